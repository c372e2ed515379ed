"""Generation against transformers' generate, the KV cache against full recomputation."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import hf_pair, transformers

from mixtral import KVCache
from mixtral.generation import GenerationConfig, TextIteratorStreamer
from mixtral.generation.sampling import SamplingParams, filter_min_p, filter_top_k, filter_top_p, next_token


def padded_prompts(lengths=(3, 7, 5), vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def force_static_path(monkeypatch, cache_implementation):
    """"static" runs the fixed-shape cache and decode step that CUDA captures as a graph; forced
    here (eagerly) on the CPU, where generate otherwise serves it with the default path."""
    if cache_implementation == "static":
        import mixtral.generation.loop as loop
        from mixtral.generation import StaticStepper

        monkeypatch.setattr(loop, "choose_stepper", lambda model, ci: StaticStepper(model, capture=False))


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("window", [None, 4])
def test_greedy_generate_matches_transformers(window, cache_implementation, monkeypatch):
    force_static_path(monkeypatch, cache_implementation)
    hm, m = hf_pair(sliding_window=window, pad_token_id=0)
    ids, mask = padded_prompts()
    a = hm.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                    eos_token_id=None)
    b = m.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[],
                   cache_implementation=cache_implementation)
    assert torch.equal(a, b)


def test_generate_rejects_unknown_cache_implementation():
    _, m = hf_pair()
    with pytest.raises(ValueError, match="cache_implementation must be one of"):
        m.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, cache_implementation="offloaded")


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_greedy_with_eos_and_repetition_penalty_matches_transformers(cache_implementation, monkeypatch):
    force_static_path(monkeypatch, cache_implementation)
    hm, m = hf_pair(pad_token_id=0)
    ids, mask = padded_prompts(seed=3)
    # Pick as EOS a token that the first row emits early, so finished-row padding is exercised.
    probe = m.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    eos = int(probe[0, ids.shape[1] + 1])
    kw = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0,
              repetition_penalty=1.3, min_new_tokens=1)
    a = hm.generate(ids, do_sample=False, **kw)
    b = m.generate(ids, cache_implementation=cache_implementation, **kw)
    assert torch.equal(a, b)
    row = b[0, ids.shape[1]:].tolist()
    assert eos in row and all(t == 0 for t in row[row.index(eos) + 1:])


def test_min_new_tokens_suppresses_eos():
    _, m = hf_pair()
    ids = torch.randint(1, 101, (1, 4))
    first = int(m.generate(ids, max_new_tokens=1, eos_token_id=[])[0, -1])
    out = m.generate(ids, max_new_tokens=5, min_new_tokens=3, eos_token_id=first)
    assert first not in out[0, 4:7].tolist()
    assert out.shape[1] == 4 + 5 or first in out[0, 7:].tolist()


def test_default_length_is_20_new_tokens_capped_at_max_positions_and_stop_at_eos():
    hm, m = hf_pair(max_position_embeddings=30)
    ids = torch.randint(1, 101, (1, 6))
    # transformers 5: 20 new tokens by default, and max_length (when given) is the total length.
    assert torch.equal(m.generate(ids, eos_token_id=None), hm.generate(ids, eos_token_id=None))
    assert m.generate(ids, eos_token_id=None).shape == (1, 6 + 20)
    assert m.generate(ids, max_length=9, eos_token_id=None).shape == (1, 9)
    # A longer prompt: prompt + new tokens stop at max_position_embeddings.
    long = torch.randint(1, 101, (1, 16))
    assert torch.equal(m.generate(long, eos_token_id=None), hm.generate(long, eos_token_id=None))
    assert m.generate(long, eos_token_id=None).shape == (1, 30)
    # A prompt already at the cap leaves nothing to generate: transformers raises, and so do we.
    full = torch.randint(1, 101, (1, 30))
    with pytest.raises(ValueError, match="max_length"):
        hm.generate(full, eos_token_id=None)
    with pytest.raises(ValueError, match="max_length"):
        m.generate(full, eos_token_id=None)
    assert m.generate(full, max_new_tokens=2, eos_token_id=None).shape == (1, 32)  # explicit beats the cap
    first = int(m.generate(ids, max_new_tokens=1, eos_token_id=[])[0, -1])
    assert m.generate(ids, max_new_tokens=8, eos_token_id=[5000, first]).shape == (1, 7)


def test_sampling_is_reproducible_with_a_generator():
    _, m = hf_pair()
    ids = torch.randint(1, 101, (2, 4))
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, eos_token_id=[])
    a = m.generate(ids, generator=torch.Generator().manual_seed(7), **kw)
    b = m.generate(ids, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b)


def test_top_k_top_p_match_transformers_warpers():
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    ids = torch.zeros(4, 1, dtype=torch.long)
    assert torch.equal(filter_top_k(logits, 7), TopKLogitsWarper(7)(ids, logits.clone()))
    assert torch.equal(filter_top_p(logits, 0.8), TopPLogitsWarper(0.8)(ids, logits.clone()))
    assert torch.equal(filter_min_p(logits, 0.3), MinPLogitsWarper(0.3)(ids, logits.clone()))


def test_sampling_respects_top_k():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]]).repeat(200, 1)
    params = SamplingParams(do_sample=True, temperature=2.0, top_k=2)
    toks = next_token(logits, params, generator=torch.Generator().manual_seed(0))
    assert set(toks.tolist()) <= {0, 1} and len(set(toks.tolist())) == 2


def test_streamer_receives_prompt_then_each_token():
    _, m = hf_pair()
    ids = torch.randint(1, 101, (1, 4))

    class Recorder:
        def __init__(self):
            self.calls, self.ended = [], False

        def put(self, t):
            self.calls.append(t.reshape(-1).tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    out = m.generate(ids, max_new_tokens=5, streamer=rec, eos_token_id=[])
    assert rec.calls[0] == ids[0].tolist() and rec.ended
    assert sum(rec.calls[1:], []) == out[0, 4:].tolist()


def test_text_iterator_streamer_yields_the_decoded_text():
    import threading

    _, m = hf_pair()

    class CharTok:  # decode: one letter per id
        def decode(self, ids, **kw):
            return "".join(chr(97 + i % 26) for i in ids)

    streamer = TextIteratorStreamer(CharTok(), skip_prompt=True)
    ids = torch.randint(1, 101, (1, 3))
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "out", m.generate(ids, max_new_tokens=6, streamer=streamer, eos_token_id=[])))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == CharTok().decode(result["out"][0, 3:].tolist())


@pytest.mark.parametrize("window", [None, 3])
def test_incremental_decoding_equals_full_forward(window):
    _, m = hf_pair(sliding_window=window)
    ids = torch.randint(0, 101, (2, 11))
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
        cache = KVCache.for_model(m.config, 2)
        pieces = [m(ids[:, :4], past_key_values=cache).logits]  # a prompt chunk
        pieces.append(m(ids[:, 4:7], past_key_values=cache).logits)  # a second chunk after it
        for t in range(7, 11):
            pieces.append(m(ids[:, t:t + 1], past_key_values=cache).logits)
            if window:
                assert cache.capacity == window
                assert all(k.shape[2] == window for k in cache.k)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rolling_cache_memory_stays_flat():
    _, m = hf_pair(sliding_window=4)
    ids = torch.randint(1, 101, (1, 3))
    cache = KVCache.for_model(m.config, 1)
    with torch.no_grad():
        m(ids, past_key_values=cache)
        size = cache.memory_bytes()
        for _ in range(40):
            m(ids[:, :1], past_key_values=cache)
    assert cache.memory_bytes() == size and cache.seen == 43 and cache.capacity == 4


def test_cache_returned_and_accepted_back():
    _, m = hf_pair()
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        out = m(ids[:, :5], use_cache=True)
        assert isinstance(out.past_key_values, KVCache) and out.past_key_values.get_seq_length() == 5
        nxt = m(ids[:, 5:], past_key_values=out.past_key_values).logits
        torch.testing.assert_close(nxt[:, -1], m(ids).logits[:, -1], atol=1e-5, rtol=1e-5)
        assert m(ids, use_cache=False).past_key_values is None


def test_legacy_tuple_cache_is_accepted():
    hm, m = hf_pair()
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        out = m(ids[:, :5])
        c = out.past_key_values
        legacy = tuple((c.k[i][:, :, :5].clone(), c.v[i][:, :, :5].clone()) for i in range(len(c)))
        a = m(ids[:, 5:], past_key_values=legacy).logits
        torch.testing.assert_close(a[:, -1], m(ids).logits[:, -1], atol=1e-5, rtol=1e-5)


def test_generate_rejects_bad_input():
    _, m = hf_pair()
    with pytest.raises(ValueError, match="non-empty prompt"):
        m.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        m.generate(torch.tensor([[1, 2, 101]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(torch.tensor([[1, 2]]), do_sample=True, temperature=0.0)
    with pytest.raises(TypeError, match="unsupported arguments: typical_q"):
        m.generate(torch.tensor([[1, 2]]), typical_q=0.5)
    with pytest.raises(NotImplementedError, match="beam search"):
        m.generate(torch.tensor([[1, 2]]), num_beams=4)
    with pytest.raises(ValueError, match="num_return_sequences"):  # transformers' rule for greedy
        m.generate(torch.tensor([[1, 2]]), num_return_sequences=2)
    with pytest.raises(NotImplementedError, match="attentions"):
        m.generate(torch.tensor([[1, 2]]), output_attentions=True)
    with pytest.raises(ValueError, match="top_p"):
        m.generate(torch.tensor([[1, 2]]), do_sample=True, top_p=1.5)


# -- transformers' generate features: processors, scores, configs, call forms ---------------------

RETURN_ALL = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)


def assert_same_scores(ours, theirs, tol=1e-4):
    """Per-step (B, V) scores: the same tokens banned (-inf), the rest equal within ``tol``."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.equal(torch.isneginf(a), torch.isneginf(b))
        finite = torch.isfinite(b)
        torch.testing.assert_close(a[finite], b[finite], atol=tol, rtol=tol)


