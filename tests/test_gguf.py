"""GGUF in and out, against transformers' models and against GGUF files written here by hand.

The hand-written files follow llama.cpp's converter (its ``permute`` of q/k rows, its tensor names),
so reading them checks our reader independently of our writer.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import hf_pair, transformers

from mixtral import MixtralForCausalLM, Tokenizer
from mixtral.checkpoint.gguf import GGUFSource, _open, gguf_tensors, read_gguf, write_gguf
from mixtral.checkpoint.loading import CheckpointError
from mixtral.cli import main

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 11, 2, 80, 33]])


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's ``LlamaModel.permute`` (rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_by_hand(path, hm, layout: str, edit=None) -> None:
    """A transformers Llama/Mixtral model as llama.cpp would convert it: ``exps``, ``per_expert`` or ``dense``.
    ``edit(writer, tensors)`` may change the metadata and tensors before they are written."""
    c = hm.config
    sd = {k: v.detach().float().numpy() for k, v in hm.state_dict().items()}
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if layout != "dense":
        w.add_expert_count(c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    t = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
         "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        t[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        t[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        t[b + "attn_q.weight"] = llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        t[b + "attn_k.weight"] = llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        t[b + "attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
        t[b + "attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        if layout == "dense":
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                t[b + f"ffn_{ours}.weight"] = sd[p + f"mlp.{theirs}.weight"]
            continue
        # transformers v5 keeps Mixtral experts fused: gate_up_proj (E, 2I, H), down_proj (E, H, I)
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        inter = gate_up.shape[1] // 2
        t[b + "ffn_gate_inp.weight"] = sd[p + "mlp.gate.weight"]
        if layout == "exps":
            t[b + "ffn_gate_exps.weight"], t[b + "ffn_up_exps.weight"] = gate_up[:, :inter], gate_up[:, inter:]
            t[b + "ffn_down_exps.weight"] = down
        else:
            for e in range(gate_up.shape[0]):
                t[b + f"ffn_gate.{e}.weight"], t[b + f"ffn_up.{e}.weight"] = gate_up[e, :inter], gate_up[e, inter:]
                t[b + f"ffn_down.{e}.weight"] = down[e]
    if edit is not None:
        edit(w, t)
    for name, a in t.items():
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _state_keys(hm):
    return set(hm.state_dict())


@pytest.mark.parametrize("layout", ["exps", "per_expert"])
def test_reads_llama_cpp_moe_layouts(tmp_path, layout):
    hm, _ = hf_pair()
    assert "model.layers.0.mlp.experts.gate_up_proj" in _state_keys(hm)
    write_by_hand(tmp_path / "m.gguf", hm, layout)
    ours = MixtralForCausalLM.from_pretrained(tmp_path / "m.gguf")
    assert ours.config.num_local_experts == 4 and ours.config.num_experts_per_tok == 2
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, hm(IDS).logits, atol=1e-4, rtol=1e-4)


def test_dense_gguf_loads_as_one_expert(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    hm = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hm.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    write_by_hand(tmp_path / "d.gguf", hm, "dense")
    ours = MixtralForCausalLM.from_pretrained(tmp_path / "d.gguf")
    assert ours.config.num_local_experts == 1 and ours.config.num_experts_per_tok == 1
    assert ours.config.rope_theta == 10000.0
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, hm(IDS).logits, atol=1e-4, rtol=1e-4)


def test_round_trip_f32_equal_logits(tmp_path):
    hm, ours = hf_pair()
    write_gguf(ours, None, tmp_path / "m.gguf", type="F32")
    back = MixtralForCausalLM.from_pretrained(tmp_path / "m.gguf")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, hm(IDS).logits, atol=1e-5, rtol=1e-5)
    for name, p in ours.state_dict().items():  # F32 stores exactly what it was given
        assert torch.equal(back.state_dict()[name], p), name


def test_tied_embeddings_round_trip(tmp_path):
    hm, ours = hf_pair(tie_word_embeddings=True)
    write_gguf(ours, None, tmp_path / "t.gguf", type="F32")
    assert "output.weight" not in {t.name for t in _open(tmp_path / "t.gguf").tensors}
    back = MixtralForCausalLM.from_pretrained(tmp_path / "t.gguf")
    assert back.config.tie_word_embeddings and back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, hm(IDS).logits, atol=1e-5, rtol=1e-5)


def _block_bound(x: np.ndarray, qtype: str) -> np.ndarray:
    """Largest error each quantization type may make on each element, from its block's statistics."""
    if qtype in ("F16", "BF16"):
        return np.abs(x) * (2.0 ** -10 if qtype == "F16" else 2.0 ** -7) + 1e-7
    blocks = x.reshape(-1, 32)
    amax, lo, hi = np.abs(blocks).max(1), blocks.min(1), blocks.max(1)
    step = {"Q8_0": amax / 127, "Q4_0": amax / 8, "Q5_0": amax / 16,
            "Q4_1": (hi - lo) / 15, "Q5_1": (hi - lo) / 31}[qtype]
    # Half a step of rounding, plus the f16 rounding of the block scale (and minimum) times the level.
    # Q4_0/Q5_0 scale by the signed extreme, so the other end reaches only 7/8 (15/16) of it: a full step.
    half = 1.0 if qtype in ("Q4_0", "Q5_0") else 0.5
    bound = half * step + (amax + np.abs(lo)) * 2.0 ** -10 + 1e-7
    return np.repeat(bound, 32).reshape(x.shape)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_types_within_their_error(tmp_path, qtype):
    _, ours = hf_pair()
    write_gguf(ours, None, tmp_path / "q.gguf", type=qtype)
    source = GGUFSource(tmp_path / "q.gguf", _open(tmp_path / "q.gguf"))
    orig = {name: t.float().numpy() for name, t in gguf_tensors(ours)}
    for name, x in orig.items():
        got = source.get(name).numpy()
        assert got.shape == x.shape, name
        if x.ndim == 1 or "ffn_gate_inp" in name:  # norms and the router are never quantized
            assert source.type_of(name) == "F32" and np.array_equal(got, x), name
            continue
        assert source.type_of(name) == qtype, name
        err = np.abs(got - x)
        assert (err <= _block_bound(x, qtype)).all(), (name, float(err.max()))
        assert err.max() > 0 or qtype == "F16"
    back = MixtralForCausalLM.from_pretrained(tmp_path / "q.gguf")
    with torch.no_grad():
        a, b = back(IDS).logits, ours(IDS).logits
    # Routing is discontinuous, so a few logits may move a lot; overall the model must stay the same.
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > {"F16": 0.9999, "Q8_0": 0.999, "Q4_0": 0.7, "Q4_1": 0.7}[qtype]


