"""The KV cache: keys and values per layer, plus the bookkeeping every layer shares.

Every row of a batch has seen the same number of tokens (``seen``), as in transformers' caches:
padding is expressed through the attention mask, not through ragged lengths. Each stored slot
carries the *index* of the token it holds (0, 1, 2, ... in the order tokens were fed, padding
included) and, per row, whether that token is real or padding. Masks are derived from those two
arrays, so the attention code never needs to know how slots are laid out.

Two layouts, one class:

* ``window is None`` -- a growing buffer. Token ``j`` lives in slot ``j``. Capacity doubles when
  it runs out (or is preallocated with ``capacity=``), so decoding writes in place.
* ``window = W`` -- a rolling buffer of exactly ``W`` slots for sliding-window attention. Token
  ``j`` lives in slot ``j % W``. Worked example, W=4, after a 6-token prompt the slots hold
  indices ``[4, 5, 2, 3]``. Decoding token 6 overwrites slot 2 (index 2 is out of the window
  of query 6, which sees 3..6) giving ``[4, 5, 6, 3]``, and query 6 attends over all four
  slots. A chunk of several tokens (prefill, or a prompt fed after earlier tokens) attends
  over ``cat(slots, chunk)``, since its first query may still need keys the chunk would
  overwrite; only afterwards are the chunk's last ``W`` tokens written into their slots.
  Attention is order-free given the mask, so slots never need rotating.

``RaggedDecodeView`` presents several batch-1 caches (the server's requests, each at its own length)
as one cache of B rows for a decode step. ``StaticCache`` is the fixed-shape form a captured CUDA
graph decodes over: the same protocol, written with tensor indices only (no host synchronisation).

The protocol every cache follows, once per forward step: ``layout = cache.begin(new_valid, T)``;
each layer's ``keys, values = cache.update(layer, k, v)``; ``cache.end()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class StepLayout:
    """What one forward step attends over; the same for every layer.

    key_index: (S,) token index held by each key position, -1 for an empty slot.
    key_valid: (B, S) False where that key is padding.
    query_index: (T,) token index of each query.
    """

    key_index: torch.Tensor
    key_valid: torch.Tensor
    query_index: torch.Tensor
    all_valid: bool  # no padding and no empty slot anywhere: masks reduce to causal/window alone


@dataclass
class DecodeRows:
    """A one-token step as the decode kernels take it, so that they write the new keys and values
    themselves: the caches holding the step's rows, in row order (one batch cache, or the server's
    one cache per request), and per row the slot its new key goes to and how many leading slots it
    attends over; ``query_index`` is the query's token index in the step layout's numbering."""

    caches: list[KVCache]
    slots: list[int]
    lengths: list[int]
    query_index: int

    def keys(self, layer: int) -> list[torch.Tensor]:
        return [c.k[layer] for c in self.caches]

    def values(self, layer: int) -> list[torch.Tensor]:
        return [c.v[layer] for c in self.caches]


class KVCache:
    """Keys and values for all layers of one batch. Shapes: k[layer] is (B, n_kv, capacity, hd)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        window: int | None = None,
        capacity: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window = window
        self.dtype = dtype
        self.device = torch.device(device)
        self.seen = 0  # tokens fed so far (per row, padding included)
        # Real (non-padding) tokens fed so far per row: the next position id of each row.
        self.row_positions = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        size = window if window is not None else capacity
        self._alloc(size)
        self.layout: StepLayout | None = None  # the step's, between begin and end
        self._chunk = 0

    @classmethod
    def for_model(cls, config, batch_size: int, *, capacity: int = 0, dtype=None, device=None) -> KVCache:
        return cls(
            config.num_hidden_layers,
            batch_size,
            config.num_key_value_heads,
            config.dim_per_head,
            window=config.sliding_window,
            capacity=capacity,
            dtype=dtype or torch.float32,
            device=device or "cpu",
        )

    def _alloc(self, size: int) -> None:
        shape = (self.batch_size, self.num_kv_heads, size, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.slot_index = torch.full((size,), -1, dtype=torch.long, device=self.device)
        self.slot_valid = torch.zeros(self.batch_size, size, dtype=torch.bool, device=self.device)
        self._has_padding = False

    @property
    def capacity(self) -> int:
        return self.slot_index.shape[0]

    def get_seq_length(self) -> int:
        """Tokens seen so far (transformers' name)."""
        return self.seen

    def __len__(self) -> int:
        return self.num_layers

    def _grow(self, needed: int) -> None:
        new = max(needed, 2 * self.capacity, 16)
        old_k, old_v, old_index, old_valid, n = self.k, self.v, self.slot_index, self.slot_valid, self.capacity
        had_padding = self._has_padding
        self._alloc(new)
        for i in range(self.num_layers):
            self.k[i][:, :, :n] = old_k[i]
            self.v[i][:, :, :n] = old_v[i]
        self.slot_index[:n] = old_index
        self.slot_valid[:, :n] = old_valid
        self._has_padding = had_padding

    # -- per step ---------------------------------------------------------------------------------
    def begin(self, new_valid: torch.Tensor | None, num_new: int) -> StepLayout:
        """Prepare storage for ``num_new`` tokens; ``new_valid`` is (B, T) bool or None (no padding)."""
        T, n = num_new, self.seen
        query_index = torch.arange(n, n + T, device=self.device)
        if new_valid is None:
            new_valid = torch.ones(self.batch_size, T, dtype=torch.bool, device=self.device)
        else:
            self._has_padding = self._has_padding or not bool(new_valid.all())
        if self.window is None:
            if n + T > self.capacity:
                self._grow(n + T)
            self.slot_index[n : n + T] = query_index
            self.slot_valid[:, n : n + T] = new_valid
            key_index, key_valid = self.slot_index[: n + T], self.slot_valid[:, : n + T]
            all_valid = not self._has_padding
        elif T == 1:
            slot = n % self.window
            self.slot_index[slot] = n
            self.slot_valid[:, slot] = new_valid[:, 0]
            key_index, key_valid = self.slot_index, self.slot_valid
            all_valid = not self._has_padding and n + 1 >= self.window
        else:
            # Slots fill in order until the window is full, so the filled ones are a prefix.
            filled = min(n, self.window)
            key_index = torch.cat([self.slot_index[:filled], query_index])
            key_valid = torch.cat([self.slot_valid[:, :filled], new_valid], dim=1)
            all_valid = False  # empty slots are masked through key_index
        self.layout = StepLayout(key_index, key_valid, query_index, all_valid)
        self._chunk = T
        self._new_valid = new_valid
        return self.layout

    def decode_rows(self) -> DecodeRows | None:
        """For a one-token step: where the decode kernels write each row's new key and what it attends
        over, matching what ``update`` would write and return (the CPU decode kernels); None for a
        chunk of several tokens."""
        if self._chunk != 1:
            return None
        n = self.seen
        slot, length = (n, n + 1) if self.window is None else (n % self.window, self.window)
        B = self.batch_size
        return DecodeRows([self], [slot] * B, [length] * B, n)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values (B, n_kv, T, hd) and return what the layer attends over."""
        T, n = self._chunk, self.seen
        if self.window is None:
            self.k[layer][:, :, n : n + T] = k
            self.v[layer][:, :, n : n + T] = v
            return self.k[layer][:, :, : n + T], self.v[layer][:, :, : n + T]
        if T == 1:
            slot = n % self.window
            self.k[layer][:, :, slot : slot + 1] = k
            self.v[layer][:, :, slot : slot + 1] = v
            return self.k[layer], self.v[layer]
        filled = min(n, self.window)
        keys = torch.cat([self.k[layer][:, :, :filled], k], dim=2)
        values = torch.cat([self.v[layer][:, :, :filled], v], dim=2)
        # Keep the chunk's last `window` tokens, each in slot index % window.
        keep = min(T, self.window)
        slots = torch.arange(n + T - keep, n + T, device=self.device) % self.window
        self.k[layer][:, :, slots] = k[:, :, T - keep :]
        self.v[layer][:, :, slots] = v[:, :, T - keep :]
        return keys, values

    def end(self) -> None:
        T, n = self._chunk, self.seen
        if self.window is not None and T > 1:
            keep = min(T, self.window)
            slots = torch.arange(n + T - keep, n + T, device=self.device) % self.window
            self.slot_index[slots] = torch.arange(n + T - keep, n + T, device=self.device)
            self.slot_valid[:, slots] = self._new_valid[:, T - keep :]
        self.row_positions += self._new_valid.sum(dim=1)
        self.seen = n + T
        self.layout = None

    # -- batch surgery (used by generation and the server) ------------------------------------------
    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (a LongTensor of row ids), in that order."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.slot_valid = self.slot_valid[rows]
        self.row_positions = self.row_positions[rows]
        self.batch_size = int(rows.numel())

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens (negative: drop that many from the end), as
        transformers' ``DynamicCache.crop``, e.g. to take back rejected speculative tokens."""
        if max_length < 0:
            max_length = self.seen + max_length
        if max_length >= self.seen:
            return
        if max_length < 0:
            raise ValueError(f"crop: cannot drop more than the {self.seen} tokens held")
        if self.window is not None and self.seen > self.window:
            raise ValueError(f"crop: this rolling cache ({self.window} slots) has overwritten its oldest "
                             f"tokens already ({self.seen} seen), so it cannot be rolled back")
        self.slot_index[max_length : self.seen] = -1
        self.slot_valid[:, max_length : self.seen] = False
        self.seen = max_length
        self.row_positions = self.slot_valid[:, :max_length].sum(dim=1)
        self._has_padding = not bool(self.slot_valid[:, :max_length].all())

    def to_legacy_cache(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """transformers' legacy format: per layer (keys, values) of shape (B, n_kv, seen, hd), in
        token order. A rolling cache that has wrapped holds its slots out of order, and the
        tuples cannot say which tokens are gone, so it is refused."""
        if self.window is not None and self.seen > self.window:
            raise ValueError(f"to_legacy_cache: this rolling cache ({self.window} slots) no longer holds its "
                             f"first {self.seen - self.window} tokens; the legacy format cannot describe that")
        n = self.seen
        return tuple((k[:, :, :n], v[:, :, :n]) for k, v in zip(self.k, self.v))

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class RaggedDecodeView:
    """The KVCache protocol over several batch-1 caches, for one decode step (T=1) of all of them.

    The model sees B rows; row i reads and writes ``caches[i]``. Rows hold different numbers of
    keys, so ``update`` returns them stacked and zero-padded to the longest (S), and the layout's
    ``key_valid`` (B, S) marks each row's real keys. Each row's own cache already resolved which
    of its slots the new query may see (a rolling buffer only holds the window), so the shared
    ``key_index``/``query_index`` are all zeros: every valid key passes the causal and window tests
    and the mask reduces to ``key_valid``.
    """

    def __init__(self, caches: Sequence[KVCache]) -> None:
        self.caches = list(caches)
        self.window = self.caches[0].window
        self.dtype = self.caches[0].dtype
        self.batch_size = len(self.caches)
        self._lengths: list[int] = []
        self.layout: StepLayout | None = None

    @property
    def row_positions(self) -> torch.Tensor:
        return torch.cat([c.row_positions for c in self.caches])

    @property
    def seen(self) -> int:
        return max(c.seen for c in self.caches)

    def begin(self, new_valid: torch.Tensor | None, num_new: int) -> StepLayout:
        if num_new != 1 or (new_valid is not None and not bool(new_valid.all())):
            raise ValueError("RaggedDecodeView decodes one unpadded token per row")
        layouts = [c.begin(None, 1) for c in self.caches]
        self._lengths = [lay.key_index.shape[0] for lay in layouts]
        S = max(self._lengths)
        device = layouts[0].key_index.device
        key_valid = torch.zeros(self.batch_size, S, dtype=torch.bool, device=device)
        for i, lay in enumerate(layouts):
            key_valid[i, : self._lengths[i]] = lay.key_valid[0] & (lay.key_index >= 0)
        zeros = torch.zeros(S, dtype=torch.long, device=device)
        all_valid = len(set(self._lengths)) == 1 and bool(key_valid.all())
        self.layout = StepLayout(zeros, key_valid, zeros[:1], all_valid)
        return self.layout

    def decode_rows(self) -> DecodeRows:
        """Each row in its own cache, at its own slot and length; the query index is 0, as in the
        layout ``begin`` returns."""
        rows = [c.decode_rows() for c in self.caches]
        return DecodeRows(self.caches, [r.slots[0] for r in rows], [r.lengths[0] for r in rows], 0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, nkv, 1, hd) -> keys, values (B, nkv, S, hd), zeros past each row's length."""
        rows = [c.update(layer, k[i : i + 1], v[i : i + 1]) for i, c in enumerate(self.caches)]
        if len(set(self._lengths)) == 1:
            return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        S = max(self._lengths)
        B, nkv, _, hd = k.shape
        keys = k.new_zeros(B, nkv, S, hd)  # zeros, not garbage: a masked NaN would still poison p @ v
        values = v.new_zeros(B, nkv, S, hd)
        for i, (rk, rv) in enumerate(rows):
            keys[i, :, : rk.shape[2]] = rk[0]
            values[i, :, : rv.shape[2]] = rv[0]
        return keys, values

    def end(self) -> None:
        for c in self.caches:
            c.end()
        self.layout = None


class StaticCache:
    """Fixed-shape keys/values for all layers, for a captured decode step: k[layer] is (B, nkv, C, hd),
    C = the window when rolling. Token ``n`` goes to slot ``n`` (``n % C`` when rolling), as in
    ``KVCache``; the slot and token counters are tensors, so a graph replays the step's bookkeeping
    along with its kernels. One token per step (``begin(new_valid, 1)``).

    The prompt is prefilled into an ordinary ``KVCache`` and copied in by ``load``. Cost to know
    about: attention reads the whole capacity every step, so size it to the generation, not to the
    model's maximum context.
    """

    def __init__(self, config, batch_size: int, capacity: int, dtype: torch.dtype, device) -> None:
        self.window = config.sliding_window
        self.dtype = dtype
        C = self.window if self.window is not None else capacity
        shape = (batch_size, config.num_key_value_heads, C, config.dim_per_head)
        L = config.num_hidden_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)]
        self.slot_token = torch.full((C,), -1, dtype=torch.long, device=device)  # token index held
        self.slot_valid = torch.zeros(batch_size, C, dtype=torch.bool, device=device)
        self.seen = torch.zeros((), dtype=torch.long, device=device)
        self.row_positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._all_valid = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
        self._slot = torch.zeros(1, dtype=torch.long, device=device)
        self._new_valid = self._all_valid
        self.layout: StepLayout | None = None

    @property
    def capacity(self) -> int:
        return self.slot_token.shape[0]

    @property
    def batch_size(self) -> int:
        return self.slot_valid.shape[0]

    def reset(self) -> None:
        self.slot_token.fill_(-1)
        self.slot_valid.zero_()
        self.seen.zero_()
        self.row_positions.zero_()

    def load(self, cache: KVCache) -> None:
        """Copy a prefilled ``KVCache`` in place (same tensors, so captured graphs stay valid)."""
        if cache.window != self.window or cache.capacity > self.capacity or cache.batch_size != self.batch_size:
            raise ValueError(f"cache (window {cache.window}, capacity {cache.capacity}, batch {cache.batch_size}) "
                             f"does not fit a static cache (window {self.window}, capacity {self.capacity}, "
                             f"batch {self.batch_size})")
        self.reset()
        n = cache.capacity
        for dst, src in zip(self.k + self.v, cache.k + cache.v):
            dst[:, :, :n].copy_(src)
        self.slot_token[:n].copy_(cache.slot_index)
        self.slot_valid[:, :n].copy_(cache.slot_valid)
        self.seen.fill_(cache.seen)
        self.row_positions.copy_(cache.row_positions)

    def begin(self, new_valid: torch.Tensor | None, num_new: int) -> StepLayout:
        if num_new != 1:
            raise ValueError("StaticCache decodes one token per step")
        n = self.seen
        self._slot = (n % self.capacity if self.window is not None else n).view(1)
        self._new_valid = self._all_valid if new_valid is None else new_valid.reshape(-1, 1)
        self.slot_token.index_copy_(0, self._slot, n.view(1))
        self.slot_valid.index_copy_(1, self._slot, self._new_valid)
        self.layout = StepLayout(self.slot_token, self.slot_valid, n.view(1), False)
        return self.layout

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, nkv, 1, hd) written at the step's slot; returns the whole buffers (B, nkv, C, hd)."""
        return self.layer_view(layer).update(layer, k, v)

    def end(self) -> None:
        self.seen += 1
        self.row_positions += self._new_valid[:, 0].long()
        self.layout = None

    def layer_view(self, layer: int) -> StaticLayerView:
        """Layer ``layer``'s buffers behind the same ``update``, for a step compiled once for all
        layers: the compiled code then sees tensors, not a layer number it would specialize on."""
        return StaticLayerView(self.k[layer], self.v[layer], self._slot)


@dataclass
class StaticLayerView:
    k: torch.Tensor
    v: torch.Tensor
    slot: torch.Tensor

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, self.slot, k)
        self.v.index_copy_(2, self.slot, v)
        return self.k, self.v
