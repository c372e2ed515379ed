"""The continuous-batching engine and the OpenAI-compatible server, driven by the official openai client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from serve_helpers import free_port, tiny_checkpoint

from mixtral import MixtralForCausalLM, Tokenizer
from mixtral.generation import SamplingParams
from mixtral.serve.engine import Detokenizer, Engine, Request, run_to_completion, wait_all

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "tiny-mixtral"
LONG = "the cat sat on the mat"  # this checkpoint's greedy continuation of it has no EOS for 600+ tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / "model", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return MixtralForCausalLM.from_pretrained(checkpoint).eval(), Tokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def server(loaded):
    """The app on a free loopback port, uvicorn in a background thread."""
    from mixtral.serve.server import create_app

    model, tok = loaded
    engine = Engine(model, tok, max_batch=8)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, MODEL), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(15)
    assert not engine._thread.is_alive()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def reference(loaded, prompt_ids: list[int], max_tokens: int) -> tuple[str, str, int]:
    """Greedy text, finish reason and token count from ``generate`` (batch 1, no server). The text is
    what the completion adds to the prompt's text; after a special token (a chat prompt's [/INST])
    it is the completion decoded alone."""
    model, tok = loaded
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens)[0, len(prompt_ids):].tolist()
    reason = "stop" if out[-1] == tok.eos_token_id else "length"
    if prompt_ids[-1] in tok.all_special_ids:
        return tok.decode(out, skip_special_tokens=True), reason, len(out)
    head = tok.decode(prompt_ids, skip_special_tokens=True)
    return tok.decode(prompt_ids + out, skip_special_tokens=True)[len(head):], reason, len(out)


def chat_ids(loaded, text: str) -> list[int]:
    return loaded[1].apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_dict=False)


# -- engine ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [None, 5])
def test_engine_batched_greedy_matches_generate(tmp_path, window):
    """Ragged rows (different prompt lengths, joining at different steps) decode as each would alone;
    with a sliding window the per-request caches roll."""
    d = tiny_checkpoint(tmp_path / "m", sliding_window=window)
    model, tok = MixtralForCausalLM.from_pretrained(d).eval(), Tokenizer.from_pretrained(d)
    prompts = [tok.encode(t) for t in ["hello", "one two three four five six seven", "a big red fox jumps over"]]
    engine = Engine(model, tok, max_batch=2)  # the third request waits, then joins mid-flight
    engine.start()
    try:
        results = [wait_all(ev) for ev in run_to_completion(engine, [Request(p, 12) for p in prompts])]
    finally:
        engine.stop()
    assert max(engine.batch_sizes) == 2
    for p, (text, final) in zip(prompts, results):
        ref_text, ref_reason, n = reference((model, tok), p, 12)
        assert (text, final.reason, final.completion_tokens) == (ref_text, ref_reason, n)


def test_detokenizer_holds_back_possible_stop_strings(loaded):
    tok = loaded[1]
    ids = [tok.convert_tokens_to_ids(w) for w in "the cat sat on".split()]
    d = Detokenizer(tok, ["cat sat"])
    assert d.add(ids[0]) == ("the", False)
    assert d.add(ids[1]) == (" ", False)  # "cat" may begin "cat sat": held back
    assert d.add(ids[2]) == ("", True)
    d = Detokenizer(tok, ["cat dog"])
    pieces = [d.add(i)[0] for i in ids] + [d.flush()]
    assert "".join(pieces) == "the cat sat on"


def test_detokenizer_keeps_the_space_sentencepiece_strips(tmp_path):
    """Mixtral's decoder strips the first token's leading space; decoded after the prompt's last
    tokens, a completion is exactly what it adds to the prompt's text (before: "jumps", not " jumps")."""
    from test_tokenizer import mixtral_tokenizer_json

    tok = Tokenizer.from_pretrained(mixtral_tokenizer_json(tmp_path / "tok"))
    full = tok.encode("The quick brown fox jumps over the lazy dog.")
    for k in (2, 4, 7):
        d = Detokenizer(tok, [], full[:k])
        text = "".join(d.add(t)[0] for t in full[k:]) + d.flush()
        assert text == tok.decode(full, skip_special_tokens=True)[len(tok.decode(full[:k], skip_special_tokens=True)):]
    k = next(k for k in range(2, len(full)) if tok.convert_ids_to_tokens(full[k]).startswith("▁"))
    assert Detokenizer(tok, [], full[:k]).add(full[k])[0].startswith(" ")


