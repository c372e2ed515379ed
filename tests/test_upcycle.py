"""Upcycled with exact copies = the dense model, checked against transformers' Llama and Mistral."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import transformers

from mixtral import MixtralForCausalLM
from mixtral.checkpoint.loading import CheckpointError
from mixtral.cli import main
from mixtral.loader import upcycle

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 11, 2, 80, 33, 7, 8]])
DENSE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def dense_dir(tmp_path, kind: str = "llama", **kw):
    torch.manual_seed(0)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    hm = cls[1](cls[0](**DENSE, **kw)).eval()
    with torch.no_grad():
        for p in hm.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    path = tmp_path / kind
    hm.save_pretrained(path)
    return hm, path


@pytest.mark.parametrize("kind,kw", [("llama", {"rope_theta": 500000.0}), ("llama", {"tie_word_embeddings": True}),
                                     ("mistral", {"sliding_window": 4})])
def test_exact_copies_equal_the_dense_model(tmp_path, kind, kw):
    hm, path = dense_dir(tmp_path, kind, **kw)
    model = upcycle(MixtralForCausalLM, path, experts=4, top_k=2, seed=3)
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, hm(IDS).logits, atol=1e-5, rtol=1e-5)
        # the router is seeded, not trivial: different tokens pick different experts
        h = model.model.embed_tokens(IDS)[0]
        picks = (h @ model.model.layers[0].mlp.gate.weight.t()).topk(2).indices.sort().values
        assert len({tuple(r.tolist()) for r in picks}) > 1


def test_seed_and_noise(tmp_path):
    hm, path = dense_dir(tmp_path)
    a, b, c = (upcycle(MixtralForCausalLM, path, 4, 2, seed=s) for s in (1, 1, 2))
    gate = "model.layers.1.mlp.gate.weight"
    assert torch.equal(a.state_dict()[gate], b.state_dict()[gate])
    assert not torch.equal(a.state_dict()[gate], c.state_dict()[gate])
    noisy = upcycle(MixtralForCausalLM, path, 4, 2, noise=1e-3, seed=1)
    experts = noisy.model.layers[0].mlp.experts.gate_up_proj
    dense = hm.model.layers[0].mlp.gate_proj.weight
    assert not torch.equal(experts[0], experts[1])
    assert (experts[:, :96] - dense).abs().max() < 1e-2  # copies plus noise of std 1e-3
    with torch.no_grad():
        torch.testing.assert_close(noisy(IDS).logits, hm(IDS).logits, atol=0.1, rtol=0.05)


def test_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    hm, path = dense_dir(tmp_path)
    assert main(["upcycle", str(path), str(tmp_path / "moe"), "--experts", "3", "--top-k", "2"]) == 0
    assert "3 experts (top-2)" in capsys.readouterr().out
    model = MixtralForCausalLM.from_pretrained(tmp_path / "moe")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, hm(IDS).logits, atol=1e-5, rtol=1e-5)


def test_rejects_what_it_cannot_upcycle(tmp_path, capsys):
    _, path = dense_dir(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'gpt2' is not a dense Llama/Mistral"):
        upcycle(MixtralForCausalLM, path)
    (path / "config.json").write_text(json.dumps(cfg | {"mlp_bias": True}))
    with pytest.raises(CheckpointError, match="mlp_bias"):
        upcycle(MixtralForCausalLM, path)
    (path / "config.json").write_text(json.dumps(cfg))
    assert main(["upcycle", str(path), str(tmp_path / "x"), "--experts", "2", "--top-k", "3"]) == 2
    assert "num_experts_per_tok (3) cannot exceed num_local_experts (2)" in capsys.readouterr().err
    assert main(["upcycle", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
