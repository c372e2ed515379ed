"""Decode as one captured CUDA graph per batch size.

At batch 1 a Mixtral decode step is ~32 layers x ~20 kernels; launched one by one from Python the
GPU idles between them. A CUDA graph replays the whole step with one launch, but only if nothing
in the step changes shape or talks to the host. So the decode step here is written against a
``StaticCache`` whose bookkeeping lives in device tensors:

* ``seen`` (a 0-dim tensor) replaces the cache's Python int; the slot written this step is
  ``seen`` (growing buffer) or ``seen % W`` (rolling buffer), written with ``index_copy_``.
* attention always spans the whole buffer (static S); empty slots, padding and the window are
  masked by a (B, 1, 1, S) boolean computed on the device from ``slot_token``/``slot_valid`` --
  S bytes per row, so nothing like the (B, 1, T, S) prefill mask is ever built.
* the next token is chosen on the device (argmax, or the exponential-race form of sampling:
  argmax(p / Exp(1)) is a draw from p) so no ``.item()`` or ``multinomial`` sync is needed.
* the experts use the Triton kernel (``mixtral.moe`` picks it on CUDA under inference mode), whose
  routing is sorted on the device.

Prefill runs outside the graph with the ordinary ``KVCache``; ``StaticCache.load`` copies it in.
``decode_step`` runs eagerly on any device (the CPU tests compare it with the model's own decode);
``GraphDecoder`` captures it on CUDA. Cost to know about: attention reads the whole capacity every
step, so size the buffer to the generation, not to the model's maximum context.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..cache import KVCache
from ..model import apply_rotary, rotary_cos_sin


class StaticCache:
    """Fixed-shape keys/values for all layers: k[layer] is (B, nkv, C, hd). C = window when rolling."""

    def __init__(self, config, batch_size: int, capacity: int, dtype: torch.dtype, device) -> None:
        self.window = config.sliding_window
        C = self.window if self.window is not None else capacity
        shape = (batch_size, config.num_key_value_heads, C, config.dim_per_head)
        L = config.num_hidden_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L)]
        self.slot_token = torch.full((C,), -1, dtype=torch.long, device=device)  # token index held
        self.slot_valid = torch.zeros(batch_size, C, dtype=torch.bool, device=device)
        self.seen = torch.zeros((), dtype=torch.long, device=device)
        self.row_positions = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.slot_token.shape[0]

    def reset(self) -> None:
        self.slot_token.fill_(-1)
        self.slot_valid.zero_()
        self.seen.zero_()
        self.row_positions.zero_()

    def load(self, cache: KVCache) -> None:
        """Copy a prefilled ``KVCache`` in place (same tensors, so captured graphs stay valid)."""
        if cache.window != self.window or cache.capacity > self.capacity:
            raise ValueError(f"cache (window {cache.window}, capacity {cache.capacity}) does not fit a static "
                             f"cache (window {self.window}, capacity {self.capacity})")
        self.reset()
        n = cache.capacity
        for dst, src in zip(self.k + self.v, cache.k + cache.v):
            dst[:, :, :n].copy_(src)
        self.slot_token[:n].copy_(cache.slot_index)
        self.slot_valid[:, :n].copy_(cache.slot_valid)
        self.seen.fill_(cache.seen)
        self.row_positions.copy_(cache.row_positions)


def decode_step(model, cache: StaticCache, tokens: torch.Tensor, valid: torch.Tensor,
                layer_step=None) -> torch.Tensor:
    """tokens (B,) long, valid (B,) bool -> logits (B, V). Shape-static, no host sync.

    ``layer_step`` replaces ``decode_layer`` (``compiled_decode_step`` passes its compiled form)."""
    layer_step = layer_step or decode_layer
    base = model.model
    n = cache.seen
    slot = (n % cache.capacity if cache.window is not None else n).view(1)
    cache.slot_token.index_copy_(0, slot, n.view(1))
    cache.slot_valid.index_copy_(1, slot, valid[:, None])
    keys = cache.slot_token
    visible = (keys >= 0) & (keys <= n)
    if cache.window is not None:
        visible &= keys > n - cache.window
    mask = (visible[None] & cache.slot_valid)[:, None, None, :]  # (B, 1, 1, C)
    mask = mask | ~mask.any(dim=-1, keepdim=True)  # a padding row that sees nothing: any finite output

    h = base.embed_tokens(tokens[:, None])  # (B, 1, H)
    cos, sin = rotary_cos_sin(base.inv_freq, cache.row_positions[:, None], h.dtype)
    for i, layer in enumerate(base.layers):
        h = layer_step(layer, h, cos, sin, cache.k[i], cache.v[i], slot, mask)
    logits = model.lm_head(base.norm(h))[:, -1]
    cache.seen += 1
    cache.row_positions += valid.long()
    return logits


def decode_layer(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer of a decode step: h (B, 1, H) -> (B, 1, H); writes k/v at ``slot``."""
    attn = layer.self_attn
    B = h.shape[0]
    q, k, v = attn.qkv_proj(layer.input_layernorm(h)).split(attn.qkv_sizes, dim=-1)
    q = q.view(B, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, nh, 1, hd)
    k = k.view(B, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)  # (B, nkv, 1, hd)
    v = v.view(B, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k_cache.index_copy_(2, slot, k)
    v_cache.index_copy_(2, slot, v)
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                         enable_gqa=attn.num_kv_heads != attn.num_heads)
    h = h + attn.o_proj(out.transpose(1, 2).reshape(B, 1, -1))
    y, _ = layer.mlp(layer.post_attention_layernorm(h))
    return h + y


