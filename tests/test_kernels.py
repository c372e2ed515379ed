"""GPU kernels against the plain torch definitions, on odd sizes.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set here before
Triton is imported): slow, so sizes are small, but every index computation, mask and padding rule
is exercised. Tests that need a real GPU (compiled kernels, CUDA graphs) skip without one.

Tolerances: fp32 kernels vs the fp32 reference 1e-4 (reordered sums only); bf16 kernels vs the
bf16 reference 3e-2 relative to the output's scale (both round to bf16 at different points: the
kernel keeps fp32 accumulators, routing products and top-k sum); int8 vs the reference on the
dequantized weights 1e-4 in fp32 (the same numbers, scale applied after the sum instead of before).
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="triton not installed (pip install 'triton==3.9.0', the gpu extra)")

from mixtral.cache import KVCache, StaticCache, StepLayout  # noqa: E402
from mixtral.generation.cuda_graph import decode_step, graph_unsafe_modules  # noqa: E402
from mixtral.kernels.attention import attention  # noqa: E402
from mixtral.kernels.fused_moe import (  # noqa: E402
    fused_experts,
    fused_experts_quantized,
    moe_align,
    moe_align_reference,
    quantized_linear,
)
from mixtral.kernels.moe_configs import MoeConfig, default_config, get_config, tokens_bucket  # noqa: E402
from mixtral.model import build_mask, eager_attention  # noqa: E402
from mixtral.moe import Experts, experts_reference  # noqa: E402
from mixtral.quant import (  # noqa: E402
    QuantExperts,
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    quantize_model,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# H and I deliberately not multiples of the 32-wide tiles used below.
HIDDEN, INTER = 48, 40
SMALL = MoeConfig(block_m=16, block_n=32, block_k=32)
LARGE = MoeConfig(block_m=32, block_n=32, block_k=32)  # fewer interpreted programs for 257 tokens
# Split-K over I=40 in 32-wide steps: splits [0, 32), [32, 40) and one past the end (zeros).
SPLIT = MoeConfig(block_m=16, block_n=32, block_k=32, split_k=3)
WIDE_K = MoeConfig(block_m=16, block_n=32, block_k=64)  # int4: two groups of 32 per tile, or groups cut


def routing(N: int, E: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), K, dim=-1)
    return ids.to(DEVICE), (weights / weights.sum(-1, keepdim=True)).to(DEVICE)


def expert_weights(E: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * INTER, HIDDEN, generator=g) * HIDDEN**-0.5
    w2 = torch.randn(E, HIDDEN, INTER, generator=g) * INTER**-0.5
    x = torch.randn(300, HIDDEN, generator=g)
    return x.to(DEVICE), w13.to(DEVICE), w2.to(DEVICE)


# The last case has more slots (600) than one chunk holds (4096 // 16 experts = 256): three passes.
@pytest.mark.parametrize("N,E,K,block_m", [(1, 8, 2, 16), (3, 4, 1, 4), (33, 8, 4, 16), (257, 3, 2, 32),
                                           (5, 8, 8, 4), (300, 16, 2, 16)])
def test_align_matches_reference(N, E, K, block_m):
    ids, _ = routing(N, E, K)
    sorted_slots, block_expert = moe_align(ids, E, block_m)
    want_slots, want_experts = moe_align_reference(ids.cpu(), E, block_m)
    assert torch.equal(sorted_slots.cpu(), want_slots)
    assert torch.equal(block_expert.cpu(), want_experts)


# Each tokens count, E and top-k appears at least once, fp32 and bf16 both (the full cross product
# is too slow under the interpreter).
CASES = [
    (1, 8, 2, torch.float32, SMALL),
    (1, 4, 1, torch.bfloat16, SMALL),
    (3, 4, 4, torch.float32, SMALL),
    (3, 8, 2, torch.bfloat16, SMALL),
    (33, 8, 4, torch.bfloat16, SMALL),
    (33, 4, 1, torch.float32, SMALL),
    (3, 8, 2, torch.float32, SPLIT),
    (33, 8, 2, torch.bfloat16, SPLIT),
    (257, 8, 2, torch.float32, LARGE),
    (33, 4, 2, torch.float32, (LARGE, SPLIT)),  # a (gate_up, down) pair: down takes gate_up's block_m
]


@pytest.mark.parametrize("N,E,K,dtype,config", CASES)
def test_fused_experts_match_reference(N, E, K, dtype, config):
    x, w13, w2 = expert_weights(E)
    x, w13, w2 = x[:N].to(dtype), w13.to(dtype), w2.to(dtype)
    ids, weights = routing(N, E, K)
    got = fused_experts(x, ids, weights, w13, w2, config=config)
    assert got.shape == (N, HIDDEN) and got.dtype == dtype
    want = experts_reference(x.float(), ids, weights, w13.float(), w2.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2 * want.abs().max().item()
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=0 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("config", [SMALL, SPLIT])
def test_fused_experts_deterministic(config):
    x, w13, w2 = expert_weights(4)
    ids, weights = routing(33, 4, 2)
    a = fused_experts(x[:33], ids, weights, w13, w2, config=config)
    b = fused_experts(x[:33], ids, weights, w13, w2, config=config)
    assert torch.equal(a, b)


@pytest.mark.parametrize("N,E,K,config", [(1, 8, 2, SMALL), (33, 4, 4, SMALL), (3, 8, 1, SMALL), (1, 8, 2, SPLIT)])
def test_int8_experts_match_dequantized_reference(N, E, K, config):
    x, w13, w2 = expert_weights(E)
    x = x[:N]
    (q13, s13), (q2, s2) = quantize_int8(w13), quantize_int8(w2)
    ids, weights = routing(N, E, K)
    got = fused_experts_quantized(x, ids, weights, [q13, s13], [q2, s2], config=config)
    want = experts_reference(x, ids, weights, dequantize_int8(q13, s13), dequantize_int8(q2, s2))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # And the quantization error against the unquantized experts stays small.
    exact = experts_reference(x, ids, weights, w13, w2)
    assert (got - exact).abs().max() < 0.05 * exact.abs().max()


# int4 packs blocks of 32 inputs: H=96 is one pair of blocks then a block alone, I=64 one pair.
H4, I4 = 96, 64


# Tiles of 32 inputs lie inside one group; WIDE_K tiles (64) hold two groups of 32 (with a last
# half-empty tile at H=96), one group of 64, or cut groups of 96 (per-element scales).
@pytest.mark.parametrize("N,E,K,g_up,g_down,config", [(1, 8, 2, 32, 64, SMALL), (33, 4, 4, 96, 32, SMALL),
                                                       (3, 8, 1, 32, 32, SPLIT), (5, 4, 2, 32, 64, WIDE_K),
                                                       (2, 8, 2, 96, 32, WIDE_K)])
def test_int4_experts_match_dequantized_reference(N, E, K, g_up, g_down, config):
    g = torch.Generator().manual_seed(N)
    w13 = torch.randn(E, 2 * I4, H4, generator=g) * H4**-0.5
    w2 = torch.randn(E, H4, I4, generator=g) * I4**-0.5
    x = torch.randn(N, H4, generator=g).to(DEVICE)
    up, down = quantize_int4(w13, g_up), quantize_int4(w2, g_down)
    assert up[1].shape[-1] == H4 // g_up and down[1].shape[-1] == I4 // g_down  # the group sizes asked for
    ids, weights = routing(N, E, K)
    got = fused_experts_quantized(x, ids, weights, [t.to(DEVICE) for t in up], [t.to(DEVICE) for t in down],
                                  config=config)
    want = experts_reference(x, ids, weights, dequantize_int4(*up).to(DEVICE), dequantize_int4(*down).to(DEVICE))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt,M,N,K,config", [("int8", 1, 40, 48, SMALL), ("int8", 3, 97, 48, SMALL),
                                              ("int8", 33, 40, 80, SMALL), ("int4", 1, 40, 96, SMALL),
                                              ("int4", 3, 97, 128, SMALL), ("int4", 33, 40, 32, SMALL),
                                              ("int4", 2, 40, 160, WIDE_K)])
def test_quantized_linear_matches_dequantized_product(fmt, M, N, K, config):
    g = torch.Generator().manual_seed(M)
    w = torch.randn(N, K, generator=g)
    stored = quantize_int8(w) if fmt == "int8" else quantize_int4(w, 32)
    dense = dequantize_int8(*stored) if fmt == "int8" else dequantize_int4(*stored)
    x = torch.randn(M, K, generator=g)
    got = quantized_linear(x.to(DEVICE), [t.to(DEVICE) for t in stored], config=config)
    assert got.shape == (M, N) and got.dtype == x.dtype
    torch.testing.assert_close(got.cpu(), x @ dense.t(), atol=1e-4, rtol=1e-4)


def test_quantized_kernels_refuse_misshaped_scales():
    x, w13, w2 = expert_weights(4)
    (q13, s13), (q2, s2) = quantize_int8(w13), quantize_int8(w2)
    ids, weights = routing(3, 4, 2)
    with pytest.raises(ValueError, match="one per output channel"):
        fused_experts_quantized(x[:3], ids, weights, [q13, s13[:, :-1]], [q2, s2], config=SMALL)
    with pytest.raises(ValueError, match="quantized_linear"):
        quantized_linear(x[:3], [q2[0], s2[0, :-1]], config=SMALL)
    q4, sc4, mn4 = quantize_int4(torch.randn(40, 96), 32)
    with pytest.raises(ValueError, match="needs scales and mins"):
        quantized_linear(torch.randn(2, 96).to(DEVICE), [q4, sc4, mn4[:, :-1]], config=SMALL)


def _dequantized_twin(qmodel, config):
    """A float model holding the quantized model's dequantized weights, experts on the reference
    path: the definition the Triton kernels must reproduce."""
    from mixtral import MixtralForCausalLM

    ref = MixtralForCausalLM(config, attn_implementation="eager").eval()
    float_state = {k: v for k, v in qmodel.state_dict().items() if not k.endswith((".qweight", ".scales", ".mins"))}
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLinear):
            float_state[f"{name}.weight"] = m.weight_q.dequantize()
        elif isinstance(m, QuantExperts):
            float_state[f"{name}.gate_up_proj"] = m.gate_up_q.dequantize()
            float_state[f"{name}.down_proj"] = m.down_q.dequantize()
    ref.load_state_dict(float_state)
    for layer in ref.model.layers:
        layer.mlp.experts.implementation = "reference"
    return ref.to(DEVICE)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_runs_the_triton_kernels(monkeypatch, mode):
    """A model quantized by ``mixtral.quant``, on the path it takes on CUDA (forced when run on the
    CPU): every attention projection and experts call goes through the Triton kernels, and prefill,
    cached decode and the CUDA graph's decode step match the dequantized float model."""
    from conftest import tiny_kwargs

    import mixtral.kernels.fused_moe as fm
    import mixtral.quant as quant
    from mixtral import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(**tiny_kwargs())
    qmodel = quantize_model(MixtralForCausalLM(config, attn_implementation="eager").eval(), mode).to(DEVICE)
    ref = _dequantized_twin(qmodel, config)
    calls = {"experts": 0, "linear": 0}

    def counting(fn, key):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(quant, "triton_applies", lambda x: not torch.is_grad_enabled())
    monkeypatch.setattr(fm, "fused_experts_quantized", counting(fm.fused_experts_quantized, "experts"))
    monkeypatch.setattr(fm, "quantized_linear", counting(fm.quantized_linear, "linear"))

    ids = torch.randint(0, config.vocab_size, (2, 5), device=DEVICE)
    steps, total = 3, 5 + 3
    with torch.inference_mode():
        cq = KVCache.for_model(config, 2, capacity=total, device=DEVICE)
        cr = KVCache.for_model(config, 2, capacity=total, device=DEVICE)
        got = qmodel(input_ids=ids, past_key_values=cq, use_cache=True).logits
        want = ref(input_ids=ids, past_key_values=cr, use_cache=True).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        L = config.num_hidden_layers
        assert calls == {"experts": L, "linear": 2 * L}  # q|k|v and o per layer; lm_head stays float
        static = StaticCache(config, 2, total, torch.float32, DEVICE)
        static.load(cq)
        tok = want[:, -1].argmax(-1)
        for _ in range(steps):
            want = ref(input_ids=tok[:, None], past_key_values=cr, use_cache=True).logits[:, -1]
            got = qmodel(input_ids=tok[:, None], past_key_values=cq, use_cache=True).logits[:, -1]
            graph_body = decode_step(qmodel, static, tok, torch.ones(2, dtype=torch.bool, device=DEVICE))
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(graph_body, want, atol=1e-4, rtol=1e-4)
            tok = want.argmax(-1)
    assert calls["experts"] == L * (1 + 2 * steps)


