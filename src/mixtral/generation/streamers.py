"""Streamers: text as tokens arrive, as transformers' ``TextStreamer`` and ``TextIteratorStreamer``.

``generate(..., streamer=...)`` calls ``put`` with the prompt ids, then each step's tokens, and
``end`` once."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import torch


class TextStreamer:
    """Prints text as tokens arrive (batch 1), like transformers' TextStreamer."""

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self._tokens: list[int] = []
        self._printed = 0
        self._prompt_pending = True

    def put(self, token_ids: torch.Tensor) -> None:
        if token_ids.dim() > 1 and token_ids.shape[0] > 1:
            raise ValueError("TextStreamer supports batch size 1 only")
        if self.skip_prompt and self._prompt_pending:
            self._prompt_pending = False
            return
        self._prompt_pending = False
        self._tokens += token_ids.reshape(-1).tolist()
        text = self.tokenizer.decode(self._tokens, **self.decode_kwargs)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            return
        self.on_text(text[self._printed:], stream_end=False)
        self._printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self._tokens, **self.decode_kwargs)
        self.on_text(text[self._printed:], stream_end=True)
        self._tokens, self._printed, self._prompt_pending = [], 0, True

    def on_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else "\n")


class TextIteratorStreamer(TextStreamer):
    """The iterator form: run ``generate`` in a thread and iterate over text pieces here."""

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def on_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.queue.put(text, timeout=self.timeout)
        if stream_end:
            self.queue.put(None, timeout=self.timeout)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self.queue.get(timeout=self.timeout)
            if item is None:
                return
            yield item
