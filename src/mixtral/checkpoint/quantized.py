"""The quantized checkpoint layout, as a format: which stored tensors are quantized, and the rules
for the rest (the layout is documented in ``mixtral.quant``).

A quantized checkpoint is a Hugging Face directory whose ``config.json`` has a
``quantization_config`` and whose tensors use internal names: ``NAME.qweight``, ``NAME.scales``
and (int4) ``NAME.mins`` for each quantized ``NAME``, everything else as is. ``quantized_rules``
gives identity rules for the float tensors and remembers the quantized names; building the
quantized modules from them is ``mixtral.quant.checkpoint.prepare``'s work.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import MixtralConfig
from .loading import CheckpointError, Rule

SUFFIXES = (".qweight", ".scales", ".mins")


class QuantizedRules(dict):
    """Float rules (internal name -> Rule) plus the quantized tensor names and the config block."""

    def __init__(self, rules: dict[str, Rule], quantized: list[str], qconfig: dict) -> None:
        super().__init__(rules)
        self.quantized = quantized
        self.qconfig = qconfig


def is_quantized(path: Path) -> bool:
    """Whether the directory ``path`` holds a quantized checkpoint (its config.json says so)."""
    try:
        return "quantization_config" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def quantized_rules(config: MixtralConfig, keys: set[str], path: Path) -> QuantizedRules:
    """The rules for the quantized checkpoint in ``path`` holding tensors ``keys``."""
    qconfig = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    if (qconfig.get("quant_method") != "mixtral-weight-only" or qconfig.get("bits") not in (4, 8)
            or qconfig.get("activations", "int8") not in ("int8", "fp32") or qconfig.get("version", 1) not in (1, 2)):
        raise CheckpointError(f"{path}: unsupported quantization_config {qconfig}")
    quantized = sorted({k[: -len(".qweight")] for k in keys if k.endswith(".qweight")})
    consumed = {q + s for q in quantized for s in SUFFIXES}
    rules = {k: Rule((k,)) for k in keys if k not in consumed}
    if config.tie_word_embeddings or "lm_head.weight" in quantized:
        rules.pop("lm_head.weight", None)
    return QuantizedRules(rules, quantized, qconfig)
