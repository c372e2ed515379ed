"""Checkpoint formats. Each format is a reader (config + tensor source) and a renaming table.

``load_pretrained`` looks at what ``path`` is and dispatches:

* a ``.gguf`` file                              -> ``mixtral.checkpoint.gguf``
* a directory with ``params.json`` (raw Mistral) -> ``mixtral.checkpoint.mistral``
* a directory with ``config.json`` (HF)          -> ``mixtral.checkpoint.hf``
* anything else that looks like ``org/name``    -> fetched from the hub with huggingface_hub
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch

from .loading import CheckpointError, materialize, parse_dtype

__all__ = ["CheckpointError", "from_state_dict", "load_pretrained", "resolve_path", "read_checkpoint"]


def resolve_path(path: str | Path) -> Path:
    """A local path as is; otherwise a hub repo id, downloaded when huggingface_hub and the network allow."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as e:
            raise CheckpointError(f"{text}: not a local path, and huggingface_hub is not installed") from e
        try:
            return Path(snapshot_download(
                text, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
            ))
        except Exception as e:
            raise CheckpointError(f"{text}: not a local path, and fetching it from the hub failed: {e}") from e
    raise CheckpointError(f"{text}: no such file or directory")


def read_checkpoint(path: Path, config: Any = None):
    """(config, tensor source, rules) for any supported checkpoint at ``path``. With ``config``, a
    directory of safetensors without config.json is read too: transformers' Trainer writes its
    checkpoints of a model that is not a transformers ``PreTrainedModel`` (ours) that way."""
    from ..config import MixtralConfig

    if (config is not None and path.is_dir() and not (path / "config.json").exists()
            and not (path / "params.json").exists() and any(path.glob("model*.safetensors"))):
        from .hf import hf_rules, read_hf

        _, source = read_hf(path, config)
        return config, source, hf_rules(config, set(source.keys()))

    if path.is_file() and path.suffix == ".gguf":
        from .gguf import read_gguf

        return read_gguf(path)
    if path.is_dir() and (path / "params.json").exists() and not (path / "config.json").exists():
        from .mistral import read_mistral

        return read_mistral(path)
    if path.is_dir() and (path / "config.json").exists():
        from .hf import hf_rules, read_hf

        config, source = read_hf(path)
        if isinstance(config, MixtralConfig) and _is_quantized(path):
            from ..quant.checkpoint import quantized_rules

            return config, source, quantized_rules(config, set(source.keys()), path)
        return config, source, hf_rules(config, set(source.keys()))
    if path.is_dir() and any(path.glob("model*.safetensors")):
        raise CheckpointError(f"{path}: weights but no config.json (a transformers Trainer checkpoint of our "
                              "model?): pass config=model.config, or save with model.save_pretrained")
    if path.is_dir():
        raise CheckpointError(f"{path}: neither config.json (Hugging Face) nor params.json (Mistral) found")
    raise CheckpointError(f"{path}: not a checkpoint directory or a .gguf file")


def _is_quantized(path: Path) -> bool:
    import json

    try:
        return "quantization_config" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_pretrained(
    cls,
    path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    quantize: str | None = None,
    config: Any = None,
    progress: bool | None = None,
    config_overrides: dict[str, Any] | None = None,
):
    """The model of ``cls`` in ``path``. ``config_overrides`` are config attributes set before the
    model is built, as transformers takes them (``num_labels=3``, ``output_router_logits=True``):
    a name that is not a config field is an error, not a silently ignored typo."""
    path = resolve_path(path)
    ckpt_config, source, rules = read_checkpoint(path, config)
    config = config or ckpt_config
    if config_overrides:
        import dataclasses

        fields = {f.name for f in dataclasses.fields(config)} | {"id2label"}
        unknown = sorted(set(config_overrides) - fields)
        if unknown:
            raise TypeError(f"from_pretrained() got arguments that are neither its own nor config fields: "
                            f"{', '.join(unknown)}")
        config = copy.deepcopy(config)
        config.update(config_overrides)
    if dtype == "auto":
        dtype = config.torch_dtype or torch.float32
    model = build_model(cls, config, source, rules, origin=str(path), dtype=dtype, device=device,
                        attn_implementation=attn_implementation, quantize=quantize, progress=progress)
    if path.is_dir() and (path / "generation_config.json").exists() and hasattr(model, "generation_config"):
        from ..generation import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def from_state_dict(
    cls,
    state_dict: dict[str, torch.Tensor],
    config: Any,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
):
    """A model of ``cls`` holding a transformers Mixtral state dict's tensors (hub per-expert or v5
    fused names), loaded as ``from_pretrained`` loads files: every tensor checked and renamed
    through ``hf.hf_rules``. E.g. ``from_state_dict(MixtralForCausalLM, hf_model.state_dict(),
    config)`` gives our model with transformers' very weights."""
    from ..model import MixtralModel
    from .hf import hf_rules
    from .loading import DictSource

    state = dict(state_dict)
    if cls is MixtralModel:  # a bare transformers model's tensors carry no "model." prefix
        state = {k if k.startswith("model.") else "model." + k: v for k, v in state.items()}
    return build_model(cls, config, DictSource(state, "state dict"), hf_rules(config, set(state)),
                       origin="state dict", dtype=dtype, device=device, attn_implementation=attn_implementation)


def build_model(cls, config, source, rules, *, origin: str, dtype, device, attn_implementation: str = "sdpa",
                quantize: str | None = None, progress: bool | None = None):
    """Construct ``cls`` on meta and fill it from ``source`` through ``rules`` (see ``materialize``)."""
    from ..model import MixtralModel

    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = cls(config, attn_implementation=attn_implementation)
    bare = cls is MixtralModel
    consumed: set[str] = set()
    prepare = getattr(model, "prepare_for_checkpoint", None)
    if prepare is not None:  # quantized checkpoints swap in quantized modules, loading those tensors
        consumed = set(prepare(rules, source, device) or ())
    if bare:
        rules = {k[len("model."):]: v for k, v in rules.items() if k.startswith("model.")}
    head = {"MixtralForSequenceClassification": "score.weight"}.get(cls.__name__)
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
    base = model if bare else model.model
    base.reset_rotary(device)
    if config.tie_word_embeddings and not bare and isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        model.lm_head.weight = base.embed_tokens.weight
    held = getattr(model, "quantization_config", None)
    if quantize and held is None:
        from ..quant import quantize_model

        quantize_model(model, quantize)
    elif quantize and f"int{held['bits']}" != quantize:  # the same mode is a no-op; another can't be had
        raise CheckpointError(f"{origin}: quantize={quantize!r}, but the checkpoint is already int{held['bits']}; "
                              "quantize from the float checkpoint")
    model.eval()
    return model
