"""Assembling a model from a checkpoint: the layer between the formats and the model classes.

``mixtral.checkpoint`` reads any supported checkpoint into (config, tensor source, rules); here a
model class ``cls`` (any of ``mixtral.model``'s, passed in: this module does not import them) is
built on the meta device, a quantized checkpoint swaps in its quantized modules, every other
parameter is filled through the rules (``materialize``), embeddings are tied, the model is
quantized on request, and the checkpoint's ``generation_config.json`` is read.

A class's ``checkpoint_prefix`` is what its parameter names lack against the checkpoint's keys:
``"model."`` for the bare ``MixtralModel``, nothing for the classes with a head.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch

from .checkpoint import read_checkpoint, resolve_path
from .checkpoint.hf import hf_rules
from .checkpoint.loading import CheckpointError, DictSource, Rule, TensorSource, materialize, parse_dtype
from .checkpoint.upcycle import read_upcycled
from .generation import GenerationConfig
from .quant import quantize_model

# Heads that may be absent from a checkpoint and start fresh: a classifier loads from a causal-LM checkpoint.
_FRESH_HEADS = {"MixtralForSequenceClassification": "score.weight"}


def load_pretrained(
    cls: type,
    path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    quantize: str | None = None,
    config: Any = None,
    progress: bool | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The model of ``cls`` in ``path``. ``config_overrides`` are config attributes set before the
    model is built, as transformers takes them (``num_labels=3``, ``output_router_logits=True``):
    a name that is not a config field is an error, not a silently ignored typo."""
    path = resolve_path(path)
    ckpt_config, source, rules = read_checkpoint(path, config)
    config = _overridden(config or ckpt_config, config_overrides)
    if dtype == "auto":
        dtype = config.torch_dtype or torch.float32
    model = build_model(cls, config, source, rules, origin=str(path), dtype=dtype, device=device,
                        attn_implementation=attn_implementation, quantize=quantize, progress=progress)
    if path.is_dir() and (path / "generation_config.json").exists() and hasattr(model, "generation_config"):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def _overridden(config: Any, overrides: dict[str, Any] | None) -> Any:
    """A copy of ``config`` with ``overrides`` set; the checkpoint's own config object stays as read."""
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(config)} | {"id2label"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"from_pretrained() got arguments that are neither its own nor config fields: "
                        f"{', '.join(unknown)}")
    config = copy.deepcopy(config)
    config.update(overrides)
    return config


def from_state_dict(
    cls: type,
    state_dict: dict[str, torch.Tensor],
    config: Any,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A model of ``cls`` holding a transformers Mixtral state dict's tensors (hub per-expert or v5
    fused names), loaded as ``from_pretrained`` loads files: every tensor checked and renamed
    through ``hf.hf_rules``. E.g. ``from_state_dict(MixtralForCausalLM, hf_model.state_dict(),
    config)`` gives our model with transformers' very weights."""
    state = dict(state_dict)
    prefix = getattr(cls, "checkpoint_prefix", "")
    if prefix:  # a bare transformers model's tensors lack the prefix its checkpoints carry
        state = {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}
    return build_model(cls, config, DictSource(state, "state dict"), hf_rules(config, set(state)),
                       origin="state dict", dtype=dtype, device=device, attn_implementation=attn_implementation)


def upcycle(
    cls: type,
    path: str | Path,
    experts: int = 8,
    top_k: int = 2,
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    progress: bool | None = None,
) -> torch.nn.Module:
    """A ``cls`` model (on the CPU) upcycled from the dense checkpoint at ``path``, an HF directory
    or a GGUF file: ``experts`` copies of each dense MLP, top-``top_k`` routing (see
    ``mixtral.checkpoint.upcycle``)."""
    config, source, rules = read_upcycled(Path(path), experts, top_k, noise, seed)
    return build_model(cls, config, source, rules, origin=str(path), dtype=dtype, device="cpu", progress=progress)


def build_model(cls: type, config: Any, source: TensorSource, rules: dict[str, Rule], *, origin: str,
                dtype: torch.dtype | str, device: torch.device | str, attn_implementation: str = "sdpa",
                quantize: str | None = None, progress: bool | None = None) -> torch.nn.Module:
    """Construct ``cls`` on meta and fill it from ``source`` through ``rules`` (see ``materialize``)."""
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = cls(config, attn_implementation=attn_implementation)
    prefix = getattr(cls, "checkpoint_prefix", "")
    consumed: set[str] = set()
    prepare = getattr(model, "prepare_for_checkpoint", None)
    if prepare is not None:  # quantized checkpoints swap in quantized modules, loading those tensors
        consumed = set(prepare(rules, source, device) or ())
    if prefix:
        rules = {k[len(prefix):]: v for k, v in rules.items() if k.startswith(prefix)}
    head = _FRESH_HEADS.get(cls.__name__)
    fresh = materialize(
        model, rules, source, dtype=dtype, device=device,
        optional=[head] if head else [],
        # A classifier loads from a causal-LM checkpoint (and vice versa) without its head; a tied
        # checkpoint may still carry lm_head.weight.
        ignore=lambda key: key in consumed or key in ("lm_head.weight", "score.weight")
        or key.endswith("rotary_emb.inv_freq"),
        progress=progress,
    )
    if fresh:
        warnings.warn(f"{origin}: {', '.join(fresh)} not in the checkpoint; initialized randomly", stacklevel=4)
    base = model.get_decoder()  # the MixtralModel inside (a bare one is its own)
    base.reset_rotary(device)
    if config.tie_word_embeddings and isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        model.lm_head.weight = base.embed_tokens.weight
    _quantize(model, quantize, origin)
    model.eval()
    return model


def _quantize(model: torch.nn.Module, quantize: str | None, origin: str) -> None:
    """``quantize`` a float model; a model loaded quantized may only be asked for its own mode."""
    held = getattr(model, "quantization_config", None)
    if quantize and held is None:
        quantize_model(model, quantize)
    elif quantize and f"int{held['bits']}" != quantize:  # the same mode is a no-op; another can't be had
        raise CheckpointError(f"{origin}: quantize={quantize!r}, but the checkpoint is already int{held['bits']}; "
                              "quantize from the float checkpoint")
