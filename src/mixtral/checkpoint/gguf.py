"""llama.cpp's GGUF files, read and written (``llama`` architecture: Llama, Mistral and Mixtral).

Internal name (see ``mixtral.model``)         GGUF tensor (numpy shape = torch shape; GGUF lists dims reversed)
model.embed_tokens.weight                    token_embd.weight
model.norm.weight / lm_head.weight           output_norm.weight / output.weight (absent: tied embeddings)
model.layers.N.input_layernorm.weight        blk.N.attn_norm.weight
model.layers.N.post_attention_layernorm.w.   blk.N.ffn_norm.weight
model.layers.N.self_attn.qkv_proj.weight     cat(unpermute(attn_q), unpermute(attn_k), attn_v)
model.layers.N.self_attn.o_proj.weight       blk.N.attn_output.weight
model.layers.N.mlp.gate.weight               blk.N.ffn_gate_inp.weight (E, H); a dense file has none: zeros (1, H)
model.layers.N.mlp.experts.gate_up_proj      cat(ffn_gate_exps, ffn_up_exps) on dim 1 (E, 2I, H), or stacked
                                             per-expert ffn_gate.E / ffn_up.E (older files), or dense ffn_gate/up
model.layers.N.mlp.experts.down_proj         ffn_down_exps (E, H, I), per-expert ffn_down.E, or dense ffn_down

llama.cpp stores q/k rows in the interleaved-pair rotary order (as Meta's and Mistral's releases do);
``unpermute`` is the same row shuffle the raw Mistral reader applies. A dense file loads as a
one-expert, top-1 Mixtral: softmax over one logit is 1, so the layer computes the dense MLP exactly.

Tensors are dequantized with ``gguf.quants.dequantize`` one at a time, as ``materialize`` asks.
The vocabulary is handed over as metadata (``gguf_metadata``); ``mixtral.Tokenizer.from_gguf`` builds
the tokenizer from it. Writing (``write_gguf``) takes a model and a tokenizer as they are.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import MixtralConfig
from .loading import CheckpointError, Rule, TensorSource, dense_as_one_expert
from .mistral import half_to_interleaved, interleaved_to_half

ARCH = "llama"

READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
WRITE_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")

# llama.cpp token types (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# -- reading -------------------------------------------------------------------------------------

def _open(path: Path):
    import gguf

    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (the first bytes are not 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises plain ValueError/IndexError on corrupt or short files
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                                  f"the file has {size}")
    return reader


def _metadata(reader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


class GGUFSource(TensorSource):
    """GGUF tensors by name, dequantized to float32 torch tensors on request."""

    def __init__(self, path: Path, reader) -> None:
        self.path = path
        self._tensors = {t.name: t for t in reader.tensors}
        for t in reader.tensors:
            if t.tensor_type.name not in READ_TYPES:
                raise CheckpointError(
                    f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, which is not supported "
                    f"(supported: {', '.join(READ_TYPES)})"
                )

    def keys(self):
        return self._tensors.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def type_of(self, key: str) -> str:
        return self._tensors[key].tensor_type.name

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[key].shape.tolist()))

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32  # every READ_TYPES tensor dequantizes to float32

    def get(self, key: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self._tensors[key]
        try:
            array = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{self.path}: could not dequantize {key} ({t.tensor_type.name}): {e}") from e
        # F32 tensors come back as read-only views of the memory map: copy, the model owns its weights.
        return torch.from_numpy(np.array(array, dtype=np.float32, copy=True)).reshape(self.shape(key))

    def where(self, key: str) -> str:
        return str(self.path)


def config_from_gguf(meta: dict[str, Any], source: GGUFSource, path: Path) -> MixtralConfig:
    """GGUF ``llama.*`` metadata -> MixtralConfig (a dense file becomes 1 expert, top-1)."""
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported; only 'llama' "
                              "(which llama.cpp uses for Llama, Mistral and Mixtral)")
    get = _getter(meta, arch, path)
    _check_rope_scaling(get, arch, path)
    hidden, heads = get("embedding_length", required=True), get("attention.head_count", required=True)
    if heads <= 0:
        raise CheckpointError(f"{path}: metadata {arch}.attention.head_count is {heads}, expected a positive number")
    head_dim = get("attention.key_length") or hidden // heads
    rot = get("rope.dimension_count")
    if rot is not None and rot != head_dim:
        raise CheckpointError(f"{path}: partial rotary embeddings ({rot} of {head_dim} dims) are not supported")
    experts = get("expert_count") or 1
    # llama.cpp asserts expert_used_count > 0 for a mixture; defaulting it would silently run top-1.
    top_k = get("expert_used_count", required=True) if experts > 1 else 1
    if "token_embd.weight" not in source:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    rows = source.shape("token_embd.weight")[0]
    vocab = get("vocab_size") or rows  # a vocab_size that disagrees with the rows fails the shape check
    _check_token_count(meta, rows, path)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    try:
        return MixtralConfig(
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            intermediate_size=int(get("expert_feed_forward_length") or get("feed_forward_length", required=True)),
            num_hidden_layers=int(get("block_count", required=True)),
            num_attention_heads=int(heads),
            num_key_value_heads=int(get("attention.head_count_kv") or heads),
            head_dim=int(head_dim) if head_dim != hidden // heads else None,
            max_position_embeddings=int(get("context_length", 4096)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5, kind=float)),
            rope_theta=float(get("rope.freq_base", 10000.0, kind=float)),
            num_local_experts=int(experts),
            num_experts_per_tok=int(top_k),
            tie_word_embeddings="output.weight" not in source,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=int(eos) if eos is not None else None,
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
    except CheckpointError:  # already says what is wrong (and is a ValueError: keep it from the clause below)
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata does not describe a valid model ({e})") from e


def _getter(meta: dict[str, Any], arch: str, path: Path):
    """``get(key, default, required, kind)``: the ``{arch}.{key}`` metadata value, checked to be one
    number (or string) of ``kind``."""
    def get(key: str, default: Any = None, required: bool = False, kind: type = int) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            if required:
                raise CheckpointError(f"{path}: metadata {arch}.{key} is missing")
            return None
        if isinstance(value, list):
            raise CheckpointError(f"{path}: per-layer values for {arch}.{key} are not supported")
        ok = {int: (int,), float: (int, float), str: (str,)}[kind]
        if not isinstance(value, ok) or (kind is not str and isinstance(value, bool)):
            raise CheckpointError(f"{path}: metadata {arch}.{key} is {value!r} ({type(value).__name__}), "
                                  f"expected {'a string' if kind is str else 'a number'}")
        return value

    return get


def _check_rope_scaling(get, arch: str, path: Path) -> None:
    """Refuse rope scaling, which the model does not implement. llama.cpp reads a scaling factor
    (rope.scaling.factor, or the older rope.scale_linear) as linear scaling when rope.scaling.type
    is absent, and ignores it only for type "none"."""
    scaling = get("rope.scaling.type", kind=str)
    if scaling not in (None, "none"):
        raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported")
    factor = get("rope.scaling.factor", kind=float)
    if factor is None:
        factor = get("rope.scale_linear", kind=float)
    if scaling is None and factor not in (None, 0.0, 1.0):
        raise CheckpointError(f"{path}: rope scaling factor {factor} is not supported (without "
                              f"{arch}.rope.scaling.type, llama.cpp applies it as linear scaling)")


def _check_token_count(meta: dict[str, Any], rows: int, path: Path) -> None:
    """More tokens than embedding rows would give ids the model cannot look up (llama.cpp refuses
    such a file too); fewer is normal: the extra rows are padding no token maps to."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) > rows:
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens has {len(tokens)} tokens but token_embd.weight "
                              f"only {rows} rows: ids past the last row would index out of range")


