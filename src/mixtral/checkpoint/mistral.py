"""Mistral's own release formats: ``params.json`` plus ``consolidated.*`` weights.

Two layouts exist. Both store q/k rows for interleaved-pair rotary embeddings (pairs (x0, x1), (x2, x3),
... rotated together, as mistral-inference and llama.cpp compute it); our model rotates halves
(x_i with x_{i + hd/2}), so ``interleaved_to_half`` reorders those rows once, at load time.

December-2023 Mixtral release (``params.json`` with HF-style names, ``consolidated.NN.pt``):

Internal name (see ``mixtral.model``)         raw key
model.embed_tokens.weight / model.norm.w.    tok_embeddings.weight / norm.weight
lm_head.weight                               output.weight
model.layers.N.input_layernorm.weight        layers.N.attention_norm.weight
model.layers.N.post_attention_layernorm.w.   layers.N.ffn_norm.weight
model.layers.N.self_attn.qkv_proj.weight     cat(perm(attention.wq), perm(attention.wk), attention.wv)
model.layers.N.self_attn.o_proj.weight       layers.N.attention.wo.weight
model.layers.N.mlp.gate.weight               layers.N.block_sparse_moe.gate.weight
model.layers.N.mlp.experts.gate_up_proj      block_sparse_moe.w1 / w3, each (E * I, H): split per expert, cat
model.layers.N.mlp.experts.down_proj         block_sparse_moe.w2 (E * I, H): split per expert, transposed

mistral-inference layout (``params.json`` with dim, n_layers, ...; ``consolidated.safetensors``):
the same attention and norm keys; ``layers.N.feed_forward.gate.weight`` and
``layers.N.feed_forward.experts.E.w1/w2/w3.weight`` (ordinary Linear weights), or dense
``layers.N.feed_forward.w1/w2/w3.weight`` (loaded as one expert, top-1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import MixtralConfig
from .loading import CheckpointError, Rule, SafetensorsSource, TensorSource, dense_as_one_expert, read_json


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k projection rows from interleaved-pair rotary order to rotate-half order, per head."""
    rows, *rest = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``interleaved_to_half`` (what llama.cpp's converter calls ``permute``)."""
    rows, *rest = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


class TorchFilesSource(TensorSource):
    """Tensors from one or more ``torch.save`` files (memory-mapped), each key in exactly one file."""

    def __init__(self, files: list[Path]) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self._file_of: dict[str, Path] = {}
        for f in files:
            try:
                state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{f}: not a readable PyTorch checkpoint ({e})") from e
            if not isinstance(state, dict):
                raise CheckpointError(f"{f}: expected a dict of tensors, found {type(state).__name__}")
            for k, v in state.items():
                if not isinstance(v, torch.Tensor):
                    raise CheckpointError(f"{f}: entry {k!r} is a {type(v).__name__}, not a tensor")
                if k in self._file_of:
                    raise CheckpointError(f"{f}: tensor {k!r} also appears in {self._file_of[k]}")
                self._tensors[k], self._file_of[k] = v, f

    def keys(self):
        return self._tensors.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:  # memory-mapped: metadata only, no data read
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def where(self, key: str) -> str:
        return str(self._file_of.get(key, "?"))


# -- params.json ---------------------------------------------------------------------------------

def _sliding_window(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    return int(value)


def _moe(params: dict[str, Any], path: Path) -> tuple[Any, Any]:
    """(experts, top-k) from mistral-inference's ``moe`` section; none (or null) is a dense model.
    mistral-inference's ``MoeArgs`` has no default for either field, and guessing top-1 for a
    top-2 model would run it wrongly without a word, so a section lacking one is an error."""
    moe = params.get("moe")
    if moe is None:
        return 1, 1
    if not isinstance(moe, dict):
        raise CheckpointError(f"{path}: 'moe' must be an object with num_experts and num_experts_per_tok, "
                              f"found {moe!r}")
    for field in ("num_experts", "num_experts_per_tok"):
        if field not in moe:
            raise CheckpointError(f"{path}: moe.{field} is missing (mistral-inference requires both "
                                  "moe.num_experts and moe.num_experts_per_tok)")
    return moe["num_experts"], moe["num_experts_per_tok"]


def _rope_theta(params: dict[str, Any]) -> float:
    """Absent or null means 1e6, as in mistral-inference (``rope_theta or 1e6``). A 0 is not
    read as "absent" here: MixtralConfig rejects it, as any theta <= 0."""
    value = params.get("rope_theta")
    return 1e6 if value is None else float(value)


def config_from_params(params: dict[str, Any], path: Path) -> MixtralConfig:
    """Either ``params.json`` layout -> MixtralConfig; a dense mistral-inference model is 1 expert, top-1."""
    try:
        if "dim" in params:  # mistral-inference
            experts, top_k = _moe(params, path)
            kw = dict(
                hidden_size=params["dim"], num_hidden_layers=params["n_layers"],
                intermediate_size=params["hidden_dim"], num_attention_heads=params["n_heads"],
                num_key_value_heads=params.get("n_kv_heads", params["n_heads"]),
                rms_norm_eps=float(params.get("norm_eps", 1e-5)), vocab_size=params["vocab_size"],
                rope_theta=_rope_theta(params), num_local_experts=experts, num_experts_per_tok=top_k,
                sliding_window=_sliding_window(params.get("sliding_window")),
                max_position_embeddings=int(params.get("max_seq_len", 32768)),
            )
            head_dim = params.get("head_dim")
            if head_dim and head_dim != kw["hidden_size"] // kw["num_attention_heads"]:
                kw["head_dim"] = int(head_dim)
        elif "hidden_size" in params:  # the December-2023 Mixtral release
            kw = {k: params[k] for k in (
                "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                "num_local_experts", "num_key_value_heads", "vocab_size")}
            kw.update(
                rms_norm_eps=float(params.get("rms_norm_eps", 1e-5)),
                rope_theta=_rope_theta(params),
                num_experts_per_tok=int(params.get("num_experts_per_tok", 2)),
                sliding_window=_sliding_window(params.get("sliding_window")),
                max_position_embeddings=int(params.get("max_position_embeddings", 4096 * 8)),
            )
        else:
            raise CheckpointError(f"{path}: neither the mistral-inference layout (dim, n_layers, ...) nor the "
                                  "HF-style layout (hidden_size, ...) of params.json")
        return MixtralConfig(**kw)
    except CheckpointError:  # already names the file (and is a ValueError: keep it from the clause below)
        raise
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


# -- tensors -------------------------------------------------------------------------------------

def _source(directory: Path) -> TensorSource:
    safetensors = sorted(directory.glob("consolidated*.safetensors"))
    if safetensors:
        return SafetensorsSource(safetensors)
    files = sorted(directory.glob("consolidated.*.pt")) + sorted(directory.glob("consolidated.*.pth"))
    if files:
        return TorchFilesSource(files)
    raise CheckpointError(f"{directory}: no consolidated.safetensors or consolidated.*.pt(h) weights found")


def _key(keys: set[str], name: str) -> str:
    return name + ".weight" if name + ".weight" in keys else name


def mistral_rules(config: MixtralConfig, keys: set[str]) -> dict[str, Rule]:
    nh, nkv, E, I, H = (config.num_attention_heads, config.num_key_value_heads, config.num_local_experts,
                        config.intermediate_size, config.hidden_size)
    q, kv = (nh * config.dim_per_head, H), (nkv * config.dim_per_head, H)
    rules = {
        "model.embed_tokens.weight": Rule(("tok_embeddings.weight",)),
        "model.norm.weight": Rule(("norm.weight",)),
        "lm_head.weight": Rule(("output.weight",)),
    }
    for i in range(config.num_hidden_layers):
        r, p = f"layers.{i}.", f"model.layers.{i}."
        rules[p + "input_layernorm.weight"] = Rule((r + "attention_norm.weight",))
        rules[p + "post_attention_layernorm.weight"] = Rule((r + "ffn_norm.weight",))
        rules[p + "self_attn.qkv_proj.weight"] = Rule(
            (r + "attention.wq.weight", r + "attention.wk.weight", r + "attention.wv.weight"),
            lambda ts: torch.cat([interleaved_to_half(ts[0], nh), interleaved_to_half(ts[1], nkv), ts[2]]),
            (q, kv, kv),
        )
        rules[p + "self_attn.o_proj.weight"] = Rule((r + "attention.wo.weight",))
        moe, ff = r + "block_sparse_moe.", r + "feed_forward."
        if _key(keys, moe + "w1") in keys:  # Dec-2023: experts fused along rows, w2 transposed
            rules[p + "mlp.gate.weight"] = Rule((moe + "gate.weight",))
            rules[p + "mlp.experts.gate_up_proj"] = Rule(
                (_key(keys, moe + "w1"), _key(keys, moe + "w3")),
                lambda ts: torch.cat([ts[0].reshape(E, I, H), ts[1].reshape(E, I, H)], dim=1), ((E * I, H),) * 2)
            rules[p + "mlp.experts.down_proj"] = Rule(
                (_key(keys, moe + "w2"),), lambda ts: ts[0].reshape(E, I, H).transpose(1, 2), ((E * I, H),))
        elif ff + "experts.0.w1.weight" in keys:  # mistral-inference MoE
            rules[p + "mlp.gate.weight"] = Rule((ff + "gate.weight",))
            rules[p + "mlp.experts.gate_up_proj"] = Rule(
                tuple(f"{ff}experts.{e}.w1.weight" for e in range(E))
                + tuple(f"{ff}experts.{e}.w3.weight" for e in range(E)),
                lambda ts: torch.stack([torch.cat([a, b]) for a, b in zip(ts[:E], ts[E:])]), ((I, H),) * (2 * E))
            rules[p + "mlp.experts.down_proj"] = Rule(
                tuple(f"{ff}experts.{e}.w2.weight" for e in range(E)), torch.stack, ((H, I),) * E)
        else:  # dense mistral-inference
            rules.update(dense_as_one_expert(p, ff + "w1.weight", ff + "w3.weight", ff + "w2.weight", H, I))
    return rules


def read_mistral(directory: Path) -> tuple[MixtralConfig, TensorSource, dict[str, Rule]]:
    directory = Path(directory)
    params_path = directory / "params.json"
    if not params_path.exists():
        raise CheckpointError(f"{directory}: no params.json (not a raw Mistral release)")
    params = read_json(params_path)
    config = config_from_params(params, params_path)
    source = _source(directory)
    keys = set(source.keys())
    if "output.weight" not in keys:
        config.tie_word_embeddings = True
    if "tok_embeddings.weight" in keys:  # releases are bf16: keep that dtype when converting
        config.torch_dtype = str(source.dtype("tok_embeddings.weight")).replace("torch.", "")
    return config, source, mistral_rules(config, keys)


def sentencepiece_file(directory: Path) -> Path | None:
    """``tokenizer.model`` or the versioned ``tokenizer.model.v3`` mistral-inference ships."""
    for name in ("tokenizer.model", *sorted(p.name for p in directory.glob("tokenizer.model.v*"))):
        if (directory / name).exists():
            return directory / name
    return None