def test_detokenizer_is_incremental_and_exact(tmp_path):
    """Each step decodes a window of a few tokens, not the whole completion (that made a step's cost
    grow with the answer's length), and the pieces still add up to the full decode, multi-byte
    characters (byte-fallback tokens) included."""
    from test_tokenizer import mixtral_tokenizer_json

    tok = Tokenizer.from_pretrained(mixtral_tokenizer_json(tmp_path / "tok"))
    ids = tok.encode("naïve café, déjà vu: the lazy dog. " * 40, add_special_tokens=False)
    decoded: list[int] = []

    class Counting:
        all_special_ids = tok.all_special_ids

        def decode(self, token_ids, **kw):
            decoded.append(len(token_ids))
            return tok.decode(token_ids, **kw)

    d = Detokenizer(Counting(), [])
    text = "".join(d.add(t)[0] for t in ids) + d.flush()
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 400 and max(decoded) <= 8


def test_seeded_sampling_is_reproducible_beside_others(server, loaded):
    engine = server[1]
    ids = chat_ids(loaded, "hello")
    params = SamplingParams(do_sample=True, temperature=0.9, top_p=0.95)
    alone = wait_all(run_to_completion(engine, [Request(ids, 16, params, seed=7)])[0])
    others = [Request(chat_ids(loaded, "hi"), 16, params, seed=s) for s in range(3)]
    beside = run_to_completion(engine, [*others, Request(ids, 16, params, seed=7)])
    assert wait_all(beside[-1]) == alone


def test_frequency_and_presence_penalties_follow_openai(server, loaded):
    """Against the formula written out (logit -= frequency * count + presence * (count > 0), over
    the tokens generated so far), decoded without a cache; and beside an unpenalized request."""
    model, tok = loaded
    engine = server[1]
    ids = tok.encode(LONG)
    fp, pp, n = 0.7, 1.3, 24
    out: list[int] = []
    counts = torch.zeros(model.config.vocab_size)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            token = int((logits - fp * counts - pp * (counts > 0)).argmax())
            out.append(token)
            counts[token] += 1
            if token in engine.eos_ids:
                break
    plain, penalized = run_to_completion(engine, [
        Request(ids, n), Request(ids, n, frequency_penalty=fp, presence_penalty=pp)])
    text, final = wait_all(penalized)
    after_prompt = tok.decode(ids + out, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
    assert final.completion_tokens == len(out) and text == after_prompt
    assert wait_all(plain)[0] == reference(loaded, ids, n)[0] != text  # the penalty changed something


def test_max_context_below_two_is_refused(loaded):
    for bad in (0, 1, -5):
        with pytest.raises(ValueError, match="max_context must be >= 2"):
            Engine(*loaded, max_context=bad)


# -- HTTP ----------------------------------------------------------------------------------------------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = httpx.get(server[0] + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_completion(client, loaded):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello how are you"}],
                                       max_tokens=10, temperature=0)
    text, reason, n = reference(loaded, chat_ids(loaded, "hello how are you"), 10)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL and r.created > 0
    assert r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, reason)
    prompt_len = len(chat_ids(loaded, "hello how are you"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_len, n, prompt_len + n)


def test_streamed_chat_concatenates_to_greedy_text(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "what is your name"}], max_tokens=30, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len(pieces) > 3 and "".join(pieces) == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}


def test_completion_with_stop(client, loaded):
    full = client.completions.create(model=MODEL, prompt=LONG, max_tokens=12, temperature=0)
    words = full.choices[0].text.split()
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length" and len(words) > 6
    stop = " ".join(words[4:6])
    expected = full.choices[0].text[: full.choices[0].text.index(stop)]
    r = client.completions.create(model=MODEL, prompt=LONG, max_tokens=12, temperature=0, stop=["zzz", stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    assert r.usage.completion_tokens < full.usage.completion_tokens
    streamed = client.completions.create(model=MODEL, prompt=LONG, max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_eight_concurrent_greedy_requests_match_alone(client, server, loaded):
    prompts = ["hello", "hi", "what is your name", "how are you", "one two three", "the big dog",
               "red blue green", "i am fine thanks"]
    refs = [reference(loaded, chat_ids(loaded, p), 24)[0] for p in prompts]
    engine = server[1]
    engine.batch_sizes.clear()

    def ask(p: str) -> str:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=24,
                                           temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, prompts))
    assert got == refs
    assert max(engine.batch_sizes) > 1  # they really ran beside each other


@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "tiny-mixtral", "messages": [', 400, None),  # malformed JSON
    ({"model": MODEL, "messages": "hello"}, 400, "messages"),  # a field of the wrong type
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    # before: param "max_tokens", a field the client did not send
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    # before: param "messages.0.content.str", the name of a pydantic union member
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "the " * 1100}]}, 400, "messages"),
    # before: HTTP 500 "Overflow when unpacking long long" (from torch.Generator.manual_seed)
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": 10**23}, 400, "seed"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5}, 400,
     "frequency_penalty"),
    # before: 200 as if honoured (logprobs null, plain text, no tool call)
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     400, "response_format"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tools"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    if isinstance(body, bytes):
        kw = {"content": body, "headers": {"content-type": "application/json"}}
    else:
        kw = {"json": body}
    r = httpx.post(server[0] + "/v1/chat/completions", timeout=30, **kw)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param
    assert httpx.get(server[0] + "/health").status_code == 200


