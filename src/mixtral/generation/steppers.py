"""Decode steppers: one token per row through the KV cache, behind one small interface.

    stepper = choose_stepper(model, cache_implementation)   # once per generate call or engine
    cache = stepper.begin(cache)                             # after the prompt is prefilled into it
    logits = stepper.step(tokens, cache)                     # tokens (B,) -> logits (B, V)

* ``EagerStepper``: the model's own ``forward`` (the reference every other stepper is tested
  against; inside it, per-op CPU kernels still apply where ``mixtral.kernels`` says so).
* ``CpuFusedStepper``: every decoder layer of the step in one C++ call (``decode_layers`` in
  ``mixtral/kernels/cpu_kernels.cpp``) over the layers' tensors, packed once when the stepper is
  made (``mixtral.packed``). It removes the dozens of torch ops and module calls per layer whose
  dispatch costs more than the arithmetic at one token; the numbers are the layer-by-layer path's
  up to float rounding.
* ``StaticStepper``: a fixed-shape cache (``mixtral.cache.StaticCache``) and the model's own layers,
  captured as a CUDA graph on a GPU (``mixtral.generation.cuda_graph``).

``choose_stepper`` is the one place that decides which applies. generate, the server's engine and
``mixtral bench`` all call it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..cache import KVCache, StaticCache
from ..kernels import cpu_kernels, cpu_row_kernels, using_reference
from ..layers import linear, rotary_cos_sin
from ..packed import PackedLayers, decode_all_layers
from .cuda_graph import CAPACITY_STEP, decode_step, kept_graph_decoder


class EagerStepper:
    """The model's ``forward`` for one token per row."""

    name = "eager"
    hands_out_cache = True  # the cache generate returns as past_key_values is the one decoded into

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def begin(self, cache: Any) -> Any:
        return cache

    def step(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        return self.model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True).logits[:, -1]


class CpuFusedStepper(EagerStepper):
    """All decoder layers of a decode step in one C++ call. Serves the few rows the CPU row kernels
    serve (``mixtral.kernels.cpu_row_kernels``); a larger batch steps through ``forward``, where
    grouped matrix products beat the row kernels. Weights are packed when the stepper is made, so
    a module replaced afterwards needs a new stepper (generate makes one per call)."""

    name = "cpu-fused"

    def __init__(self, model: nn.Module, packed: PackedLayers) -> None:
        super().__init__(model)
        self.packed = packed

    def step(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        base = self.model.model
        h = base.embed_tokens(tokens)  # (B, H)
        ck = cpu_row_kernels(h)
        if ck is None or cache.dtype != torch.float32:  # the kernels read and write fp32 caches only
            return super().step(tokens, cache)
        B = h.shape[0]
        layout = cache.begin(None, 1)
        cos, sin = (t.reshape(B, -1).contiguous()
                    for t in rotary_cos_sin(base.inv_freq, cache.row_positions[:, None], h.dtype))
        h = decode_all_layers(ck, self.packed, h, cos, sin, layout, cache.decode_rows(), base.config)
        cache.end()
        return linear(self.model.lm_head, base.norm(h))


class StaticStepper(EagerStepper):
    """Decode over a fixed-shape cache, so the step can be replayed as one CUDA graph (``capture``:
    on a GPU, the kept ``GraphDecoder`` of this model, batch size and capacity, reused by later
    calls); without capture the same body runs eagerly (tests, and a check on any device). The
    static cache stays with its kept graph: it is not handed out as ``past_key_values``."""

    name = "static"
    hands_out_cache = False

    def __init__(self, model: nn.Module, capture: bool = True) -> None:
        super().__init__(model)
        self.capture = capture
        self.decoder = None

    def begin(self, cache: KVCache) -> StaticCache:
        B, capacity = cache.batch_size, -(-cache.capacity // CAPACITY_STEP) * CAPACITY_STEP
        if self.capture:
            self.decoder = kept_graph_decoder(self.model, B, capacity)
            static = self.decoder.cache
        else:
            static = StaticCache(self.model.config, B, capacity, self.model.dtype, self.model.device)
        static.load(cache)  # the prompt's keys (and its padding) into the fixed-shape cache
        return static

    def step(self, tokens: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        if self.decoder is not None:
            self.decoder.step(tokens)
            return self.decoder.logits  # overwritten by the next replay
        return decode_step(self.model, cache, tokens, None)


CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")


def choose_stepper(model: nn.Module, cache_implementation: str | None = None) -> EagerStepper:
    """The stepper for ``model``: ``cache_implementation="static"`` (transformers' spelling) on CUDA
    takes the captured graph; on the CPU the default path serves it, since the fused decode
    kernels there have no launches to save. On the CPU the fused stepper wherever the kernels are
    built and cover every layer (not in training mode, not with ``attn_implementation="eager"``,
    which stays the written-out reference, nor inside ``mixtral.kernels.reference()``); otherwise
    the model's forward."""
    device = model.device.type
    if cache_implementation == "static" and device == "cuda":
        return StaticStepper(model)
    if (device == "cpu" and not model.training and model.attn_implementation != "eager" and not using_reference()
            and cpu_kernels() is not None):
        packed = PackedLayers.of(model.model.layers)
        if packed is not None:
            return CpuFusedStepper(model, packed)
    return EagerStepper(model)