def sample_on_device(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """logits (B, V) -> (B,). temperature 0 is greedy. No host sync (graph-safe RNG)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)


def graph_unsafe_modules(model) -> list[str]:
    """Experts modules whose CUDA forward reads values back to the host (``experts_grouped``'s
    ``tolist``), which a CUDA graph cannot capture: "name: why" for each. Empty means capturable."""
    from ..moe import Experts
    from ..quant import QuantExperts

    problems = []
    for name, m in model.named_modules():
        if isinstance(m, Experts):
            if m.act is not F.silu:
                problems.append(f"{name}: the Triton kernel implements SiLU experts only")
            elif m.implementation not in ("auto", "triton"):
                problems.append(f"{name}: implementation {m.implementation!r} (use 'auto' or 'triton')")
        elif isinstance(m, QuantExperts) and m.act is not F.silu:
            problems.append(f"{name}: the Triton kernel implements SiLU experts only")
    return problems


def compiled_decode_step(backend: str = "inductor"):
    """``decode_step`` with each layer run by ``torch.compile(decode_layer)``, traced whole
    (``fullgraph``: a graph break raises).

    Why: a graph removes launch *latency*, not launches. Eager, a layer's step is ~40 kernels (the
    norms, rotary, router softmax/top-k and residual adds are several small ones each); replayed,
    each still costs a few microseconds, ~1280 per token over 32 layers, a large share of a step
    that moves its bytes in ~4-5 ms. Inductor fuses those elementwise chains; the Triton MoE and
    quantized kernels stay opaque nodes (registered torch ops, ``fused_moe``) and the CPU kernels
    step aside while tracing (``cpu_kernels``).

    Per layer rather than the whole step: the layers are identical modules, which torch.compile
    passes as inputs, so one compilation serves all 32 (compiling the unrolled step would take 32x
    as long). One compiled function per process and backend, shared by every ``GraphDecoder``: the
    first batch size and cache capacity compile specialized, and a second shape compiles once more
    with symbolic sizes (torch.compile's default), which then serves every later shape -- rather
    than a compilation per shape, which would soon hit torch.compile's recompile limit.
    """
    return functools.partial(decode_step, layer_step=_compiled_layer(backend))


@functools.cache
def _compiled_layer(backend):
    return torch.compile(decode_layer, fullgraph=True, backend=backend)


class GraphDecoder:
    """One captured decode step for one batch size. ``step(tokens)`` -> next tokens (B,), on device;
    ``logits`` (B, V) holds the step's logits until the next ``step``.

    Capture happens on an empty cache (the warm-up runs write into it), then the cache is reset;
    ``cache.load`` after prefill refills the same tensors, so the graph reads the prompt's keys.
    ``compile=True`` captures the ``torch.compile``d step (``compiled_decode_step``); sampling stays
    outside the compiled part (its RNG is the graph-safe default generator's).
    """

    def __init__(self, model, cache: StaticCache, temperature: float = 0.0, top_k: int | None = None,
                 compile: bool = True) -> None:
        if not torch.cuda.is_available() or cache.slot_token.device.type != "cuda":
            raise RuntimeError("GraphDecoder needs a CUDA device and a StaticCache on it")
        problems = graph_unsafe_modules(model)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError("this model's decode step cannot be captured in a CUDA graph: "
                             + "; ".join(problems[:3]) + more)
        from . import triton_available

        if not triton_available():
            raise RuntimeError("GraphDecoder needs Triton for the experts (pip install 'mixtral[gpu]')")
        B = cache.slot_valid.shape[0]
        device = cache.slot_token.device
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)
        self.valid = torch.ones(B, dtype=torch.bool, device=device)

        step = compiled_decode_step() if compile else decode_step

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            logits = step(model, cache, self.tokens, self.valid)
            return logits, sample_on_device(logits, temperature, top_k)

        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # compiles (torch.compile, Triton), settles allocator pools
                    run()
            torch.cuda.current_stream().wait_stream(stream)
            cache.reset()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                # Both outputs live in the graph's memory: overwritten by the next replay.
                self.logits, self.next_tokens = run()
            cache.reset()

    def step(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        self.tokens.copy_(tokens)
        if valid is not None:
            self.valid.copy_(valid)
        self.graph.replay()
        return self.next_tokens


_DECODERS: dict[tuple, GraphDecoder] = {}


def clear_graph_decoders() -> None:
    """Drop every kept graph and static cache (they hold GPU memory, and their model, until then)."""
    _DECODERS.clear()


def weights_key(model) -> tuple[int, int]:
    """(model id, fingerprint of where its tensors live). A captured graph reads the addresses it
    saw at capture: weights changed in place (``load_state_dict``, ``copy_``) are seen by later
    replays, but a replaced module or parameter (``quantize_model``, ``model.to``, assigning a new
    Parameter) is not. Keying kept graphs by this makes such a change capture a new graph instead
    of silently replaying the old weights."""
    tensors = list(model.parameters()) + list(model.buffers())
    return id(model), hash(tuple((t.data_ptr(), t.dtype, t.shape) for t in tensors))


def _kept_decoder(key: tuple, make) -> GraphDecoder:
    """The kept decoder for ``key`` (whose first item is ``weights_key``), made if absent; graphs of
    the same model under older weights are dropped (they could never match again)."""
    if key not in _DECODERS:
        for stale in [k for k in _DECODERS if k[0][0] == key[0][0] and k[0] != key[0]]:
            del _DECODERS[stale]
        _DECODERS[key] = make()
    return _DECODERS[key]


CAPACITY_STEP = 256  # static caches for generate() are sized in these steps, so graphs get reused


def static_decoder(model, batch_size: int, capacity: int):
    """``generate(cache_implementation="static")``'s decode: (a ``StaticCache`` holding at least
    ``capacity`` tokens, ``step(tokens (B,)) -> logits (B, V)``), every new token valid.

    On CUDA the step is a captured graph of the compiled step, kept per (model and its weights'
    addresses, batch size, capacity rounded up to ``CAPACITY_STEP``) and reused by later calls; its
    logits are overwritten by the next step. Elsewhere ``decode_step`` runs eagerly: the same numbers, but on the CPU
    slower than the default path, whose fused decode kernels have no launch overhead to remove.
    """
    device = model.device
    if device.type != "cuda":
        static = StaticCache(model.config, batch_size, capacity, model.dtype, device)
        valid = torch.ones(batch_size, dtype=torch.bool, device=device)
        return static, lambda tokens: decode_step(model, static, tokens, valid)
    capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
    decoder = _kept_decoder(
        (weights_key(model), batch_size, capacity, 0.0, None, True),
        lambda: GraphDecoder(model, StaticCache(model.config, batch_size, capacity, model.dtype, device)),
    )

    def step(tokens: torch.Tensor) -> torch.Tensor:
        decoder.step(tokens)
        return decoder.logits

    return decoder.cache, step


@torch.inference_mode()
def generate_with_graph(
    model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0, top_k: int | None = None, compile: bool = True,
) -> torch.Tensor:
    """Prefill eagerly, then decode by graph replay. Returns (B, max_new_tokens) new token ids.

    One graph (and one static cache) is kept per (model and its weights' addresses, batch size,
    capacity, sampling, compile) and reused.
    No EOS handling: the caller trims; checking EOS each step would cost a sync.
    """
    B, L = input_ids.shape
    capacity = L + max_new_tokens
    decoder = _kept_decoder(
        (weights_key(model), B, capacity, temperature, top_k, compile),
        lambda: GraphDecoder(model, StaticCache(model.config, B, capacity, model.dtype, input_ids.device),
                             temperature, top_k, compile),
    )
    cache = KVCache.for_model(model.config, B, capacity=capacity, dtype=model.dtype, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    decoder.cache.load(cache)
    tok = sample_on_device(out.logits[:, -1], temperature, top_k)
    new = torch.empty(B, max_new_tokens, dtype=torch.long, device=input_ids.device)
    for i in range(max_new_tokens):
        new[:, i] = tok
        if i + 1 < max_new_tokens:
            tok = decoder.step(tok)
    return new