@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
def test_decode_step_compiles_whole(monkeypatch, fmt):
    """The layer step GraphDecoder captures traces as one graph (``fullgraph``: any break raises) on
    the branches CUDA takes -- Triton experts, quantized kernels as torch ops, no CPU-kernel calls --
    compiled once for all layers (and at most twice over batch sizes), and the compiled step (AOT
    autograd's functionalized graph, which is what inductor receives) keeps the rolling cache's
    in-place writes: same logits as the eager step, step after step."""
    from conftest import tiny_kwargs

    import mixtral.quant as quant
    from mixtral import MixtralConfig, MixtralForCausalLM
    from mixtral.generation.cuda_graph import compiled_decode_step

    torch._dynamo.reset()
    monkeypatch.setattr(quant, "triton_applies", lambda x: not torch.is_grad_enabled())
    torch.manual_seed(0)
    config = MixtralConfig(**tiny_kwargs(sliding_window=4))
    model = MixtralForCausalLM(config).eval()
    for layer in model.model.layers:
        layer.mlp.experts.implementation = "triton"
    if fmt != "float":
        quantize_model(model, fmt)
    model.to(DEVICE)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    step = compiled_decode_step(backend=counter)
    # (batch, capacity): the first shape compiles once for every layer and step; a second compiles
    # once more with symbolic sizes, which serves the third too (checked once: the interpreter is slow).
    shapes = [(2, 9), (3, 12), (4, 7)] if fmt == "float" else [(2, 9)]
    for (B, capacity), compiles in zip(shapes, (1, 2, 2)):
        ids = torch.randint(0, config.vocab_size, (B, 5), device=DEVICE)
        valid = torch.ones(B, dtype=torch.bool, device=DEVICE)
        with torch.inference_mode():
            cache = KVCache.for_model(config, B, capacity=capacity, device=DEVICE)
            tok = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
            eager, compiled = (StaticCache(config, B, capacity, torch.float32, DEVICE) for _ in range(2))
            eager.load(cache)
            compiled.load(cache)
            for _ in range(3):  # past the window of 4: the rolling buffer wraps
                want = decode_step(model, eager, tok, valid)
                torch.testing.assert_close(step(model, compiled, tok, valid), want, atol=1e-5, rtol=1e-5)
                tok = want.argmax(-1)
        assert counter.frame_count == compiles
        for a, b in zip(eager.k + eager.v, compiled.k + compiled.v):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_kept_graphs_follow_the_weights():
    """A kept graph is reused while the model's tensors stay where they were (in-place updates are
    seen by replays); replacing modules (here ``quantize_model``) keys a new graph and drops the
    stale one, instead of replaying the old weights."""
    from conftest import tiny_kwargs

    from mixtral import MixtralConfig, MixtralForCausalLM
    from mixtral.generation import cuda_graph

    model = MixtralForCausalLM(MixtralConfig(**tiny_kwargs()))
    before = cuda_graph.weights_key(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    assert cuda_graph.weights_key(model) == before
    quantize_model(model, "int8")
    after = cuda_graph.weights_key(model)
    assert after != before and after[0] == before[0]
    cuda_graph.clear_graph_decoders()
    made = []
    for key, name in [((before, 1), "old"), ((before, 1), "again"), ((after, 1), "new")]:
        cuda_graph._kept_decoder(key, lambda name=name: made.append(name) or name)
    assert made == ["old", "new"] and list(cuda_graph._DECODERS) == [(after, 1)]
    cuda_graph.clear_graph_decoders()


def test_graph_capture_refuses_modules_that_sync():
    from conftest import tiny_kwargs

    from mixtral import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**tiny_kwargs())
    model = MixtralForCausalLM(config)
    assert graph_unsafe_modules(model) == []
    model.model.layers[1].mlp.experts.implementation = "grouped"
    assert graph_unsafe_modules(model) == [
        "model.layers.1.mlp.experts: implementation 'grouped' (use 'auto' or 'triton')"]
    assert graph_unsafe_modules(quantize_model(MixtralForCausalLM(config), "int8")) == []
    assert graph_unsafe_modules(quantize_model(MixtralForCausalLM(config), "int4")) == []
    gelu = MixtralConfig(**tiny_kwargs(hidden_act="gelu"))
    problems = graph_unsafe_modules(quantize_model(MixtralForCausalLM(gelu), "int4"))
    assert len(problems) == gelu.num_hidden_layers and "SiLU experts only" in problems[0]


