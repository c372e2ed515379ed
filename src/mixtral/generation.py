"""Generation: prefill once, then decode one token at a time through the KV cache.

``generate`` follows transformers' ``model.generate`` for the arguments Mixtral users pass. The
steps are small functions (``prefill``, ``decode_step``, ``next_token``) so the server and the
benchmarks reuse them and fast paths can replace them one at a time.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache

CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: a seen token's logit is divided by the penalty if positive, else multiplied."""
    score = torch.gather(logits, 1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Greedy or sampled; stays on the device (no host sync)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if not params.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = filter_top_k(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        logits = filter_top_p(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """Run the prompt through the model, filling ``cache``; returns last-position logits (B, V)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1]


def decode_step(model, tokens: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """One token per row (B,) -> logits (B, V)."""
    out = model(input_ids=tokens[:, None], attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


def static_decode_applies(model, cache_implementation: str | None) -> bool:
    """Whether ``cache_implementation="static"`` takes the fixed-shape path: on CUDA, where a
    captured graph removes per-kernel launch costs. On the CPU the default path serves it, with the
    same tokens and faster (demo model, 64 tokens, two runs each: 14.5-17.1 tok/s against 9.2-10.8
    through the eager fixed-shape step), since its fused decode kernels have no launches to save."""
    return cache_implementation == "static" and model.device.type == "cuda"


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
    cache_implementation: str | None = None,
    **unused,
) -> torch.LongTensor:
    """Prompt + new tokens as (B, prompt_len + generated). Rows that finish early are padded after EOS.

    ``cache_implementation="static"`` (transformers' spelling) decodes over a fixed-shape cache on
    CUDA: one captured graph of the compiled step per batch size, kept for later calls
    (``mixtral.kernels.cuda_graph.static_decoder``); the prompt is still prefilled eagerly. See
    ``static_decode_applies`` for the CPU.
    """
    if input_ids is None:
        input_ids = unused.pop("inputs", None)
    if unused:
        raise TypeError(f"generate() got unsupported arguments: {', '.join(sorted(unused))}")
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("generate needs a non-empty prompt: input_ids of shape (batch, length >= 1)")
    config = model.config
    B, L = input_ids.shape
    if max_new_tokens is None:
        max_new_tokens = (max_length if max_length is not None else 20) - L
    if max_new_tokens < 0 or (max_length is not None and max_new_tokens == 0 and L > max_length):
        raise ValueError(f"max_new_tokens/max_length leave no room: prompt has {L} tokens")
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, got {cache_implementation!r}")
    params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty)
    if eos_token_id is None:
        eos = config.eos_token_ids
    else:
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (config.pad_token_id if config.pad_token_id is not None
                                                          else (eos[0] if eos else 0))
    device = model.device
    input_ids = input_ids.to(device)
    total = L + max_new_tokens
    out = torch.full((B, total), pad, dtype=torch.long, device=device)
    out[:, :L] = input_ids
    mask = torch.ones(B, total, dtype=torch.long, device=device)
    if attention_mask is not None:
        mask[:, :L] = attention_mask.to(device)
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    cache = KVCache.for_model(config, B, capacity=total, dtype=model.dtype, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits = prefill(model, input_ids, mask[:, :L] if has_padding else None, cache) if max_new_tokens else None
    static_step = None
    if static_decode_applies(model, cache_implementation) and max_new_tokens > 1:
        from .kernels.cuda_graph import static_decoder

        static_cache, static_step = static_decoder(model, B, total)
        static_cache.load(cache)  # the prompt's keys (and its padding) into the fixed-shape cache
        del cache
    for step in range(max_new_tokens):
        if step < min_new_tokens and eos:
            logits = logits.clone()
            logits[:, eos_t] = float("-inf")
        seen = out[:, : L + step] if params.repetition_penalty != 1.0 else None
        tok = next_token(logits, params, seen, generator)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        out[:, L + step] = tok
        if streamer is not None:
            streamer.put(tok.cpu())
        if eos:
            finished |= torch.isin(tok, eos_t)
            if bool(finished.all()):
                out = out[:, : L + step + 1]
                break
        if step + 1 < max_new_tokens:
            if static_step is not None:
                logits = static_step(tok)
            else:
                logits = decode_step(model, tok, mask[:, : L + step + 1] if has_padding else None, cache)
    if streamer is not None:
        streamer.end()
    return out


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
