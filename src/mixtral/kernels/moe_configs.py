"""Block sizes for the fused MoE kernels, kept as data.

Keyed by ``(kernel, weight format, tokens bucket, E, N, K)`` where N and K are the product's output
and reduction sizes (gate_up: N = 2I, K = H; down: N = H, K = I) and the tokens bucket is the
smallest power of two >= the number of tokens in the call. A missing key falls back to
``default_config``; ``bench/gpu.py --tune`` measures candidates on the card and prints entries to
paste here.

Status: the entries below are *starting points chosen by reasoning, not timed* (the sessions that
wrote them had no GPU); each compiles for sm_90 and sm_80 (``bench/kernel_report.py``) within its
shared memory and without spilling registers (on 99 KiB cards the launch steps down, see
``fused_moe._launch_fitted``). Decode (few tokens) is memory bound: one 16-row tile per
expert, narrow N tiles so the weights are streamed by many programs at once. Prefill is compute
bound: 64-128 row tiles and wide N tiles for tensor-core reuse.
"""

from __future__ import annotations

from typing import NamedTuple


class MoeConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # the down product only (gate_up's SiLU needs whole sums)


# Mixtral-8x7B: E=8, H=4096, I=14336.
_MIXTRAL_8X7B = {
    # (kernel, format, bucket): config
    ("gate_up", "bf16", 1): MoeConfig(16, 64, 128, 4, 4),
    ("down", "bf16", 1): MoeConfig(16, 32, 256, 4, 4),
    ("gate_up", "int8", 1): MoeConfig(16, 64, 256, 4, 4),
    ("down", "int8", 1): MoeConfig(16, 32, 256, 4, 4),
    ("gate_up", "bf16", 64): MoeConfig(16, 64, 128, 4, 4),
    ("down", "bf16", 64): MoeConfig(16, 64, 128, 4, 4),
    # Prefill: 128-row tiles. A 64x128 gate_up tile reads 40 KB (x rows, w1 and w3 tiles) per 2.1
    # MFLOP, ~83 B per SM-cycle at an H100's peak rate, more than L2 feeds an SM; 128x64 reads 32 KB
    # per 2.1 MFLOP and fits twice per SM. (128x128 would read less still, but spills on sm_80.)
    # The down tile has one weight tile, so 128x128 costs no more registers there. All four compile
    # without spills for sm_80 and sm_90 (bench/kernel_report.py).
    ("gate_up", "bf16", 4096): MoeConfig(128, 64, 64, 8, 3),
    ("down", "bf16", 4096): MoeConfig(128, 128, 64, 8, 3),
    ("gate_up", "int8", 4096): MoeConfig(128, 64, 64, 8, 3),
    ("down", "int8", 4096): MoeConfig(128, 128, 64, 8, 3),
    # int4 (group 32) dequantizes in registers, so tiles that suit bf16 spill: these compile for
    # sm_90 with no spills and 2 (gate_up) or 4 (down) programs per SM (bench/kernel_report.py).
    ("gate_up", "int4", 1): MoeConfig(16, 64, 128, 8, 3),
    ("down", "int4", 1): MoeConfig(16, 32, 128, 4, 4),
    ("gate_up", "int4", 64): MoeConfig(16, 64, 128, 8, 3),
    ("down", "int4", 64): MoeConfig(16, 32, 128, 4, 4),
}

CONFIGS: dict[tuple[str, str, int, int, int, int], MoeConfig] = {}
for (_kernel, _fmt, _bucket), _cfg in _MIXTRAL_8X7B.items():
    _n, _k = (2 * 14336, 4096) if _kernel == "gate_up" else (4096, 14336)
    CONFIGS[(_kernel, _fmt, _bucket, 8, _n, _k)] = _cfg

# The quantized attention projections (``quantized_linear``, E = 1): q|k|v (6144 x 4096) and o (4096 x 4096).
# Decode has one 16-row tile, so parallelism comes from N alone: 32-wide tiles give 192 and 128
# programs for the 132 SMs of an H100 (64-wide would leave a third of them idle on o_proj).
# int4 takes half the K depth: with 256 it needed 254 registers per thread under Triton 3.6 (the
# lent GPUs' version), with 128 it needs 127 and four programs fit per SM (bench/kernel_report.py).
for _n in (6144, 4096):
    CONFIGS[("linear", "int8", 1, 1, _n, 4096)] = MoeConfig(16, 32, 256, 4, 4)
    CONFIGS[("linear", "int4", 1, 1, _n, 4096)] = MoeConfig(16, 32, 128, 4, 4)


def tokens_bucket(num_tokens: int) -> int:
    return 1 << max(0, (num_tokens - 1).bit_length())


def default_config(num_tokens: int, top_k: int, num_experts: int) -> MoeConfig:
    """Heuristic: rows per expert decide whether a call is memory bound (decode) or compute bound."""
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 16:
        return MoeConfig(16, 64, 128, 4, 4)
    if rows_per_expert <= 128:
        return MoeConfig(32, 64, 64, 4, 4)
    return MoeConfig(64, 128, 64, 8, 4)


# A table entry serves token counts up to this many powers of two from its bucket. Further away the
# regime may differ (a decode entry's 16-row tiles would re-read each expert's weights 64 times
# for a 4096-token prefill), so the heuristic answers instead.
NEAREST_BUCKET_REACH = 2


def get_config(kernel: str, fmt: str, num_tokens: int, top_k: int, E: int, N: int, K: int) -> MoeConfig:
    """The table's entry whose tokens bucket is nearest ``num_tokens`` (in powers of two), if within
    ``NEAREST_BUCKET_REACH``; otherwise ``default_config``."""
    key = (kernel, fmt, E, N, K)
    entries = {b: c for (kn, f, b, e, n, k), c in CONFIGS.items() if (kn, f, e, n, k) == key}
    want = tokens_bucket(num_tokens).bit_length()
    near = [b for b in entries if abs(b.bit_length() - want) <= NEAREST_BUCKET_REACH]
    if not near:
        return default_config(num_tokens, top_k, E)
    return entries[min(near, key=lambda b: (abs(b.bit_length() - want), b))]