def processor_case(case, new, prompt_len):
    """(the processor's arguments, the ones it runs beside) for ``case``, picked from row 0's greedy
    continuation ``new`` so that each processor changes what is generated."""
    if case == "no_repeat_ngram_size":
        return dict(no_repeat_ngram_size=2), {}
    if case == "bad_words_single":
        return dict(bad_words_ids=[[new[2]], [7, 8, 9]]), {}
    if case == "bad_words_multi":
        return dict(bad_words_ids=[[new[3], new[4]]]), {}
    if case == "suppress_tokens":
        return dict(suppress_tokens=[new[1], new[5]]), {}
    if case == "begin_suppress_tokens":
        return dict(begin_suppress_tokens=[new[0]]), {}
    if case == "min_length":
        return dict(min_length=prompt_len + 6), dict(eos_token_id=new[2])
    assert case == "repetition_penalty"
    return dict(repetition_penalty=1.5), {}


@pytest.mark.parametrize("case", ["no_repeat_ngram_size", "bad_words_single", "bad_words_multi", "suppress_tokens",
                                  "begin_suppress_tokens", "min_length", "repetition_penalty"])
def test_greedy_processors_and_scores_match_transformers(case):
    hm, m = hf_pair(pad_token_id=0)
    ids, mask = padded_prompts(seed=1)
    L = ids.shape[1]
    common = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    new = m.generate(ids, **common)[0, L:].tolist()
    processor, context = processor_case(case, new, L)
    context = {**common, **context}
    a = hm.generate(ids, **context, **processor, **RETURN_ALL)
    b = m.generate(ids, **context, **processor, **RETURN_ALL)
    assert torch.equal(a.sequences, b.sequences)
    assert_same_scores(b.scores, a.scores)  # processed, in transformers' order
    assert_same_scores(b.logits, a.logits)  # raw
    assert not torch.equal(m.generate(ids, **context), b.sequences)  # the processor acted


