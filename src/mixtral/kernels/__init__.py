"""Kernels behind the model's fast paths, and the one place that decides when they apply.

* ``cpu`` (+ ``cpu_kernels.cpp``): AVX2 kernels for CPU decode (matrix-vector products over fp32,
  int8 and int4 weights, the router, the experts step, decode attention, and all decoder layers of
  a decode step in one call), compiled at first use, with torch fallbacks.
* ``fused_moe``, ``moe_configs``: the Triton fused MoE for CUDA (bf16, int8 and int4 weights) and a
  quantized Linear, registered as torch ops so ``torch.compile`` keeps them whole.
* ``attention``: layout-driven attention for CUDA (flash-attn, SDPA, FlexAttention).
* ``offline``: compiles the Triton kernels for a GPU architecture without a GPU (reports, tests).

Kernels take tensors and small plain structs; none imports the model. Triton is an optional
dependency (the ``gpu`` extra) and is never imported at package import time.

The decisions every fast path shares live here, once:

* ``cpu_row_kernels(x)``: the compiled CPU kernels when ``x`` is a few fp32 rows on the CPU outside
  autograd (decode), else None. The row kernels stream each weight once per call, which wins
  while the rows are few; past ``FEW_ROWS`` grouped matrix products win. ``cpu_decode_kernels``
  is the same without the row limit, for kernels that work row by row (decode attention).
* ``triton_applies(x)``: the Triton kernels, for CUDA tensors outside autograd (they have no
  backward).
* ``reference()``: a context manager under which both say no, so the whole package runs its plain
  torch definitions (tests compare every fast path against that).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from collections.abc import Iterator

import torch

from .cpu import cpu_kernels

# Up to this many rows the CPU row kernels beat dequantize + matrix product (and the fp32 matrix
# products of MKL, which reach about half the memory bandwidth on small CPUs at one row).
FEW_ROWS = 8

# Looked up once (find_spec does not import Triton): the answer cannot change within a process, and
# a constant is something torch.compile can trace through without a graph break.
_TRITON = importlib.util.find_spec("triton") is not None

_REFERENCE = contextvars.ContextVar("mixtral_reference", default=False)


def triton_available() -> bool:
    return _TRITON


@contextlib.contextmanager
def reference() -> Iterator[None]:
    """Run the package's plain torch definitions inside this block: no CPU kernels, no Triton, no
    fused decode stepper. Per thread (a context variable), so a server thread is not affected."""
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def using_reference() -> bool:
    # torch.compile traces the CUDA paths; a context variable is not something it can guard on.
    return not torch.compiler.is_compiling() and _REFERENCE.get()


def cpu_decode_kernels(x: torch.Tensor):
    """The CPU kernels for fp32 ``x`` on the CPU outside autograd, or None. None also inside
    ``reference()``, while torch.compile traces, and where the kernels could not be built (see
    ``mixtral.kernels.cpu``). For kernels that work row by row at any batch (decode attention)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled() or using_reference():
        return None
    return cpu_kernels()


def cpu_row_kernels(x: torch.Tensor):
    """``cpu_decode_kernels`` for at most ``FEW_ROWS`` rows (x's leading dimensions): the kernels
    that read a weight matrix, which beat matrix products only while the rows are few."""
    # The device first: on CUDA no shape is inspected, so torch.compile adds no guard on the rows.
    if x.device.type != "cpu" or x.numel() > FEW_ROWS * x.shape[-1]:
        return None
    return cpu_decode_kernels(x)


def triton_applies(x: torch.Tensor) -> bool:
    """Whether ``x`` goes through the Triton kernels: on CUDA, outside autograd, Triton installed.
    They read int8 and int4 weights as stored, with no host synchronisation, so a decode step
    stays capturable in a CUDA graph."""
    return x.is_cuda and not torch.is_grad_enabled() and _TRITON and not using_reference()
