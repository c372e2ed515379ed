"""Continuous batching: one thread runs the model for every request in flight.

Each request owns a batch-1 ``KVCache`` (growing, or rolling under a sliding window), so requests of
any length can come and go without copying anyone else's keys. A step of the loop:

1. drop requests whose client went away (their slot is free from this step on);
2. admit waiting requests up to ``max_batch``: each prompt is prefilled alone (B=1), its first token
   sampled, and it joins the batch;
3. one batched forward decodes a token for every active request through ``RaggedDecodeView``, which
   presents the list of per-request caches to the model as one cache of B rows;
4. each row applies its frequency/presence penalties (rows without any skip this), samples with
   its own settings and generator, detokenizes, checks EOS / stop strings / length, and streams its
   new text out; finished requests leave the batch at once.

The model is only ever called from the engine thread. Requests come in through a thread-safe queue
and results go out through each request's ``emit`` callback (the server wraps an asyncio queue).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..cache import KVCache, RaggedDecodeView
from ..generation import SamplingParams, choose_stepper, next_token, prefill

log = logging.getLogger("mixtral.serve")


# -- events a request receives ----------------------------------------------------------------------
@dataclass
class Delta:
    text: str  # new text since the previous Delta (may be several tokens' worth, never a partial character)


@dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Failed


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: Sequence[str] = ()
    emit: Callable[[Event], None] = lambda event: None
    cancelled: bool = False  # set from any thread; the engine drops the request at its next step
    # OpenAI's penalties: logit -= frequency * count + presence * (count > 0), counting the tokens
    # generated so far (not the prompt's, as vLLM does).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def cancel(self) -> None:
        self.cancelled = True


class Detokenizer:
    """Turns a growing list of token ids into text deltas, honouring stop strings.

    Text that could still become a stop string (a suffix that is a prefix of one) or that ends in an
    incomplete UTF-8 character is held back until the next token decides it.

    Decoding is incremental, so a step costs the same at token 4000 as at token 4: each new token is
    decoded together with the few before it (``ids[prefix:]``), and the text those few give alone
    (``ids[prefix:read]``) is cut off again. The window is needed because a token's text depends on
    its neighbours (SentencePiece strips the leading space of a sequence's first token, byte tokens
    form one character only together). The completion starts after the last few ``context``
    (prompt) tokens for the same reason: decoded alone, "The capital of France is" + ▁Paris would
    give "Paris", not the " Paris" that OpenAI and vLLM return. After a special token (a chat
    prompt's ``[/INST]``) the text starts afresh, as alone.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer, stop: Sequence[str], context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        prefix = list(context[-self.CONTEXT_TOKENS :])
        if prefix:
            special = set(tokenizer.all_special_ids)
            prefix = prefix[max((k + 1 for k, t in enumerate(prefix) if t in special), default=0) :]
        if prefix and self._decode(prefix).endswith("\ufffd"):  # the prompt ends inside a character
            prefix = []
        self.ids: list[int] = prefix  # the context prefix, then the completion's tokens
        self.prefix, self.read = 0, len(prefix)  # the window: ids[prefix:read] is decoded already
        self.text = ""  # the completion's text so far (complete characters only)
        self.sent = 0  # characters of ``text`` already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self) -> None:
        """Move the complete characters the window's new tokens make into ``text``."""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; returns (new text to emit, whether a stop string was hit)."""
        self.ids.append(token)
        self._advance()
        text = self.text
        hits = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            return self._take(text[: min(hits)]), True
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return self._take(text[: len(text) - hold]), False

    def flush(self) -> str:
        """The held-back text, once no more tokens will come (an unfinished character included)."""
        tail = self._decode(self.ids[self.prefix :])[len(self._decode(self.ids[self.prefix : self.read])) :]
        return self._take(self.text + tail)

    def _take(self, text: str) -> str:
        new = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return new


@dataclass
class _Active:
    request: Request
    cache: KVCache
    generator: torch.Generator | None
    detok: Detokenizer
    last_token: int = -1
    generated: int = 0
    counts: torch.Tensor | None = None  # (V,) fp32 times each token was generated; only with penalties


class Engine:
    """Owns the model and the thread that runs it. ``submit`` from any thread; ``start``/``stop`` once."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_context: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_context is not None and max_context < 2:  # one prompt token and one generated
            raise ValueError(f"max_context must be >= 2 tokens, got {max_context}")
        self.model = model.eval()
        # The same decode step generate would take. Its packed weights are the model's as of now:
        # replace modules or parameters (quantize, load an adapter) before making the engine.
        self.stepper = choose_stepper(self.model)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        config = model.config
        self.max_context = min(max_context or config.max_position_embeddings, config.max_position_embeddings)
        eos = set(config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = eos
        self._inbox: queue.Queue[Request | None] = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._active: list[_Active] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run; the batch size of each is in batch_sizes (for tests and stats)
        self.batch_sizes: deque[int] = deque(maxlen=1024)

    # -- control, from any thread ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mixtral-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Cancel what is still queued or running (each gets a Failed event) and join the thread."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        if len(request.prompt_ids) + request.max_tokens > self.max_context:
            raise ValueError(f"prompt ({len(request.prompt_ids)}) + max_tokens ({request.max_tokens}) "
                             f"exceeds the context of {self.max_context} tokens")
        self._inbox.put(request)

    @property
    def num_active(self) -> int:
        return len(self._active)

    # -- the loop ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                self._collect(block=not self._active and not self._waiting)
                self._active = [a for a in self._active if not a.request.cancelled]
                self._admit()
                if self._active:
                    self._decode()
        self._collect(block=False)
        for r in [a.request for a in self._active] + list(self._waiting):
            _send(r, Failed("the server is shutting down"))
        self._active, self._waiting = [], deque()

    def _collect(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.max_batch and not self._stopping:
            request = self._waiting.popleft()
            if request.cancelled:
                continue
            try:
                self._prefill(request)
            except Exception as e:  # a bad request must not take the server down
                log.exception("prefill failed")
                _send(request, Failed(f"prefill failed: {e}"))

    def _prefill(self, request: Request) -> None:
        model = self.model
        n = len(request.prompt_ids)
        cache = KVCache.for_model(model.config, 1, capacity=n + request.max_tokens, dtype=model.dtype,
                                  device=model.device)
        generator = None
        if request.params.do_sample:
            generator = torch.Generator(device=model.device)
            if request.seed is not None:
                generator.manual_seed(request.seed)
            else:
                generator.seed()
        active = _Active(request, cache, generator, Detokenizer(self.tokenizer, request.stop, request.prompt_ids))
        if request.frequency_penalty or request.presence_penalty:
            active.counts = torch.zeros(model.config.vocab_size, dtype=torch.float32, device=model.device)
        ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=model.device)
        logits = prefill(model, ids, None, cache)
        token = int(next_token(logits, request.params, None, generator)[0])
        if self._advance(active, token):
            self._active.append(active)

    def _decode(self) -> None:
        batch = self._active
        self.steps += 1
        self.batch_sizes.append(len(batch))
        tokens = torch.tensor([a.last_token for a in batch], dtype=torch.long, device=self.model.device)
        try:
            logits = self.stepper.step(tokens, RaggedDecodeView([a.cache for a in batch]))
            logits = _penalize(logits, batch)
            greedy = logits.argmax(dim=-1).tolist()
            chosen = [g if not a.request.params.do_sample else
                      int(next_token(logits[i : i + 1], a.request.params, None, a.generator)[0])
                      for i, (a, g) in enumerate(zip(batch, greedy))]
        except Exception as e:
            log.exception("decode step failed")
            for a in batch:
                _send(a.request, Failed(f"decode failed: {e}"))
            self._active = []
            return
        self._active = [a for a, t in zip(batch, chosen) if self._advance(a, t)]

    def _advance(self, a: _Active, token: int) -> bool:
        """Account one sampled token; emit its text; returns whether the request goes on."""
        a.generated += 1
        a.last_token = token
        if a.counts is not None:
            a.counts[token] += 1
        request = a.request
        if token in self.eos_ids:
            return self._finish(a, "stop")
        text, hit_stop = a.detok.add(token)
        if text:
            _send(request, Delta(text))
        if hit_stop:
            return self._finish(a, "stop", flush=False)
        if a.generated >= request.max_tokens:
            return self._finish(a, "length")
        return True

    def _finish(self, a: _Active, reason: str, flush: bool = True) -> bool:
        if flush and (rest := a.detok.flush()):
            _send(a.request, Delta(rest))
        _send(a.request, Finished(reason, len(a.request.prompt_ids), a.generated))
        return False


def _penalize(logits: torch.Tensor, batch: Sequence[_Active]) -> torch.Tensor:
    """(B, V) logits with each row's frequency/presence penalties applied; the same tensor, untouched,
    when no row has any (the common case costs one Python loop over the batch)."""
    rows = [i for i, a in enumerate(batch) if a.counts is not None]
    if not rows:
        return logits
    logits = logits.to(torch.float32, copy=True)  # the model's output buffer may be reused next step
    for i in rows:
        a = batch[i]
        logits[i] -= a.request.frequency_penalty * a.counts + a.request.presence_penalty * (a.counts > 0)
    return logits


def _send(request: Request, event: Event) -> None:
    try:
        request.emit(event)
    except Exception:  # the receiving side is gone (event loop closed): nothing left to tell
        request.cancel()


def wait_all(events: Sequence[Event]) -> tuple[str, Finished | Failed]:
    """Join a finished request's events into (text, final event); a convenience for callers and tests."""
    text = "".join(e.text for e in events if isinstance(e, Delta))
    final = next(e for e in events if isinstance(e, (Finished, Failed)))
    return text, final


def run_to_completion(engine: Engine, requests: Sequence[Request], timeout: float = 60.0) -> list[list[Event]]:
    """Submit requests to a started engine and block until each has finished (used by tests and bench)."""
    done = threading.Semaphore(0)
    events: list[list[Event]] = [[] for _ in requests]

    def collector(i: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            events[i].append(event)
            if not isinstance(event, Delta):
                done.release()
        return emit

    for i, r in enumerate(requests):
        r.emit = collector(i)
        engine.submit(r)
    deadline = time.monotonic() + timeout
    for _ in requests:
        if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("requests did not finish in time")
    return events
