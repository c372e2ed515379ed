"""Checkpoint formats: each reads a checkpoint into (config, tensor source, renaming rules) and
writes one back; none builds a model (that is ``mixtral.loader``'s work).

``read_checkpoint`` looks at what ``path`` is and dispatches:

* a ``.gguf`` file                              -> ``mixtral.checkpoint.gguf``
* a directory with ``params.json`` (raw Mistral) -> ``mixtral.checkpoint.mistral``
* a directory with ``config.json`` (HF)          -> ``mixtral.checkpoint.hf``, or
  ``mixtral.checkpoint.quantized`` when its config has a ``quantization_config``

``resolve_path`` turns anything else that looks like ``org/name`` into a hub download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import MixtralConfig
from .gguf import read_gguf
from .hf import hf_rules, read_hf
from .loading import CheckpointError, Rule, TensorSource
from .mistral import read_mistral
from .quantized import is_quantized, quantized_rules

__all__ = ["CheckpointError", "read_checkpoint", "resolve_path"]


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


def read_checkpoint(path: Path, config: Any = None) -> tuple[Any, TensorSource, dict[str, Rule]]:
    """(config, tensor source, rules) for any supported checkpoint at ``path``. With ``config``, a
    directory of safetensors without config.json is read too: transformers' Trainer writes its
    checkpoints of a model that is not a transformers ``PreTrainedModel`` (ours) that way."""
    if (config is not None and path.is_dir() and not (path / "config.json").exists()
            and not (path / "params.json").exists() and any(path.glob("model*.safetensors"))):
        _, source = read_hf(path, config)
        return config, source, hf_rules(config, set(source.keys()))

    if path.is_file() and path.suffix == ".gguf":
        return read_gguf(path)
    if path.is_dir() and (path / "params.json").exists() and not (path / "config.json").exists():
        return read_mistral(path)
    if path.is_dir() and (path / "config.json").exists():
        config, source = read_hf(path)
        if isinstance(config, MixtralConfig) and is_quantized(path):
            return config, source, quantized_rules(config, set(source.keys()), path)
        return config, source, hf_rules(config, set(source.keys()))
    if path.is_dir() and any(path.glob("model*.safetensors")):
        raise CheckpointError(f"{path}: weights but no config.json (a transformers Trainer checkpoint of our "
                              "model?): pass config=model.config, or save with model.save_pretrained")
    if path.is_dir():
        raise CheckpointError(f"{path}: neither config.json (Hugging Face) nor params.json (Mistral) found")
    raise CheckpointError(f"{path}: not a checkpoint directory or a .gguf file")
