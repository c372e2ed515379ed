"""The Hugging Face layouts: the hub's per-expert layout and transformers v5's fused experts.

Internal name (see ``mixtral.model``)            hub layout (read and written)                 v5 layout (read)
model.embed_tokens.weight                      same                                          same
model.layers.N.input_layernorm.weight          same                                          same
model.layers.N.post_attention_layernorm.weight same                                          same
model.layers.N.self_attn.qkv_proj.weight       cat(self_attn.q_proj, k_proj, v_proj)         same as hub
model.layers.N.self_attn.o_proj.weight         same                                          same
model.layers.N.mlp.gate.weight                 block_sparse_moe.gate.weight                  mlp.gate.weight
model.layers.N.mlp.experts.gate_up_proj        stack_E(cat(experts.E.w1, experts.E.w3))      mlp.experts.gate_up_proj
model.layers.N.mlp.experts.down_proj           stack_E(experts.E.w2)                         mlp.experts.down_proj
model.norm.weight / lm_head.weight / score.weight  same                                      same

Our own names (``state_dict()`` as is, which transformers' Trainer writes for a model that is not a
transformers ``PreTrainedModel``) are the v5 layout with the fused qkv_proj, and are read too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..config import MixtralConfig
from .loading import CheckpointError, Rule, SafetensorsSource, TensorSource, write_atomically


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _stack_gate_up(num_experts: int):
    def combine(ts: list[torch.Tensor]) -> torch.Tensor:
        w1, w3 = ts[:num_experts], ts[num_experts:]
        return torch.stack([torch.cat([a, b], dim=0) for a, b in zip(w1, w3)])

    return combine


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(ts)


def hf_rules(config: MixtralConfig, keys: set[str]) -> dict[str, Rule]:
    """Internal name -> Rule, in full (``model.``-prefixed) names, for whichever layout ``keys`` use."""
    rules = {
        "model.embed_tokens.weight": Rule(("model.embed_tokens.weight",)),
        "model.norm.weight": Rule(("model.norm.weight",)),
        "lm_head.weight": Rule(("lm_head.weight",)),
        "score.weight": Rule(("score.weight",)),
    }
    E, H, I, hd = config.num_local_experts, config.hidden_size, config.intermediate_size, config.dim_per_head
    q, kv = (config.num_attention_heads * hd, H), (config.num_key_value_heads * hd, H)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        if attn + "qkv_proj.weight" in keys:  # our own names: a Trainer checkpoint (state_dict() as is)
            rules[attn + "qkv_proj.weight"] = Rule((attn + "qkv_proj.weight",))
        else:
            rules[attn + "qkv_proj.weight"] = Rule(
                (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), _cat, (q, kv, kv)
            )
        for name in ("self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            rules[p + name] = Rule((p + name,))
        if p + "mlp.experts.gate_up_proj" in keys or p + "mlp.gate.weight" in keys:  # transformers v5
            for name in ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
                rules[p + name] = Rule((p + name,))
        else:  # the hub layout, one Linear per expert
            moe = p + "block_sparse_moe."
            rules[p + "mlp.gate.weight"] = Rule((moe + "gate.weight",))
            rules[p + "mlp.experts.gate_up_proj"] = Rule(
                tuple(f"{moe}experts.{e}.w1.weight" for e in range(E))
                + tuple(f"{moe}experts.{e}.w3.weight" for e in range(E)),
                _stack_gate_up(E), ((I, H),) * (2 * E),
            )
            rules[p + "mlp.experts.down_proj"] = Rule(
                tuple(f"{moe}experts.{e}.w2.weight" for e in range(E)), _stack, ((H, I),) * E
            )
    return rules


def to_hub_layout(name: str, tensor: torch.Tensor, config: MixtralConfig) -> list[tuple[str, torch.Tensor]]:
    """The inverse of ``hf_rules`` for the hub layout: one internal tensor -> checkpoint tensors."""
    m = re.fullmatch(r"(model\.layers\.\d+\.)(.*)", name)
    if not m:
        return [(name, tensor)]
    p, rest = m.groups()
    if rest == "self_attn.qkv_proj.weight":
        hd = config.dim_per_head
        q, k, v = tensor.split(
            (config.num_attention_heads * hd, config.num_key_value_heads * hd, config.num_key_value_heads * hd)
        )
        return [(p + "self_attn.q_proj.weight", q), (p + "self_attn.k_proj.weight", k),
                (p + "self_attn.v_proj.weight", v)]
    moe = p + "block_sparse_moe."
    if rest == "mlp.gate.weight":
        return [(moe + "gate.weight", tensor)]
    if rest == "mlp.experts.gate_up_proj":
        inter = tensor.shape[1] // 2
        out = []
        for e in range(tensor.shape[0]):
            out.append((f"{moe}experts.{e}.w1.weight", tensor[e, :inter]))
            out.append((f"{moe}experts.{e}.w3.weight", tensor[e, inter:]))
        return out
    if rest == "mlp.experts.down_proj":
        return [(f"{moe}experts.{e}.w2.weight", tensor[e]) for e in range(tensor.shape[0])]
    return [(name, tensor)]


class PrefixedSource(TensorSource):
    """A bare ``MixtralModel`` checkpoint has no ``model.`` prefix; present it as if it had one."""

    def __init__(self, inner: TensorSource) -> None:
        self.inner = inner
        self._map = {self._full(k): k for k in inner.keys()}

    @staticmethod
    def _full(key: str) -> str:
        return key if key.startswith(("model.", "lm_head.", "score.")) else "model." + key

    def keys(self):
        return self._map.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._map

    def get(self, key: str) -> torch.Tensor:
        return self.inner.get(self._map[key])

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(self._map[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.inner.dtype(self._map[key])

    def where(self, key: str) -> str:
        return self.inner.where(self._map.get(key, key))

    def describe(self) -> str:
        return self.inner.describe()


def read_hf(directory: Path, config: MixtralConfig | None = None) -> tuple[MixtralConfig, TensorSource]:
    config = config if config is not None else MixtralConfig.from_pretrained(directory)
    source: TensorSource = SafetensorsSource.from_directory(directory)
    if not any(k.startswith("model.") for k in source.keys()):
        source = PrefixedSource(source)
    return config, source


# -- writing -------------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, flags=re.I)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '5GB' or '500MB'")
    n, unit = float(m.group(1)), m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(n * base ** "BKMGT".index(unit[0]))


def hub_tensors(model, state_dict: dict[str, torch.Tensor] | None = None) -> list[tuple[str, torch.Tensor]]:
    """All tensors of ``model`` (or ``state_dict``, in the model's own names) in the hub layout,
    full names, tied weights written once."""
    config = model.config
    out, seen = [], set()
    prefix = "model." if type(model).__name__ == "MixtralModel" else ""
    if state_dict is None:
        items = model.named_parameters(remove_duplicate=False)
    else:
        expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        if set(state_dict) - expected:
            raise ValueError(f"save_pretrained: state_dict keys that are not parameters of the model: "
                             f"{sorted(set(state_dict) - expected)[:5]}")
        items = state_dict.items()
    for name, p in items:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        out += to_hub_layout(prefix + name, p.detach(), config)
    return out


def save_pretrained(model, directory: str | Path, max_shard_size: int | str = "5GB",
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    limit = parse_size(max_shard_size)
    tensors = hub_tensors(model, state_dict)
    bare = type(model).__name__ == "MixtralModel"
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name[len("model."):] if bare else name, t))
        size += nbytes

    def write(tmp: Path) -> None:
        config = model.config
        config.torch_dtype = str(model.dtype).replace("torch.", "")
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:  # as transformers writes it
            model.generation_config.save_pretrained(tmp)
        if len(shards) == 1:
            save_file({n: t.contiguous().clone() for n, t in shards[0]}, tmp / "model.safetensors",
                      metadata={"format": "pt"})
            return
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: t.contiguous().clone() for n, t in shard}, tmp / fname, metadata={"format": "pt"})
            for n, t in shard:
                weight_map[n] = fname
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    stale = set(directory.glob("model*.safetensors")) | set(directory.glob("model.safetensors.index.json"))
    write_atomically(directory, write)
    written = {"model.safetensors"} if len(shards) == 1 else {
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    } | {"model.safetensors.index.json"}
    for f in stale:
        if f.name not in written:  # an old shard set must not mix with the new one
            f.unlink()


def check_layout(source: TensorSource, origin: Path) -> None:
    if not any(".layers." in k for k in source.keys()):
        raise CheckpointError(f"{origin}: no transformer layers found (keys look like {list(source.keys())[:3]})")
