"""Every CPU fast path against its plain definition, on random models with odd sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixtral import MixtralConfig, MixtralForCausalLM
from mixtral.generation import CpuFusedStepper, EagerStepper, choose_stepper, prefill
from mixtral.kernels import cpu_kernels, reference
from mixtral.layers import RMSNorm, linear
from mixtral.moe import experts_cpu, experts_grouped, experts_reference


def odd_model(seed: int = 0, **kw) -> MixtralForCausalLM:
    cfg = dict(vocab_size=97, hidden_size=70, intermediate_size=45, num_hidden_layers=2, num_attention_heads=5,
               num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=256)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**cfg)).eval()
    with torch.no_grad():  # larger weights than the default init, so routing and logits vary
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    return model


def set_experts(model: MixtralForCausalLM, name: str) -> None:
    for layer in model.model.layers:
        layer.mlp.experts.implementation = name


@pytest.mark.parametrize("N", [1, 3, 8, 13])
def test_experts_cpu_matches_reference(N):
    torch.manual_seed(N)
    E, H, I, K = 5, 70, 45, 2
    gu, dn = torch.randn(E, 2 * I, H) * 0.2, torch.randn(E, H, I) * 0.2
    x = torch.randn(N, H)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    w = torch.softmax(torch.randn(N, K), -1)
    ref = experts_reference(x, ids, w, gu, dn)
    with torch.inference_mode():
        for fn in (experts_cpu, experts_grouped):
            torch.testing.assert_close(fn(x, ids, w, gu, dn), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
def test_experts_kernel_rows_do_not_depend_on_the_batch(fmt):
    """The kernel groups a batch's token slots by expert, so each expert's weights are read once; every
    token must still come out exactly as it does alone (bitwise), or a server's answer would depend
    on who else is being served. Three experts for 8 tokens: every expert serves several tokens, one
    token picks its experts in the other order, and one expert stays unused in the second half."""
    from mixtral.kernels.cpu import cpu_kernels
    from mixtral.quant import QuantExperts, QuantizedTensor

    if cpu_kernels() is None:
        pytest.skip("no C++ compiler: the CPU kernels are not built")
    torch.manual_seed(11)
    E, H, I, K, N = 4, 96, 160, 2, 8
    gu, dn = torch.randn(E, 2 * I, H) * 0.2, torch.randn(E, H, I) * 0.2
    x = torch.randn(N, H)
    ids = torch.tensor([[0, 1], [1, 0], [2, 0], [1, 2], [0, 2], [2, 1], [0, 1], [1, 2]])
    w = torch.softmax(torch.randn(N, K), -1)
    if fmt == "float":
        def run(*a):
            return experts_cpu(*a, gu, dn)
    else:
        run = QuantExperts(QuantizedTensor.quantize(gu, fmt, 32), QuantizedTensor.quantize(dn, fmt, 32), F.silu)
    with torch.inference_mode():
        batch = run(x, ids, w)
        for n in range(N):
            assert torch.equal(batch[n : n + 1], run(x[n : n + 1], ids[n : n + 1], w[n : n + 1])), n
        for half in (slice(0, 4), slice(4, 8)):
            assert torch.equal(batch[half], run(x[half], ids[half], w[half]))
    if fmt == "float":
        torch.testing.assert_close(batch, experts_reference(x, ids, w, gu, dn), rtol=1e-5, atol=1e-5)
    else:  # activations are rounded to int8 blocks too: ~1% of the output's norm
        want = experts_reference(x, ids, w, run.gate_up_q.dequantize(), run.down_q.dequantize())
        assert (batch - want).norm() / want.norm() < 0.03


@pytest.mark.parametrize("rows", [1, 2, 5, 12])
def test_project_matches_linear(rows):
    torch.manual_seed(rows)
    lin = nn.Linear(83, 37, bias=False)
    x = torch.randn(1, rows, 83)
    with torch.inference_mode():
        torch.testing.assert_close(linear(lin, x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(70, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    for rows in (1, 3, 20):
        x = torch.randn(1, rows, 70)
        ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
        with torch.inference_mode():
            torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_fast_model_matches_reference_path(sliding_window):
    model = odd_model(sliding_window=sliding_window)
    ids = torch.randint(0, 97, (1, 9))
    with torch.inference_mode():
        set_experts(model, "reference")
        ref_logits = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=12)
        set_experts(model, "auto")
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=12)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, ref_tokens)


def test_decode_steps_match_full_forward():
    """Decoding through the cache (the chosen stepper's kernels) gives the logits of one full forward
    (matrix paths)."""
    from mixtral.cache import KVCache

    model = odd_model(seed=1)
    ids = torch.randint(0, 97, (1, 14))
    with torch.inference_mode():
        full = model(ids).logits[0]
        cache = KVCache.for_model(model.config, 1, capacity=14)
        stepper = choose_stepper(model)
        steps = [prefill(model, ids[:, :10], None, cache)]
        for t in range(10, 14):
            steps.append(stepper.step(ids[:, t], cache))
    torch.testing.assert_close(torch.cat(steps), full[9:], rtol=1e-4, atol=1e-4)


def test_batched_padded_generation_matches_reference():
    model = odd_model(seed=2)
    ids = torch.randint(1, 97, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0
    with torch.inference_mode():
        set_experts(model, "reference")
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8)
        set_experts(model, "auto")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(out, ref)


def decode_logits(model, ids, mask, steps: int, stepper, tokens=None):
    """Prefill then ``steps`` decode steps of ``stepper`` through a fresh cache; feeds ``tokens``
    (steps, B) when given, else the greedy choice. Returns the logits of every step (steps + 1, B, V)
    and the tokens fed."""
    from mixtral.cache import KVCache

    B, L = ids.shape
    cache = KVCache.for_model(model.config, B, capacity=L + steps)
    logits = [prefill(model, ids, mask, cache)]
    fed = []
    for t in range(steps):
        tok = tokens[t] if tokens is not None else logits[-1].argmax(-1)
        fed.append(tok)
        logits.append(stepper.step(tok, cache))
    return torch.stack(logits), torch.stack(fed)


class CountingKernels:
    """The compiled kernels module, counting calls of one of its functions."""

    def __init__(self, real, name: str, calls: list) -> None:
        self.real, self.name, self.calls = real, name, calls

    def __getattr__(self, attr: str):
        fn = getattr(self.real, attr)
        if attr != self.name:
            return fn
        return lambda *a: self.calls.append(1) or fn(*a)


def count_kernel_calls(monkeypatch, module, chooser: str, name: str) -> list:
    """Calls of kernel ``name`` through ``module``'s ``chooser`` (``cpu_row_kernels``...) from now on."""
    calls: list = []
    real = getattr(module, chooser)

    def counting(*a, **k):
        ck = real(*a, **k)
        return CountingKernels(ck, name, calls) if ck is not None else None

    monkeypatch.setattr(module, chooser, counting)
    return calls


def stepper_under_test(model, monkeypatch, whole_step: bool):
    """``whole_step``: the fused stepper (all layers in one ``decode_layers`` call); otherwise the
    model's forward, whose layers each run the decode attention kernel. With the call counter."""
    import mixtral.generation.steppers as steppers
    import mixtral.model as model_mod

    if whole_step:
        stepper = choose_stepper(model)
        assert isinstance(stepper, CpuFusedStepper) == (cpu_kernels() is not None)
        return stepper, count_kernel_calls(monkeypatch, steppers, "cpu_row_kernels", "decode_layers"), 1
    # A path the whole-step kernel does not cover, in one layer: the forward runs layer by layer.
    model.model.layers[-1].mlp.experts.implementation = "grouped"
    calls = count_kernel_calls(monkeypatch, model_mod, "cpu_decode_kernels", "decode_attention")
    return EagerStepper(model), calls, model.config.num_hidden_layers


@pytest.mark.parametrize("sliding_window", [None, 6])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("whole_step", [True, False])
def test_fused_decode_matches_plain_path(sliding_window, padded, whole_step, monkeypatch):
    """The fused decode kernels against the plain path (rotary, cache.update, SDPA with a built
    mask, the torch router, the reference experts: ``mixtral.kernels.reference()``): same logits per
    step, same greedy tokens, with left padding and with a rolling sliding-window cache (12 steps >
    6), for the whole-step stepper and for the layer-by-layer forward with the attention kernel."""
    model = odd_model(seed=3, sliding_window=sliding_window, num_key_value_heads=5 if padded else 1)
    torch.manual_seed(4)
    ids = torch.randint(1, 97, (3, 9))
    mask = None
    if padded:
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[1, :4] = 0
        mask[2, :8] = 0  # one real token: early decode steps see few keys
    with torch.inference_mode():
        with reference():
            ref, ref_tokens = decode_logits(model, ids, mask, 12, EagerStepper(model))
        stepper, calls, per_step = stepper_under_test(model, monkeypatch, whole_step)
        fast, _ = decode_logits(model, ids, mask, 12, stepper, tokens=ref_tokens)
        _, fast_tokens = decode_logits(model, ids, mask, 12, stepper)
    assert sum(calls) == (2 * 12 * per_step if cpu_kernels() is not None else 0)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast_tokens, ref_tokens)


