"""``GenerationConfig``: transformers' generation settings that ``generate`` implements.

The same defaults, the same fields and the same ``generation_config.json`` files as transformers;
keys it does not implement are kept in ``extra`` and written back, not acted on.

Reading order: the ``GenerationConfig`` dataclass (validation, then construction and files), its
helpers, then ``resolve_generation_config``, which layers keyword arguments over a config over the
model's, by transformers' precedence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENERATION_CONFIG_NAME = "generation_config.json"


# -- GenerationConfig ------------------------------------------------------------------------------


@dataclass
class GenerationConfig:
    """transformers' ``GenerationConfig`` fields that ``generate`` implements, with the values
    transformers falls back to when nothing sets them (``top_k=50``, ``temperature=1.0``, ...).

    ``max_length=None`` means transformers' default rule: 20 new tokens, capped so that prompt plus
    new tokens fit ``max_position_embeddings``. ``max_length`` set means total length, prompt
    included; ``max_new_tokens`` wins over it. Keys of a ``generation_config.json`` that are not
    fields here land in ``extra``: kept, written back, not acted on (``generate`` warns when one
    would have changed transformers' output).
    """

    # Length.
    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    min_length: int | None = 0
    stop_strings: str | list[str] | None = None
    # Strategy: greedy or sampling; beam search is not implemented (num_beams must be 1).
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    early_stopping: bool | str = False  # beam search only
    length_penalty: float = 1.0  # beam search only
    # Logits processors, applied in transformers' order (see ``build_logits_processors``).
    temperature: float | None = 1.0
    top_k: int | None = 50
    top_p: float | None = 1.0
    min_p: float | None = None
    repetition_penalty: float | None = 1.0
    no_repeat_ngram_size: int | None = 0
    bad_words_ids: list[list[int]] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    # Special tokens.
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    # Cache and outputs.
    use_cache: bool = True
    cache_implementation: str | None = None
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    output_attentions: bool = False
    output_hidden_states: bool = False
    # Keys of a generation_config.json that are not fields above.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"GenerationConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise bad(name, "a positive integer or None")
        for name in ("min_new_tokens", "min_length", "no_repeat_ngram_size", "top_k"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise bad(name, "a non-negative integer or None")
        for name in ("num_beams", "num_return_sequences"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        if self.do_sample and not (self.temperature is None or self.temperature > 0):
            raise ValueError(f"GenerationConfig.temperature must be > 0 when sampling (do_sample=True), got "
                             f"{self.temperature}; for greedy decoding set do_sample=False")
        for name in ("top_p", "min_p"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise bad(name, "in [0, 1] or None")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "> 0")
        if self.bad_words_ids is not None and (
            isinstance(self.bad_words_ids, (str, bytes)) or not self.bad_words_ids
            or any(_is_int(s) or not s or not all(_is_int(t) and t >= 0 for t in s) for s in self.bad_words_ids)
        ):
            raise bad("bad_words_ids", "a non-empty list of non-empty lists of token ids")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            value = getattr(self, name)
            if value is not None and (_is_int(value) or not all(_is_int(t) for t in value)):
                raise bad(name, "a list of token ids or None")
        stops = [self.stop_strings] if isinstance(self.stop_strings, str) else self.stop_strings
        if stops is not None and (not stops or not all(isinstance(s, str) and s for s in stops)):
            raise bad("stop_strings", "a non-empty string, a list of them, or None")

    # -- construction and files ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationConfig:
        """Fields by name; ``None`` values count as unset (transformers writes them so); other keys
        go to ``extra``."""
        known, extra = _split(data)
        return cls(**known, extra=extra)

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """The special tokens of a model config (ours or transformers'), every other field default."""
        return cls(**{name: getattr(config, name, None) for name in ("eos_token_id", "bos_token_id", "pad_token_id")
                      if getattr(config, name, None) is not None})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> GenerationConfig:
        """A checkpoint directory's ``generation_config.json`` (or that file's path). No file: the
        defaults, as when a checkpoint ships none."""
        file = Path(path)
        if file.is_dir():
            file = file / GENERATION_CONFIG_NAME
        if not file.exists():
            return cls()
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """Every field (and the ``extra`` keys), as transformers' ``to_dict`` gives them."""
        data = {name: getattr(self, name) for name in _field_names()}
        return {**self.extra, **data}

    def to_diff_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults, and the ``extra`` keys."""
        defaults = _DEFAULTS.to_dict()
        return {k: v for k, v in self.to_dict().items() if k not in defaults or v != defaults[k]}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``generation_config.json`` (non-default values only, as transformers writes it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_diff_dict(), indent=2, sort_keys=True) + "\n"
        (directory / GENERATION_CONFIG_NAME).write_text(text, encoding="utf-8")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(GenerationConfig)} - {"extra"}


_DEFAULTS = GenerationConfig()

# transformers generation settings generate does not implement, at values that change nothing
# (older transformers wrote them into every generation_config.json). Any other value is warned about.
_INERT_FOREIGN = {
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "num_beam_groups": 1, "diversity_penalty": 0.0, "guidance_scale": 1.0,
    "remove_invalid_values": False, "renormalize_logits": False, "token_healing": False,
}


def _stated_settings(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the fields ``config`` sets, its other keys). Ours sets what differs from the defaults; a
    transformers ``GenerationConfig`` (read through ``to_dict()``) sets what is not ``None``."""
    if isinstance(config, GenerationConfig):
        names = _field_names()
        diff = config.to_diff_dict()
        return {k: v for k, v in diff.items() if k in names}, dict(config.extra)
    return _split(config.to_dict() if hasattr(config, "to_dict") else dict(vars(config)))


def _split(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our fields that ``data`` sets to a value, its keys that are not our fields)."""
    names = _field_names()
    return {k: v for k, v in data.items() if k in names and v is not None}, {k: v for k, v in data.items()
                                                                             if k not in names}


def resolve_generation_config(model, generation_config: Any = None, **overrides: Any) -> GenerationConfig:
    """transformers' precedence: explicit keyword arguments > ``generation_config`` > the model's
    ``generation_config`` > its config's special tokens > the defaults. A keyword passed as ``None``
    is set to ``None`` (``top_k=None`` turns top-k off, as in transformers)."""
    settings = GenerationConfig.from_model_config(model.config).to_diff_dict()
    foreign: dict[str, Any] = {}
    for layer in (getattr(model, "generation_config", None), generation_config):
        if layer is not None:
            known, unknown = _stated_settings(layer)
            settings.update(known)
            foreign.update(unknown)
    settings.update(overrides)
    acted_on = sorted(k for k, v in foreign.items() if not k.startswith("_") and k != "transformers_version"
                      and v is not None and _INERT_FOREIGN.get(k, object()) != v)
    if acted_on:
        warnings.warn(f"generate ignores generation settings it does not implement: {', '.join(acted_on)}",
                      stacklevel=3)
    return GenerationConfig(**settings)