def _unpermute(n_heads: int):
    return lambda ts: interleaved_to_half(ts[0], n_heads)


def gguf_rules(config: MixtralConfig, keys: set[str]) -> dict[str, Rule]:
    """Internal name -> Rule over GGUF tensor names, for fused, per-expert or dense MLP tensors."""
    nh, nkv, E, H = config.num_attention_heads, config.num_key_value_heads, config.num_local_experts, config.hidden_size
    I, hd = config.intermediate_size, config.dim_per_head
    rules = {
        "model.embed_tokens.weight": Rule(("token_embd.weight",)),
        "model.norm.weight": Rule(("output_norm.weight",)),
        "lm_head.weight": Rule(("output.weight",)),
    }
    for i in range(config.num_hidden_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        rules[p + "input_layernorm.weight"] = Rule((b + "attn_norm.weight",))
        rules[p + "post_attention_layernorm.weight"] = Rule((b + "ffn_norm.weight",))
        rules[p + "self_attn.qkv_proj.weight"] = Rule(
            (b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"),
            lambda ts, nh=nh, nkv=nkv: torch.cat(
                [interleaved_to_half(ts[0], nh), interleaved_to_half(ts[1], nkv), ts[2]]),
            ((nh * hd, H), (nkv * hd, H), (nkv * hd, H)),
        )
        rules[p + "self_attn.o_proj.weight"] = Rule((b + "attn_output.weight",))
        if b + "ffn_gate_exps.weight" in keys:
            rules[p + "mlp.experts.gate_up_proj"] = Rule(
                (b + "ffn_gate_exps.weight", b + "ffn_up_exps.weight"), lambda ts: torch.cat(ts, dim=1),
                ((E, I, H),) * 2)
            rules[p + "mlp.experts.down_proj"] = Rule((b + "ffn_down_exps.weight",))
        elif b + "ffn_gate.0.weight" in keys:
            rules[p + "mlp.experts.gate_up_proj"] = Rule(
                tuple(f"{b}ffn_gate.{e}.weight" for e in range(E)) + tuple(f"{b}ffn_up.{e}.weight" for e in range(E)),
                lambda ts, E=E: torch.stack([torch.cat([g, u]) for g, u in zip(ts[:E], ts[E:])]),
                ((I, H),) * (2 * E),
            )
            rules[p + "mlp.experts.down_proj"] = Rule(
                tuple(f"{b}ffn_down.{e}.weight" for e in range(E)), torch.stack, ((H, I),) * E)
        else:  # dense: one expert
            rules.update(dense_as_one_expert(p, b + "ffn_gate.weight", b + "ffn_up.weight",
                                             b + "ffn_down.weight", H, I))
        if E > 1 or b + "ffn_gate_inp.weight" in keys:
            rules[p + "mlp.gate.weight"] = Rule((b + "ffn_gate_inp.weight",))
        else:  # a single expert needs no router: its softmax weight is 1 whatever the logit
            rules[p + "mlp.gate.weight"] = Rule((), lambda ts, H=H: torch.zeros(1, H))
    return rules


def read_gguf(path: Path) -> tuple[MixtralConfig, GGUFSource, dict[str, Rule]]:
    path = Path(path)
    reader = _open(path)
    source = GGUFSource(path, reader)
    config = config_from_gguf(_metadata(reader), source, path)
    return config, source, gguf_rules(config, set(source.keys()))


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata key/values of a GGUF file (the tokenizer's arrays included), its token count
    checked against the embedding rows as ``read_gguf`` checks it."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is not None:
        _check_token_count(meta, int(embd.shape[-1]), path)  # GGUF lists dims reversed: rows last
    return meta


# -- writing -------------------------------------------------------------------------------------

def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """The inverse of ``gguf_rules`` (fused ``_exps`` form): GGUF name -> float tensor (torch shape)."""
    config = model.config
    state = dict(model.state_dict())
    nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.dim_per_head
    out = [("token_embd.weight", state["model.embed_tokens.weight"]),
           ("output_norm.weight", state["model.norm.weight"])]
    if not config.tie_word_embeddings:
        out.append(("output.weight", state["lm_head.weight"]))
    for i in range(config.num_hidden_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        q, k, v = state[p + "self_attn.qkv_proj.weight"].split((nh * hd, nkv * hd, nkv * hd))
        gate_up = state[p + "mlp.experts.gate_up_proj"]
        inter = gate_up.shape[1] // 2
        out += [
            (b + "attn_norm.weight", state[p + "input_layernorm.weight"]),
            (b + "attn_q.weight", half_to_interleaved(q, nh)),
            (b + "attn_k.weight", half_to_interleaved(k, nkv)),
            (b + "attn_v.weight", v),
            (b + "attn_output.weight", state[p + "self_attn.o_proj.weight"]),
            (b + "ffn_norm.weight", state[p + "post_attention_layernorm.weight"]),
            (b + "ffn_gate_inp.weight", state[p + "mlp.gate.weight"]),
            (b + "ffn_gate_exps.weight", gate_up[:, :inter]),
            (b + "ffn_up_exps.weight", gate_up[:, inter:]),
            (b + "ffn_down_exps.weight", state[p + "mlp.experts.down_proj"]),
        ]
    return out


def _tensor_type(name: str, shape: tuple[int, ...], wanted: str) -> str:
    """Norms and the router stay F32 (the router is never quantized); matrices whose rows do not
    split into quantization blocks fall back to F16, as llama.cpp's converter does."""
    import gguf

    if len(shape) == 1 or "ffn_gate_inp" in name or wanted == "F32":
        return "F32"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted]][0]
    return wanted if shape[-1] % block == 0 else "F16"


def _add_tokenizer_metadata(writer, tok, vocab_size: int) -> None:
    """Vocabulary, special tokens and chat template, in the form llama.cpp reads.

    llama.cpp needs one token per embedding row: a vocabulary smaller than the model's is padded
    with unused ``[PADn]`` tokens, as llama.cpp's own converter does.
    """
    if tok.is_sentencepiece:
        pieces, normalizer = _read_sentencepiece_proto(tok.backend.serialized_model_proto())
        tokens, scores, types = (list(x) for x in zip(*pieces))
        pads = [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
        tokens, scores, types = tokens + pads, scores + [-1e9] * len(pads), types + [UNUSED] * len(pads)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(normalizer.get("add_dummy_prefix", True))
        writer.add_remove_extra_whitespaces(normalizer.get("remove_extra_whitespaces", True))
    else:
        spec = json.loads(tok.backend.to_str())
        model = spec["model"]
        if model.get("type") != "BPE":
            raise CheckpointError(f"tokenizer model {model.get('type')!r} cannot be written to GGUF (only BPE)")
        vocab = tok.backend.get_vocab(with_added_tokens=True)
        tokens = [None] * max(max(vocab.values()) + 1, vocab_size)
        for t, i in vocab.items():
            tokens[i] = t
        tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
        added = {a["id"]: a for a in spec.get("added_tokens", [])}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        types = [(CONTROL if added[i]["special"] else USER_DEFINED) if i in added else NORMAL
                 for i in range(len(tokens))]
        present = set(vocab.values())
        types = [ty if i in present else UNUSED for i, ty in enumerate(types)]
        if model.get("byte_fallback"):
            # SentencePiece-style BPE: llama.cpp merges by score, so rank pieces by the merge that makes them.
            rank = {a + b: r for r, (a, b) in enumerate(m.split(" ", 1) for m in merges)}
            types = [BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else ty for t, ty in zip(tokens, types)]
            unk = model.get("unk_token")
            types = [UNKNOWN if t == unk else ty for t, ty in zip(tokens, types)]
            writer.add_tokenizer_model("llama")
            writer.add_token_list(tokens)
            writer.add_token_scores([-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else -1e9)
                                     for t in tokens])
            writer.add_token_types(types)
            writer.add_add_space_prefix(_has_prepend(spec))
        else:
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_pre_name(spec.get("pre_tokenizer")))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges)
    for key, text in (("bos", tok.bos_token), ("eos", tok.eos_token), ("unk", tok.unk_token),
                      ("pad", tok.pad_token)):
        i = tok.convert_tokens_to_ids(text) if text else None
        if i is not None:
            getattr(writer, f"add_{key}_token_id")(i)
    writer.add_add_bos_token(bool(tok.add_bos_token))
    writer.add_add_eos_token(bool(tok.add_eos_token))
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _read_sentencepiece_proto(data: bytes) -> tuple[list[tuple[str, float, int]], dict[str, bool]]:
    """(piece, score, type) per token and the normalizer flags of a SentencePiece ``ModelProto``.

    The Python API cannot tell user-defined pieces from normal ones, and the protobuf package is not
    a dependency, so this reads the few fields needed straight from the wire format
    (ModelProto: 1 = pieces {1 piece, 2 score, 3 type}, 3 = normalizer_spec {3 add_dummy_prefix,
    4 remove_extra_whitespaces}). SentencePiece's piece types use llama.cpp's numbering.
    """
    import struct

    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = _varint(buf, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _varint(buf, i)
            elif wire == 1:
                value, i = buf[i:i + 8], i + 8
            elif wire == 2:
                n, i = _varint(buf, i)
                value, i = buf[i:i + n], i + n
            elif wire == 5:
                value, i = buf[i:i + 4], i + 4
            else:
                raise CheckpointError(f"tokenizer.model: unsupported protobuf wire type {wire}")
            yield number, value

    pieces, normalizer = [], {}
    for number, value in fields(data):
        if number == 1:
            piece = {n: v for n, v in fields(value)}
            pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece.get(2, b"\0\0\0\0"))[0],
                           int(piece.get(3, NORMAL))))
        elif number == 3:
            spec = dict(fields(value))
            normalizer = {"add_dummy_prefix": bool(spec.get(3, 1)), "remove_extra_whitespaces": bool(spec.get(4, 1))}
    return pieces, normalizer


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _has_prepend(spec: dict) -> bool:
    return "Prepend" in json.dumps(spec.get("normalizer")) or "Metaspace" in json.dumps(spec.get("pre_tokenizer"))


