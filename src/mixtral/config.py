"""Model configuration: the fields and defaults of transformers' ``MixtralConfig``.

The dataclass is the single source of truth for model shapes. Reading and writing
``config.json`` lives here; translations from other formats (Mistral ``params.json``,
GGUF metadata) live next to those formats in ``mixtral.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")

CONFIG_NAME = "config.json"


# config.json keys that describe the file rather than the model, or are read elsewhere
# (``quantization_config`` by ``mixtral.quant``): never kept as config attributes.
NOT_ATTRIBUTES = frozenset({
    "architectures", "model_type", "transformers_version", "quantization_config", "_name_or_path",
    "auto_map", "id2label", "label2id", "rope_parameters", "rope_scaling", "dtype",
})


@dataclass(init=False)
class MixtralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 1e6
    sliding_window: int | None = None
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 2
    num_local_experts: int = 8
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    # Sequence classification head.
    num_labels: int = 2
    problem_type: str | None = None
    # Defaults of the optional outputs, as in transformers (a call's own argument wins).
    output_hidden_states: bool = False
    output_attentions: bool = False
    return_dict: bool = True
    # Not a model field: the dtype the weights were saved in, kept for config.json round trips.
    torch_dtype: str | None = field(default=None, repr=False)

    model_type = "mixtral"

    def __init__(self, **kwargs: Any) -> None:
        """Keyword arguments as transformers' ``MixtralConfig`` takes them, v4 or v5 spellings
        (``rope_parameters``/``rope_scaling``, ``dtype``, ``id2label``). Keys that are not fields are
        kept as attributes and written back to config.json, as transformers does."""
        kwargs = _normalize_keys(kwargs)
        self.id2label = kwargs.pop("id2label", None)
        self.architectures = kwargs.get("architectures")  # written by save_pretrained: the saving class
        for f in dataclasses.fields(self):
            setattr(self, f.name, kwargs.pop(f.name) if f.name in kwargs else f.default)
        self.extra_keys = sorted(k for k in kwargs if k not in NOT_ATTRIBUTES)
        for key in self.extra_keys:
            setattr(self, key, kwargs[key])
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        self.validate()

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label_or_default.items()}

    @property
    def id2label_or_default(self) -> dict[int, str]:
        return self.id2label if self.id2label is not None else {i: f"LABEL_{i}" for i in range(self.num_labels)}

    # -- derived values -------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        """transformers' alias for ``num_local_experts``."""
        return self.num_local_experts

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rope_parameters(self) -> dict[str, Any]:
        return {"rope_type": "default", "rope_theta": self.rope_theta}

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first field that is of the wrong type or out of range."""
        # Types first: a config.json string such as "false" or "1e-5" must not pass as a value
        # (the string "false" is truthy, so it would tie the output head to the embeddings).
        self._validate_types()
        self._validate_shapes()
        self._validate_values()

    def _validate_types(self) -> None:
        """The flags are booleans, the hyperparameters numbers, the special tokens ids or null."""
        for name in ("use_cache", "tie_word_embeddings", "output_router_logits", "output_hidden_states",
                     "output_attentions", "return_dict"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MixtralConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("initializer_range", "rms_norm_eps", "rope_theta", "attention_dropout",
                     "router_aux_loss_coef", "router_jitter_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"MixtralConfig.{name} must be a number, got {value!r}")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"MixtralConfig.{name} must be a token id (an integer >= 0) or null, got {value!r}")
        eos = self.eos_token_id
        if eos is not None and not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                       for t in (eos if isinstance(eos, list) else [eos])):
            raise ValueError(f"MixtralConfig.eos_token_id must be a token id or a list of them, got {eos!r}")

    def _validate_shapes(self) -> None:
        """The sizes are positive integers that fit together (heads, key-value groups, experts)."""
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "num_experts_per_tok",
            "num_local_experts",
            "num_labels",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MixtralConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise ValueError(f"MixtralConfig.head_dim must be a positive integer or None, got {self.head_dim!r}")
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(f"MixtralConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"MixtralConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) when head_dim is not set"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"MixtralConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"MixtralConfig.num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed "
                f"num_local_experts ({self.num_local_experts})"
            )

    def _validate_values(self) -> None:
        """The activation, sliding window, rates and problem type are ones the model knows."""
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"MixtralConfig.hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) or self.sliding_window < 1
        ):
            raise ValueError(
                f"MixtralConfig.sliding_window must be None or an integer >= 1, got {self.sliding_window!r}"
            )
        for name in ("rms_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MixtralConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("attention_dropout", "router_jitter_noise"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"MixtralConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ValueError(f"MixtralConfig.problem_type is not a known problem type: {self.problem_type!r}")

    # -- config.json ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixtralConfig:
        """Build from a ``config.json`` dictionary (transformers v4 or v5)."""
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dictionary, in the layout transformers writes (v4 keys, which v5 reads too)."""
        out: dict[str, Any] = {
            "architectures": getattr(self, "architectures", None) or ["MixtralForCausalLM"],
            "model_type": self.model_type,
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "torch_dtype" and value is None:
                continue
            out[f.name] = value
        for key in self.extra_keys:
            out[key] = getattr(self, key)
        out["id2label"] = {str(i): label for i, label in self.id2label_or_default.items()}
        out["label2id"] = self.label2id
        return out

    def to_json_string(self, use_diff: bool = False) -> str:
        """config.json's text; ``use_diff`` keeps only what differs from the defaults (transformers' flag)."""
        data = self.to_dict()
        if use_diff:
            defaults = MixtralConfig().to_dict()
            data = {k: v for k, v in data.items() if k in ("architectures", "model_type") or defaults.get(k) != v}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def update(self, values: dict[str, Any]) -> None:
        """Set several attributes at once (transformers' ``config.update``), then check the result."""
        values = dict(values)
        if "num_labels" in values and "id2label" not in values and values["num_labels"] != self.num_labels:
            self.id2label = None  # the labels follow the new count (LABEL_0...), as transformers' setter does
        for key, value in _normalize_keys(values).items():
            if key == "id2label":
                self.id2label = {int(k): str(v) for k, v in value.items()}
                self.num_labels = len(self.id2label)
                continue
            if key not in {f.name for f in dataclasses.fields(self)} and key not in self.extra_keys:
                self.extra_keys = sorted([*self.extra_keys, key])
            setattr(self, key, value)
        self.validate()

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> MixtralConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        model_type = data.get("model_type")
        if model_type not in (None, "mixtral", "mistral", "llama"):
            raise ValueError(f"{path}: model_type {model_type!r} is not a Mixtral-architecture model")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> MixtralConfig:
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path}: no config.json found")
        return cls.from_json_file(path)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(self.to_json_string())


