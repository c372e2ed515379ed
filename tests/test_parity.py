"""Numerical parity with transformers' Mixtral on identical random weights (fp32, max abs error <= 1e-4)."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_pair

from mixtral import MixtralForCausalLM, MixtralForSequenceClassification, MixtralModel, load_balancing_loss

TOL = 1e-4

CASES = {
    "base": {},
    "gqa_mqa": dict(num_key_value_heads=1),
    "no_gqa": dict(num_key_value_heads=4),
    "sliding_window": dict(sliding_window=4),
    "tied": dict(tie_word_embeddings=True),
    "top1": dict(num_experts_per_tok=1),
    "top4": dict(num_experts_per_tok=4, num_local_experts=6),
    "head_dim": dict(head_dim=24),
}


def left_padded(vocab: int = 101, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def hf_position_ids(mask: torch.Tensor) -> torch.Tensor:
    # transformers' forward uses 0..T-1 unless told; its generate derives them from the mask like this.
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def close(a, b, tol=TOL, where=None):
    if where is not None:
        a, b = a[where], b[where]
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err:.2e} > {tol}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_lm_matches_transformers(case, attn):
    hm, m = hf_pair(attn=attn, pad_token_id=0, **CASES[case])
    ids, mask = left_padded()
    # A padding position's logits are arbitrary in both libraries, so no label may be predicted from
    # one: the first real token of each left-padded row is not a target either.
    first_real = mask.cumsum(-1) == 1
    labels = ids.masked_fill((mask == 0) | first_real, -100)
    with torch.no_grad():
        a = hm(ids, attention_mask=mask, position_ids=hf_position_ids(mask), labels=labels,
               output_router_logits=True, output_hidden_states=True, output_attentions=attn == "eager")
        b = m(ids, attention_mask=mask, labels=labels, output_router_logits=True, output_hidden_states=True,
              output_attentions=attn == "eager")
    real = mask.bool()
    close(a.logits, b.logits, where=real)
    close(a.loss, b.loss)
    close(a.aux_loss, b.aux_loss)
    assert len(a.router_logits) == len(b.router_logits) == m.config.num_hidden_layers
    flat = real.reshape(-1)
    for x, y in zip(a.router_logits, b.router_logits):
        assert y.shape == (ids.numel(), m.config.num_local_experts)
        close(x, y, where=flat)
    assert len(a.hidden_states) == len(b.hidden_states) == m.config.num_hidden_layers + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        close(x, y, where=real)
    if attn == "eager":
        for x, y in zip(a.attentions, b.attentions):
            assert y.shape == (3, m.config.num_attention_heads, 10, 10)
            close(x.transpose(1, 2)[real], y.transpose(1, 2)[real])  # real queries


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("pad_labels", ["ignored", "targets"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_loss_matches_transformers_backend(attn, pad_labels, window):
    """The same attention implementation on both sides, and every position compared, padding too:
    the last padding position of a row predicts its first real token, so the loss reads the logits
    of queries that may see no key. transformers' eager and sdpa disagree about those rows (eager's
    additive finfo.min mask averages all values uniformly, SDPA's boolean mask gives zeros), so each
    backend is compared with its own counterpart."""
    hm, m = hf_pair(attn=attn, hf_attn=attn, pad_token_id=0, sliding_window=window)
    ids, mask = left_padded()
    labels = ids.masked_fill(mask == 0, -100) if pad_labels == "ignored" else ids
    with torch.no_grad():
        a = hm(ids, attention_mask=mask, position_ids=hf_position_ids(mask), labels=labels,
               output_router_logits=True)
        b = m(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    close(a.loss, b.loss)
    close(a.aux_loss, b.aux_loss)
    close(a.logits, b.logits)


def test_unpadded_batch_matches_without_position_ids():
    hm, m = hf_pair(sliding_window=3)
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        close(hm(ids).logits, m(ids).logits)


def test_output_attentions_under_sdpa_falls_back_to_eager():
    hm, m = hf_pair(attn="sdpa")
    ids = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        a = hm(ids, output_attentions=True)
        b = m(ids, output_attentions=True)
    for x, y in zip(a.attentions, b.attentions):
        close(x, y)
        torch.testing.assert_close(y.sum(-1), torch.ones_like(y.sum(-1)))


def test_bare_model_matches():
    hm, m = hf_pair(cls=MixtralModel)
    ids = torch.randint(0, 101, (2, 6))
    with torch.no_grad():
        close(hm(ids).last_hidden_state, m(ids).last_hidden_state)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("problem,num_labels", [
    (None, 3), ("regression", 1), ("multi_label_classification", 3), ("single_label_classification", 3),
])
def test_sequence_classification_matches(side, problem, num_labels):
    hm, m = hf_pair(cls=MixtralForSequenceClassification, pad_token_id=0, num_labels=num_labels,
                    problem_type=problem)
    ids = torch.randint(1, 101, (3, 8))
    mask = torch.ones_like(ids)
    if side == "right":
        mask[0, 5:] = 0
        mask[1, 7:] = 0
    else:
        mask[0, :3] = 0
        mask[1, :1] = 0
    ids[mask == 0] = 0
    pos = hf_position_ids(mask)
    if problem == "regression":
        labels = torch.randn(3)
    elif problem == "multi_label_classification":
        labels = torch.randint(0, 2, (3, num_labels)).float()
    else:
        labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        a = hm(ids, attention_mask=mask, position_ids=pos, labels=labels)
        b = m(ids, attention_mask=mask, labels=labels)
    assert b.logits.shape == (3, num_labels)
    close(a.logits, b.logits)
    close(a.loss, b.loss)


def test_return_dict_false_and_tuple_indexing():
    _, m = hf_pair()
    ids = torch.randint(0, 101, (1, 5))
    out = m(ids, labels=ids)
    assert torch.equal(out[0], out.loss) and torch.equal(out[1], out.logits)
    tup = m(ids, labels=ids, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[1], out.logits)
    assert out["logits"] is out.logits


def test_load_balancing_loss_formula():
    """Switch Transformer eqs. 4-6 written out by hand, with and without a padding mask."""
    torch.manual_seed(0)
    E, K = 5, 2
    layers = [torch.randn(12, E) for _ in range(3)]
    mask = torch.ones(2, 6)
    mask[0, :2] = 0
    for attn in (None, mask):
        weights = torch.ones(12) if attn is None else attn.reshape(-1)
        f = torch.zeros(E)
        P = torch.zeros(E)
        total = 0.0
        for logits in layers:
            probs = logits.softmax(-1)
            top = probs.topk(K, -1).indices
            for t in range(12):
                for e in top[t]:
                    f[e] += weights[t]
                P += probs[t] * weights[t]
                total += weights[t]
        expected = E * (f / total * P / total).sum()
        got = load_balancing_loss(tuple(layers), E, K, attn)
        torch.testing.assert_close(got, expected)


def test_router_jitter_only_in_training():
    _, m = hf_pair(router_jitter_noise=0.3)
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(ids).logits, m(ids).logits)
        m.train()
        assert not torch.equal(m(ids).logits, m(ids).logits)


def test_training_step_backpropagates_to_experts_and_router():
    _, m = hf_pair()
    m.train()
    ids = torch.randint(0, 101, (2, 8))
    out = m(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    layer = m.model.layers[0]
    assert layer.mlp.gate.weight.grad is not None and layer.mlp.gate.weight.grad.abs().sum() > 0
    assert layer.mlp.experts.gate_up_proj.grad.abs().sum() > 0


def test_inputs_embeds_equals_input_ids():
    _, m = hf_pair()
    ids = torch.randint(0, 101, (2, 5))
    with torch.no_grad():
        close(m(ids).logits, m(inputs_embeds=m.model.embed_tokens(ids)).logits, tol=0)


def test_construction_shapes_and_init():
    from mixtral import MixtralConfig

    cfg = MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3, initializer_range=0.05)
    m = MixtralForCausalLM(cfg)
    experts = m.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (3, 80, 32) and experts.down_proj.shape == (3, 32, 40)
    assert m.model.layers[0].self_attn.qkv_proj.weight.shape == (8 * 4 + 2 * 2 * 8, 32)
    std = m.lm_head.weight.std().item()
    assert 0.04 < std < 0.06
    assert torch.equal(m.model.norm.weight, torch.ones(32))