def test_experts_module_runs_triton_implementation():
    experts = Experts(4, HIDDEN, INTER).to(DEVICE)
    x, w13, w2 = expert_weights(4)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w13)
        experts.down_proj.copy_(w2)
    ids, weights = routing(3, 4, 2)
    want = experts_reference(x[:3], ids, weights, w13, w2)
    experts.implementation = "triton"
    with torch.inference_mode():
        got = experts(x[:3], ids, weights)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_launch_steps_down_to_a_config_that_fits_shared_memory():
    """A launch the device refuses for shared memory (Triton's OutOfResources) is retried with
    fewer stages, then a shorter K tile, never another block_m; the fitted config is kept per
    (kernel, device, config), so the next call launches it directly."""
    from triton.runtime.errors import OutOfResources

    from mixtral.kernels import fused_moe

    tried = []

    def launch(c):  # a device with room for 2 stages of 64-deep tiles
        tried.append(c)
        if c.num_stages > 2 or c.block_k > 64:
            raise OutOfResources(2 * c.num_stages * c.block_k, 256, "shared memory")

    wanted = MoeConfig(16, 64, 256, 4, 4)
    device = torch.device("cpu", 7)  # a key of its own
    used = fused_moe._launch_fitted("test", device, wanted, launch)
    assert used == MoeConfig(16, 64, 64, 4, 2)
    assert [(c.num_stages, c.block_k) for c in tried] == [(4, 256), (3, 256), (2, 256), (2, 128), (2, 64)]
    tried.clear()
    assert fused_moe._launch_fitted("test", device, wanted, launch) == used and tried == [used]

    def never(c):
        raise OutOfResources(1 << 20, 1024, "shared memory")

    with pytest.raises(OutOfResources):  # nothing smaller left: the device's error stands
        fused_moe._launch_fitted("test", device, MoeConfig(16, 16, 32, 4, 2), never)
    tried.clear()
    with pytest.raises(OutOfResources):  # an explicit config (tuning) runs as given or fails
        fused_moe._launch_fitted("test", device, MoeConfig(16, 64, 256, 4, 3), launch, fit=False)
    assert tried == [MoeConfig(16, 64, 256, 4, 3)]
    fused_moe._FITTED.clear()


