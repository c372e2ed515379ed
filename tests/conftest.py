"""Shared helpers: tiny configs, and the same random weights in our model and transformers'."""

from __future__ import annotations

import pytest
import torch

from mixtral import MixtralConfig, MixtralForCausalLM, MixtralForSequenceClassification, MixtralModel
from mixtral.loader import from_state_dict

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
)

HF_CLASSES = {
    MixtralForCausalLM: "MixtralForCausalLM",
    MixtralForSequenceClassification: "MixtralForSequenceClassification",
    MixtralModel: "MixtralModel",
}


def tiny_kwargs(**overrides):
    kw = dict(TINY)
    kw.update(overrides)
    return kw


def hf_pair(cls=MixtralForCausalLM, seed: int = 0, attn: str = "sdpa", hf_attn: str = "eager", **overrides):
    """A transformers model with random weights and ours holding the very same weights."""
    kw = tiny_kwargs(**overrides)
    torch.manual_seed(seed)
    hcfg = transformers.MixtralConfig(**kw)
    hm = getattr(transformers, HF_CLASSES[cls])._from_config(hcfg, attn_implementation=hf_attn).eval()
    with torch.no_grad():  # transformers' init is too small to make routing interesting
        for name, p in hm.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2 if p.dim() > 1 and p.shape[-1] <= 128 else 0.05)
    ours = from_hf_model(hm, cls, MixtralConfig(**kw), attn)
    return hm, ours


def from_hf_model(hm, cls, config, attn="sdpa"):
    return from_state_dict(cls, {k: v.detach().clone() for k, v in hm.state_dict().items()}, config,
                           attn_implementation=attn)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
