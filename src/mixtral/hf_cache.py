"""Caches from transformers code: the legacy tuple-of-(k, v)-per-layer format and ``DynamicCache``.

The model attends through its own ``KVCache`` (``mixtral.cache``). ``to_kv_cache`` copies a
transformers cache into one before a forward step, and ``write_back`` gives a ``DynamicCache`` the
step's keys and values afterwards, for code that reuses its cache object in place.
"""

from __future__ import annotations

from typing import Any

import torch

from .cache import KVCache


def is_transformers_cache(past: Any) -> bool:
    return hasattr(past, "layers") and hasattr(past, "get_seq_length") and not isinstance(past, KVCache)


def to_kv_cache(past: Any, config, batch: int, attention_mask: torch.Tensor | None = None,
                num_new: int = 0) -> Any:
    """Our KVCache (or any object with its begin/update/end protocol, such as the server's view) as
    is; a legacy tuple or a ``DynamicCache`` copied into a new ``KVCache``, which the output's
    ``past_key_values`` carries on. Neither format records padding, so with an ``attention_mask``
    it must cover past + ``num_new`` tokens: its past columns mark the held keys that are real."""
    if past is None or isinstance(past, KVCache) or hasattr(past, "begin"):
        return past
    if is_transformers_cache(past):
        if config.sliding_window is not None or any(getattr(past, "is_sliding", None) or ()):
            raise TypeError("past_key_values: a transformers cache cannot be used with a sliding-window model "
                            "(its keys are kept in a rolling buffer here); pass the mixtral KVCache that the "
                            "previous call returned as past_key_values")
        if past.get_seq_length() == 0:
            return None  # DynamicCache() passed to start: ours is made fresh, and copied back after the step
        past = tuple((layer.keys, layer.values) for layer in past.layers)
    if isinstance(past, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in past):
        return _from_legacy(past, config, batch, attention_mask, num_new)
    raise TypeError(f"past_key_values must be a mixtral KVCache or a tuple of (k, v) pairs, got {type(past)}")


def _from_legacy(past, config, batch: int, attention_mask: torch.Tensor | None, num_new: int) -> KVCache:
    if len(past) != config.num_hidden_layers:
        raise ValueError(f"past_key_values has {len(past)} layers, the model {config.num_hidden_layers}")
    k0 = past[0][0]
    n = k0.shape[2]
    cache = KVCache.for_model(config, batch, capacity=n, dtype=k0.dtype, device=k0.device)
    if cache.window is not None and n > cache.window:
        raise ValueError("legacy past_key_values longer than the sliding window cannot be converted")
    valid = torch.ones(batch, n, dtype=torch.bool, device=k0.device)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, n + num_new):
            raise ValueError(
                f"attention_mask must be (batch, past + seq_len) = ({batch}, {n + num_new}) with past_key_values "
                f"given as tuples or a transformers cache (they do not record padding), got shape "
                f"{tuple(attention_mask.shape)}")
        valid = attention_mask[:, :n].to(device=k0.device).bool()
    cache.begin(valid, n)
    for i, (k, v) in enumerate(past):
        cache.update(i, k, v)
    cache.end()
    return cache


def write_back(hf_cache: Any, cache: KVCache, num_new: int) -> None:
    """Append the step's ``num_new`` keys and values of every layer to a transformers cache."""
    n = cache.seen
    for i in range(len(cache.k)):
        hf_cache.update(cache.k[i][:, :, n - num_new : n], cache.v[i][:, :, n - num_new : n], i)