def test_config_table_lookup():
    assert tokens_bucket(1) == 1 and tokens_bucket(3) == 4 and tokens_bucket(4096) == 4096
    decode = get_config("gate_up", "bf16", 1, 2, 8, 2 * 14336, 4096)
    prefill = get_config("gate_up", "bf16", 4096, 2, 8, 2 * 14336, 4096)
    assert decode.block_m == 16 and prefill.block_m >= 64
    assert get_config("down", "bf16", 5, 2, 4, 48, 40).block_m == 16  # not in the table: heuristic
    # Only decode entries for int4 (buckets 1 and 64): a prefill must not borrow their 16-row tiles
    # (bucket 64 is 6 powers of two away from 4096); the heuristic's prefill tiles answer instead.
    assert get_config("gate_up", "int4", 1, 2, 8, 2 * 14336, 4096).block_m == 16
    assert get_config("gate_up", "int4", 4096, 2, 8, 2 * 14336, 4096) == default_config(4096, 2, 8)
    assert default_config(4096, 2, 8).block_m >= 64
    assert get_config("gate_up", "int4", 4, 2, 8, 2 * 14336, 4096).block_m == 16  # near bucket 1: its entry


# --- attention --------------------------------------------------------------------------------
def _qkv(B, T, S, nh=4, nkv=2, hd=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, nh, T, hd, generator=g), torch.randn(B, nkv, S, hd, generator=g),
            torch.randn(B, nkv, S, hd, generator=g))


