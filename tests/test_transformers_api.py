"""The parts of transformers' model and config API that code written for transformers calls:
loading keywords, training utilities, config spellings. Checked against transformers itself on
identical weights, or against the same computation done without the utility."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, hf_pair, tiny_kwargs, transformers

from mixtral import MixtralConfig, MixtralForCausalLM, MixtralForSequenceClassification


def ids_and_labels(seed: int = 0, B: int = 2, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


# -- loss under gradient accumulation ---------------------------------------------------------------
def test_num_items_in_batch_scales_the_loss_like_transformers():
    hm, m = hf_pair()
    ids, labels = ids_and_labels()
    for n in (None, 64, torch.tensor(64)):
        extra = {} if n is None else {"num_items_in_batch": n}
        with torch.no_grad():
            ours = m(ids, labels=labels, **extra).loss
            ref = hm(ids, labels=labels, **extra).loss
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and it is not silently the mean: 64 items is ~(labelled / 64) of the mean
        labelled = (labels[:, 1:] != -100).sum()
        assert m(ids, labels=labels, num_items_in_batch=64).loss == pytest.approx(
            float(m(ids, labels=labels).loss * labelled / 64), rel=1e-5)


# -- from_pretrained / save_pretrained keywords -----------------------------------------------------
@pytest.fixture
def bf16_checkpoint(tmp_path):
    hm, _ = hf_pair()
    hm.to(torch.bfloat16).save_pretrained(tmp_path)
    return tmp_path


def test_default_dtype_is_the_checkpoints_like_transformers(bf16_checkpoint):
    ref = transformers.MixtralForCausalLM.from_pretrained(bf16_checkpoint)
    ours = MixtralForCausalLM.from_pretrained(bf16_checkpoint)
    assert ours.dtype == ref.dtype == torch.bfloat16
    assert MixtralForCausalLM.from_pretrained(bf16_checkpoint, torch_dtype=torch.float32).dtype == torch.float32


def test_from_pretrained_takes_transformers_keywords(bf16_checkpoint):
    for device_map in ("cpu", {"": "cpu"}, "auto" if not torch.cuda.is_available() else "cpu"):
        m = MixtralForCausalLM.from_pretrained(bf16_checkpoint, device_map=device_map, low_cpu_mem_usage=True,
                                               trust_remote_code=False, use_safetensors=True)
        assert m.device.type == "cpu"
    with pytest.raises(ValueError, match="per-module map"):
        MixtralForCausalLM.from_pretrained(bf16_checkpoint, device_map={"model.layers.0": "cpu"})
    # Config attributes as keywords, as transformers takes them; a typo is an error, not ignored.
    with pytest.warns(UserWarning, match="score.weight not in the checkpoint"):  # a causal-LM checkpoint
        clf = MixtralForSequenceClassification.from_pretrained(bf16_checkpoint, num_labels=3, pad_token_id=0)
    ref = transformers.MixtralForSequenceClassification.from_pretrained(bf16_checkpoint, num_labels=3,
                                                                        pad_token_id=0)
    assert clf.score.weight.shape == ref.score.weight.shape == (3, TINY["hidden_size"])
    assert clf.config.label2id == ref.config.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    clf.save_pretrained(bf16_checkpoint / "clf")  # and the saved config agrees with itself
    assert MixtralForSequenceClassification.from_pretrained(bf16_checkpoint / "clf").config.num_labels == 3
    assert MixtralForCausalLM.from_pretrained(bf16_checkpoint, output_router_logits=True).config.output_router_logits
    with pytest.raises(TypeError, match="num_lables"):
        MixtralForCausalLM.from_pretrained(bf16_checkpoint, num_lables=3)
    # A transformers config object is taken as the config.
    hcfg = transformers.MixtralConfig.from_pretrained(bf16_checkpoint)
    assert MixtralForCausalLM.from_pretrained(bf16_checkpoint, config=hcfg).config.hidden_size == TINY["hidden_size"]


def test_model_built_from_a_transformers_config():
    hcfg = transformers.MixtralConfig(**TINY)
    m = MixtralForCausalLM(hcfg)
    assert isinstance(m.config, MixtralConfig) and m.config.num_local_experts == TINY["num_local_experts"]
    assert m.num_parameters() == transformers.MixtralForCausalLM(hcfg).num_parameters()


def test_saved_classifier_names_its_architecture(tmp_path):
    _, m = hf_pair(MixtralForSequenceClassification, pad_token_id=0)
    m.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MixtralForSequenceClassification"]
    assert transformers.AutoConfig.from_pretrained(tmp_path).architectures == ["MixtralForSequenceClassification"]
    with pytest.raises(ValueError, match="safetensors only"):
        m.save_pretrained(tmp_path / "bin", safe_serialization=False)


# -- training utilities ---------------------------------------------------------------------------
def _grads(model, ids, labels):
    model.zero_grad()
    out = model(ids, labels=labels, output_router_logits=True)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients_and_outputs():
    _, m = hf_pair(router_jitter_noise=0.1)  # jitter: recomputation must replay the same noise
    m.train()
    ids, labels = ids_and_labels()
    torch.manual_seed(3)
    plain, g_plain = _grads(m, ids, labels)
    m.gradient_checkpointing_enable()
    assert m.is_gradient_checkpointing
    torch.manual_seed(3)
    ckpt, g_ckpt = _grads(m, ids, labels)
    # One router-logits entry per layer: the backward pass's re-run must not record a second set.
    assert len(ckpt.router_logits) == len(plain.router_logits) == TINY["num_hidden_layers"]
    assert ckpt.past_key_values is None  # no cache is written while recomputing
    torch.testing.assert_close(ckpt.loss, plain.loss)
    torch.testing.assert_close(ckpt.aux_loss, plain.aux_loss)
    assert g_ckpt.keys() == g_plain.keys() and len(g_plain) == len(list(m.parameters()))
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=1e-5, msg=name)
    m.gradient_checkpointing_disable()
    assert not m.is_gradient_checkpointing


def test_frozen_embeddings_with_input_require_grads():
    """The adapter-training set-up: embeddings frozen, checkpointing on; gradients reach the layers."""
    _, m = hf_pair()
    m.train()
    m.get_input_embeddings().weight.requires_grad_(False)
    m.gradient_checkpointing_enable({"use_reentrant": True})  # reentrant needs an input that requires grad
    m.enable_input_require_grads()
    ids, labels = ids_and_labels()
    m(ids, labels=labels).loss.backward()
    assert m.model.layers[0].self_attn.qkv_proj.weight.grad is not None
    assert m.get_input_embeddings().weight.grad is None


def test_num_parameters_like_transformers():
    hm, m = hf_pair()
    for p in list(m.model.layers[0].parameters()):
        p.requires_grad_(False)
    for p in list(hm.model.layers[0].parameters()):
        p.requires_grad_(False)
    for kw in ({}, {"only_trainable": True}, {"exclude_embeddings": True},
               {"only_trainable": True, "exclude_embeddings": True}):
        assert m.num_parameters(**kw) == hm.num_parameters(**kw), kw


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings_like_transformers(tied):
    hm, m = hf_pair(tie_word_embeddings=tied)
    old_embed = m.get_input_embeddings().weight.detach().clone()
    old_head = m.get_output_embeddings().weight.detach().clone()
    for model in (hm, m):
        model.resize_token_embeddings(120, pad_to_multiple_of=16)  # -> 128 rows
    for model in (hm, m):
        assert model.get_input_embeddings().weight.shape == (128, TINY["hidden_size"])
        assert model.get_output_embeddings().weight.shape == (128, TINY["hidden_size"])
        assert model.config.vocab_size == 128
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    new_embed, new_head = m.get_input_embeddings().weight.detach(), m.get_output_embeddings().weight.detach()
    torch.testing.assert_close(new_embed[:101], old_embed)
    torch.testing.assert_close(new_head[:101], old_head)
    # transformers' mean resizing: the new rows sit at the old rows' mean (within 1e-9 of the covariance).
    torch.testing.assert_close(new_embed[101:], old_embed.mean(0).expand(27, -1), atol=1e-3, rtol=0)
    torch.testing.assert_close(hm.get_input_embeddings().weight.detach()[101:], new_embed[101:], atol=2e-3, rtol=0)
    ids = torch.tensor([[5, 127, 110]])
    with torch.no_grad():
        assert m(ids).logits.shape == (1, 3, 128)
    m.resize_token_embeddings(50)
    torch.testing.assert_close(m.get_input_embeddings().weight.detach(), old_embed[:50])


def test_embedding_accessors():
    _, m = hf_pair()
    assert m.get_decoder() is m.model
    new = torch.nn.Embedding(TINY["vocab_size"], TINY["hidden_size"])
    m.set_input_embeddings(new)
    assert m.model.embed_tokens is new
    m.config.tie_word_embeddings = True
    m.tie_weights()
    assert m.lm_head.weight is new.weight


# -- config -------------------------------------------------------------------------------------
def test_config_takes_transformers_spellings_and_extra_keys(tmp_path):
    c = MixtralConfig(**tiny_kwargs(), rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                      dtype=torch.bfloat16, id2label={0: "neg", 1: "neu", 2: "pos"}, my_tag="x")
    assert c.rope_theta == 5e5 and c.torch_dtype == "bfloat16" and c.num_labels == 3 and c.my_tag == "x"
    assert c.label2id == {"neg": 0, "neu": 1, "pos": 2}
    c.save_pretrained(tmp_path)
    ref = transformers.MixtralConfig.from_pretrained(tmp_path)  # transformers reads what we write
    assert ref.id2label == {0: "neg", 1: "neu", 2: "pos"} and ref.my_tag == "x"
    assert ref.rope_parameters["rope_theta"] == 5e5
    back = MixtralConfig.from_pretrained(tmp_path)
    assert back == c and back.my_tag == "x" and back.id2label == c.id2label
    c.update({"sliding_window": 8, "other": 1})
    assert c.sliding_window == 8 and c.to_dict()["other"] == 1
    assert json.loads(c.to_json_string(use_diff=True))["sliding_window"] == 8
    assert "rms_norm_eps" not in json.loads(c.to_json_string(use_diff=True))


@pytest.mark.parametrize("key,value", [
    ("tie_word_embeddings", "false"), ("rms_norm_eps", "1e-5"), ("eos_token_id", "2"), ("use_cache", 1),
    ("pad_token_id", -1), ("eos_token_id", [2, "3"]),
])
def test_config_refuses_values_of_the_wrong_type(tmp_path, key, value):
    (tmp_path / "config.json").write_text(json.dumps({**tiny_kwargs(), key: value}))
    with pytest.raises(ValueError, match=rf"config.json: MixtralConfig.{key}"):
        MixtralConfig.from_pretrained(tmp_path)


def test_config_output_defaults_apply_to_forward():
    _, m = hf_pair()
    ids, _ = ids_and_labels()
    m.config.output_hidden_states = True
    with torch.no_grad():
        assert len(m(ids).hidden_states) == TINY["num_hidden_layers"] + 1
        m.config.return_dict = False
        assert isinstance(m(ids), tuple)


def test_attention_mask_longer_than_the_tokens_is_refused():
    _, m = hf_pair()
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match=r"attention_mask must be .* \(1, 3\)"):
        m(ids, attention_mask=torch.tensor([[1, 1, 1, 0, 0]]))
    with torch.no_grad():
        out = m(ids, use_cache=True)
        step = m(torch.tensor([[6]]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                 past_key_values=out.past_key_values)  # past + new columns: fine
    assert step.logits.shape == (1, 1, TINY["vocab_size"])


# -- caches and logits ---------------------------------------------------------------------------
def test_transformers_dynamic_cache_and_legacy_tuples_with_left_padding():
    """A prompt prefilled by transformers (its DynamicCache, or those tensors as legacy tuples)
    continues in ours: the next steps' logits match transformers' own, padding included, and a
    DynamicCache reused in place (transformers' idiom) holds every step's keys."""
    import copy

    from transformers import DynamicCache

    hm, m = hf_pair(pad_token_id=0)
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = [torch.tensor([[8], [9]]), torch.tensor([[10], [11]])]
    with torch.no_grad():
        shared = DynamicCache()
        hm(ids, attention_mask=mask, position_ids=pos, past_key_values=shared, use_cache=True)
        legacy = tuple((layer.keys.clone(), layer.values.clone()) for layer in shared.layers)
        theirs = copy.deepcopy(shared)
        for j, nxt in enumerate(steps):
            step_mask = F.pad(mask, (0, j + 1), value=1)
            ref = hm(nxt, attention_mask=step_mask, position_ids=pos[:, -1:] + 1 + j, past_key_values=theirs).logits
            ours = m(nxt, attention_mask=step_mask, past_key_values=shared).logits  # the same object each step
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
            assert shared.get_seq_length() == 6 + j
        ours_legacy = m(steps[0], attention_mask=F.pad(mask, (0, 1), value=1), past_key_values=legacy).logits
        ref0 = hm(steps[0], attention_mask=F.pad(mask, (0, 1), value=1), position_ids=pos[:, -1:] + 1,
                  past_key_values=_refill(legacy)).logits
        torch.testing.assert_close(ours_legacy, ref0, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match=r"must be \(batch, past \+ seq_len\) = \(2, 6\) with past_key_values"):
            m(steps[0], attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=legacy)
        # An empty DynamicCache to start, reused in place: the same logits as one full forward.
        fresh, full = DynamicCache(), torch.tensor([[3, 4, 5, 6, 7, 8]])
        m(full[:, :5], past_key_values=fresh)
        torch.testing.assert_close(m(full[:, 5:], past_key_values=fresh).logits[:, -1], m(full).logits[:, -1],
                                   atol=1e-5, rtol=1e-5)


def _refill(legacy):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(legacy):
        cache.update(k.clone(), v.clone(), i)
    return cache


def test_cache_crop_and_legacy_round_trip():
    _, m = hf_pair()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        full = m(ids, use_cache=True).past_key_values
        legacy = full.to_legacy_cache()
        assert len(legacy) == TINY["num_hidden_layers"] and legacy[0][0].shape[2] == 6
        cache = m(ids[:, :4], use_cache=True).past_key_values
        m(torch.tensor([[9, 9]]), past_key_values=cache)  # two rejected "draft" tokens
        cache.crop(-2)
        assert cache.get_seq_length() == 4
        stepped = m(ids[:, 4:], past_key_values=cache).logits
        ref = m(ids).logits[:, 4:]
    torch.testing.assert_close(stepped, ref, atol=1e-5, rtol=1e-5)
    for k, v in legacy:  # the first 4 positions are the ones the cropped cache kept
        assert k.shape[2] == v.shape[2] == 6
    torch.testing.assert_close(cache.to_legacy_cache()[0][0][:, :, :4], legacy[0][0][:, :, :4])
    _, windowed = hf_pair(sliding_window=3)
    with torch.no_grad():
        rolled = windowed(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="cannot be rolled back"):
        rolled.crop(2)
    with pytest.raises(ValueError, match="no longer holds"):
        rolled.to_legacy_cache()


def test_logits_to_keep_as_positions_like_transformers():
    hm, m = hf_pair()
    ids, _ = ids_and_labels()
    keep = torch.tensor([0, 4, 8])
    with torch.no_grad():
        torch.testing.assert_close(m(ids, logits_to_keep=keep).logits, hm(ids, logits_to_keep=keep).logits,
                                   atol=1e-4, rtol=1e-4)
        assert m(ids, logits_to_keep=2).logits.shape[1] == 2
