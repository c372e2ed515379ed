"""The AVX2 decode kernels (``cpu_kernels.cpp``), compiled with the system C++ compiler at first use.

``cpu_kernels()`` returns the compiled module, or None where it cannot be had: not an x86 CPU with
AVX2+FMA, no compiler, a failed build, ``MIXTRAL_CPU_KERNELS=0`` in the environment, or inside a
``torch.compile`` trace. Every caller has a pure-torch fallback with the same numbers (up to float
rounding), so None only costs speed. The build runs once and is cached by torch in ``~/.cache/torch_extensions``.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


def _cpu_supported() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except Exception:  # older torch without the query
        return False


def _build_directory() -> Path:
    """One build folder per kernel source and torch version, so an edited source never picks up a
    stale binary and versions never overwrite each other."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    path = root / f"mixtral_cpu_kernels-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_kernels():
    """The compiled module, or None (see above). Always None while torch.compile traces: the
    pybind functions are opaque to it (each call would break the graph), and the plain torch ops
    of every fallback are what the compiler fuses anyway."""
    if torch.compiler.is_compiling():
        return None
    return _load()


@functools.cache
def _load():
    if os.environ.get("MIXTRAL_CPU_KERNELS", "1") == "0" or not _cpu_supported() or not SOURCE.exists():
        return None
    try:
        from torch.utils.cpp_extension import load

        build_dir = _build_directory()
        # torch guards a build with a plain `lock` file, which a build killed half-way (Ctrl-C on
        # first use) leaves behind, and every later process then waits on forever. An flock is
        # released by the kernel when its holder dies; whoever holds it is the only builder, so a
        # `lock` file seen then is stale.
        with open(build_dir / "mixtral.flock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            return load(
                name="mixtral_cpu_kernels",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
    except Exception as e:  # no compiler, missing headers, ...: fall back to torch ops
        warnings.warn(f"mixtral: AVX2 kernels unavailable, using slower torch fallbacks ({e})", stacklevel=2)
        return None
