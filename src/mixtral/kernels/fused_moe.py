"""The fused MoE experts in Triton: three launches per layer, no host synchronisation.

Same contract as ``mixtral.moe.experts_reference``::

    x (N, H), ids (N, K), weights (N, K) fp32 -> y (N, H)
    gate_up_proj (E, 2I, H): w1 rows then w3 rows;  down_proj (E, H, I)

1. ``moe_align`` (one Triton program): the N*K token *slots* (slot s = token s // K, choice s % K)
   are sorted by expert, stably, and each expert's run is padded to a multiple of BLOCK_M. Output:
   ``sorted_slots`` (padding holds the sentinel N*K) and ``block_expert`` (the expert of each
   BLOCK_M-row block, -1 for blocks past the end). Sizes come from an upper bound known on the host,
   so nothing is read back: the kernels below skip the unused blocks themselves.
   Worked example, K=2, ids=[[2,0],[0,1]], BLOCK_M=4: slots 0..3 have experts [2,0,0,1];
   sorted_slots = [1,2,4,4 | 3,4,4,4 | 0,4,4,4], block_expert = [0, 1, 2, -1...].
2. ``_gate_up`` (grouped GEMM, grid = blocks x I-tiles): gathers the tokens of a block, multiplies
   by the expert's w1 and w3 tiles (two accumulators, one pass over H), writes silu(g) * u to an
   intermediate of (padded slots, I) in *sorted* order, so step 3 reads contiguous rows.
3. ``_down`` (grouped GEMM, grid = blocks x H-tiles x K-splits): multiplies by w2 (over its split
   of I), scales each row by its routing weight, writes the slot's fp32 row to ``(splits, N*K, H)``.
   The split and top-k sums are then one plain reduction: a fixed order, so results are
   bit-for-bit reproducible (an atomic-add epilogue would not be).

Int8 weight-only (``fused_experts_int8``): ``mixtral.quant``'s int8 format, int8 weights with one
fp32 scale per output channel, so a checkpoint written by ``mixtral quantize --mode int8`` runs here
as stored. The same two kernels take a ``HAS_SCALE`` flag: the int8 tile is converted to the
activation dtype inside the loop (exact: |q| <= 127 fits bf16's mantissa) and the scale is applied
once to the accumulator (a per-output-channel scale factors out of the sum over K).
``int8_linear`` is the same loop for a plain int8 ``Linear`` (the attention projections), used for
few rows; many rows dequantize and use cuBLAS.

Performance notes (not yet measured, see docs/kernels.md): decode is memory bound, so the kernels
are judged by bytes moved; a decode block holds one real row in 16 (tl.dot's minimum), which
wastes tensor-core work that is free in that regime. Block sizes live in ``moe_configs``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .moe_configs import MoeConfig, get_config

# The CPU interpreter (TRITON_INTERPRET=1) mis-computes tl.dot on bf16 operands and int8 -> bf16
# casts; under it the products are done in fp32 instead. Compiled kernels keep bf16 tensor cores.
_DOT_FP32 = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# 1. Sort slots by expert, padded to the block size.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _align_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, num_slots, num_experts, max_padded,
    BLOCK_M: tl.constexpr, EP: tl.constexpr, CHUNK: tl.constexpr,
):
    experts = tl.arange(0, EP)
    counts = tl.zeros([EP], dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded

    # Every padded position: its expert (how many runs end at or before it), and whether it is
    # padding (past its expert's count) -> write the sentinel. Disjoint from the real positions
    # written below, so no ordering between the two loops is needed.
    for p0 in range(0, max_padded, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        ex = tl.sum((ends[None, :] <= p[:, None]).to(tl.int32), axis=1)
        sel = experts[None, :] == ex[:, None]
        start_of = tl.sum(tl.where(sel, starts[None, :], 0), axis=1)
        count_of = tl.sum(tl.where(sel, counts[None, :], 0), axis=1)
        is_pad = (ex >= num_experts) | (p - start_of >= count_of)
        tl.store(sorted_ptr + p, tl.full([CHUNK], 0, tl.int32) + num_slots, mask=is_pad & (p < max_padded))
        first_of_block = (p % BLOCK_M) == 0
        block_ex = tl.where(ex < num_experts, ex, -1)
        tl.store(block_expert_ptr + p // BLOCK_M, block_ex, mask=first_of_block & (p < max_padded))

    # Real slots: position = start of the expert's run + rank among earlier slots of that expert.
    seen = tl.zeros([EP], dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)  # (CHUNK, EP)
        before = tl.cumsum(onehot, axis=0) - onehot  # earlier slots of the same expert in this chunk
        dest = tl.sum(onehot * (before + seen[None, :] + starts[None, :]), axis=1)
        tl.store(sorted_ptr + dest, offs.to(tl.int32), mask=offs < num_slots)
        seen += tl.sum(onehot, axis=0)


def padded_size(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the padded length, from shapes alone (at most min(E, slots) runs are padded)."""
    runs = min(num_experts, num_slots)
    return triton.cdiv(num_slots + runs * (block_m - 1), block_m) * block_m


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (N, K) -> sorted_slots (P,) int32, block_expert (P / block_m,) int32. See the module doc."""
    flat = ids.reshape(-1)
    num_slots = flat.numel()
    max_padded = padded_size(num_slots, num_experts, block_m)
    sorted_slots = torch.empty(max_padded, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(max_padded // block_m, dtype=torch.int32, device=ids.device)
    ep = triton.next_power_of_2(num_experts)
    chunk = max(16, min(1024, 8192 // ep))
    _align_kernel[(1,)](flat, sorted_slots, block_expert, num_slots, num_experts, max_padded,
                        BLOCK_M=block_m, EP=ep, CHUNK=chunk)
    return sorted_slots, block_expert


def moe_align_reference(ids: torch.Tensor, num_experts: int, block_m: int):
    """The same layout in plain torch (host loop): the kernel's specification, for tests."""
    flat = ids.reshape(-1).tolist()
    num_slots = len(flat)
    slots, experts = [], []
    for e in range(num_experts):
        run = [s for s, x in enumerate(flat) if x == e]
        if not run:
            continue
        pad = -len(run) % block_m
        slots += run + [num_slots] * pad
        experts += [e] * ((len(run) + pad) // block_m)
    max_padded = padded_size(num_slots, num_experts, block_m)
    slots += [num_slots] * (max_padded - len(slots))
    experts += [-1] * (max_padded // block_m - len(experts))
    return torch.tensor(slots, dtype=torch.int32), torch.tensor(experts, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# 2-3. Grouped GEMMs (bf16 or int8 weights), and a plain int8 Linear.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _block_rows(sorted_ptr, pid_m, num_slots, BLOCK_M: tl.constexpr):
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in sorted order
    slot = tl.load(sorted_ptr + rows)
    return rows, slot, slot < num_slots


@triton.jit
def _mma(a, w, acc, DOT_FP32: tl.constexpr):
    # fp32 activations get true fp32 products ("ieee"; tl.dot would otherwise round them to TF32's
    # 10-bit mantissa): fp32 is the accuracy choice on a GPU, bf16 and int8 are the fast ones.
    if DOT_FP32 or a.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, w.to(a.dtype), acc)


@triton.jit
def _gate_up(
    x_ptr, w_ptr, scale_ptr, h_ptr, sorted_ptr, block_expert_ptr,
    num_slots, I, H, stride_xm, stride_we, stride_wn, stride_se, stride_hm,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """h[sorted row] = silu(x @ w1.T) * (x @ w3.T) for one (block, I-tile). With ``HAS_SCALE`` the
    weights are int8 and ``scale_ptr`` holds one scale per output channel (E, 2I)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows, slot, row_ok = _block_rows(sorted_ptr, pid_m, num_slots, BLOCK_M)
    token = (slot // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
    g_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # (BK, BN)
    u_ptrs = g_ptrs + I * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = offs_k < H - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc_g = _mma(a, g, acc_g, DOT_FP32)
        acc_u = _mma(a, u, acc_u, DOT_FP32)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if HAS_SCALE:  # a per-output-channel scale factors out of the sum over H: apply it once
        s_ptrs = scale_ptr + e * stride_se + offs_n
        acc_g *= tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]
        acc_u *= tl.load(s_ptrs + I, mask=n_ok, other=0.0)[None, :]
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down(
    h_ptr, w_ptr, scale_ptr, y_ptr, rw_ptr, sorted_ptr, block_expert_ptr,
    num_slots, H, I, stride_hm, stride_we, stride_wn, stride_se, stride_ys, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """y[split, slot] = routing weight * (h @ w2.T) over this split's share of I, for one
    (block, H-tile, split); fp32, in slot order. Splits are summed on the host side in a fixed
    order (see ``_run``), never with atomics."""
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    k_per_split = tl.cdiv(tl.cdiv(I, tl.num_programs(2)), BLOCK_K) * BLOCK_K
    k_start = pid_s * k_per_split
    k_end = tl.minimum(I, k_start + k_per_split)  # a split past the end keeps zeros
    rows, slot, row_ok = _block_rows(sorted_ptr, pid_m, num_slots, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + k_start + offs_k[None, :]
    w_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + k_start + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = offs_k < k_end - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = _mma(a, w, acc, DOT_FP32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + e * stride_se + offs_n, mask=n_ok, other=0.0)[None, :]
    acc *= tl.load(rw_ptr + slot, mask=row_ok, other=0.0)[:, None]
    y_ptrs = y_ptr + pid_s.to(tl.int64) * stride_ys + slot[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _linear_int8(
    x_ptr, w_ptr, scale_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """y = (x @ q.T) * scale for a plain int8 Linear: the ``_down`` loop without experts or routing."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = _mma(a, w, acc, DOT_FP32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc *= tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor):
    N, H = x.shape
    E, two_i, H2 = w13.shape
    if H2 != H or w2.shape != (E, H, two_i // 2):
        raise ValueError(f"expert shapes do not match: x {tuple(x.shape)}, gate_up {tuple(w13.shape)}, "
                         f"down {tuple(w2.shape)}")
    if ids.shape != weights.shape or ids.shape[0] != N:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be (N, K)")
    if x.stride(-1) != 1 or w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("x and expert weights must be contiguous in their last dimension")


def _configs(fmt: str, N: int, K: int, E: int, I: int, H: int, config):
    if config is not None:
        return config, config
    return (get_config("gate_up", fmt, N, K, E, 2 * I, H), get_config("down", fmt, N, K, E, H, I))


def fused_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act=F.silu,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """The experts' common signature on the Triton kernels (SiLU experts only)."""
    if act is not F.silu:
        raise NotImplementedError("the fused MoE kernel implements SiLU experts only")
    if config is None:
        return torch.ops.mixtral.fused_experts(x, ids, weights, gate_up_proj, down_proj)
    return _run("bf16", x, ids, weights, gate_up_proj, None, down_proj, None, config)


def fused_experts_int8(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_q: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down_q: torch.Tensor,
    down_scale: torch.Tensor,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """Int8 weight-only experts in ``mixtral.quant``'s int8 format: ``*_q`` int8 (E, N, K),
    ``*_scale`` fp32 (E, N), w = q * scale. SiLU experts."""
    if gate_up_scale.shape != gate_up_q.shape[:2] or down_scale.shape != down_q.shape[:2]:
        raise ValueError(f"int8 scales must be one per output channel: gate_up {tuple(gate_up_q.shape)} with "
                         f"scales {tuple(gate_up_scale.shape)}, down {tuple(down_q.shape)} with "
                         f"scales {tuple(down_scale.shape)}")
    gs, ds = gate_up_scale.float().contiguous(), down_scale.float().contiguous()
    if config is None:
        return torch.ops.mixtral.fused_experts_int8(x, ids, weights, gate_up_q, gs, down_q, ds)
    return _run("int8", x, ids, weights, gate_up_q, gs, down_q, ds, config)


def _run(fmt, x, ids, weights, w13, s13, w2, s2, config: MoeConfig | None) -> torch.Tensor:
    _check(x, ids, weights, w13, w2)
    N, H = x.shape
    E, I, K = w13.shape[0], w2.shape[-1], ids.shape[1]
    cfg_up, cfg_down = _configs(fmt, N, K, E, I, H, config)
    # Both GEMMs walk the same sorted layout, so they share one block_m (the gate_up config's).
    block_m = cfg_up.block_m
    cfg_down = cfg_down._replace(block_m=block_m)
    has_scale = s13 is not None
    # Without scales the kernels never read scale_ptr; any tensor fills the slot.
    s13, s2 = (s13, s2) if has_scale else (w13, w2)
    sorted_slots, block_expert = moe_align(ids, E, block_m)
    blocks = block_expert.numel()

    h = torch.empty(sorted_slots.numel(), I, dtype=x.dtype, device=x.device)  # sorted order
    c = cfg_up
    _gate_up[(blocks, triton.cdiv(I, c.block_n))](
        x, w13, s13, h, sorted_slots, block_expert, N * K, I, H, x.stride(0), w13.stride(0), w13.stride(1),
        s13.stride(0), h.stride(0), TOP_K=K, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        HAS_SCALE=has_scale, DOT_FP32=_DOT_FP32, num_warps=c.num_warps, num_stages=c.num_stages)

    # Split-K over I for the down product: at decode its grid is only (2 blocks x H / BLOCK_N), too
    # few programs to keep every SM streaming weights; splits multiply it. Partial sums in fp32.
    c = cfg_down
    y = torch.empty(c.split_k, N * K, H, dtype=torch.float32, device=x.device)  # slot order
    rw = weights.reshape(-1).float().contiguous()
    _down[(blocks, triton.cdiv(H, c.block_n), c.split_k)](
        h, w2, s2, y, rw, sorted_slots, block_expert, N * K, H, I, h.stride(0), w2.stride(0), w2.stride(1),
        s2.stride(0), y.stride(0), y.stride(1), BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        HAS_SCALE=has_scale, DOT_FP32=_DOT_FP32, num_warps=c.num_warps, num_stages=c.num_stages)
    # Splits and top-k choices summed by a plain reduction: a fixed order, so results are
    # bit-for-bit reproducible (an atomic-add epilogue would not be).
    return y.view(c.split_k, N, K, H).sum(dim=(0, 2)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# A plain int8 Linear (attention projections of an int8 model) for few rows
# ---------------------------------------------------------------------------------------------
def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                config: MoeConfig | None = None) -> torch.Tensor:
    """x (M, K) @ (qweight (N, K) int8 * scales (N,)).T -> (M, N) in x's dtype. No host sync."""
    M, K = x.shape
    N = qweight.shape[0]
    if qweight.shape != (N, K) or scales.shape != (N,) or x.stride(-1) != 1 or qweight.stride(-1) != 1:
        raise ValueError(f"int8_linear: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"scales {tuple(scales.shape)} (contiguous rows, one scale per output row)")
    if config is None:
        return torch.ops.mixtral.int8_linear(x, qweight, scales)
    return _linear(x, qweight, scales, config)


def _linear(x, qweight, scales, config) -> torch.Tensor:
    M, K = x.shape
    N = qweight.shape[0]
    c = config or get_config("linear", "int8", M, 1, 1, N, K)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _linear_int8[(triton.cdiv(M, c.block_m), triton.cdiv(N, c.block_n))](
        x, qweight, scales, y, M, N, K, x.stride(0), qweight.stride(0), y.stride(0),
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, DOT_FP32=_DOT_FP32,
        num_warps=c.num_warps, num_stages=c.num_stages)
    return y


# ---------------------------------------------------------------------------------------------
# The same three entry points as torch custom ops
# ---------------------------------------------------------------------------------------------
# torch.compile cannot trace into a Triton launch made from Python; as registered ops the kernels
# are opaque nodes of the compiled decode step (no graph break), their output shapes given by the
# fake implementations. Config lookup happens inside, from the shapes, so the op signatures carry
# tensors only. Calls with an explicit config (tests, tuning) skip the ops.

@torch.library.custom_op("mixtral::fused_experts", mutates_args=())
def _fused_experts_op(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                      w2: torch.Tensor) -> torch.Tensor:
    return _run("bf16", x, ids, weights, w13, None, w2, None, None)


@torch.library.custom_op("mixtral::fused_experts_int8", mutates_args=())
def _fused_experts_int8_op(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, q13: torch.Tensor,
                           s13: torch.Tensor, q2: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    return _run("int8", x, ids, weights, q13, s13, q2, s2, None)


@torch.library.custom_op("mixtral::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return _linear(x, qweight, scales, None)


@_fused_experts_op.register_fake
def _(x, ids, weights, w13, w2):
    return torch.empty_like(x)


@_fused_experts_int8_op.register_fake
def _(x, ids, weights, q13, s13, q2, s2):
    return torch.empty_like(x)


@_int8_linear_op.register_fake
def _(x, qweight, scales):
    return x.new_empty(x.shape[0], qweight.shape[0])
