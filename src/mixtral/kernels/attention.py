"""Attention on the GPU, driven by the cache's ``StepLayout`` instead of a dense mask.

``mixtral.layers.build_mask`` materializes a (B, 1, T, S) boolean mask: fine on the CPU, but at a 4096-token
prefill that is 16M entries per row and it rules out the flash kernels. Here the same rule --
query i sees key j iff j is real, j <= i and, with a window W, i - W < j -- is either implied by
a kernel's own arguments or evaluated inside the kernel:

* ``flash_attn`` (the flash-attn package, when installed): unpadded steps whose keys sit in token
  order (growing cache, or a rolling cache at decode where every held key is in the window).
  ``causal=True`` aligns queries to the *last* keys, which is our indexing; ``window_size=(W-1, 0)``
  is the sliding window.
* SDPA (PyTorch picks its flash / memory-efficient backend): the same unpadded cases without the
  package, via ``is_causal`` or no mask at all.
* FlexAttention: everything else -- left padding, a rolling buffer whose slots are out of order,
  sliding-window prefill, chunks after earlier tokens. ``mask_mod`` reads ``key_index``,
  ``key_valid`` and ``query_index`` (a few KB) and FlexAttention skips fully masked 128x128
  tiles, so sliding-window prefill costs ~T*W, not T*S. On CUDA it runs compiled (its decode
  kernel is used for short T); on the CPU it runs eagerly, which is only for tests.

Status: the CPU tests cover the FlexAttention and SDPA paths against the dense-mask reference; the
flash-attn path and compiled FlexAttention are unmeasured (no GPU when written), see docs/kernels.md.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from ..cache import StepLayout


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: StepLayout, window: int | None
) -> torch.Tensor:
    """q (B, nh, T, hd), k/v (B, nkv, S, hd) -> (B, nh, T, hd). GQA by head grouping.

    With no padding (``layout.all_valid``) and T > 1, the keys are tokens 0..S-1 in order (a
    rolling buffer never reports all_valid for a chunk), so causal kernels aligned to the last key
    are exact. At T == 1 key order does not matter, and a full rolling buffer holds only keys
    inside the window.
    """
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if layout.all_valid:
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
            return _flash_attn(q, k, v, window)
        if T == 1 and (window is None or S <= window):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        if S == T and (window is None or window >= T):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return flex_attention_layout(q, k, v, layout, window)


def _flash_attn(q, k, v, window: int | None) -> torch.Tensor:
    from flash_attn import flash_attn_func  # (B, T, nh, hd) layout

    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
        window_size=(window - 1, 0) if window is not None else (-1, -1),
    )
    return out.transpose(1, 2)


def layout_mask_mod(layout: StepLayout, window: int | None):
    """FlexAttention's ``mask_mod`` for a step: ``build_mask``'s rule, evaluated per (b, h, i, j)."""
    key_index, key_valid, query_index = layout.key_index, layout.key_valid, layout.query_index

    def mask_mod(b, h, i, j):
        qi, kj = query_index[i], key_index[j]
        ok = (kj <= qi) & (kj >= 0) & key_valid[b, j]
        if window is not None:
            ok = ok & (kj > qi - window)
        return ok

    return mask_mod


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=None)


def flex_attention_layout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: StepLayout, window: int | None
) -> torch.Tensor:
    """FlexAttention with the layout's mask. Rows that may see nothing (padding queries) come out
    as zeros, not NaN, as SDPA gives them (see ``mixtral.layers.build_mask``)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, T, S = q.shape[0], q.shape[2], k.shape[2]
    block_mask = create_block_mask(layout_mask_mod(layout, window), B, None, T, S, device=q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