def test_repetition_penalty_skips_left_padding_as_transformers():
    hm, m = hf_pair(pad_token_id=0)
    ids, mask = padded_prompts(seed=5)
    first = int(m.generate(ids, attention_mask=mask, max_new_tokens=1, eos_token_id=None)[0, -1])
    assert first not in ids[0][mask[0].bool()].tolist()
    ids = ids.masked_fill(mask == 0, first)  # the padding holds the token row 0 is about to emit
    kw = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=None, repetition_penalty=5.0)
    out = m.generate(ids, **kw)
    assert torch.equal(out, hm.generate(ids, **kw))
    assert out[0, ids.shape[1]] == first  # padding is not "seen": nothing penalized the first token


@pytest.mark.parametrize("kw", [
    {},  # transformers' defaults: top_k=50
    dict(temperature=0.7, top_p=0.8),
    dict(top_k=0, min_p=0.2, temperature=1.5),
    dict(top_k=None, top_p=0.9),
    dict(top_k=5, repetition_penalty=1.3, no_repeat_ngram_size=1),
])
def test_sampling_scores_match_transformers(kw):
    hm, m = hf_pair(pad_token_id=0)
    ids, mask = padded_prompts(seed=4)
    args = dict(attention_mask=mask, max_new_tokens=1, do_sample=True, eos_token_id=None, **RETURN_ALL, **kw)
    a, b = hm.generate(ids, **args), m.generate(ids, **args)
    assert_same_scores(b.scores, a.scores)
    assert torch.isfinite(b.scores[0].gather(1, b.sequences[:, -1:])).all()  # drawn from the kept tokens
    kept = torch.isfinite(b.scores[0]).sum(-1)
    if not kw:
        assert (kept == 50).all()
    else:
        assert (kept < 101).all()  # each filter removed something


