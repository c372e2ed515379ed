"""Building blocks of the decoder: RMSNorm, rotary embeddings, the one attention-mask rule, the
written-out attention, and the bias-free projection.

Everything here is a small pure function or module over tensors; the model (``mixtral.model``),
the decode steppers (``mixtral.generation``) and the kernels' tests all use these same pieces.
Where a CPU kernel replaces a few torch ops at decode it is chosen by ``mixtral.kernels``'
``cpu_row_kernels`` and gives the same numbers up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cache import StepLayout
from .kernels import cpu_row_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            ck = cpu_row_kernels(x)
            if ck is not None:  # decode: torch's rms_norm op costs more than the arithmetic here
                return ck.rms_norm(x.contiguous(), self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op: same numbers
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, through the CPU matrix-vector kernel for a few fp32 rows of a plain bias-free
    fp32 ``nn.Linear`` (decode): MKL's matrix-vector product reaches only part of the memory
    bandwidth on small CPUs, the kernel streams the weight at full speed."""
    if type(module) is nn.Linear and module.bias is None and module.weight.dtype == torch.float32:
        ck = cpu_row_kernels(x)
        if ck is not None and module.weight.is_contiguous():
            y = ck.linear(x.reshape(-1, x.shape[-1]).contiguous(), [module.weight], False)
            return y.view(*x.shape[:-1], y.shape[-1])
    return module(x)


@dataclass
class Step:
    """What every layer of one forward step shares, decided once per step (``MixtralModel.plan_step``,
    or a decode stepper): rotary phases, the mask in the form the chosen attention path takes, the
    cache, and the optional-output recorder.

    ``attention`` is the path: "sdpa" or "eager" (``mask`` a (B, 1, T, S) bool tensor or None for
    plain causal), "layout" (CUDA kernels that evaluate the rule from ``layout`` itself), or
    "cpu_decode" (one kernel call per layer that applies the rule from ``layout`` and ``rows``, and
    writes the cache; ``cos``/``sin`` then (B, hd) contiguous).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    attention: str
    mask: torch.Tensor | None = None
    cache: Any = None
    layout: StepLayout | None = None
    rows: Any = None  # mixtral.cache.DecodeRows, for "cpu_decode"
    dropout: float = 0.0
    record: Any = None  # mixtral.model.Recorder, or None when no optional output is wanted


# -- rotary embeddings -----------------------------------------------------------------------------

def rotary_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rotary_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """position_ids (B, T) -> cos, sin (B, 1, T, hd), in the rotate-half layout of HF checkpoints."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def derive_position_ids(valid: torch.Tensor | None, row_start: torch.Tensor, T: int) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift a row's rotary phases."""
    if valid is None:
        return row_start[:, None] + torch.arange(T, device=row_start.device)[None]
    pos = row_start[:, None] + valid.long().cumsum(dim=1) - 1
    return pos.masked_fill(~valid, 1).clamp_(min=0)


# -- the attention-mask rule -------------------------------------------------------------------------

def build_mask(layout: StepLayout, window: int | None) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask, True = may attend. The one rule every attention path follows:

    Query i sees key j iff j is real (not padding, not an empty slot), j <= i, and, with a sliding
    window W, i - W < j. No exception for a query that may see nothing (a padding query before its
    row's first real token): each path then gives what transformers' same backend gives, so the
    logits at such positions (which a loss over left-padded rows reads) match too. SDPA (and
    FlexAttention, and the CPU decode kernel) output zeros for such a row; the eager path's
    ``finfo.min`` scores come out uniform, i.e. the mean of all values. Neither is NaN.
    """
    q = layout.query_index[:, None]
    k = layout.key_index[None, :]
    allowed = (k <= q) & (k >= 0)  # (T, S)
    if window is not None:
        allowed &= k > q - window
    allowed = allowed[None] & layout.key_valid[:, None, :]  # (B, T, S)
    return allowed[:, None]


def needs_mask(layout: StepLayout, window: int | None, rolling: bool) -> bool:
    """False when the rule reduces to no mask tensor at all: one query that sees every key held (a
    decode step without padding, over a growing cache or a rolling one that holds only the window),
    or a square causal block (SDPA's ``is_causal``). Both are the common cases."""
    T, S = layout.query_index.shape[0], layout.key_index.shape[0]
    if not layout.all_valid:
        return True
    if T == 1 and (window is None or rolling):
        return False
    return not (S == T and (window is None or window >= T))


# -- attention math ------------------------------------------------------------------------------------

def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out: q (B, nh, T, hd), k/v (B, nkv, S, hd) -> (B, nh, T, hd) and the
    probabilities (B, nh, T, S). ``mask`` None means causal, aligned to the last key."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is None:
        T, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs_dropped = F.dropout(probs, p=dropout) if dropout > 0 else probs
    return probs_dropped @ v, probs


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   dropout: float = 0.0) -> torch.Tensor:
    """PyTorch's fused attention under the same mask convention as ``eager_attention``."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                          is_causal=mask is None and q.shape[2] > 1,
                                          enable_gqa=k.shape[1] != q.shape[1])
