"""CPU runtime settings that suit inference."""

from __future__ import annotations

import os

import torch


def physical_cores() -> int:
    """Physical cores: hyper-threads share one core's vector units and slow matrix products down."""
    try:
        with open("/proc/cpuinfo") as f:
            pairs = {(block.get("physical id"), block.get("core id")) for block in _cpuinfo_blocks(f.read())}
        pairs.discard((None, None))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def _cpuinfo_blocks(text: str):
    for block in text.strip().split("\n\n"):
        yield dict(
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()) if k
        )


def configure_threads(threads: int | None = None) -> int:
    """Use ``threads`` (default: physical cores, capped by the CPUs this process may run on)."""
    if threads is None:
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, min(physical_cores(), allowed))
    torch.set_num_threads(threads)
    return threads