def _check_attention(layout: StepLayout, window, B, T, S):
    q, k, v = _qkv(B, T, S)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on the CPU warns that it is unfused
        got = attention(q, k, v, layout, window)
    want, _ = eager_attention(q, k, v, build_mask(layout, window))
    # Padding queries are unused (and defined differently); compare the real ones.
    real = layout.key_valid[:, -T:] if layout.key_valid.shape[1] >= T else torch.ones(B, T, dtype=torch.bool)
    torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_left_padded_prefill(window):
    B, T = 2, 7
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :3] = False
    idx = torch.arange(T)
    _check_attention(StepLayout(idx, valid, idx, False), window, B, T, T)


def test_attention_sliding_window_prefill_and_rolling_cache():
    W, B = 4, 2
    cache = KVCache(1, B, 2, 16, window=W)
    cache.begin(None, 6)  # prompt longer than the window
    cache.update(0, *_qkv(B, 6, 6)[1:])
    cache.end()
    layout = cache.begin(None, 3)  # a chunk after it: attends over cat(slots, chunk)
    S = layout.key_index.shape[0]
    _check_attention(layout, W, B, 3, S)


def test_attention_decode_without_mask_matches():
    B, S = 2, 9
    idx = torch.arange(S)
    layout = StepLayout(idx, torch.ones(B, S, dtype=torch.bool), idx[-1:], True)
    _check_attention(layout, None, B, 1, S)