def _pre_name(pre: dict | None) -> str:
    text = json.dumps(pre)
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    if "\\\\p{N}{1,3}" in text or "\\p{N}{1,3}" in text:
        return "llama-bpe"
    return "gpt2"


def write_gguf(model, tokenizer, path: str | os.PathLike, type: str = "F16", name: str | None = None) -> None:
    """Write ``model`` (and ``tokenizer`` when given) as a llama.cpp GGUF file, atomically."""
    import gguf
    from gguf.quants import quantize
    from tqdm.auto import tqdm

    if type not in WRITE_TYPES:
        raise ValueError(f"GGUF type {type!r} is not supported for writing; use one of {', '.join(WRITE_TYPES)}")
    config = model.config
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    writer = gguf.GGUFWriter(tmp, ARCH)
    writer.add_name(name or path.stem)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.dim_per_head)
    if config.dim_per_head != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(config.dim_per_head)
        writer.add_value_length(config.dim_per_head)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if config.num_local_experts > 1:
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    file_type = {"F32": "ALL_F32", "F16": "MOSTLY_F16"}.get(type, f"MOSTLY_{type}")
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        _add_tokenizer_metadata(writer, tokenizer, config.vocab_size)
    tensors = gguf_tensors(model)
    try:
        for tname, t in tqdm(tensors, desc=f"quantizing to {type}", disable=len(tensors) < 100 or None):
            array = t.detach().to(torch.float32).cpu().numpy()
            ttype = _tensor_type(tname, array.shape, type)
            if ttype == "F32":
                writer.add_tensor(tname, np.ascontiguousarray(array))
            elif ttype == "F16":
                writer.add_tensor(tname, array.astype(np.float16))
            else:
                qtype = gguf.GGMLQuantizationType[ttype]
                writer.add_tensor(tname, quantize(array, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=len(tensors) >= 100)
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