@pytest.mark.parametrize("qtype", ["BF16", "Q5_0", "Q5_1", "Q8_0"])
def test_dequantizes_other_types(tmp_path, qtype):
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    w = gguf.GGUFWriter(tmp_path / "x.gguf", "llama")
    q = gguf.GGMLQuantizationType[qtype]
    w.add_tensor("blk.0.attn_v.weight", gguf.quants.quantize(x, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source = GGUFSource(tmp_path / "x.gguf", _open(tmp_path / "x.gguf"))
    got = source.get("blk.0.attn_v.weight").numpy()
    assert got.shape == x.shape and (np.abs(got - x) <= _block_bound(x, qtype)).all()


# -- tokenizers ----------------------------------------------------------------------------------

CORPUS = ["The quick brown fox jumps over the lazy dog 12345 times.", "Mixtral routes every token to two experts.",
          "Sparse mixtures of experts are fast, aren't they?", "hello world\n\ttabs and  spaces", "é ü ñ 日本"] * 30
PROBES = ["the lazy fox 2024", "Experts route tokens!", "  leading spaces and trailing ", "日本語 é",
          "<|im_start|>user\nhi 42<|im_end|>\n"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _byte_level_tokenizer(digits: bool):
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = Raw(models.BPE())
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bl]) if digits else bl
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(raw, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token=None,
                     pad_token="<|endoftext|>", chat_template=TEMPLATE, add_bos_token=False)


@pytest.mark.parametrize("digits", [False, True])
def test_gpt2_tokenizer_round_trip(tmp_path, digits):
    tok = _byte_level_tokenizer(digits)
    _, ours = hf_pair(vocab_size=300)
    write_gguf(ours, tok, tmp_path / "t.gguf", type="F32")
    meta_pre = _open(tmp_path / "t.gguf").fields["tokenizer.ggml.pre"].contents()
    assert meta_pre == ("smollm" if digits else "gpt2")
    back = Tokenizer.from_pretrained(tmp_path / "t.gguf")
    for text in PROBES:
        assert back.encode(text) == tok.encode(text), text
        assert back.decode(back.encode(text)) == text
    msgs = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
    assert (back.bos_token, back.eos_token, back.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert back.vocab_size == 300  # padded to the model's vocabulary, as llama.cpp requires


def _sentencepiece(tmp_path):
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=420,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   user_defined_symbols=["[INST]", "[/INST]"],
                                   # as Llama's and Mistral's tokenizer.model: no whitespace normalization
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path))


