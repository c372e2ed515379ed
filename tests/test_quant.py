"""Weight-only int8/int4: formats, kernels against dequantize + torch, whole models, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mixtral import MixtralConfig, MixtralForCausalLM
from mixtral.checkpoint import CheckpointError
from mixtral.moe import experts_reference
from mixtral.quant import (
    QuantExperts,
    QuantizedTensor,
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    int4_group_size,
    quantize_int4,
    quantize_int8,
    quantize_model,
)


def small_model(seed: int = 0, **kw) -> MixtralForCausalLM:
    # int4 needs input sizes that are multiples of 32; otherwise sizes are deliberately irregular.
    cfg = dict(vocab_size=113, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=3,
               num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=256)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    return model


def test_int8_round_trip_error_bound():
    w = torch.randn(3, 37, 70)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (3, 37)
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_error_bound(group):
    w = torch.randn(2, 11, 192)
    q, s, m = quantize_int4(w, group)
    G = int4_group_size(192, group)
    assert q.shape == (2, 11, 96) and q.dtype == torch.uint8 and s.shape == (2, 11, 192 // G)
    assert s.dtype == m.dtype == torch.float16
    err = (dequantize_int4(q, s, m) - w).abs().reshape(2, 11, 192 // G, G)
    # half a step, plus the fp16 rounding of the stored min and scale (relative 2^-11 each)
    amax = w.abs().reshape(2, 11, 192 // G, G).amax(dim=-1, keepdim=True)
    assert (err <= s.float()[..., None] / 2 + amax * 2**-9 + 1e-5).all()


@pytest.mark.parametrize("K", [64, 96, 192])
def test_int4_packing_layout(K):
    """The packed bytes, against the layout written out here: blocks of 32 pair up, byte j of pair p
    holding input 64p + j (low nibble) and 64p + 32 + j (high); an odd last block at c holds c + j
    (low) and c + 16 + j (high) in its byte j."""
    torch.manual_seed(K)
    n = torch.randint(0, 16, (3, K))
    n[:, ::32] = 0  # every group of 32 spans 0..15, so scale 1 and min 0 keep the nibbles exact
    n[:, 1::32] = 15
    q, s, m = quantize_int4(n.float(), 32)
    assert torch.equal(s, torch.ones_like(s)) and torch.equal(m, torch.zeros_like(m))
    want = []
    nb = K // 32
    for p in range(nb // 2):
        want += [n[:, 64 * p + j] | (n[:, 64 * p + 32 + j] << 4) for j in range(32)]
    if nb % 2:
        c = 32 * (nb - 1)
        want += [n[:, c + j] | (n[:, c + 16 + j] << 4) for j in range(16)]
    assert torch.equal(q.long(), torch.stack(want, dim=1))


def test_quantized_checkpoint_with_bad_shapes_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = quantize_model(small_model(seed=5), "int4", group_size=32)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.mlp.experts.down_proj.scales"
    tensors[key] = tensors[key][..., :-1].contiguous()  # one group short
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layers.1.mlp.experts.down_proj"):
        MixtralForCausalLM.from_pretrained(tmp_path)


def test_int4_version1_checkpoint_is_upgraded(tmp_path):
    """A checkpoint in the first int4 layout (fp32 scales and mins, each block packed alone) loads
    as the weights it encodes, and saves back in the current layout."""
    import json

    from mixtral.quant import LAYOUT_VERSION

    model = small_model(seed=4)
    quantize_model(model, "int4", group_size=32)
    model.save_pretrained(tmp_path / "v2")
    expected = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, QuantizedTensor)}
    # Rewrite the file in layout 1, as the first release wrote it.
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "v2" / "model.safetensors")
    module_of = {"weight": "weight_q", "gate_up_proj": "gate_up_q", "down_proj": "down_q"}
    for name in [k for k in tensors if k.endswith(".mins")]:
        base = name[: -len(".mins")]
        owner, _, leaf = base.rpartition(".")
        scales, mins = tensors[base + ".scales"].float(), tensors[name].float()
        w = expected[f"{owner}.{module_of[leaf]}"]
        K, ng = w.shape[-1], scales.shape[-1]
        n = torch.round((w.reshape(*w.shape[:-1], ng, K // ng) - mins[..., None]) / scales[..., None])
        v1 = n.reshape(*w.shape[:-1], K // 32, 2, 16).to(torch.uint8)  # byte j of a block: inputs j, j + 16
        tensors[base + ".qweight"] = (v1[..., 0, :] | (v1[..., 1, :] << 4)).reshape(*w.shape[:-1], K // 2)
        tensors[base + ".scales"], tensors[name] = scales, mins
    (tmp_path / "v1").mkdir()
    save_file(tensors, tmp_path / "v1" / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "v2" / "config.json").read_text())
    del cfg["quantization_config"]["version"]
    (tmp_path / "v1" / "config.json").write_text(json.dumps(cfg))
    loaded = MixtralForCausalLM.from_pretrained(tmp_path / "v1")
    for name, module in loaded.named_modules():
        if isinstance(module, QuantizedTensor) and module.bits == 4:
            torch.testing.assert_close(module.dequantize(), expected[name], rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["version"] == \
        LAYOUT_VERSION


def test_int4_group_size_divides():
    assert int4_group_size(576, 128) == 96
    assert int4_group_size(1536, 128) == 128
    with pytest.raises(ValueError):
        int4_group_size(70, 32)


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8_0 activation rounding, written out: blocks of 32 along the last dimension,
    scale = max|x| / 127, x -> round(x / scale) * scale (round half to even, as the kernel's nearbyint)."""
    b = x.reshape(*x.shape[:-1], -1, 32)
    scale = b.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(b / torch.where(scale > 0, scale, 1)), 0)
    return (q * scale).reshape(x.shape)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 20])
