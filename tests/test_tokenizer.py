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


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    raw = Raw(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    d = tmp_path_factory.mktemp("tok")
    raw.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": MIXTRAL_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
    }))
    return d


def test_matches_transformers_tokenizer(hf_tokenizer_dir):
    ours = Tokenizer.from_pretrained(hf_tokenizer_dir)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(hf_tokenizer_dir)
    theirs.pad_token = theirs.eos_token
    theirs.padding_side = "left"
    texts = ["the lazy fox", "two experts route every token quickly"]
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


def test_chat_template_matches_transformers(hf_tokenizer_dir):
    ours = Tokenizer.from_pretrained(hf_tokenizer_dir)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(hf_tokenizer_dir)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
                {"role": "user", "content": "the fox?"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s>[INST] hello [/INST]world</s>[INST] the fox? [/INST]"
    ids = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    assert ids.count(ours.bos_token_id) == 1
    with pytest.raises(ValueError, match="alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_save_and_reload(hf_tokenizer_dir, tmp_path):
    ours = Tokenizer.from_pretrained(hf_tokenizer_dir)
    ours.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.encode("the quick fox") == ours.encode("the quick fox")
    assert again.chat_template == MIXTRAL_TEMPLATE


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
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fox"}])
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1
    batch = tok(["hello", "the quick brown fox"], return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0].tolist()[0] == 0


def test_unequal_rows_need_padding(hf_tokenizer_dir):
    tok = Tokenizer.from_pretrained(hf_tokenizer_dir)
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "the lazy brown dog"], return_tensors="pt")


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
