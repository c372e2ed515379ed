"""GPU kernels and fast paths: the fused MoE (Triton), attention, CUDA-graph decode.

Nothing here is imported by the core package at import time: Triton is an optional dependency
(the ``gpu`` extra) and CPU installs never need it. ``triton_available`` is the one check.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