@pytest.mark.parametrize("activations", ["int8", "fp32"])
@pytest.mark.parametrize("K,G", [(160, 32), (576, 32), (192, 64), (192, 96)])
def test_quant_linear_matches_dequantized(mode, rows, activations, K, G):
    """Few rows run the decode kernels: with int8 activations they compute the dequantized weight
    times the block-rounded activation; many rows (prefill) always use fp32 activations. Odd and
    even block counts, and groups of 2 and 3 blocks (a pair of blocks straddling two groups)."""
    torch.manual_seed(rows)
    w = torch.randn(45, K)
    lin = QuantLinear(QuantizedTensor.quantize(w, mode, G))
    assert mode == "int8" or lin.weight_q.group_size == G
    lin.weight_q.int8_activations = activations == "int8"
    x = torch.randn(1, rows, K)
    with torch.inference_mode():
        got = lin(x)
    x_seen = int8_blocks(x) if activations == "int8" and rows <= 8 else x
    want = F.linear(x_seen, lin.weight_q.dequantize())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def experts_with_int8_activations(x, ids, weights, gate_up, down):
    """The experts formula with both products' inputs block-rounded, as the decode kernels do."""
    out = torch.zeros_like(x)
    inter = down.shape[-1]
    for n in range(x.shape[0]):
        for k, e in enumerate(ids[n].tolist()):
            h = int8_blocks(x[n]) @ gate_up[e].t()
            a = F.silu(h[:inter]) * h[inter:]
            out[n] += weights[n, k] * (int8_blocks(a) @ down[e].t())
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("N", [1, 5, 17])
@pytest.mark.parametrize("activations", ["int8", "fp32"])
def test_quant_experts_match_reference(mode, N, activations):
    torch.manual_seed(N)
    E, H, I, K = 5, 96, 160, 2
    gu, dn = torch.randn(E, 2 * I, H) * 0.2, torch.randn(E, H, I) * 0.2
    experts = QuantExperts(QuantizedTensor.quantize(gu, mode, 32), QuantizedTensor.quantize(dn, mode, 32), F.silu)
    for q in (experts.gate_up_q, experts.down_q):
        q.int8_activations = activations == "int8"
    x = torch.randn(N, H)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    w = torch.softmax(torch.randn(N, K), -1)
    with torch.inference_mode():
        got = experts(x, ids, w)
    reference = experts_with_int8_activations if activations == "int8" and N <= 8 else experts_reference
    want = reference(x, ids, w, experts.gate_up_q.dequantize(), experts.down_q.dequantize())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def dequantized_copy(model: MixtralForCausalLM, quantized: MixtralForCausalLM) -> MixtralForCausalLM:
    """The float model holding exactly the weights the quantized one represents."""
    float_model = copy.deepcopy(model)
    with torch.no_grad():
        for fl, ql in zip(float_model.model.layers, quantized.model.layers):
            fl.self_attn.qkv_proj.weight.copy_(ql.self_attn.qkv_proj.weight_q.dequantize())
            fl.self_attn.o_proj.weight.copy_(ql.self_attn.o_proj.weight_q.dequantize())
            fl.mlp.experts.gate_up_proj.copy_(ql.mlp.experts.gate_up_q.dequantize())
            fl.mlp.experts.down_proj.copy_(ql.mlp.experts.down_q.dequantize())
        if isinstance(quantized.lm_head, QuantLinear):
            float_model.lm_head = torch.nn.Linear(96, 113, bias=False)
            float_model.lm_head.weight.copy_(quantized.lm_head.weight_q.dequantize())
    return float_model


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("lm_head", [False, True])
def test_quantized_model_computes_its_dequantized_weights(mode, lm_head):
    """With fp32 activations, kernels (including the whole-step decode) and the prefill path compute
    exactly the float model of the dequantized weights."""
    model = small_model()
    quantized = quantize_model(copy.deepcopy(model), mode, group_size=32, lm_head=lm_head, activations="fp32")
    reference = dequantized_copy(model, quantized)
    for layer in reference.model.layers:
        layer.mlp.experts.implementation = "reference"
    ids = torch.randint(0, 113, (2, 11))
    with torch.inference_mode():
        torch.testing.assert_close(quantized(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
        tokens = quantized.generate(ids[:1], max_new_tokens=8)
        assert torch.equal(tokens, reference.generate(ids[:1], max_new_tokens=8))
    assert isinstance(quantized.model.layers[0].mlp.experts, QuantExperts)
    assert isinstance(quantized.lm_head, QuantLinear) == lm_head


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_int8_activations_decode_close_to_fp32_activations(mode):
    """Decode with int8 activations (the default) stays near the exact weight-only decode: the
    activation rounding adds ~2% relative logit error on these random weights (about what the int8
    weight rounding itself costs, see BOUNDS below). One expert, so no routing flip can intervene."""
    model = small_model(seed=3, num_local_experts=1, num_experts_per_tok=1)
    exact = quantize_model(copy.deepcopy(model), mode, group_size=32, lm_head=True, activations="fp32")
    fast = quantize_model(copy.deepcopy(model), mode, group_size=32, lm_head=True)
    assert fast.quantization_config["activations"] == "int8"
    ids = torch.randint(0, 113, (1, 6))
    with torch.inference_mode():
        tokens = exact.generate(ids, max_new_tokens=6)
        want = exact(tokens).logits[:, 5:-1]  # position t predicts token t + 1
        from mixtral.cache import KVCache
        from mixtral.generation import choose_stepper, prefill

        cache = KVCache.for_model(fast.config, 1)
        stepper = choose_stepper(fast)
        steps = [prefill(fast, tokens[:, :6], None, cache)]
        for t in range(6, tokens.shape[1] - 1):
            steps.append(stepper.step(tokens[:, t], cache))
        got = torch.stack(steps, dim=1)
    assert ((got - want).norm() / want.norm()).item() < 0.05


# Relative logit error against fp32 with one expert (no routing flips, which are discontinuous and
# can move logits arbitrarily): measured ~2% (int8) and ~10% (int4, group 32) on these random weights.
BOUNDS = {"int8": 0.05, "int4": 0.25}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantization_error_bound(mode):
    model = small_model(num_local_experts=1, num_experts_per_tok=1)
    ids = torch.randint(0, 113, (2, 11))
    with torch.inference_mode():
        ref = model(ids).logits
        out = quantize_model(model, mode, group_size=32)(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < BOUNDS[mode]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_save_load_round_trip(mode, tmp_path):
    model = small_model(seed=1)
    src = tmp_path / "fp32"
    model.save_pretrained(src)
    ids = torch.randint(0, 113, (1, 9))
    with torch.inference_mode():
        quantize_model(model, mode, group_size=32, lm_head=True)
        want = model(ids).logits
        model.save_pretrained(tmp_path / mode)
        loaded = MixtralForCausalLM.from_pretrained(tmp_path / mode)
        got = loaded(ids).logits
        at_load = MixtralForCausalLM.from_pretrained(src, quantize=mode)
    assert loaded.quantization_config["bits"] == (8 if mode == "int8" else 4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Asking for the mode the checkpoint holds is a no-op; another mode cannot be had from it.
    assert MixtralForCausalLM.from_pretrained(tmp_path / mode, quantize=mode).quantization_config["bits"] == \
        loaded.quantization_config["bits"]
    other = "int4" if mode == "int8" else "int8"
    with pytest.raises(CheckpointError, match=f"quantize='{other}', but the checkpoint is already {mode}"):
        MixtralForCausalLM.from_pretrained(tmp_path / mode, quantize=other)
    # The activation setting is part of the checkpoint.
    model = quantize_model(small_model(seed=1), mode, group_size=32, activations="fp32")
    model.save_pretrained(tmp_path / "exact")
    exact = MixtralForCausalLM.from_pretrained(tmp_path / "exact")
    assert not exact.model.layers[0].mlp.experts.gate_up_q.int8_activations
    assert isinstance(at_load.model.layers[1].mlp.experts, QuantExperts)
    # The quantized file is smaller than the float one.
    assert (tmp_path / mode / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size


def test_cli_quantize(tmp_path):
    from mixtral.cli import main

    model = small_model(seed=2)
    model.save_pretrained(tmp_path / "fp32")
    assert main(["quantize", str(tmp_path / "fp32"), str(tmp_path / "q4"), "--int4", "--group-size", "64",
                 "--activations", "fp32"]) == 0
    loaded = MixtralForCausalLM.from_pretrained(tmp_path / "q4")
    assert loaded.quantization_config["bits"] == 4
    assert loaded.quantization_config["group_size"] == 32  # what it used, not the 64 asked for
    assert loaded.quantization_config["activations"] == "fp32"
    assert not loaded.model.layers[0].self_attn.qkv_proj.weight_q.int8_activations
    assert loaded.model.layers[0].self_attn.qkv_proj.weight_q.group_size == 32  # 96 inputs: 64 -> 32
    with torch.inference_mode():
        out = loaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_whole_step_decode_matches_layer_by_layer(mode, monkeypatch):
    """The fused stepper (one ``decode_layers`` call for all layers) against the model's forward
    running the same quantized kernels layer by layer (int8 activations in both): same logits,
    same greedy tokens."""
    import mixtral.generation.steppers as steppers
    from mixtral.cache import KVCache
    from mixtral.generation import CpuFusedStepper, EagerStepper, choose_stepper, prefill
    from mixtral.kernels import cpu_kernels

    model = quantize_model(small_model(seed=6), mode, group_size=32, lm_head=True)
    ids = torch.randint(0, 113, (2, 5))

    def run(stepper):
        cache = KVCache.for_model(model.config, 2)
        logits = [prefill(model, ids, None, cache)]
        for _ in range(6):
            logits.append(stepper.step(logits[-1].argmax(-1), cache))
        return torch.stack(logits)

    calls = []
    real = steppers.cpu_row_kernels

    class Counting:
        def __init__(self, ck):
            self.ck = ck

        def __getattr__(self, name):
            fn = getattr(self.ck, name)
            return (lambda *a: calls.append(1) or fn(*a)) if name == "decode_layers" else fn

    monkeypatch.setattr(steppers, "cpu_row_kernels", lambda x: Counting(real(x)) if real(x) is not None else None)
    with torch.inference_mode():
        fused_stepper = choose_stepper(model)
        assert isinstance(fused_stepper, CpuFusedStepper) == (cpu_kernels() is not None)
        fused = run(fused_stepper)
        per_layer = run(EagerStepper(model))
    assert len(calls) == (6 if cpu_kernels() is not None else 0)
    torch.testing.assert_close(fused, per_layer, rtol=1e-4, atol=1e-4)


def test_quantizing_a_quantized_checkpoint_is_refused(tmp_path, capsys):
    """Before: int8 -> --int4 printed success and wrote a config saying 4 bits over int8 tensors (not
    loadable), int4 -> --int8 a config saying 8 bits over int4 tensors."""
    from mixtral.cli import main

    small_model(seed=3).save_pretrained(tmp_path / "fp32")
    for first, second in (("int8", "int4"), ("int4", "int8")):
        assert main(["quantize", str(tmp_path / "fp32"), str(tmp_path / first), "--" + first]) == 0
        capsys.readouterr()
        assert main(["quantize", str(tmp_path / first), str(tmp_path / "again"), "--" + second]) == 2
        err = capsys.readouterr().err
        assert "already quantized" in err and "float checkpoint" in err
        assert not (tmp_path / "again").exists()
        with pytest.raises(ValueError, match="already quantized"):
            quantize_model(MixtralForCausalLM.from_pretrained(tmp_path / first), second)


@pytest.mark.parametrize("bad", [0, -32, 48, 50])
def test_int4_group_size_must_be_a_positive_multiple_of_32(bad):
    with pytest.raises(ValueError, match="positive multiple of 32"):
        quantize_model(small_model(), "int4", group_size=bad)


def test_recorded_group_size_is_the_one_every_tensor_uses(tmp_path, capsys):
    """Before: the requested size was recorded whatever was used (128 recorded, 64 used by the experts
    here, 128 by attention)."""
    import json

    from mixtral.cli import main

    # attention inputs 128, expert inputs 128 and 192: 64 is the largest group dividing them all
    model = quantize_model(small_model(hidden_size=128, intermediate_size=192, num_attention_heads=4,
                                       num_key_value_heads=2), "int4", group_size=128)
    used = {m.group_size for m in model.modules() if isinstance(m, QuantizedTensor) and m.bits == 4}
    assert used == {64} and model.quantization_config["group_size"] == 64
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["group_size"] == 64
    # a checkpoint recording a size its tensors do not have is described by the tensors once loaded
    config["quantization_config"]["group_size"] = 128
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    assert MixtralForCausalLM.from_pretrained(tmp_path / "q").quantization_config["group_size"] == 64
    # the command: --group-size belongs to int4
    small_model().save_pretrained(tmp_path / "fp32")
    assert main(["quantize", str(tmp_path / "fp32"), str(tmp_path / "q8"), "--int8", "--group-size", "64"]) == 2
    assert "--group-size applies to --int4 only" in capsys.readouterr().err