def test_attention_mask_inferred_from_pad_tokens_as_transformers():
    hm, m = hf_pair(pad_token_id=0)
    ids, mask = padded_prompts(seed=2)
    kw = dict(max_new_tokens=6, eos_token_id=None)
    inferred = m.generate(ids, **kw)
    assert torch.equal(inferred, hm.generate(ids, **kw))
    assert torch.equal(inferred, m.generate(ids, attention_mask=mask, **kw))
    assert not torch.equal(inferred, m.generate(ids, attention_mask=torch.ones_like(mask), **kw))
    # pad == EOS: nothing is inferred (an EOS inside a prompt is a real token), in either library.
    kw = dict(max_new_tokens=6, eos_token_id=0, pad_token_id=0)
    assert torch.equal(m.generate(ids, **kw), hm.generate(ids, **kw))
    assert torch.equal(m.generate(ids, **kw), m.generate(ids, attention_mask=torch.ones_like(mask), **kw))


def test_generation_config_json_round_trips_with_transformers(tmp_path):
    theirs = transformers.GenerationConfig(
        max_new_tokens=7, do_sample=True, temperature=0.6, top_p=0.9, no_repeat_ngram_size=3,
        bad_words_ids=[[5], [6, 7]], eos_token_id=[2, 9], pad_token_id=0, typical_p=0.95)
    theirs.save_pretrained(tmp_path)
    ours = GenerationConfig.from_pretrained(tmp_path)
    got = (ours.max_new_tokens, ours.do_sample, ours.temperature, ours.top_p, ours.no_repeat_ngram_size,
           ours.bad_words_ids, ours.eos_token_id, ours.pad_token_id)
    assert got == (7, True, 0.6, 0.9, 3, [[5], [6, 7]], [2, 9], 0)
    assert ours.top_k == 50 and ours.max_length is None  # unset there: transformers' defaults
    assert ours.extra["typical_p"] == 0.95  # not ours: kept, and written back
    ours.save_pretrained(tmp_path / "again")
    back = transformers.GenerationConfig.from_pretrained(tmp_path / "again")
    for key in ("max_new_tokens", "do_sample", "temperature", "top_p", "no_repeat_ngram_size", "bad_words_ids",
                "eos_token_id", "pad_token_id", "typical_p", "top_k", "max_length"):
        assert getattr(back, key) == getattr(theirs, key), key
    assert GenerationConfig.from_pretrained(tmp_path / "nothing-here") == GenerationConfig()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(bad / "generation_config.json"))):
        GenerationConfig.from_pretrained(bad)
    (bad / "generation_config.json").write_text(json.dumps({"top_p": 3}))
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig.from_pretrained(bad)
    _, m = hf_pair(pad_token_id=0)
    special = GenerationConfig.from_model_config(m.config)
    assert (special.eos_token_id, special.bos_token_id, special.pad_token_id, special.top_k) == (2, 1, 0, 50)


