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

Quantized weights (``fused_experts_quantized``): ``mixtral.quant``'s int8 and int4 formats read as
stored, so a model quantized by ``quantize_model`` or loaded from a ``mixtral quantize`` checkpoint
runs here without conversion. The same kernels take the format as a constexpr (``WFMT``): int8 tiles
are converted to the activation dtype in the loop (exact: |q| <= 127 fits bf16's mantissa) and the
per-output-row scale is applied once to the accumulator (it factors out of the sum over K); int4
tiles are unpacked and dequantized in the loop (layout version 2; the scale and min change every G
inputs). ``quantized_linear`` is the same loop for a plain ``Linear`` (the attention projections),
used for few rows; many rows dequantize and use cuBLAS.

Performance notes (not yet measured, see docs/kernels.md): decode is memory bound, so the kernels
are judged by bytes moved; a decode block holds one real row in 16 (tl.dot's minimum), which
wastes tensor-core work that is free in that regime. Block sizes live in ``moe_configs``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

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
    # (CHUNK, EP) int32 tiles live in registers: 4096 elements over 128 threads compile without
    # spills, 8192 spill (bench/kernel_report.py shows both). No larger than the slots either: this
    # single program is pure latency at decode, and a chunk much wider than the slots multiplies
    # its instruction count (figures in docs/kernels.md).
    chunk = max(16, min(4096 // ep, triton.next_power_of_2(num_slots)))
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
# 2-3. Grouped GEMMs over float, int8 or int4 weights, and a plain quantized Linear.
# ---------------------------------------------------------------------------------------------
# Weight formats (WFMT): 0 float as stored; 1 int8, one scale per output row (applied to the
# accumulator after the K loop); 2 int4 in mixtral.quant's layout version 2, dequantized in the
# tile (its scale and min change along K every G inputs, so they cannot be factored out).
W_FLOAT, W_INT8, W_INT4 = 0, 1, 2


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
def _weight_tile(w_ptr, s_ptr, m_ptr, n, n_ok, k0, k, k_ok, stride_wn, stride_sn, K, G,
                 WFMT: tl.constexpr, GROUPS: tl.constexpr):
    """The (BK, BN) tile of weight rows ``n`` (BN,) at inputs ``k = k0 + arange(BK)``: as stored
    (float, int8), or dequantized to fp32 (int4). Pointers are already at the expert's base."""
    mask = k_ok[:, None] & n_ok[None, :]
    n = n.to(tl.int64)
    if WFMT == 2:
        # Layout v2: inputs 64p + j and 64p + 32 + j share byte 32p + j (low, high nibble); a last
        # odd block of 32 stands alone, its inputs j and j + 16 sharing a byte.
        paired = (K // 64) * 64
        in_pair = k < paired
        byte = tl.where(in_pair, (k // 64) * 32 + k % 32, paired // 2 + (k - paired) % 16)
        shift = tl.where(in_pair, ((k // 32) % 2) * 4, ((k - paired) // 16) * 4)
        q = tl.load(w_ptr + n[None, :] * stride_wn + byte[:, None], mask=mask, other=0).to(tl.int32)
        nibble = ((q >> shift[:, None]) & 0xF).to(tl.float32)
        if GROUPS == 0:
            # Groups not aligned with the tile (a group size that is no power of two): a scale
            # and min per element.
            group = k // G
            sc = tl.load(s_ptr + n[None, :] * stride_sn + group[:, None], mask=mask, other=0.0).to(tl.float32)
            mn = tl.load(m_ptr + n[None, :] * stride_sn + group[:, None], mask=mask, other=0.0).to(tl.float32)
            tile = nibble * sc + mn
        else:
            # The tile spans GROUPS whole groups (or lies inside one): load one scale and min per
            # group and row, and broadcast them over the group's inputs. Loading them per element
            # cost two 2-byte loads per weight and spilled registers (bench/kernel_report.py).
            BK: tl.constexpr = k.shape[0]
            BN: tl.constexpr = n.shape[0]
            group = k0 // G + tl.arange(0, GROUPS)
            g_mask = (group * G < K)[:, None] & n_ok[None, :]
            sc = tl.load(s_ptr + n[None, :] * stride_sn + group[:, None], mask=g_mask, other=0.0).to(tl.float32)
            mn = tl.load(m_ptr + n[None, :] * stride_sn + group[:, None], mask=g_mask, other=0.0).to(tl.float32)
            grouped = tl.reshape(nibble, (GROUPS, BK // GROUPS, BN))
            tile = tl.reshape(grouped * sc[:, None, :] + mn[:, None, :], (BK, BN))
    else:
        tile = tl.load(w_ptr + n[None, :] * stride_wn + k[:, None], mask=mask, other=0)
    # One return: compiled Triton type-checks every return of a function, even one in a branch
    # that a constexpr rules out (float32 here, uint8/int8 there), which the interpreter never does.
    return tile


def _scale_groups(wfmt: int, G: int, block_k: int) -> int:
    """Whole int4 groups per BLOCK_K tile (1 when a group holds the tile), 0 when they do not align
    (or the weights are not int4). Tiles start at multiples of BLOCK_K (split-K included), so a
    power-of-two G aligns either way."""
    if wfmt != W_INT4:
        return 0
    if block_k % G == 0:
        return block_k // G
    return 1 if G % block_k == 0 else 0


@triton.jit
def _row_scale(acc, s_ptr, n, n_ok, stride_sn, WFMT: tl.constexpr):
    """int8: the per-output-row scale, applied once after the sum over K (it factors out)."""
    if WFMT == 1:
        acc *= tl.load(s_ptr + n.to(tl.int64) * stride_sn, mask=n_ok, other=0.0)[None, :]
    return acc


@triton.jit
def _gate_up(
    x_ptr, w_ptr, s_ptr, m_ptr, h_ptr, sorted_ptr, block_expert_ptr,
    num_slots, I, H, G, stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WFMT: tl.constexpr, GROUPS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """h[sorted row] = silu(x @ w1.T) * (x @ w3.T) for one (block, I-tile); w1 rows then w3 rows."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows, slot, row_ok = _block_rows(sorted_ptr, pid_m, num_slots, BLOCK_M)
    token = (slot // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    w_e, s_e, m_e = w_ptr + e * stride_we, s_ptr + e * stride_se, m_ptr + e * stride_se
    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < H
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = _weight_tile(w_e, s_e, m_e, offs_n, n_ok, k0, k, k_ok, stride_wn, stride_sn, H, G, WFMT, GROUPS)
        u = _weight_tile(w_e, s_e, m_e, offs_n + I, n_ok, k0, k, k_ok, stride_wn, stride_sn, H, G, WFMT, GROUPS)
        acc_g = _mma(a, g, acc_g, DOT_FP32)
        acc_u = _mma(a, u, acc_u, DOT_FP32)
        a_ptrs += BLOCK_K
    acc_g = _row_scale(acc_g, s_e, offs_n, n_ok, stride_sn, WFMT)
    acc_u = _row_scale(acc_u, s_e, offs_n + I, n_ok, stride_sn, WFMT)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down(
    h_ptr, w_ptr, s_ptr, m_ptr, y_ptr, rw_ptr, sorted_ptr, block_expert_ptr,
    num_slots, H, I, G, stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_ys, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WFMT: tl.constexpr, GROUPS: tl.constexpr, DOT_FP32: tl.constexpr,
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
    w_e, s_e, m_e = w_ptr + e * stride_we, s_ptr + e * stride_se, m_ptr + e * stride_se
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + k_start + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < k_end
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(w_e, s_e, m_e, offs_n, n_ok, k0, k, k_ok, stride_wn, stride_sn, I, G, WFMT, GROUPS)
        acc = _mma(a, w, acc, DOT_FP32)
        a_ptrs += BLOCK_K
    acc = _row_scale(acc, s_e, offs_n, n_ok, stride_sn, WFMT)
    acc *= tl.load(rw_ptr + slot, mask=row_ok, other=0.0)[:, None]
    y_ptrs = y_ptr + pid_s.to(tl.int64) * stride_ys + slot[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _linear(
    x_ptr, w_ptr, s_ptr, m_ptr, y_ptr, M, N, K, G, stride_xm, stride_wn, stride_sn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WFMT: tl.constexpr,
    GROUPS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """y = x @ w.T for a plain quantized Linear: the ``_down`` loop without experts or routing."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(w_ptr, s_ptr, m_ptr, offs_n, n_ok, k0, k, k_ok, stride_wn, stride_sn, K, G, WFMT, GROUPS)
        acc = _mma(a, w, acc, DOT_FP32)
        a_ptrs += BLOCK_K
    acc = _row_scale(acc, s_ptr, offs_n, n_ok, stride_sn, WFMT)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
class Weight(NamedTuple):
    """A weight (N, K) or stack of expert weights (E, N, K) in a kernel's terms.

    ``q``: float (.., N, K), int8 (.., N, K) or int4 packed uint8 (.., N, K/2); ``scales``: int8
    (.., N) fp32, int4 (.., N, K/G) fp16; ``mins``: int4 only, like ``scales``."""
    fmt: str  # "float" | "int8" | "int4"
    q: torch.Tensor
    scales: torch.Tensor | None = None
    mins: torch.Tensor | None = None

    @classmethod
    def quantized(cls, tensors: list[torch.Tensor]) -> Weight:
        """From ``QuantizedTensor.kernel_args()``: [qweight, scales] int8, [qweight, scales, mins] int4."""
        if len(tensors) == 3:
            return cls("int4", *tensors)
        q, scales = tensors
        return cls("int8", q, scales.float())  # fp32 scales, as the kernel reads them

    @property
    def in_features(self) -> int:
        return self.q.shape[-1] * (2 if self.fmt == "int4" else 1)

    @property
    def out_features(self) -> int:
        return self.q.shape[-2]

    def check(self, what: str) -> None:
        lead = self.q.shape[:-1]
        if self.q.stride(-1) != 1:
            raise ValueError(f"{what}: weights must be contiguous in their last dimension")
        if self.fmt == "int8" and (self.scales is None or self.scales.shape != lead):
            raise ValueError(f"{what}: int8 scales must be one per output channel: weight {tuple(self.q.shape)}, "
                             f"scales {None if self.scales is None else tuple(self.scales.shape)}")
        if self.fmt == "int4":
            ok = (self.scales is not None and self.mins is not None and self.scales.shape[:-1] == lead
                  and self.mins.shape == self.scales.shape and self.in_features % self.scales.shape[-1] == 0
                  and (self.in_features // self.scales.shape[-1]) % 32 == 0)
            if not ok:
                raise ValueError(f"{what}: int4 weight {tuple(self.q.shape)} needs scales and mins of shape "
                                 f"(..., N, K/G) with G a multiple of 32, got "
                                 f"{None if self.scales is None else tuple(self.scales.shape)} and "
                                 f"{None if self.mins is None else tuple(self.mins.shape)}")

    def args(self) -> tuple:
        """(w, scales, mins, stride_we, stride_wn, stride_se, stride_sn, G, WFMT) for the kernels."""
        q = self.q
        stride_we = q.stride(0) if q.dim() == 3 else 0
        if self.fmt == "float":  # scale and min pointers are never read: any tensor fills them
            return q, q, q, stride_we, q.stride(-2), 0, 0, 1, W_FLOAT
        s = self.scales
        m = self.mins if self.mins is not None else s
        stride_se = s.stride(0) if q.dim() == 3 else 0
        if self.fmt == "int8":
            return q, s, m, stride_we, q.stride(-2), stride_se, s.stride(-1), 1, W_INT8
        return (q, s, m, stride_we, q.stride(-2), stride_se, s.stride(-2), self.in_features // s.shape[-1],
                W_INT4)


def _check(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: Weight, w2: Weight) -> None:
    N, H = x.shape
    E, two_i = w13.q.shape[0], w13.out_features
    if w13.in_features != H or w2.q.shape[0] != E or (w2.out_features, w2.in_features) != (H, two_i // 2):
        raise ValueError(f"expert shapes do not match: x {tuple(x.shape)}, gate_up {tuple(w13.q.shape)}, "
                         f"down {tuple(w2.q.shape)} ({w13.fmt})")
    if ids.shape != weights.shape or ids.shape[0] != N:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be (N, K)")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    w13.check("gate_up")
    w2.check("down")


# An explicit config for the experts: one for both products, or a (gate_up, down) pair (tuning
# compares the table's pair with candidates). Both products share the gate_up config's block_m.
ExpertsConfig = MoeConfig | tuple[MoeConfig, MoeConfig]


def _configs(fmt: str, N: int, K: int, E: int, I: int, H: int, config: ExpertsConfig | None):
    if isinstance(config, MoeConfig):
        return config, config
    if config is not None:
        return config
    return (get_config("gate_up", fmt, N, K, E, 2 * I, H), get_config("down", fmt, N, K, E, H, I))


def fused_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act=F.silu,
    config: ExpertsConfig | None = None,
) -> torch.Tensor:
    """The experts' common signature on the Triton kernels (SiLU experts only)."""
    if act is not F.silu:
        raise NotImplementedError("the fused MoE kernel implements SiLU experts only")
    if config is None:
        return torch.ops.mixtral.fused_experts(x, ids, weights, gate_up_proj, down_proj)
    return _run(x, ids, weights, Weight("float", gate_up_proj), Weight("float", down_proj), config)


def fused_experts_quantized(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: list[torch.Tensor],
    down: list[torch.Tensor],
    config: ExpertsConfig | None = None,
) -> torch.Tensor:
    """SiLU experts with ``mixtral.quant``'s int8 or int4 weights, each given as its stored tensors
    (``QuantizedTensor.kernel_args()``): [qweight, scales] for int8, [qweight, scales, mins] for int4."""
    if config is None:
        return torch.ops.mixtral.fused_experts_quantized(x, ids, weights, list(gate_up), list(down))
    return _run(x, ids, weights, Weight.quantized(gate_up), Weight.quantized(down), config)


# ---------------------------------------------------------------------------------------------
# Fitting a config to the device's shared memory
# ---------------------------------------------------------------------------------------------
# The table's tiles are chosen for H100/H200 (227 KiB of shared memory per block) and A100 (163).
# Ada and consumer Ampere cards have 99 KiB: there the bf16 decode tiles (108 KiB) and int8's
# (120 KiB) do not fit, and Triton refuses the launch (OutOfResources). Rather than fail, a launch
# steps down to the nearest smaller config that fits, and that choice is kept per (kernel, config,
# device): fewer pipeline stages first (the cheapest loss), then a shorter K tile, then a narrower
# N tile. block_m never changes: both GEMMs and the sorted layout share it. Only the table's
# configs step down; an explicit config (tests, tuning) runs as given or fails.
_FITTED: dict[tuple, MoeConfig] = {}


def _smaller(c: MoeConfig) -> MoeConfig | None:
    if c.num_stages > 2:
        return c._replace(num_stages=c.num_stages - 1)
    if c.block_k > 32:
        return c._replace(block_k=c.block_k // 2)
    if c.block_n > 16:
        return c._replace(block_n=c.block_n // 2)
    return None


def _launch_fitted(kernel_name: str, device: torch.device, config: MoeConfig, launch,
                   fit: bool = True) -> MoeConfig:
    """``launch(config)``, or (``fit``) ``launch`` of the nearest smaller config the device has
    shared memory for. Returns the config used."""
    if not fit:
        launch(config)
        return config
    key = (kernel_name, device, config)
    c = _FITTED.get(key, config)
    while True:
        try:
            launch(c)
        except OutOfResources:
            smaller = _smaller(c)
            if smaller is None:
                raise
            c = smaller
            continue
        _FITTED[key] = c
        return c


def _run(x, ids, weights, w13: Weight, w2: Weight, config: ExpertsConfig | None) -> torch.Tensor:
    _check(x, ids, weights, w13, w2)
    N, H = x.shape
    E, I, K = w13.q.shape[0], w2.in_features, ids.shape[1]
    cfg_up, cfg_down = _configs("bf16" if w13.fmt == "float" else w13.fmt, N, K, E, I, H, config)
    # Both GEMMs walk the same sorted layout, so they share one block_m (the gate_up config's).
    block_m = cfg_up.block_m
    cfg_down = cfg_down._replace(block_m=block_m)
    sorted_slots, block_expert = moe_align(ids, E, block_m)
    blocks = block_expert.numel()

    h = torch.empty(sorted_slots.numel(), I, dtype=x.dtype, device=x.device)  # sorted order
    w13_args = w13.args()

    def gate_up(c: MoeConfig) -> None:
        w, s, m, swe, swn, sse, ssn, G, wfmt = w13_args
        _gate_up[(blocks, triton.cdiv(I, c.block_n))](
            x, w, s, m, h, sorted_slots, block_expert, N * K, I, H, G, x.stride(0), swe, swn, sse, ssn, h.stride(0),
            TOP_K=K, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, WFMT=wfmt,
            GROUPS=_scale_groups(wfmt, G, c.block_k), DOT_FP32=_DOT_FP32,
            num_warps=c.num_warps, num_stages=c.num_stages)

    _launch_fitted("gate_up", x.device, cfg_up, gate_up, fit=config is None)

    # Split-K over I for the down product: at decode its grid is only (2 blocks x H / BLOCK_N), too
    # few programs to keep every SM streaming weights; splits multiply it. Partial sums in fp32.
    splits = cfg_down.split_k
    y = torch.empty(splits, N * K, H, dtype=torch.float32, device=x.device)  # slot order
    rw = weights.reshape(-1).float().contiguous()
    w2_args = w2.args()

    def down(c: MoeConfig) -> None:
        w, s, m, swe, swn, sse, ssn, G, wfmt = w2_args
        _down[(blocks, triton.cdiv(H, c.block_n), splits)](
            h, w, s, m, y, rw, sorted_slots, block_expert, N * K, H, I, G, h.stride(0), swe, swn, sse, ssn,
            y.stride(0), y.stride(1), BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, WFMT=wfmt,
            GROUPS=_scale_groups(wfmt, G, c.block_k), DOT_FP32=_DOT_FP32,
            num_warps=c.num_warps, num_stages=c.num_stages)

    _launch_fitted("down", x.device, cfg_down, down, fit=config is None)
    # Splits and top-k choices summed by a plain reduction: a fixed order, so results are
    # bit-for-bit reproducible (an atomic-add epilogue would not be).
    return y.view(splits, N, K, H).sum(dim=(0, 2)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# A plain quantized Linear (the attention projections of an int8/int4 model), for few rows
# ---------------------------------------------------------------------------------------------
def quantized_linear(x: torch.Tensor, weight: list[torch.Tensor], config: MoeConfig | None = None) -> torch.Tensor:
    """x (M, K) @ w.T -> (M, N) in x's dtype, w given as its stored tensors (``kernel_args()``:
    [qweight, scales] int8, [qweight, scales, mins] int4). No host sync."""
    if config is None:
        return torch.ops.mixtral.quantized_linear(x, list(weight))
    return _linear_run(x, weight, config)


def _linear_run(x: torch.Tensor, weight: list[torch.Tensor], config: MoeConfig | None) -> torch.Tensor:
    w = Weight.quantized(weight)
    M, K = x.shape
    if w.q.dim() != 2 or w.in_features != K or x.stride(-1) != 1:
        raise ValueError(f"quantized_linear: x {tuple(x.shape)} against a {w.fmt} weight {tuple(w.q.shape)} "
                         f"(contiguous rows, K matching)")
    w.check("quantized_linear")
    N = w.out_features
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    q, s, m, _, swn, _, ssn, G, wfmt = w.args()

    def linear(c: MoeConfig) -> None:
        _linear[(triton.cdiv(M, c.block_m), triton.cdiv(N, c.block_n))](
            x, q, s, m, y, M, N, K, G, x.stride(0), swn, ssn, y.stride(0),
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, WFMT=wfmt,
            GROUPS=_scale_groups(wfmt, G, c.block_k), DOT_FP32=_DOT_FP32,
            num_warps=c.num_warps, num_stages=c.num_stages)

    _launch_fitted("linear", x.device, config or get_config("linear", w.fmt, M, 1, 1, N, K), linear,
                   fit=config is None)
    return y


# ---------------------------------------------------------------------------------------------
# The entry points as torch custom ops
# ---------------------------------------------------------------------------------------------
# torch.compile cannot trace into a Triton launch made from Python; as registered ops the kernels
# are opaque nodes of the compiled decode step (no graph break), their output shapes given by the
# fake implementations. Config lookup happens inside, from the shapes, so the op signatures carry
# tensors only. Calls with an explicit config (tests, tuning) skip the ops.

@torch.library.custom_op("mixtral::fused_experts", mutates_args=())
def _fused_experts_op(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                      w2: torch.Tensor) -> torch.Tensor:
    return _run(x, ids, weights, Weight("float", w13), Weight("float", w2), None)


@torch.library.custom_op("mixtral::fused_experts_quantized", mutates_args=())
def _fused_experts_quantized_op(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                                gate_up: list[torch.Tensor], down: list[torch.Tensor]) -> torch.Tensor:
    return _run(x, ids, weights, Weight.quantized(gate_up), Weight.quantized(down), None)


@torch.library.custom_op("mixtral::quantized_linear", mutates_args=())
def _quantized_linear_op(x: torch.Tensor, weight: list[torch.Tensor]) -> torch.Tensor:
    return _linear_run(x, weight, None)


@_fused_experts_op.register_fake
def _(x, ids, weights, w13, w2):
    return torch.empty_like(x)


@_fused_experts_quantized_op.register_fake
def _(x, ids, weights, gate_up, down):
    return torch.empty_like(x)


@_quantized_linear_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight[0].shape[0])
