"""What the Triton compiler makes of our kernels on Mixtral-8x7B's shapes, without a GPU.

Every launch of one layer's experts (bf16, int8, int4 weights; 1 to 4096 tokens) and of the quantized
attention projections runs its host code on CPU tensors; each Triton launch is compiled for the
named architecture (``mixtral.kernels.offline``) and reported: block sizes, shared memory and
registers against the SM's limits, stack (spilled registers), programs resident per SM, the
tensor-core instruction, the share of the K loop's global-load bytes moved by 16-byte instructions,
the SASS instructions of the K loop, and the weight bytes the loop reads per cycle of instruction issue: an
SM issues four warp instructions a cycle, so a loop that reads fewer bytes per cycle than the SM's
share of HBM bandwidth is bound by instructions, not memory, whatever the block sizes.

    python bench/kernel_report.py                 # sm_90 (H100, H200)
    python bench/kernel_report.py --arch 80       # sm_80 (A100)

A launch over the SM's shared memory is refused, as the driver would refuse it, and the kernels
step down to a smaller config (``fused_moe._launch_fitted``); both rows are printed. Exit status 1
if a kernel that runs spills registers (or does not fit). Nothing here is a timing: a
kernel that compiles cleanly can still be slow, which only the GPU benchmark (bench/gpu.py) shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones

from mixtral.kernels.offline import ARCH_LIMITS, compile_calls, linear_call, moe_call  # noqa: E402
from mixtral.quant import TRITON_LINEAR_MAX_ROWS  # noqa: E402

FORMATS = ("bf16", "int8", "int4")
TOKENS = (1, 8, 64, 4096)
# Weight bytes per element as stored: int4 adds an fp16 scale and min per group of 32.
WEIGHT_BYTES = {"bf16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 32}
# HBM bytes each SM must take per cycle for a kernel to run at the card's bandwidth (datasheet
# bandwidth / SMs / boost clock): a kernel issuing fewer weight bytes per cycle cannot get there.
SM_SHARE = {90: {"H100 SXM": 3.35e12 / 132 / 1.98e9, "H200": 4.8e12 / 132 / 1.98e9},
            89: {"L4": 300e9 / 58 / 2.04e9, "RTX 4090": 1008e9 / 128 / 2.52e9},
            86: {"A10": 600e9 / 72 / 1.695e9, "RTX 3090": 936e9 / 82 / 1.695e9},
            80: {"A100 80GB SXM": 2.04e12 / 108 / 1.41e9}}


def weight_bytes_per_iteration(fmt: str, kernel: str, constants: dict) -> float:
    """Weight bytes one program reads per iteration of its K loop (gate_up reads w1 and w3 tiles)."""
    tiles = 2 if kernel == "_gate_up" else 1
    return tiles * constants["BLOCK_K"] * constants["BLOCK_N"] * WEIGHT_BYTES[fmt]


def cases(formats=FORMATS, tokens=TOKENS):
    for fmt in formats:
        for n in tokens:
            yield f"experts {fmt}", n, moe_call(fmt, n)
    for fmt in formats:
        if fmt == "bf16":
            continue  # bf16 projections are cuBLAS matmuls
        for out, what in ((6144, "qkv"), (4096, "o")):
            for n in tokens:
                if n <= TRITON_LINEAR_MAX_ROWS:  # more rows dequantize and use cuBLAS
                    yield f"{what} {fmt}", n, linear_call(fmt, n, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, choices=sorted(ARCH_LIMITS))
    p.add_argument("--format", choices=FORMATS, action="append", help="repeatable; default all")
    p.add_argument("--tokens", type=int, action="append", help=f"repeatable; default {TOKENS}")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    limit = ARCH_LIMITS[args.arch]["shared_per_block"] // 1024
    shares = ", ".join(f"{card} {b:.1f}" for card, b in SM_SHARE[args.arch].items())
    print(f"sm_{args.arch}: shared memory per block <= {limit} KiB, 255 registers per thread; "
          f"HBM bytes per SM-cycle: {shares}")
    print(f"{'case':<14} {'tokens':>6}  {'kernel':<13} {'BM BN BK w s':<16} {'shared':>8} {'regs':>4} "
          f"{'stack':>5} {'prog/SM':>7} {'mma':<8} {'16B share':>9} {'loop':>5} {'B/cycle':>7}")
    rows, bad, t0 = [], 0, time.perf_counter()
    for case, n, call in cases(tuple(args.format or FORMATS), tuple(args.tokens or TOKENS)):
        for k in compile_calls(call, args.arch):
            c = k.constants
            tiles = f"{c.get('BLOCK_M', '-')} {c.get('BLOCK_N', '-')} {c.get('BLOCK_K', '-')} {k.num_warps} " \
                    f"{k.num_stages}"
            # Of the bytes the K loop's global loads move per iteration, the share in 16-byte loads.
            wide = k.load_bytes(16) / max(k.load_bytes(), 1)
            # Weight bytes per cycle of instruction issue (one SM): compare with the HBM share above.
            fmt = case.split()[-1]
            per_cycle = (weight_bytes_per_iteration(fmt, k.name, c) / k.issue_cycles()
                         if k.name != "_align_kernel" and k.loop_instructions else None)
            ok = k.refused or (k.fits() and k.stack_bytes == 0)
            bad += not ok
            flag = "  refused: over shared memory, steps down" if k.refused else "" if ok else "  <-- !"
            print(f"{case:<14} {n:>6}  {k.name:<13} {tiles:<16} {k.shared_bytes / 1024:>6.0f}Ki {k.registers:>4} "
                  f"{k.stack_bytes:>5} {k.programs_per_sm():>7} {k.mma:<8} {wide:>8.0%} {k.loop_instructions:>5} "
                  f"{'-' if per_cycle is None else f'{per_cycle:.1f}':>7}{flag}")
            rows.append(dict(case=case, tokens=n, kernel=k.name, constants={a: v for a, v in c.items()
                             if isinstance(v, (int, float, bool))}, num_warps=k.num_warps,
                             num_stages=k.num_stages, shared=k.shared_bytes, registers=k.registers,
                             stack=k.stack_bytes, programs_per_sm=k.programs_per_sm(), mma=k.mma,
                             wide_load_share=wide, loop_instructions=k.loop_instructions,
                             weight_bytes_per_issue_cycle=per_cycle, refused=k.refused, ok=ok))
    print(f"{len(rows)} kernels compiled for sm_{args.arch} in {time.perf_counter() - t0:.0f} s; "
          f"{bad} do not fit or spill")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, rows=rows), f, indent=1)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