def _normalize_keys(data: dict[str, Any]) -> dict[str, Any]:
    """transformers v5 and v4 spellings -> our field names: rope_parameters/rope_scaling ->
    rope_theta (only the default rope type exists in Mixtral), dtype -> torch_dtype, integer
    floats -> floats."""
    data = dict(data)
    rope = data.pop("rope_parameters", None) or data.pop("rope_scaling", None)
    if isinstance(rope, dict):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported (only 'default')")
        if "rope_theta" in rope and "rope_theta" not in data:
            data["rope_theta"] = rope["rope_theta"]
    dtype = data.pop("dtype", None)
    if dtype is not None and data.get("torch_dtype") is None:
        data["torch_dtype"] = str(dtype).removeprefix("torch.")
    if isinstance(data.get("id2label"), dict):  # the labels decide num_labels
        num_labels = data.pop("num_labels", None)
        if num_labels is not None and num_labels != len(data["id2label"]):
            raise ValueError(f"MixtralConfig: num_labels={num_labels} but id2label has {len(data['id2label'])} labels")
    for key in ("rope_theta", "rms_norm_eps", "initializer_range", "router_aux_loss_coef"):
        if isinstance(data.get(key), int) and not isinstance(data.get(key), bool):
            data[key] = float(data[key])
    return data