# --- static decode step (the body of the CUDA graph) ------------------------------------------
@pytest.mark.parametrize("window", [None, 5])
def test_static_decode_step_matches_model(window):
    from conftest import tiny_kwargs

    from mixtral import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(**tiny_kwargs(sliding_window=window))
    model = MixtralForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    steps, total = 4, 6 + 4
    with torch.inference_mode():
        cache = KVCache.for_model(config, 2, capacity=total)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        static = StaticCache(config, 2, total, torch.float32, "cpu")
        static.load(cache)
        tok = out.logits[:, -1].argmax(-1)
        full_mask = torch.cat([mask, torch.ones(2, steps, dtype=torch.long)], dim=1)
        for s in range(steps):
            want = model(input_ids=tok[:, None], attention_mask=full_mask[:, : 7 + s], past_key_values=cache,
                         use_cache=True).logits[:, -1]
            got = decode_step(model, static, tok, torch.ones(2, dtype=torch.bool))
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            tok = want.argmax(-1)


def _gpu_bench():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gpu_bench", Path(__file__).parents[1] / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_gpu_bench_tuning_rows_state_streaming_rate():
    """A tuning row's weight bytes over its time, as GB/s and a fraction of the copy bandwidth:
    1 GB in 1000 us is 1000 GB/s, half of a 2 TB/s card."""
    row = dict(table_us=1000.0, us=800.0)
    out = _gpu_bench()._streamed(row, 10**9, 2e12)
    assert out["table_gb_s"] == pytest.approx(1000) and out["table_pct_copy"] == pytest.approx(50)
    assert out["best_gb_s"] == pytest.approx(1250) and out["best_pct_copy"] == pytest.approx(62.5)
    assert out["weight_mb"] == pytest.approx(1000)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gpu_bench_builds_the_quantized_model_it_measures(fmt):
    """bench/gpu.py's model builder (meta construction, ``quantize_model``, fill in place) on the
    CPU with a tiny config: quantized where ``mixtral quantize`` puts it, nothing left on meta, the
    byte count its roofline uses equal to the quantized experts' size, and finite logits."""
    from conftest import tiny_kwargs

    from mixtral import MixtralConfig

    bench = _gpu_bench()
    config = MixtralConfig(**tiny_kwargs())
    model = bench.build_model(config, fmt, device="cpu")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(t.device.type == "cpu" for t in tensors.values())
    stored = torch.int8 if fmt == "int8" else torch.uint8
    assert tensors["model.layers.0.mlp.experts.gate_up_q.qweight"].dtype == stored
    assert tensors["model.layers.0.self_attn.qkv_proj.weight_q.qweight"].dtype == stored
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    per_expert, _ = bench.weight_bytes(model)
    H, I = config.hidden_size, config.intermediate_size
    if fmt == "int8":  # int8 weights + fp32 scale per row
        assert per_expert == 3 * H * I + 4 * (2 * I + H)
    else:  # nibbles + fp16 scale and min per 32 inputs
        assert per_expert == 3 * H * I // 2 + 2 * 2 * (3 * H * I // 32)
    with torch.inference_mode():
        logits = model(torch.randint(0, config.vocab_size, (1, 3))).logits
    assert torch.isfinite(logits).all() and logits.float().std() > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark runs for real, not as a smoke run")
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_gpu_bench_runs_every_stage_on_the_cpu(fmt, tmp_path):
    """bench/gpu.py --smoke: every stage of the GPU benchmark (ceilings, model, decode at two batch
    sizes, transformers side by side, prefill, tuning under the interpreter) on a tiny model, so a
    GPU session's few minutes never go to an error in the script. Also its roofline arithmetic: a
    decode step's bytes are the weights outside the experts, the experts it routed to and the whole
    static cache, counted here from the config."""
    from conftest import tiny_kwargs

    from mixtral import MixtralConfig

    path = tmp_path / "bench.json"
    results = _gpu_bench().main(["--smoke", "--tune", "--layers", "2", "--format", fmt, "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    assert not results["skipped"] and not results["errors"]
    assert set(results["stage_s"]) == {"ceilings", "build model", "decode b=1", "transformers", "prefill",
                                       "decode b=2", "tune"}
    assert results["transformers"]["prompt_logits_rel_err"] < 2e-2  # bf16 both sides, same weights
    assert [r["batch"] for r in results["decode"]] == [1, 2]
    assert {r["case"] for r in results["tune"]} >= {f"{fmt} experts N=1", f"{fmt} experts N=80"}

    c = MixtralConfig(**tiny_kwargs(num_local_experts=8))  # the smoke model's shape
    H, I, L, V, hd = c.hidden_size, c.intermediate_size, 2, c.vocab_size, c.dim_per_head
    nh, nkv, E = c.num_attention_heads, c.num_key_value_heads, c.num_local_experts
    q, o = H * (nh + 2 * nkv) * hd, nh * hd * H
    if fmt == "bf16":
        per_expert, attn = 2 * 3 * H * I, 2 * (q + o)
    else:  # int8 weights, fp32 scale per output row
        per_expert, attn = 3 * H * I + 4 * (2 * I + H), q + o + 4 * ((nh + 2 * nkv) * hd + H)
    # norms and router bf16, the final norm, lm_head, and the rotary frequencies (hd / 2, fp32)
    other = L * (attn + 2 * (2 * H) + 2 * E * H) + 2 * H + 2 * V * H + 4 * hd // 2
    for r in results["decode"]:
        capacity = 8 + 4 + 8  # prompt + steps + 8
        kv = 2 * L * r["batch"] * nkv * capacity * hd * 2
        assert c.num_experts_per_tok <= r["experts_read_per_layer"] <= E
        want = other + r["experts_read_per_layer"] * L * per_expert + kv
        assert r["step_gb"] * 1e9 == pytest.approx(want)
        assert r["roofline_tok_s"] == pytest.approx(r["batch"] * results["copy_gb_s"] * 1e9 / want)


def test_gpu_bench_prefill_flops_of_mixtral_8x7b():
    """Per token, Mixtral-8x7B's prefill products are ~22.5 GFLOP of experts (2 of 3 x 4096 x 14336
    per layer, 2 FLOPs each) and ~2.7 GFLOP of attention projections; the scores add 4 nh hd per
    key attended (QK^T and PV), half the keys on average under the causal mask."""
    from mixtral import MixtralConfig

    T = 4096
    experts = 32 * 2 * 2 * 3 * 4096 * 14336
    proj = 32 * 2 * 4096 * (4096 + 2 * 1024 + 4096)
    scores = 32 * 4 * 32 * 128 * T / 2
    assert _gpu_bench().prefill_flops(MixtralConfig(), T) == pytest.approx(T * (experts + proj + scores))


# --- GPU only ---------------------------------------------------------------------------------
@needs_cuda
def test_compiled_kernels_bf16_on_gpu():
    x, w13, w2 = expert_weights(8)
    x, w13, w2 = x[:64].bfloat16(), w13.bfloat16(), w2.bfloat16()
    ids, weights = routing(64, 8, 2)
    got = fused_experts(x, ids, weights, w13, w2)  # the table / heuristic configs, not the test ones
    want = experts_reference(x.float(), ids, weights, w13.float(), w2.float())
    torch.testing.assert_close(got.float(), want, atol=3e-2 * want.abs().max().item(), rtol=3e-2)


@needs_cuda
def test_graph_decode_matches_eager_decode():
    from conftest import tiny_kwargs

    from mixtral import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    config = MixtralConfig(**tiny_kwargs())
    model = MixtralForCausalLM(config).to("cuda").eval()
    ids = torch.randint(0, config.vocab_size, (2, 5), device="cuda")
    got = model.generate(ids, max_new_tokens=6, eos_token_id=[], cache_implementation="static")[:, 5:]
    want = model.generate(ids, max_new_tokens=6, eos_token_id=[])[:, 5:]
    assert torch.equal(got, want)


@needs_cuda
def test_generate_with_static_cache_replays_graphs_on_gpu():
    """generate(cache_implementation="static"): left padding, EOS, sampling knobs all as in the
    default path, and a second call of the same shape reuses the kept graph."""
    from conftest import tiny_kwargs

    from mixtral import MixtralConfig, MixtralForCausalLM
    from mixtral.generation import cuda_graph

    torch.manual_seed(0)
    cuda_graph.clear_graph_decoders()
    model = MixtralForCausalLM(MixtralConfig(**tiny_kwargs(pad_token_id=0))).to("cuda").eval()
    ids = torch.randint(1, model.config.vocab_size, (2, 6), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=[], repetition_penalty=1.2)
    want = model.generate(ids, **kw)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kw), want)
    assert len(cuda_graph._DECODERS) == 1
    assert torch.equal(model.generate(ids, cache_implementation="static", **kw), want)
    assert len(cuda_graph._DECODERS) == 1


