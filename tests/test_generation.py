"""Generation against transformers' generate, the KV cache against full recomputation."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_pair

from mixtral import KVCache
from mixtral.generation import SamplingParams, TextIteratorStreamer, filter_top_k, filter_top_p, next_token


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
        import mixtral.generation as generation

        monkeypatch.setattr(generation, "static_decode_applies", lambda model, ci: ci == "static")


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


def test_max_length_default_and_stop_at_eos():
    _, m = hf_pair()
    ids = torch.randint(1, 101, (1, 6))
    assert m.generate(ids, eos_token_id=[]).shape == (1, 20)  # transformers' default max_length
    assert m.generate(ids, max_length=9, eos_token_id=[]).shape == (1, 9)
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
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    ids = torch.zeros(4, 1, dtype=torch.long)
    assert torch.equal(filter_top_k(logits, 7), TopKLogitsWarper(7)(ids, logits.clone()))
    assert torch.equal(filter_top_p(logits, 0.8), TopPLogitsWarper(0.8)(ids, logits.clone()))


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
    with pytest.raises(TypeError, match="unsupported"):
        m.generate(torch.tensor([[1, 2]]), num_beams=4)