@pytest.mark.parametrize("sliding_window", [None, 6])
@pytest.mark.parametrize("whole_step", [True, False])
def test_ragged_decode_matches_plain_path(sliding_window, whole_step, monkeypatch):
    """The server's step: three requests, each in a cache of its own (prompts of 2, 5 and 9 tokens, so
    their lengths differ and rolling buffers are filled to different levels; the first cache starts
    empty and grows mid-decode), decoded together through ``RaggedDecodeView``. The fused kernels,
    which write every row into its own cache, against the plain path (``reference()``): same logits
    step after step; and each row against that request decoded alone."""
    from mixtral.cache import KVCache, RaggedDecodeView

    model = odd_model(seed=6, sliding_window=sliding_window)
    torch.manual_seed(7)
    prompts = [torch.randint(1, 97, (1, n)) for n in (2, 5, 9)]
    steps = 10

    def run(stepper, rows: list[int], tokens=None):
        caches, first = [], []
        for i in rows:
            cache = KVCache.for_model(model.config, 1, capacity=0 if i == 0 else 20)
            first.append(model(prompts[i], past_key_values=cache).logits[:, -1].argmax(-1))
            caches.append(cache)
        tok, out = torch.cat(first), []
        for t in range(steps):
            out.append(stepper.step(tok, RaggedDecodeView(caches)))
            tok = out[-1].argmax(-1) if tokens is None else tokens[t + 1, rows]
        return torch.stack(out), torch.cat([torch.cat(first)[None], torch.stack(out).argmax(-1)])

    with torch.inference_mode():
        with reference():
            ref, tokens = run(EagerStepper(model), [0, 1, 2])
        stepper, calls, per_step = stepper_under_test(model, monkeypatch, whole_step)
        fast, _ = run(stepper, [0, 1, 2], tokens)
        assert len(calls) == (steps * per_step if cpu_kernels() is not None else 0)
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
        for i in range(3):
            alone, _ = run(stepper, [i], tokens)
            torch.testing.assert_close(fast[:, i], alone[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N", [1, 3, 8])
def test_router_kernel_matches_formula(N):
    from mixtral.moe import Router

    torch.manual_seed(N)
    router = Router(70, 7, 3)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
    x = torch.randn(N, 70)
    logits = x @ router.weight.t()
    probs = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, 3, dim=-1)
    with torch.inference_mode():
        got_logits, got_w, got_ids = router(x)
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_ids, ids)
    torch.testing.assert_close(got_w, w / w.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_fused_decode_with_shared_position_ids():
    """position_ids of shape (1, 1) broadcast over the batch, on the fused path as on the plain one."""
    from mixtral.cache import KVCache

    model = odd_model(seed=5)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 97, (2, 5))
    outs = []
    for plain in (True, False):
        with reference() if plain else torch.inference_mode():
            cache = KVCache.for_model(model.config, 2, capacity=8)
            model(ids, past_key_values=cache)
            outs.append(model(ids[:, -1:], past_key_values=cache, position_ids=torch.tensor([[5]])).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_direct_forward_decode_runs_the_whole_step_kernel(monkeypatch):
    """A model called step by step (transformers-style loops, PEFT) takes the whole-step kernel too,
    with the logits of the plain path."""
    import mixtral.model as model_mod
    from mixtral.cache import KVCache

    model = odd_model(seed=8)
    ids = torch.randint(0, 97, (2, 6))

    def run():
        cache = KVCache.for_model(model.config, 2)
        out = [model(ids, past_key_values=cache).logits[:, -1]]
        for _ in range(4):
            out.append(model(out[-1].argmax(-1)[:, None], past_key_values=cache).logits[:, -1])
        return torch.stack(out)

    with reference():
        want = run()
    calls = count_kernel_calls(monkeypatch, model_mod, "cpu_row_kernels", "decode_layers")
    with torch.inference_mode():
        got = run()
    assert len(calls) == (4 if cpu_kernels() is not None else 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_an_adapter_on_the_router_is_not_packed():
    """PEFT's LoRA on the router wraps it and keeps the base weight under ``weight``: packing that
    would silently route without the adapter, so such layers step through forward instead."""
    peft = pytest.importorskip("peft")
    from mixtral.packed import PackedLayers

    model = odd_model(seed=9)
    assert PackedLayers.of(model.model.layers) is not None
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["gate"]))
    assert type(model.model.layers[0].mlp.gate).__name__ != "Router"
    assert PackedLayers.of(model.model.layers) is None
