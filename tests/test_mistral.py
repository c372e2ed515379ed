"""Raw Mistral releases against a reference model written here, the way mistral-inference computes it:
interleaved-pair rotary embeddings with complex numbers, on the raw tensors as stored."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from mixtral import MixtralForCausalLM, Tokenizer
from mixtral.checkpoint.loading import CheckpointError
from mixtral.cli import main

DIM, LAYERS, HEADS, KV, HD, FFN, VOCAB, E, K = 64, 2, 4, 2, 16, 96, 120, 4, 2
IDS = torch.tensor([[1, 17, 42, 99, 5, 64, 11, 2, 80, 33, 7, 8]])


def raw_weights(experts: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-expert Linear weights (w1, w3: (FFN, DIM); w2: (DIM, FFN)) under mistral-inference names."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    w = {"tok_embeddings.weight": r(VOCAB, DIM, std=1.0), "norm.weight": 1 + r(DIM, std=0.1),
         "output.weight": r(VOCAB, DIM)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        w |= {p + "attention.wq.weight": r(HEADS * HD, DIM), p + "attention.wk.weight": r(KV * HD, DIM),
              p + "attention.wv.weight": r(KV * HD, DIM), p + "attention.wo.weight": r(DIM, HEADS * HD),
              p + "attention_norm.weight": 1 + r(DIM, std=0.1), p + "ffn_norm.weight": 1 + r(DIM, std=0.1)}
        if experts == 1:
            w |= {p + "feed_forward.w1.weight": r(FFN, DIM), p + "feed_forward.w2.weight": r(DIM, FFN),
                  p + "feed_forward.w3.weight": r(FFN, DIM)}
            continue
        w[p + "feed_forward.gate.weight"] = r(experts, DIM, std=1.0)
        for e in range(experts):
            q = f"{p}feed_forward.experts.{e}."
            w |= {q + "w1.weight": r(FFN, DIM), q + "w2.weight": r(DIM, FFN), q + "w3.weight": r(FFN, DIM)}
    return w


def reference_logits(w: dict[str, torch.Tensor], ids: torch.Tensor, experts: int, theta: float,
                     window: int | None = None) -> torch.Tensor:
    """mistral-inference's forward pass on raw weights (one sequence, no cache)."""
    T = ids.shape[1]

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    freqs = 1.0 / theta ** (torch.arange(0, HD, 2).float() / HD)
    cis = torch.polar(torch.ones(T, HD // 2), torch.outer(torch.arange(T).float(), freqs))  # (T, HD/2)

    def rope(x):  # (T, heads, HD): pairs (x0, x1), (x2, x3), ... are complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], HD // 2, 2))
        return torch.view_as_real(xc * cis[:, None]).flatten(-2)

    mask = torch.ones(T, T).tril().bool()
    if window is not None:
        mask &= ~torch.ones(T, T).tril(-window).bool()
    x = w["tok_embeddings.weight"][ids[0]]
    for i in range(LAYERS):
        p = f"layers.{i}."
        h = norm(x, w[p + "attention_norm.weight"])
        q = rope((h @ w[p + "attention.wq.weight"].T).view(T, HEADS, HD))
        k = rope((h @ w[p + "attention.wk.weight"].T).view(T, KV, HD))
        v = (h @ w[p + "attention.wv.weight"].T).view(T, KV, HD)
        k, v = k.repeat_interleave(HEADS // KV, 1), v.repeat_interleave(HEADS // KV, 1)
        scores = torch.einsum("thd,shd->hts", q, k) / HD ** 0.5
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", att, v).reshape(T, -1) @ w[p + "attention.wo.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])

        def expert(name, h=h):
            return (F.silu(h @ w[name + "w1.weight"].T) * (h @ w[name + "w3.weight"].T)) @ w[name + "w2.weight"].T

        if experts == 1:
            x = x + expert(p + "feed_forward.")
            continue
        top, idx = (h @ w[p + "feed_forward.gate.weight"].T).topk(K, dim=-1)
        weights = top.softmax(-1)  # mistral-inference: softmax over the chosen experts' logits
        out = torch.zeros_like(x)
        for e in range(experts):
            y = expert(f"{p}feed_forward.experts.{e}.")
            out += y * (weights * (idx == e)).sum(-1, keepdim=True)
        x = x + out
    return norm(x, w["norm.weight"]) @ w["output.weight"].T


def to_dec2023(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The December-2023 release's names: experts fused along rows, w2 stored transposed."""
    out = {}
    for k, v in w.items():
        if ".feed_forward.experts." in k:
            continue
        out[k.replace("feed_forward.gate", "block_sparse_moe.gate")] = v
    for i in range(LAYERS):
        p = f"layers.{i}."
        for n in ("w1", "w2", "w3"):
            parts = [w[f"{p}feed_forward.experts.{e}.{n}.weight"] for e in range(E)]
            out[f"{p}block_sparse_moe.{n}"] = torch.cat([t.T if n == "w2" else t for t in parts])
    return out


def _sentencepiece(path):
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["mixtral routes tokens to experts"] * 50),
                                   model_writer=model, vocab_size=40, model_type="bpe")
    path.write_bytes(model.getvalue())