def test_unsupported_options_are_refused_and_defaults_accepted(server):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    for body, param in (({**chat, "top_logprobs": 3}, "top_logprobs"),
                        ({**chat, "logit_bias": {"5": 10}}, "logit_bias"),
                        ({"model": MODEL, "prompt": "hi", "logprobs": 0}, "logprobs"),
                        ({"model": MODEL, "prompt": "hi", "suffix": " end"}, "suffix"),
                        ({"model": MODEL, "prompt": "hi", "best_of": 3}, "best_of")):
        url = server[0] + ("/v1/chat/completions" if "messages" in body else "/v1/completions")
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, body
        assert "not supported" in r.json()["error"]["message"]
    ok = {**chat, "logprobs": False, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
          "frequency_penalty": 0, "presence_penalty": None, "seed": 2**64 - 1}
    assert httpx.post(server[0] + "/v1/chat/completions", json=ok, timeout=30).status_code == 200


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="hi " * 1100, max_tokens=2)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).choices[0].text


def test_models_retrieve_and_route_errors_are_openai_shaped(server, client):
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "mixtral") and card.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    # before: FastAPI's {"detail": "Not Found"} / {"detail": "Method Not Allowed"}
    for r, status in ((httpx.get(server[0] + "/v1/nothing-here"), 404),
                      (httpx.get(server[0] + "/v1/chat/completions"), 405)):
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_content_parts_text_joined_and_images_refused(server, client, loaded):
    """The list-of-parts content the openai client and LangChain send: text parts are joined by
    newlines (as vLLM does), an image part is a 400 that says why."""
    as_text = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello\nhow are you"}], max_tokens=8, temperature=0)
    parts = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "how are you"}]}])
    assert parts.choices[0].message.content == as_text.choices[0].message.content
    assert parts.usage.prompt_tokens == as_text.usage.prompt_tokens == len(chat_ids(loaded, "hello how are you"))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError, match="image_url") as e:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "text", "text": "what is this"}, image]}])
    assert e.value.body["param"] == "messages.0.content.1"