def test_llama_sentencepiece_tokenizer_round_trip(tmp_path):
    sp = _sentencepiece(tmp_path)
    tok = Tokenizer(sp, chat_template=TEMPLATE)
    _, ours = hf_pair(vocab_size=440)
    write_gguf(ours, tok, tmp_path / "s.gguf", type="F32")
    back = Tokenizer.from_gguf(tmp_path / "s.gguf")
    for text in PROBES[:4] + ["experts experts fox", "a\nb", "🙂 byte fallback ☃"]:
        assert back.encode(text) == [sp.bos_id()] + sp.encode(text), text  # sentencepiece itself
        assert back.decode(back.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text))
    # user-defined pieces stay atomic (llama.cpp matches them in raw text, as tokenizers' added tokens)
    assert back.encode("[INST]", add_special_tokens=False) == [sp.piece_to_id("[INST]")]
    assert back.bos_token == "<s>" and back.eos_token == "</s>" and back.add_bos_token


def test_cli_round_trip_through_hf_directories(tmp_path, capsys):
    hm, ours = hf_pair(vocab_size=300)
    ours.save_pretrained(tmp_path / "hf")
    _byte_level_tokenizer(True).save_pretrained(tmp_path / "hf")
    assert main(["convert", "to-gguf", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--type", "F32"]) == 0
    assert main(["convert", "gguf", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "hf", "m.gguf"]  # no temporary leftovers
    back = MixtralForCausalLM.from_pretrained(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, hm(IDS).logits, atol=1e-5, rtol=1e-5)
    tok = Tokenizer.from_pretrained(tmp_path / "back")
    assert tok.encode(PROBES[0]) == _byte_level_tokenizer(True).encode(PROBES[0])
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE


# -- errors ----------------------------------------------------------------------------------------

def test_truncated_file_is_named(tmp_path):
    _, ours = hf_pair()
    write_gguf(ours, None, tmp_path / "m.gguf", type="F32")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf.*truncated"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a GGUF file"):
        MixtralForCausalLM.from_pretrained(tmp_path / "junk.gguf")


def test_wrong_architecture_and_unsupported_type(tmp_path, capsys):
    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["convert", "gguf", str(tmp_path / "gpt2.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gpt2.gguf" in err and "architecture 'gpt2' is not supported" in err
    assert not (tmp_path / "out" / "config.json").exists()

    w = gguf.GGUFWriter(tmp_path / "q2k.gguf", "llama")
    q = gguf.GGMLQuantizationType.Q2_K
    w.add_tensor("token_embd.weight", np.zeros((4, 84), np.uint8), raw_dtype=q)  # 84 bytes = one Q2_K block
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"q2k\.gguf: tensor token_embd.weight has quantization type Q2_K"):
        read_gguf(tmp_path / "q2k.gguf")


def _drop(key):
    return lambda w, t: w.kv_data[0].pop(key)


@pytest.mark.parametrize("edit,problem", [
    (_drop("llama.expert_used_count"), r"metadata llama\.expert_used_count is missing"),  # not a silent top-1
    (lambda w, t: w.add_float32("llama.rope.scaling.factor", 4.0), r"rope scaling factor 4\.0 is not supported"),
    (lambda w, t: w.add_float32("llama.rope.scale_linear", 2.0), r"rope scaling factor 2\.0 is not supported"),
    (lambda w, t: (_drop("llama.attention.head_count")(w, t), w.add_string("llama.attention.head_count", "4")),
     r"llama\.attention\.head_count is '4' \(str\), expected a number"),
    (lambda w, t: t.update({"blk.0.attn_q.weight": t["blk.0.attn_q.weight"][:-4]}),
     r"blk\.0\.attn_q\.weight in .*m\.gguf: shape \(60, 64\) does not fit .*qkv_proj\.weight: expected \(64, 64\)"),
    (lambda w, t: w.add_token_list([f"t{i}" for i in range(102)]),  # more tokens than the 101 embedding rows
     r"tokenizer\.ggml\.tokens has 102 tokens but token_embd\.weight only 101 rows"),
])
def test_bad_metadata_and_tensors_are_named(tmp_path, edit, problem):
    hm, _ = hf_pair()
    write_by_hand(tmp_path / "m.gguf", hm, "exps", edit)
    with pytest.raises(CheckpointError, match=problem) as e:
        MixtralForCausalLM.from_pretrained(tmp_path / "m.gguf")
    assert str(tmp_path / "m.gguf") in str(e.value)


def test_fewer_tokens_than_rows_and_unscaled_rope_load(tmp_path):
    """Padding rows beyond the vocabulary are normal, and a factor of 1 or type "none" scales nothing."""
    hm, _ = hf_pair()

    def edit(w, t):
        w.add_token_list([f"t{i}" for i in range(90)])
        w.add_string("llama.rope.scaling.type", "none")
        w.add_float32("llama.rope.scaling.factor", 8.0)  # llama.cpp ignores the factor for type "none"

    write_by_hand(tmp_path / "m.gguf", hm, "exps", edit)
    with torch.no_grad():
        torch.testing.assert_close(MixtralForCausalLM.from_pretrained(tmp_path / "m.gguf")(IDS).logits,
                                   hm(IDS).logits, atol=1e-4, rtol=1e-4)


def test_to_gguf_refuses_a_quantized_checkpoint(tmp_path, capsys):
    from mixtral.quant import quantize_model

    _, ours = hf_pair()
    quantize_model(ours, "int8")
    ours.save_pretrained(tmp_path / "q")
    assert main(["convert", "to-gguf", str(tmp_path / "q"), str(tmp_path / "q.gguf")]) == 2
    assert "quantized checkpoint" in capsys.readouterr().err and not (tmp_path / "q.gguf").exists()


def test_to_gguf_output_must_end_in_gguf(tmp_path, capsys):
    """A .bin written by to-gguf would not be recognized as GGUF by any loader, ours included."""
    _, ours = hf_pair()
    ours.save_pretrained(tmp_path / "hf")
    assert main(["convert", "to-gguf", str(tmp_path / "hf"), str(tmp_path / "m.bin")]) == 2
    assert "must end in .gguf" in capsys.readouterr().err and not (tmp_path / "m.bin").exists()
