"""The Triton kernels compiled for real GPUs (sm_90: H100/H200; sm_80: A100; sm_89: L4, L40S, RTX
4090) on this CPU machine.

The interpreter tests (test_kernels.py) check what the kernels compute; they cannot see what only
the compiler checks: return types across constexpr branches, shared memory and registers. Here
``bench/kernel_report.py`` compiles Mixtral-8x7B's launches (``mixtral.kernels.offline``: Triton's
own compiler and the ptxas it ships with; nothing runs) and each kernel is held to NVIDIA's per-SM
limits: it fits, does not spill registers, uses tensor cores, and its K loop reads mostly through
16-byte loads (a per-element gather of weights or scales pulls that share down: int4's per-weight
scale loads had it at 24%); and the decode loops of the bf16 and int8 experts issue their weight
bytes faster than HBM delivers them. On sm_89 (99 KiB of shared memory per block) the launches that
do not fit are refused, as the driver would refuse them, and must step down to a config that does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "bench" / "kernel_report.py"


def _nvidia_tools() -> bool:
    # Located without importing Triton into this process: test_kernels.py must set
    # TRITON_INTERPRET before Triton's first import, and collection order would put this file first.
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    bin_dir = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    return all(os.access(bin_dir / tool, os.X_OK) for tool in ("ptxas", "cuobjdump", "nvdisasm"))


pytestmark = pytest.mark.skipif(not _nvidia_tools(), reason="triton (with its NVIDIA backend tools) is not installed")


def _report(tmp_path: Path, arch: int, tokens: list[int]) -> list[dict]:
    out = tmp_path / f"sm{arch}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    cmd = [sys.executable, str(REPORT), "--arch", str(arch), "--json", str(out)]
    for n in tokens:
        cmd += ["--tokens", str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.exists(), f"kernel_report failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())["rows"]


@pytest.mark.parametrize("arch,tokens", [(90, [1, 4096]), (80, [1, 4096]), (89, [1])])
def test_mixtral_kernels_compile_fit_and_do_not_spill(tmp_path, arch, tokens):
    rows = _report(tmp_path, arch, tokens)
    refused = [r for r in rows if r["refused"]]
    if arch == 89:
        # 99 KiB of shared memory per block: the table's bf16 and int8 decode tiles (108 and 120
        # KiB) are refused, and the launch steps down to a config that fits instead of failing.
        assert {(r["case"], r["kernel"]) for r in refused} == {("experts bf16", "_gate_up"),
                                                                ("experts int8", "_gate_up")}
    else:
        assert not refused, f"the table's configs should fit sm_{arch}: {refused}"
    rows = [r for r in rows if not r["refused"]]
    seen = {(r["case"], r["tokens"], r["kernel"]) for r in rows}
    for fmt in ("bf16", "int8", "int4"):
        for n in tokens:
            assert {(f"experts {fmt}", n, k) for k in ("_align_kernel", "_gate_up", "_down")} <= seen
    assert ("qkv int8", 1, "_linear") in seen and ("o int4", 1, "_linear") in seen

    problems = [r for r in rows if not r["ok"]]
    assert not problems, f"kernels over the sm_{arch} limits or spilling: {problems}"
    for r in rows:
        if r["kernel"] == "_align_kernel":
            continue
        where = f"{r['case']} x{r['tokens']} {r['kernel']}"
        assert r["mma"] != "none", f"{where}: tl.dot did not become a tensor-core instruction"
        if arch == 90 and r["constants"]["BLOCK_M"] >= 64:
            assert r["mma"] == "wgmma", f"{where}: Hopper prefill tiles should use wgmma"
        assert r["wide_load_share"] >= 0.85, f"{where}: only {r['wide_load_share']:.0%} of the K loop's load " \
                                             f"bytes are 16-byte"
        # Decode is memory bound: the K loop must issue its weight bytes faster than an H100 SM's
        # share of HBM (3.35 TB/s / 132 SMs / 1.98 GHz = 12.8 B per cycle), or instruction issue
        # caps the speed below the roofline. The targets' formats (bf16, int8) must clear it; int4
        # does not yet (its dequantization costs ~6-9 B per cycle, reported, not asserted).
        if arch == 90 and r["tokens"] == 1 and not r["case"].endswith("int4"):
            assert r["weight_bytes_per_issue_cycle"] >= 12.8, f"{where}: issue bound ({r['loop_instructions']} " \
                                                              f"instructions per K step)"