def test_system_message_with_a_template_that_refuses_it(client, loaded, monkeypatch):
    """Mixtral-Instruct's own template raises on a system role; the system text goes into the first
    user turn (what Mistral's tooling does) instead of the request failing."""
    from test_tokenizer import MIXTRAL_TEMPLATE

    tok = loaded[1]
    monkeypatch.setattr(tok, "chat_template", MIXTRAL_TEMPLATE)
    messages = [{"role": "system", "content": "be good"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    folded = [{"role": "user", "content": "be good\n\nhi"}, *messages[2:]]
    ids = tok.apply_chat_template(folded, add_generation_prompt=True, return_dict=False)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == reference(loaded, ids, 6)[0]


def test_n_choices_sample_from_derived_seeds(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=1.0, seed=5)
    one = client.chat.completions.create(**kw)
    three = client.chat.completions.create(**kw, n=3)
    texts = [c.message.content for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts[0] == one.choices[0].message.content  # choice 0 uses the seed itself, choice j seed + j
    alone = [client.chat.completions.create(**{**kw, "seed": 5 + j}) for j in range(3)]
    assert [a.choices[0].message.content for a in alone] == texts
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    streamed: dict[int, list[str]] = {0: [], 1: [], 2: []}
    finishes: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for c in client.chat.completions.create(**kw, n=3, stream=True, stream_options={"include_usage": True}):
        for ch in c.choices:
            streamed[ch.index].append(ch.delta.content or "")
            if ch.finish_reason:
                finishes[ch.index].append(ch.finish_reason)
        last = c
    assert ["".join(streamed[i]) for i in range(3)] == texts
    assert finishes == {i: [three.choices[i].finish_reason] for i in range(3)}
    assert last.choices == [] and last.usage == three.usage


def test_completions_batch_of_prompts(client, loaded):
    tok = loaded[1]
    prompts = ["hello", "the big dog", "one two"]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    ids = [tok.encode(p) for p in prompts]
    as_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in as_ids.choices] == list(range(6))  # prompt i's j-th choice is i * n + j
    assert [c.text for c in as_ids.choices] == [s.choices[0].text for s in singles for _ in range(2)]
    streamed = ["", "", ""]
    for c in client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True):
        streamed[c.choices[0].index] += c.choices[0].text
    assert streamed == [c.text for c in batch.choices]


def test_completion_text_keeps_its_leading_space_and_echo(client, loaded):
    """The completion is the text the model adds after the prompt, so prompt + text reads right
    (before: "the catsat", SentencePiece-style decoders dropping the first token's space); with
    echo the prompt comes first, as OpenAI and vLLM do."""
    tok = loaded[1]
    ids = tok.encode("the cat")
    text, _, _ = reference(loaded, ids, 5)
    r = client.completions.create(model=MODEL, prompt="the cat", max_tokens=5, temperature=0)
    assert r.choices[0].text == text and text.startswith(" ")
    echoed = client.completions.create(model=MODEL, prompt="the cat", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "the cat" + text
    streamed = client.completions.create(model=MODEL, prompt="the cat", max_tokens=5, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == "the cat" + text


def test_completions_default_to_16_tokens(client):
    r = client.completions.create(model=MODEL, prompt=LONG, temperature=0)  # no max_tokens: OpenAI's 16
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (16, "length")


def test_max_completion_tokens_and_null_fields(server, client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=3, temperature=0, user="u1", metadata={"k": "v"})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (3, "length")
    with pytest.raises(openai.BadRequestError, match=r"maximum context length is 1024 tokens.*in the messages"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=5000)
    # clients built from OpenAI's schema send null for what is unset (before: 400 on "stream": null)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": None,
            "stream": None, "stream_options": None, "temperature": None, "top_p": None, "stop": None,
            "seed": None, "user": None}
    assert httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=30).status_code == 200
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    assert raw.parse().choices[0].message.role == "assistant"


def test_include_usage_chunks_carry_null_usage(server):
    """With include_usage every chunk has a "usage" key, null until the last (choices: [])."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=30) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    body["stream_options"] = None
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=30) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    assert all("usage" not in c and c["choices"] for c in chunks)


def test_streams_beside_a_dropped_n_stream_finish(server, client, loaded):
    """Four streaming clients run while an n=3 stream is dropped: its three slots are freed and
    the others' text is unchanged."""
    base, engine = server
    prompts = ["hello", "hi", "the big dog", "red blue green"]
    refs = [reference(loaded, chat_ids(loaded, p), 30)[0] for p in prompts]

    def stream(p: str) -> str:
        chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                                max_tokens=30, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    body = {"model": MODEL, "prompt": LONG, "max_tokens": 600, "n": 3, "temperature": 0.8, "stream": True}
    with ThreadPoolExecutor(4) as pool:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
            futures = [pool.submit(stream, p) for p in prompts]
            time.sleep(0.05)
        got = [f.result(timeout=60) for f in futures]
    assert got == refs
    deadline = time.monotonic() + 10
    while engine.num_active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_active == 0


def test_dropped_stream_frees_its_slot(server, client, loaded):
    base, engine = server
    ref = reference(loaded, chat_ids(loaded, "hi"), 40)[0]
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 600, "temperature": 0, "stream": True}
    other: list[str] = []

    def keep_going():
        other.append(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=40, temperature=0,
        ).choices[0].message.content)

    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
        worker = threading.Thread(target=keep_going)
        worker.start()
        time.sleep(0.05)
    steps = engine.steps
    deadline = time.monotonic() + 10
    worker.join(10)
    while engine.num_active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_active == 0 and engine.steps - steps < 400  # dropped long before its 600 tokens
    assert other == [ref]


def test_serve_command_shuts_down_cleanly_on_sigterm(checkpoint):
    """`mixtral serve` in a subprocess: SIGTERM mid-stream lets the stream finish, then exits 0."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixtral.cli", "serve", "--model", str(checkpoint), "--port", str(port),
         "--threads", "1", "--served-model-name", MODEL],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": MODEL, "prompt": LONG, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_load_benchmark_script(server, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "load.py"
    spec = importlib.util.spec_from_file_location("load_bench", path)
    load = importlib.util.module_from_spec(spec)
    sys.modules["load_bench"] = load  # dataclasses look their module up there
    spec.loader.exec_module(load)
    out = tmp_path / "load.json"
    assert load.main(["--base-url", server[0], "--clients", "4", "--requests", "6", "--max-tokens", "6",
                      "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["requests"] == 6 and report["errors"] == 0 and report["output_tokens_per_s"] > 0
    assert report["ttft_p50_ms"] <= report["ttft_p99_ms"]
    assert "requests/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        load.main(["--base-url", "http://example.com:8000"])
