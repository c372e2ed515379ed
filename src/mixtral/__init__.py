"""mixtral: Mistral AI's Mixtral sparse mixture-of-experts model, readable and fast, transformers-compatible."""

from .cache import KVCache
from .config import MixtralConfig
from .generation import GenerationConfig
from .model import MixtralForCausalLM, MixtralForSequenceClassification, MixtralModel
from .moe import load_balancing_loss
from .tokenizer import Tokenizer

__all__ = [
    "GenerationConfig",
    "KVCache",
    "MixtralConfig",
    "MixtralForCausalLM",
    "MixtralForSequenceClassification",
    "MixtralModel",
    "Tokenizer",
    "load_balancing_loss",
]

__version__ = "0.1.0"
