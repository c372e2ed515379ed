"""Tokenizer against transformers' tokenizer on the same files, and SentencePiece against its own rules."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import transformers

from mixtral import Tokenizer

# The template Mixtral-8x7B-Instruct ships in tokenizer_config.json.
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

TEXT = ["The quick brown fox jumps over the lazy dog.", "Mixtral routes every token to two experts.",
        "Sparse mixtures of experts are fast.", "hello world"] * 20


MESSAGES = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
            {"role": "user", "content": "the fox?"}]


def mixtral_tokenizer_json(directory, *, post_processor: bool = True, **config):
    """tokenizer.json and tokenizer_config.json laid out as Mixtral-8x7B-Instruct's: byte-fallback BPE,
    "▁" prepended by the normalizer, BOS from the post-processor; ``config`` overrides entries."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, normalizers, processors, trainers

    raw = Raw(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    raw.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=380, special_tokens=specials))
    if post_processor:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    raw.save(str(directory / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
           "chat_template": MIXTRAL_TEMPLATE, "tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
           "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps({**cfg, **config}))
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    return mixtral_tokenizer_json(tmp_path_factory.mktemp("tok"))


def reference(directory, **kwargs):
    """transformers' tokenizer of the same files, taking tokenizer.json as it is."""
    return transformers.PreTrainedTokenizerFast.from_pretrained(directory, **kwargs)


def test_matches_transformers_tokenizer(hf_tokenizer_dir):
    ours = Tokenizer.from_pretrained(hf_tokenizer_dir)
    theirs = reference(hf_tokenizer_dir, padding_side="left")
    ours.pad_token = ours.eos_token
    theirs.pad_token = theirs.eos_token
    assert ours.pad_token_id == theirs.pad_token_id == 2
    texts = ["the lazy fox", "two experts route every token quickly", "caf\u00e9 \u2603"]  # bytes: fallback
    for t in texts:
        assert ours.encode(t) == theirs.encode(t)
        assert ours.encode(t, add_special_tokens=False) == theirs.encode(t, add_special_tokens=False)
    a = ours(texts, return_tensors="pt", padding=True)
    b = theirs(texts, return_tensors="pt", padding=True)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a.attention_mask, b["attention_mask"])
    assert a["attention_mask"][0, 0] == 0  # left padding by default
    ids = a["input_ids"]
    assert ours.batch_decode(ids, skip_special_tokens=True) == theirs.batch_decode(ids, skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    right = dict(padding="max_length", max_length=12, padding_side="right")
    assert ours(texts, **right)["input_ids"] == theirs(texts, **right)["input_ids"]


def test_padding_without_pad_token_raises_like_transformers(hf_tokenizer_dir):
    ours, theirs = Tokenizer.from_pretrained(hf_tokenizer_dir), reference(hf_tokenizer_dir)
    assert ours.pad_token is None and ours.pad_token_id is None
    for args in [(["a", "the lazy dog"], True), ("one text", True), (["a", "b"], "longest"),
                 (["a"], "max_length")]:
        kw = dict(padding=args[1], max_length=8 if args[1] == "max_length" else None)
        with pytest.raises(ValueError, match="padding token"):
            theirs(args[0], **kw)
        with pytest.raises(ValueError, match=r"tokenizer\.pad_token = tokenizer\.eos_token"):
            ours(args[0], **kw)
    for padding in (False, "do_not_pad"):
        assert ours(["a", "the dog"], padding=padding)["input_ids"] == theirs(["a", "the dog"], padding=padding)[
            "input_ids"]
    ours.pad_token = ours.eos_token
    assert ours(["a", "the lazy dog"], padding=True)["input_ids"][0][0] == ours.eos_token_id


def test_chat_template_matches_transformers(hf_tokenizer_dir):
    ours = Tokenizer.from_pretrained(hf_tokenizer_dir)
    theirs = reference(hf_tokenizer_dir)
    text = ours.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == "<s>[INST] hello [/INST]world</s>[INST] the fox? [/INST]"
    # transformers 5's default: a BatchEncoding of lists, or of (1, T) tensors
    enc = ours.apply_chat_template(MESSAGES, add_generation_prompt=True)
    ref = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert set(enc) == set(ref) == {"input_ids", "attention_mask"}
    assert enc["input_ids"] == ref["input_ids"] and enc.attention_mask == ref["attention_mask"]
    assert enc["input_ids"].count(ours.bos_token_id) == 1
    pt, ref_pt = (t.apply_chat_template(MESSAGES, return_tensors="pt") for t in (ours, theirs))
    assert pt["input_ids"].shape == (1, len(ref_pt["input_ids"][0]))
    assert torch.equal(pt["input_ids"], ref_pt["input_ids"]) and torch.equal(pt.attention_mask,
                                                                              ref_pt["attention_mask"])
    ids = ours.apply_chat_template(MESSAGES, return_dict=False)
    assert ids == theirs.apply_chat_template(MESSAGES, return_dict=False)
    assert torch.equal(ours.apply_chat_template(MESSAGES, return_dict=False, return_tensors="pt"),
                       theirs.apply_chat_template(MESSAGES, return_dict=False, return_tensors="pt"))
    with pytest.raises(ValueError, match="alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_continue_final_message_matches_transformers(hf_tokenizer_dir):
    ours, theirs = Tokenizer.from_pretrained(hf_tokenizer_dir), reference(hf_tokenizer_dir)
    prefill = MESSAGES + [{"role": "assistant", "content": "The fox is "}]
    # a template that trims message text: the trailing space goes too, as in transformers
    trimming = MIXTRAL_TEMPLATE.replace("message['content'] + eos_token", "message['content'] | trim + eos_token")
    for template in (None, trimming):
        text = ours.apply_chat_template(prefill, continue_final_message=True, tokenize=False, chat_template=template)
        assert text == theirs.apply_chat_template(prefill, continue_final_message=True, tokenize=False,
                                                  chat_template=template)
        assert not text.endswith("</s>")
    assert text.endswith("[/INST]The fox is")
    assert ours.apply_chat_template(prefill, continue_final_message=True, return_dict=False) == \
        theirs.apply_chat_template(prefill, continue_final_message=True, return_dict=False)
    assert prefill[-1]["content"] == "The fox is "  # the caller's messages are untouched
    with pytest.raises(ValueError, match="not compatible"):
        ours.apply_chat_template(prefill, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ValueError, match="not compatible"):
        theirs.apply_chat_template(prefill, continue_final_message=True, add_generation_prompt=True)


def test_batch_of_conversations_matches_transformers(hf_tokenizer_dir):
    ours, theirs = Tokenizer.from_pretrained(hf_tokenizer_dir), reference(hf_tokenizer_dir, padding_side="left")
    batch = [MESSAGES, MESSAGES[:1]]
    texts = ours.apply_chat_template(batch, add_generation_prompt=True, tokenize=False)
    assert texts == theirs.apply_chat_template(batch, add_generation_prompt=True, tokenize=False)
    assert len(texts) == 2
    rows = ours.apply_chat_template(batch, add_generation_prompt=True, return_dict=False)
    assert rows == theirs.apply_chat_template(batch, add_generation_prompt=True, return_dict=False)
    with pytest.raises(ValueError, match="padding token"):
        ours.apply_chat_template(batch, padding=True)
    ours.pad_token, theirs.pad_token = ours.eos_token, theirs.eos_token
    a = ours.apply_chat_template(batch, add_generation_prompt=True, padding=True, return_tensors="pt")
    b = theirs.apply_chat_template(batch, add_generation_prompt=True, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert a["input_ids"].shape[0] == 2 and a["attention_mask"][1, 0] == 0


@pytest.mark.parametrize("post_processor", [True, False])
@pytest.mark.parametrize("add_eos", [False, True])
def test_special_tokens_follow_tokenizer_json_like_transformers(tmp_path, post_processor, add_eos):
    """transformers 5 ignores tokenizer_config.json's add_bos_token/add_eos_token when there is a
    tokenizer.json: its post-processor decides. Passed to from_pretrained, the flags rewrite it."""
    d = mixtral_tokenizer_json(tmp_path, post_processor=post_processor, add_eos_token=add_eos)
    ours = Tokenizer.from_pretrained(d)
    for theirs in (reference(d), transformers.AutoTokenizer.from_pretrained(d)):  # LlamaTokenizer
        assert ours.encode("the lazy fox") == theirs.encode("the lazy fox")
    ids = ours.encode("the lazy fox")
    assert (ids[0] == ours.bos_token_id) == post_processor and ids[-1] != ours.eos_token_id
    assert ours.add_bos_token == post_processor and not ours.add_eos_token
    both = Tokenizer.from_pretrained(d, add_bos_token=True, add_eos_token=True)
    assert both.encode("the fox") == reference(d, add_bos_token=True, add_eos_token=True).encode("the fox")
    assert both.encode("the fox")[-1] == both.eos_token_id
    ours.add_eos_token = True  # the setter rewrites the post-processor too
    assert ours.encode("the fox") == reference(d, add_bos_token=post_processor, add_eos_token=True).encode("the fox")


def test_common_methods_match_transformers(hf_tokenizer_dir, tmp_path):
    ours, theirs = Tokenizer.from_pretrained(hf_tokenizer_dir), reference(hf_tokenizer_dir)
    ids = ours.encode("the lazy fox, ok.")
    assert ours.decode(ids[1]) == theirs.decode(ids[1]) and ours.decode(torch.tensor(ids[1])) == ours.decode(ids[1])
    for clean in (None, True, False):  # BPE: transformers 5 ignores clean-up
        assert ours.decode(ids, clean_up_tokenization_spaces=clean) == theirs.decode(
            ids, clean_up_tokenization_spaces=clean)
    assert ours.decode({"input_ids": ids}) == theirs.decode(ids)
    for text in ("the lazy fox", "hello </s> world"):
        assert ours.tokenize(text) == theirs.tokenize(text)
        assert ours.convert_tokens_to_string(ours.tokenize(text)) == theirs.convert_tokens_to_string(
            theirs.tokenize(text))
    assert ours.tokenize("fox", add_special_tokens=True) == theirs.tokenize("fox", add_special_tokens=True)
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.convert_tokens_to_ids(["<s>", "</s>"]) == theirs.convert_tokens_to_ids(["<s>", "</s>"])
    assert torch.equal(ours.encode("the fox", return_tensors="pt"), theirs.encode("the fox", return_tensors="pt"))
    for text in ("the fox", ["the fox", "a dog"]):
        a, b = ours(text, return_attention_mask=False), theirs(text, return_attention_mask=False)
        assert dict(a) == dict(b) and set(a) == {"input_ids"}
    assert ours.model_max_length == theirs.model_max_length == int(1e30)
    short = dict(padding_side="right", model_max_length=4, use_fast=True, trust_remote_code=True, legacy=False)
    a, b = Tokenizer.from_pretrained(hf_tokenizer_dir, **short), reference(hf_tokenizer_dir, **short)
    assert (a.padding_side, a.model_max_length) == (b.padding_side, b.model_max_length) == ("right", 4)
    assert a("the lazy brown dog", truncation=True) == b("the lazy brown dog", truncation=True)
    assert len(a.encode("the lazy brown dog", max_length=3)) == len(b.encode("the lazy brown dog", max_length=3))
    with pytest.raises(TypeError, match="paddingside"):
        Tokenizer.from_pretrained(hf_tokenizer_dir, paddingside="left")
    for t in (ours, theirs):
        t.eos_token = "<unk>"
    assert ours.eos_token_id == theirs.eos_token_id == 0
    assert ours.apply_chat_template(MESSAGES[:2], tokenize=False) == theirs.apply_chat_template(
        MESSAGES[:2], tokenize=False)
    ours.bos_token = "</s>"
    assert ours.bos_token_id == 2


def test_add_special_tokens_matches_transformers(hf_tokenizer_dir):
    ours, theirs = Tokenizer.from_pretrained(hf_tokenizer_dir), reference(hf_tokenizer_dir)
    for tokens in ({"pad_token": "[PAD]"}, {"pad_token": "</s>"}, {"additional_special_tokens": ["<x>", "<y>"]}):
        assert ours.add_special_tokens(tokens) == theirs.add_special_tokens(tokens)
        assert (ours.pad_token, ours.pad_token_id, len(ours)) == (theirs.pad_token, theirs.pad_token_id, len(theirs))
    assert ours.encode("a<x>b [PAD]") == theirs.encode("a<x>b [PAD]")
    assert ours.decode(ours.encode("a<x>b"), skip_special_tokens=True) == theirs.decode(
        theirs.encode("a<x>b"), skip_special_tokens=True)


def test_word_level_decode_cleans_up_spaces_like_transformers(tmp_path):
    from serve_helpers import build_tokenizer_json

    build_tokenizer_json(tmp_path)
    ours, theirs = Tokenizer.from_pretrained(tmp_path), reference(tmp_path)
    ids = ours.encode("hello , how are you ?")
    for clean in (True, False):
        assert ours.decode(ids, clean_up_tokenization_spaces=clean) == theirs.decode(
            ids, clean_up_tokenization_spaces=clean)
    assert ours.decode(ids, clean_up_tokenization_spaces=True).endswith("you?")


def test_save_and_reload(hf_tokenizer_dir, tmp_path):
    ours = Tokenizer.from_pretrained(hf_tokenizer_dir)
    ours.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.encode("the quick fox") == ours.encode("the quick fox")
    assert again.chat_template == MIXTRAL_TEMPLATE


def test_saved_flags_reach_transformers(hf_tokenizer_dir, tmp_path):
    """A backend without a post-processor (as built from GGUF) and add_bos_token=True: the saved
    tokenizer.json adds BOS itself, so transformers and a reload agree with the original."""
    from tokenizers import Tokenizer as Raw

    raw = Raw.from_file(str(hf_tokenizer_dir / "tokenizer.json"))
    raw.post_processor = None
    tok = Tokenizer(raw, add_bos_token=True)
    tok.save_pretrained(tmp_path)
    expected = [1] + tok.encode("the fox", add_special_tokens=False)
    assert tok.encode("the fox") == expected
    assert Tokenizer.from_pretrained(tmp_path).encode("the fox") == reference(tmp_path).encode("the fox") == expected


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(TEXT))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   byte_fallback=False, minloglevel=2)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": MIXTRAL_TEMPLATE}))
    return d


def test_sentencepiece_tokenizer(sp_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = Tokenizer.from_pretrained(sp_dir)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.encode("the lazy dog") == [1] + sp.encode("the lazy dog")
    assert tok.decode(tok.encode("the lazy dog"), skip_special_tokens=True) == "the lazy dog"
    # Special tokens written by a chat template become their ids, not characters.
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fox"}],
                                  return_dict=False)
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1
    with pytest.raises(ValueError, match="padding token"):
        tok(["hello", "the quick brown fox"], padding=True)
    tok.pad_token = tok.eos_token
    batch = tok(["hello", "the quick brown fox"], return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0].tolist()[0] == 0
    assert batch["input_ids"][0, 0] == 2
    # No post-processor here: tokenizer_config.json's add_eos_token is honoured (transformers 4's rule).
    assert Tokenizer.from_pretrained(sp_dir, add_eos_token=True).encode("the dog") == [1] + sp.encode("the dog") + [2]
    assert tok.tokenize("the dog") == sp.encode("the dog", out_type=str)
    assert tok.convert_tokens_to_string(tok.tokenize("the dog")) == "the dog"
    assert tok.get_vocab()["</s>"] == 2 and len(tok.get_vocab()) == len(tok)


def test_unequal_rows_need_padding(hf_tokenizer_dir):
    tok = Tokenizer.from_pretrained(hf_tokenizer_dir)
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "the lazy brown dog"], return_tensors="pt")


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_unreadable_tokenizer_files_are_named(tmp_path):
    from mixtral.checkpoint import CheckpointError

    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a readable tokenizers file"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{bad")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: not a readable SentencePiece model"):
        Tokenizer.from_pretrained(tmp_path)