def test_generate_reads_model_and_passed_generation_configs(tmp_path):
    hm, m = hf_pair(pad_token_id=0)
    ids, mask = padded_prompts(seed=8)
    transformers.GenerationConfig(max_new_tokens=9, no_repeat_ngram_size=1, suppress_tokens=[3, 4], bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0).save_pretrained(tmp_path)
    hm.generation_config = transformers.GenerationConfig.from_pretrained(tmp_path)
    m.generation_config = GenerationConfig.from_pretrained(tmp_path)
    want = hm.generate(ids, attention_mask=mask)
    assert want.shape[1] <= ids.shape[1] + 9
    assert torch.equal(m.generate(ids, attention_mask=mask), want)
    # A passed config (transformers' own, read duck-typed) over the model's; keywords over both.
    passed = transformers.GenerationConfig(max_new_tokens=4)
    got = m.generate(ids, generation_config=passed, attention_mask=mask)
    assert got.shape[1] <= ids.shape[1] + 4
    assert torch.equal(got, hm.generate(ids, generation_config=passed, attention_mask=mask))
    kw = dict(generation_config=passed, attention_mask=mask, no_repeat_ngram_size=0)
    assert torch.equal(m.generate(ids, **kw), hm.generate(ids, **kw))


@pytest.fixture(scope="module")
def bpe_tokenizers(tmp_path_factory):
    """A small BPE (SentencePiece-style spaces) that ours and transformers' tokenizer both read."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from mixtral import Tokenizer

    raw = Raw(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    text = ["the quick brown fox jumps over the lazy dog", "sparse experts route every token"] * 10
    raw.train_from_iterator(text, trainers.BpeTrainer(vocab_size=101, special_tokens=["<unk>", "<s>", "</s>"]))
    d = tmp_path_factory.mktemp("bpe")
    raw.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return Tokenizer.from_pretrained(d), transformers.PreTrainedTokenizerFast.from_pretrained(d)


def test_stop_strings_match_transformers(bpe_tokenizers):
    ours_tok, hf_tok = bpe_tokenizers
    hm, m = hf_pair(vocab_size=len(ours_tok))
    ids = torch.randint(3, len(ours_tok), (2, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=12, eos_token_id=2)
    new = m.generate(ids, **kw)[0, 4:].tolist()
    ends = [len(ours_tok.decode(new[:k])) for k in range(len(new) + 1)]  # text length after k tokens
    j = next(j for j in range(1, len(new)) if ends[j] >= 2 and ends[j + 1] - ends[j] >= 2)
    stop = ours_tok.decode(new)[ends[j] - 2: ends[j] + 1]  # ends inside token j: it runs past the string
    kw["stop_strings"] = [stop, "zzzz"]
    out = m.generate(ids, tokenizer=ours_tok, **kw)
    assert torch.equal(out, hm.generate(ids, tokenizer=hf_tok, **kw))
    row = out[0, 4:].tolist()
    end = max(i for i, t in enumerate(row) if t != 2) + 1
    assert stop in ours_tok.decode(row[:end]) and stop not in ours_tok.decode(row[:end - 1])
    # Only a string the new token completes counts, not one already in the prompt.
    prompt = torch.cat([ids[:1], torch.tensor([new[: j + 1]])], dim=1)
    out = m.generate(prompt, tokenizer=ours_tok, **kw)
    assert torch.equal(out, hm.generate(prompt, tokenizer=hf_tok, **kw)) and out.shape[1] > prompt.shape[1] + 1
    with pytest.raises(ValueError, match="tokenizer"):
        m.generate(ids, stop_strings="x", max_new_tokens=2)


def test_inputs_embeds_returns_only_new_tokens_as_transformers():
    hm, m = hf_pair()
    ids = torch.randint(1, 101, (2, 5))
    with torch.no_grad():
        embeds = m.get_input_embeddings()(ids)
    kw = dict(max_new_tokens=6, eos_token_id=None)
    out = m.generate(inputs_embeds=embeds, **kw)
    assert torch.equal(out, hm.generate(inputs_embeds=embeds, **kw))
    assert torch.equal(out, m.generate(ids, **kw)[:, 5:])
    assert m.generate(inputs_embeds=embeds, eos_token_id=None).shape == (2, 20)


def test_transformers_call_forms_and_harmless_arguments():
    from mixtral.tokenizer import BatchEncoding

    hm, m = hf_pair(pad_token_id=0)
    ids, mask = padded_prompts(seed=7)
    kw = dict(max_new_tokens=5, eos_token_id=None)
    want = m.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(m.generate(BatchEncoding(input_ids=ids, attention_mask=mask), **kw), want)
    assert torch.equal(m.generate(inputs=ids, attention_mask=mask, **kw), want)
    harmless = dict(use_cache=True, num_beams=1, output_attentions=False, output_hidden_states=False,
                    early_stopping=True, length_penalty=2.0)
    assert torch.equal(m.generate(ids, attention_mask=mask, **harmless, **kw), want)
    assert torch.equal(hm.generate(ids, attention_mask=mask, **harmless, **kw), want)


def test_return_dict_in_generate():
    hm, m = hf_pair()
    ids = torch.randint(1, 101, (2, 4))
    kw = dict(max_new_tokens=5, eos_token_id=None, return_dict_in_generate=True)
    out = m.generate(ids, output_scores=True, **kw)
    theirs = hm.generate(ids, output_scores=True, **kw)
    assert torch.equal(out.sequences, theirs.sequences) and out["sequences"] is out.sequences
    assert out[0] is out.sequences and "scores" in out.keys() and out.logits is None
    assert len(out.scores) == 5 and out.scores[0].shape == (2, 101)
    assert isinstance(out.past_key_values, KVCache)
    assert out.past_key_values.get_seq_length() == theirs.past_key_values.get_seq_length() == 4 + 5 - 1
    plain = m.generate(ids, **kw)
    assert plain.scores is None and torch.equal(plain.sequences, out.sequences)


def test_num_return_sequences_samples_each_prompt_n_times():
    hm, m = hf_pair()
    ids = torch.randint(1, 101, (2, 4))
    kw = dict(do_sample=True, num_return_sequences=3, max_new_tokens=6, eos_token_id=None)
    out = m.generate(ids, generator=torch.Generator().manual_seed(0), **kw)
    assert out.shape == hm.generate(ids, **kw).shape == (6, 10)
    assert torch.equal(out[:, :4], ids.repeat_interleave(3, dim=0))  # transformers' row order
    assert len({tuple(r) for r in out[:3, 4:].tolist()}) > 1  # independent draws
