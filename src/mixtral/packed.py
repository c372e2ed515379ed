"""The decoder layers' tensors packed for the CPU whole-step kernel, and the call that runs it.

``decode_layers`` (``mixtral/kernels/cpu_kernels.cpp``) runs every decoder layer of a one-token step
in one C++ call: per layer RMSNorm, q|k|v, decode attention (rotary, cache write, the mask rule),
o and residual, RMSNorm, router, experts and residual. It is a fast path of ``model.DecoderLayer``
(tests compare the two step by step); ``PackedLayers.of`` says whether it covers a model's layers.
The fused decode stepper packs once; ``MixtralModel.forward`` packs afresh at each decode step,
since a model called directly may have had modules swapped between calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .cache import DecodeRows, StepLayout
from .layers import RMSNorm
from .moe import Router


@dataclass
class PackedLayers:
    """Every decoder layer's tensors as ``decode_layers`` takes them: per layer the input norm,
    q|k|v, o, the post-attention norm, the router, gate_up and down, each weight as [w] (fp32),
    [q, scale] (int8) or [q, scale, min] (int4); ``counts`` holds per layer how many tensors its
    qkv, o, gate_up and down take; ``int8_activations`` whether quantized weights meet int8 blocks."""

    tensors: list[torch.Tensor]
    counts: list[int]
    int8_activations: bool

    @classmethod
    def of(cls, layers: nn.ModuleList) -> PackedLayers | None:
        """None when some layer holds what the kernel does not cover (a bias, another dtype, an
        adapter module, mixed activation settings): then the model steps layer by layer."""
        tensors: list[torch.Tensor] = []
        counts: list[int] = []
        quant: set[bool] = set()
        # The modules' own dicts, not attribute access: nn.Module's __getattr__ is slow enough to show
        # when a direct forward call packs at every decode step.
        for layer in layers._modules.values():
            sub = layer._modules
            attn, moe = sub["self_attn"]._modules, sub["mlp"]._modules
            gate, norms = moe["gate"], (sub["input_layernorm"], sub["post_attention_layernorm"])
            # Exact types only: an adapter wrapping a module (PEFT's LoRA) keeps the base weight
            # under the same attribute name, and packing that would silently drop the adapter.
            if type(gate) is not Router or any(type(n) is not RMSNorm for n in norms):
                return None
            qkv, o = _weight(attn["qkv_proj"]), _weight(attn["o_proj"])
            experts = getattr(moe["experts"], "kernel_weights", lambda: None)()
            weights = (norms[0]._parameters["weight"], norms[1]._parameters["weight"], gate._parameters["weight"])
            if qkv is None or o is None or experts is None or any(t.dtype != torch.float32 for t in weights):
                return None
            quant.update(a for a in (qkv[1], o[1], experts[2]) if a is not None)
            tensors += [weights[0], *qkv[0], *o[0], weights[1], weights[2].contiguous(), *experts[0], *experts[1]]
            counts += [len(qkv[0]), len(o[0]), len(experts[0]), len(experts[1])]
        if len(quant) > 1:
            return None
        return cls(tensors, counts, quant.pop() if quant else False)


def _weight(module: nn.Module) -> tuple[list[torch.Tensor], bool | None] | None:
    """A projection's kernel tensors and int8-activation setting (None for float), or None."""
    if type(module) is nn.Linear:
        w, bias = module._parameters["weight"], module._parameters["bias"]
        return ([w], None) if bias is None and w.dtype == torch.float32 and w.is_contiguous() else None
    weights = getattr(module, "kernel_weights", None)  # mixtral.quant.QuantLinear
    return weights() if weights is not None else None


def decode_all_layers(ck: Any, packed: PackedLayers, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      layout: StepLayout, rows: DecodeRows, config) -> torch.Tensor:
    """h (B, H) after the embeddings -> (B, H) after the last layer (before the final norm), with
    every layer's keys and values written into ``rows``' caches. cos/sin (B, hd) contiguous."""
    layers = range(config.num_hidden_layers)
    return ck.decode_layers(
        h.contiguous(), cos, sin, packed.tensors, packed.counts, [rows.keys(i) for i in layers],
        [rows.values(i) for i in layers], rows.slots, rows.lengths, layout.key_index, layout.key_valid,
        rows.query_index, config.sliding_window or 0, config.num_attention_heads, config.rms_norm_eps,
        config.num_experts_per_tok, packed.int8_activations,
    )
