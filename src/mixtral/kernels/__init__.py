"""Kernels behind the model's fast paths.

* ``cpu`` (+ ``cpu_kernels.cpp``): AVX2 matrix-vector kernels for CPU decode (fp32, int8, int4),
  compiled at first use, with torch fallbacks.
* ``fused_moe``, ``moe_configs``: the Triton fused MoE for CUDA (bf16, int8 and int4 weights) and a
  quantized Linear, registered as torch ops so ``torch.compile`` keeps them whole.
* ``attention``: layout-driven attention for CUDA (flash-attn, SDPA, FlexAttention).
* ``cuda_graph``: decode captured as one CUDA graph per batch size, its layers ``torch.compile``d.

Nothing here is imported by the core package at import time: Triton is an optional dependency
(the ``gpu`` extra) and CPU installs never need it. ``triton_available`` is the one check.
"""

from __future__ import annotations

import importlib.util

# Looked up once (find_spec does not import Triton): the answer cannot change within a process, and
# a constant is something torch.compile can trace through without a graph break.
_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON
