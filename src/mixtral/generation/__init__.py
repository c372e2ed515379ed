"""Generation: the ``generate`` loop, token choice, decode steppers and streamers.

* ``loop``: ``generate``, transformers' ``model.generate`` (greedy and sampling) as a short sequence of steps.
* ``config``: ``GenerationConfig`` and ``generation_config.json``.
* ``sampling``: logits processors, sampling, stop strings, the server's ``SamplingParams``.
* ``steppers``: one decode step behind one interface (eager, CPU fused, static/CUDA graph), chosen
  once by ``choose_stepper``; ``cuda_graph`` holds the captured form.
* ``streamers``: ``TextStreamer`` and ``TextIteratorStreamer``.

Nothing here imports the model: it is passed in (``mixtral.model`` imports this package).
"""

from .config import GENERATION_CONFIG_NAME, GenerationConfig, resolve_generation_config
from .loop import GenerateDecoderOnlyOutput, generate, generated_length, prefill
from .sampling import (
    NEG_INF,
    Processor,
    SamplingParams,
    StopStrings,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    build_logits_processors,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    next_token,
    sample,
    warp_for_sampling,
)
from .steppers import CACHE_IMPLEMENTATIONS, CpuFusedStepper, EagerStepper, StaticStepper, choose_stepper
from .streamers import TextIteratorStreamer, TextStreamer

__all__ = [
    "CACHE_IMPLEMENTATIONS",
    "GENERATION_CONFIG_NAME",
    "NEG_INF",
    "CpuFusedStepper",
    "EagerStepper",
    "GenerateDecoderOnlyOutput",
    "GenerationConfig",
    "Processor",
    "SamplingParams",
    "StaticStepper",
    "StopStrings",
    "TextIteratorStreamer",
    "TextStreamer",
    "apply_repetition_penalty",
    "ban_repeated_ngrams",
    "build_logits_processors",
    "choose_stepper",
    "filter_min_p",
    "filter_top_k",
    "filter_top_p",
    "generate",
    "generated_length",
    "next_token",
    "prefill",
    "resolve_generation_config",
    "sample",
    "warp_for_sampling",
]