def test_dec2023_release(tmp_path):
    w = raw_weights(E)
    raw = to_dec2023(w)
    keys = sorted(raw)
    torch.save({k: raw[k].to(torch.bfloat16) for k in keys[: len(keys) // 2]}, tmp_path / "consolidated.00.pt")
    torch.save({k: raw[k].to(torch.bfloat16) for k in keys[len(keys) // 2:]}, tmp_path / "consolidated.01.pt")
    (tmp_path / "params.json").write_text(json.dumps({
        "hidden_size": DIM, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "intermediate_size": FFN,
        "num_local_experts": E, "num_key_value_heads": KV, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "vocab_size": VOCAB, "sliding_window": "null"}))
    assert MixtralForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16  # dtype="auto", as transformers 5
    model = MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.sliding_window is None and model.config.torch_dtype == "bfloat16"
    w = {k: v.to(torch.bfloat16).float() for k, v in w.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits[0], reference_logits(w, IDS, E, 1e6), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("experts", [E, 1])
def test_mistral_inference_layout_and_convert(tmp_path, experts, capsys):
    from safetensors.torch import save_file

    src, dst = tmp_path / "raw", tmp_path / "hf"
    src.mkdir()
    w = raw_weights(experts, seed=1)
    save_file(w, src / "consolidated.safetensors")
    params = {"dim": DIM, "n_layers": LAYERS, "head_dim": HD, "hidden_dim": FFN, "n_heads": HEADS,
              "n_kv_heads": KV, "norm_eps": 1e-5, "vocab_size": VOCAB, "sliding_window": 5}
    if experts > 1:
        params["moe"] = {"num_experts": experts, "num_experts_per_tok": K}
    (src / "params.json").write_text(json.dumps(params))  # no rope_theta: 1e6
    _sentencepiece(src / "tokenizer.model")
    expected = reference_logits(w, IDS, experts, 1e6, window=5)
    with torch.no_grad():
        torch.testing.assert_close(MixtralForCausalLM.from_pretrained(src)(IDS).logits[0], expected,
                                   atol=1e-4, rtol=1e-4)
    assert main(["convert", "mistral", str(src), str(dst)]) == 0
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"]
    model = MixtralForCausalLM.from_pretrained(dst)
    assert model.config.num_local_experts == experts and model.config.sliding_window == 5
    # Converting again over that output replaces it whole: a stale template or tokenizer.json of
    # an earlier checkpoint would otherwise be loaded in place of the new tokenizer.model.
    (dst / "chat_template.jinja").write_text("STALE")
    (dst / "tokenizer.json").write_text("{}")
    assert main(["convert", "mistral", str(src), str(dst)]) == 0
    assert not (dst / "chat_template.jinja").exists() and not (dst / "tokenizer.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits[0], expected, atol=1e-4, rtol=1e-4)
    tok = Tokenizer.from_pretrained(dst)
    assert tok.decode(tok.encode("mixtral routes tokens"), skip_special_tokens=True) == "mixtral routes tokens"


def test_errors_name_the_file(tmp_path, capsys):
    src = tmp_path / "release"  # the output may not lie inside the source, so the two are siblings
    src.mkdir()
    assert main(["convert", "mistral", str(src), str(tmp_path / "out")]) == 2
    assert f"{src}: no params.json" in capsys.readouterr().err
    (src / "params.json").write_text(json.dumps({"dim": DIM}))
    torch.save({}, src / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"params\.json: missing field 'n_layers'"):
        MixtralForCausalLM.from_pretrained(src)
    (src / "params.json").write_text(json.dumps({"vocab": 3}))
    with pytest.raises(CheckpointError, match=r"params\.json: neither the mistral-inference layout"):
        MixtralForCausalLM.from_pretrained(src)


def test_source_shapes_checked_before_reshaping(tmp_path):
    """A Dec-2023 w2 stored (H, E*I) would reshape into garbage; a short or 1-D wq would crash in reshape."""
    raw = to_dec2023(raw_weights(E))
    (tmp_path / "params.json").write_text(json.dumps({
        "hidden_size": DIM, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "intermediate_size": FFN,
        "num_local_experts": E, "num_key_value_heads": KV, "vocab_size": VOCAB}))
    for key, bad, found in [("layers.1.block_sparse_moe.w2", raw["layers.1.block_sparse_moe.w2"].T, (DIM, E * FFN)),
                            ("layers.0.attention.wq.weight", raw["layers.0.attention.wq.weight"][:-2], (62, DIM)),
                            ("layers.0.attention.wq.weight", torch.zeros(10), (10,))]:
        torch.save(raw | {key: bad.contiguous()}, tmp_path / "consolidated.00.pt")
        expected = (E * FFN, DIM) if "w2" in key else (HEADS * HD, DIM)
        with pytest.raises(CheckpointError, match=rf"{key} in .*consolidated\.00\.pt: shape {re.escape(str(found))} "
                                                  rf"does not fit .*expected {re.escape(str(expected))}"):
            MixtralForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit,problem", [
    ({"moe": {"num_experts": E}}, r"moe\.num_experts_per_tok is missing"),  # not a silent top-1
    ({"moe": {"num_experts_per_tok": K}}, r"moe\.num_experts is missing"),
    ({"moe": [1]}, r"'moe' must be an object"),
    ({"rope_theta": 0}, r"rope_theta must be > 0"),  # not read as "absent", i.e. 1e6
])
def test_params_json_errors(tmp_path, edit, problem):
    from safetensors.torch import save_file

    save_file(raw_weights(E), tmp_path / "consolidated.safetensors")
    params = {"dim": DIM, "n_layers": LAYERS, "head_dim": HD, "hidden_dim": FFN, "n_heads": HEADS, "n_kv_heads": KV,
              "vocab_size": VOCAB, "moe": {"num_experts": E, "num_experts_per_tok": K}, "rope_theta": None}
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert MixtralForCausalLM.from_pretrained(tmp_path).config.rope_theta == 1e6  # null: mistral-inference's 1e6
    (tmp_path / "params.json").write_text(json.dumps(params | edit))
    with pytest.raises(CheckpointError, match=rf"params\.json: .*{problem}"):
        MixtralForCausalLM.from_pretrained(tmp_path)