@needs_cuda
def test_int8_graph_decode_matches_eager_decode():
    from conftest import tiny_kwargs

    from mixtral import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    config = MixtralConfig(**tiny_kwargs())
    model = quantize_model(MixtralForCausalLM(config).eval(), "int8").to("cuda")
    ids = torch.randint(0, config.vocab_size, (2, 5), device="cuda")
    got = model.generate(ids, max_new_tokens=6, eos_token_id=[], cache_implementation="static")[:, 5:]
    want = model.generate(ids, max_new_tokens=6, eos_token_id=[])[:, 5:]
    assert torch.equal(got, want)


@pytest.mark.parametrize("window", [None, 3])
def test_model_with_layout_attention_matches_sdpa(monkeypatch, window):
    """The model's flash_attention_2 wiring (forced on here; on the CPU it is normally SDPA) gives
    the same logits and greedy tokens as the dense-mask path, padded and with a sliding window."""
    import mixtral.model as model_module
    from mixtral import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, sliding_window=window)
    ref = MixtralForCausalLM(cfg).eval()
    fa = MixtralForCausalLM(cfg, attn_implementation="flash_attention_2").eval()
    fa.load_state_dict(ref.state_dict())
    ids = torch.randint(1, 61, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    real_path = model_module.attention_path
    monkeypatch.setattr(model_module, "attention_path",
                        lambda impl, *a: "layout" if impl == "flash_attention_2" else real_path(impl, *a))
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = fa(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=1e-4)
    out_a = ref.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    out_b = fa.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out_a, out_b)
