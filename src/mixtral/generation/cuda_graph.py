"""Decode as one captured CUDA graph per batch size, over a fixed-shape cache.

A decode step on a GPU is many small kernels; launching them costs more than their work at batch
1. ``decode_step`` is the step written with static shapes and no host synchronisation: the same
``DecoderLayer`` modules as every other path (``mixtral.model``), over a ``StaticCache``
(``mixtral.cache``), with the one mask rule (``mixtral.layers.build_mask``) evaluated on device.
``GraphDecoder`` captures it, its layers ``torch.compile``d, and replays it per token.

``decode_step`` runs eagerly on any device (the CPU tests compare it with the model's own decode);
``GraphDecoder`` needs CUDA. Kept graphs are reused across ``generate`` calls of the same model,
batch size and capacity (``kept_graph_decoder``).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from ..cache import StaticCache
from ..kernels import triton_available
from ..layers import Step, build_mask, rotary_cos_sin
from ..moe import Experts


def decode_step(model, cache: StaticCache, tokens: torch.Tensor, valid: torch.Tensor | None,
                layer_step=None) -> torch.Tensor:
    """tokens (B,) long, valid (B,) bool or None (all real) -> logits (B, V). Shape-static, no host
    sync. ``layer_step(layer, h, step)`` runs one layer (``compiled_decode_step`` passes the
    compiled form)."""
    layer_step = layer_step or run_layer
    base = model.model
    layout = cache.begin(valid, 1)
    h = base.embed_tokens(tokens[:, None])  # (B, 1, H)
    cos, sin = rotary_cos_sin(base.inv_freq, cache.row_positions[:, None], h.dtype)
    step = Step(cos, sin, "sdpa", mask=build_mask(layout, cache.window), cache=cache, layout=layout)
    for i, layer in enumerate(base.layers):
        h = layer_step(layer, h, dataclasses.replace(step, cache=cache.layer_view(i)))
    logits = model.lm_head(base.norm(h))[:, -1]
    cache.end()
    return logits


def run_layer(layer, h: torch.Tensor, step: Step) -> torch.Tensor:
    return layer(h, step)


def graph_unsafe_modules(model) -> list[str]:
    """Experts modules whose CUDA forward reads values back to the host (``experts_grouped``'s
    ``tolist``), which a CUDA graph cannot capture: "name: why" for each. Empty means capturable."""
    problems = []
    for name, m in model.named_modules():
        if not hasattr(m, "kernel_weights") or not hasattr(m, "act"):  # experts modules, float or quantized
            continue
        if m.act is not F.silu:
            problems.append(f"{name}: the Triton kernel implements SiLU experts only")
        elif isinstance(m, Experts) and m.implementation not in ("auto", "triton"):
            problems.append(f"{name}: implementation {m.implementation!r} (use 'auto' or 'triton')")
    return problems


def compiled_decode_step(backend: str = "inductor"):
    """``decode_step`` with each layer run by ``torch.compile(run_layer)``, traced whole
    (``fullgraph``: a graph break raises).

    Why: a graph removes launch *latency*, not launches. Eager, a layer's step is dozens of small
    kernels (the norms, rotary, router softmax/top-k and residual adds are several each); replayed,
    each still costs microseconds, a large share of a step that is otherwise bound by reading the
    weights once (docs/kernels.md). Inductor fuses those elementwise chains; the Triton MoE and
    quantized kernels stay opaque nodes (registered torch ops, ``fused_moe``) and the CPU kernels
    step aside while tracing (``mixtral.kernels.cpu_kernels``).

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
    return torch.compile(run_layer, fullgraph=True, backend=backend)


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


def kept_graph_decoder(model, batch_size: int, capacity: int) -> GraphDecoder:
    """The kept ``GraphDecoder`` of (model and its weights' addresses, batch size, capacity), made
    and captured if absent. Its logits are overwritten by the next replay."""
    return _kept_decoder(
        (weights_key(model), batch_size, capacity),
        lambda: GraphDecoder(model, StaticCache(model.config, batch_size, capacity, model.dtype, model.device)),
    )
