"""Generation: prefill once, then decode one token at a time through the KV cache.

``generate`` follows transformers' ``model.generate`` for greedy decoding and sampling: the same
defaults, the same ``GenerationConfig`` fields and ``generation_config.json`` files
(``mixtral.generation_config``), and the same logits processors applied in the same order
(``mixtral.sampling``), so ``output_scores`` match. The steps are small functions (``prefill``,
``decode_step``, ``next_token``) so the server and the benchmarks reuse them and fast paths can
replace them one at a time.

Reading order: the model steps (``prefill``, ``decode_step``), ``generate`` itself, then the
streamers. Token choice (``SamplingParams``, ``next_token``, the logits processors, stop strings)
lives in ``mixtral.sampling`` and the ``GenerationConfig`` in ``mixtral.generation_config``; both
are re-exported here.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .cache import KVCache
from .generation_config import (
    GENERATION_CONFIG_NAME,
    GenerationConfig,
    _field_names,
    _is_int,
    resolve_generation_config,
)
from .outputs import ModelOutput
from .sampling import (
    NEG_INF,
    Processor,
    SamplingParams,
    StopStrings,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    build_logits_processors,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    next_token,
    sample,
    warp_for_sampling,
)

__all__ = [
    # defined here
    "CACHE_IMPLEMENTATIONS",
    "GenerateDecoderOnlyOutput",
    "TextIteratorStreamer",
    "TextStreamer",
    "decode_step",
    "generate",
    "generated_length",
    "prefill",
    "static_decode_applies",
    # re-exported from .generation_config
    "GENERATION_CONFIG_NAME",
    "GenerationConfig",
    "resolve_generation_config",
    # re-exported from .sampling
    "NEG_INF",
    "Processor",
    "SamplingParams",
    "StopStrings",
    "apply_repetition_penalty",
    "ban_repeated_ngrams",
    "build_logits_processors",
    "filter_min_p",
    "filter_top_k",
    "filter_top_p",
    "next_token",
    "sample",
    "warp_for_sampling",
]

CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")


# -- model steps -----------------------------------------------------------------------------------


def prefill(model, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, cache: KVCache,
            inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt (ids, or embeddings) through the model, filling ``cache``; returns
    last-position logits (B, V)."""
    out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
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


# -- generate --------------------------------------------------------------------------------------


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)``: attribute, ``out["sequences"]`` and tuple
    access, as transformers' class of this name. ``scores`` holds each step's processed (B, V)
    scores, ``logits`` the raw ones (fp32), when asked for. ``past_key_values`` is the ``KVCache``
    (every position but the last token's), ``None`` after the CUDA static path, whose fixed-shape
    cache stays with its kept graph."""

    sequences: torch.LongTensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[Any, ...] | None = None
    hidden_states: tuple[Any, ...] | None = None
    past_key_values: Any = None


def generated_length(config: GenerationConfig, ids_length: int, embeds_length: int | None,
                     max_positions: int | None) -> tuple[int, int]:
    """(new tokens to generate, sequence length below which EOS is banned), by transformers' rules.

    ``ids_length`` is the width of the ids the output starts with (0 for embeddings alone),
    ``embeds_length`` the prompt length when ``inputs_embeds`` are given.
    """
    embeds_differ = embeds_length is not None and embeds_length != ids_length
    if config.max_new_tokens is not None:
        max_length = ids_length + config.max_new_tokens
    elif config.max_length is None:  # the default: 20 new tokens, capped at the position limit
        max_length = ids_length + 20
        if max_positions is not None:
            max_length = min(max_length, max_positions)
    elif embeds_differ:  # max_length counts the embedded prompt, which the output does not hold
        max_length = config.max_length - embeds_length
    else:
        max_length = config.max_length
    if ids_length >= max_length:
        capped = config.max_new_tokens is None and config.max_length is None
        raise ValueError(
            f"Input length of input_ids is {ids_length}, but `max_length` is set to {max_length}"
            + (" (the model's max_position_embeddings)" if capped else "")
            + ": nothing is left to generate. Shorten the prompt, or set `max_new_tokens`.")
    if config.min_new_tokens is not None:
        min_length = ids_length + config.min_new_tokens
    elif embeds_differ:
        min_length = max((config.min_length or 0) - embeds_length, 0)
    else:
        min_length = config.min_length or 0
    return max_length - ids_length, min_length


def _inputs(input_ids: Any, inputs: Any, attention_mask: torch.Tensor | None):
    """The prompt ids and mask from ``input_ids``/``inputs``: a tensor, or a mapping such as the
    ``BatchEncoding`` of ``tokenizer(..., return_tensors="pt")``."""
    if input_ids is not None and inputs is not None:
        raise ValueError("pass the prompt once: input_ids or inputs, not both")
    ids = input_ids if input_ids is not None else inputs
    if isinstance(ids, Mapping):
        if attention_mask is None:
            attention_mask = ids.get("attention_mask")
        ids = ids.get("input_ids")
    if ids is not None and not isinstance(ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor (tokenizer(..., return_tensors='pt')), got {type(ids).__name__}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    return ids, attention_mask


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    generation_config: Any = None,
    *,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    inputs: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """Prompt + new tokens as (B * num_return_sequences, prompt_len + generated); rows that finish
    early are padded after EOS. With ``inputs_embeds`` alone, only the new tokens (as transformers).

    Every ``GenerationConfig`` field can be passed as a keyword, over ``generation_config`` (ours or
    a transformers one) and ``model.generation_config``. ``generator`` seeds sampling; ``tokenizer``
    is needed for ``stop_strings``. Without an attention mask, one is inferred from
    ``pad_token_id`` when the prompt holds it and it is not an EOS id (transformers' rule).

    ``cache_implementation="static"`` (transformers' spelling) decodes over a fixed-shape cache on
    CUDA: one captured graph of the compiled step per batch size, kept for later calls
    (``mixtral.kernels.cuda_graph.static_decoder``); the prompt is still prefilled eagerly. See
    ``static_decode_applies`` for the CPU. The kept graph owns its cache, so two such calls of the
    same batch size must not run at once from different threads (the server does not use it).
    """
    unknown = sorted(set(kwargs) - _field_names())
    if unknown:
        raise TypeError(f"generate() got unsupported arguments: {', '.join(unknown)}")
    cfg = resolve_generation_config(model, generation_config, **kwargs)
    _check_supported(cfg, tokenizer)
    config = model.config
    device = model.device

    # Prompt: ids (or the BOS token when nothing is given), embeddings, or both.
    input_ids, attention_mask = _inputs(input_ids, inputs, attention_mask)
    if input_ids is None:
        if inputs_embeds is not None:
            input_ids = torch.zeros(inputs_embeds.shape[0], 0, dtype=torch.long)
        elif cfg.bos_token_id is not None:
            input_ids = torch.full((1, 1), cfg.bos_token_id, dtype=torch.long)
    if input_ids is None or input_ids.dim() != 2 or (input_ids.shape[1] == 0 and inputs_embeds is None):
        raise ValueError("generate needs a non-empty prompt: input_ids of shape (batch, length >= 1)")
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != input_ids.shape[0]
                                      or inputs_embeds.shape[1] == 0):
        raise ValueError(f"inputs_embeds must be (batch, length >= 1, hidden_size) with the batch of input_ids, "
                         f"got shape {tuple(inputs_embeds.shape)}")
    input_ids = input_ids.to(device)
    ids_len = input_ids.shape[1]
    ctx_len = inputs_embeds.shape[1] if inputs_embeds is not None else ids_len  # positions the model sees
    max_new, min_length = generated_length(cfg, ids_len, ctx_len if inputs_embeds is not None else None,
                                           getattr(config, "max_position_embeddings", None))

    eos = [] if cfg.eos_token_id is None else (
        [cfg.eos_token_id] if _is_int(cfg.eos_token_id) else list(cfg.eos_token_id))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else None)
    if (attention_mask is None and cfg.pad_token_id is not None and cfg.pad_token_id not in eos
            and ids_len == ctx_len):
        inferred = input_ids.ne(cfg.pad_token_id).long()
        if not bool(inferred.all()):  # a host sync, once per call (the padding check below is another)
            attention_mask = inferred
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if attention_mask.shape != (input_ids.shape[0], ctx_len):
            raise ValueError(f"attention_mask must be (batch, prompt length) = {(input_ids.shape[0], ctx_len)}, "
                             f"got shape {tuple(attention_mask.shape)}")

    if cfg.num_return_sequences > 1:  # each prompt's rows next to each other, as transformers orders them
        n = cfg.num_return_sequences
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0) if attention_mask is not None else None
        inputs_embeds = inputs_embeds.repeat_interleave(n, dim=0) if inputs_embeds is not None else None
    B = input_ids.shape[0]

    total = ids_len + max_new
    out = torch.full((B, total), pad if pad is not None else 0, dtype=torch.long, device=device)
    out[:, :ids_len] = input_ids
    mask = torch.ones(B, ctx_len + max_new, dtype=torch.long, device=device)
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if has_padding:
        mask[:, :ctx_len] = attention_mask
    processors = build_logits_processors(
        cfg, eos=eos, vocab_size=config.vocab_size, prompt_length=ids_len, min_length=min_length,
        # transformers' repetition penalty skips each row's left padding (its first real position)
        penalty_skip=(attention_mask != 0).int().argmax(dim=1) if has_padding else None, device=device,
    )
    stop = StopStrings(cfg.stop_strings, tokenizer) if cfg.stop_strings is not None else None
    can_finish = bool(eos) or stop is not None
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    pad_t = torch.tensor(pad if pad is not None else 0, dtype=torch.long, device=device)
    want_scores = cfg.return_dict_in_generate and cfg.output_scores
    want_logits = cfg.return_dict_in_generate and cfg.output_logits
    scores_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []

    cache = KVCache.for_model(config, B, capacity=ctx_len + max_new, dtype=model.dtype, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    prompt_mask = mask[:, :ctx_len] if has_padding else None
    if inputs_embeds is not None:
        logits = prefill(model, None, prompt_mask, cache, inputs_embeds=inputs_embeds.to(device))
    else:
        logits = prefill(model, input_ids, prompt_mask, cache)
    static_step = None
    if static_decode_applies(model, cfg.cache_implementation) and max_new > 1:
        from .kernels.cuda_graph import static_decoder

        static_cache, static_step = static_decoder(model, B, ctx_len + max_new)
        static_cache.load(cache)  # the prompt's keys (and its padding) into the fixed-shape cache
        cache = None  # the fixed-shape cache belongs to the kept graph: it is not handed out
    for step in range(max_new):
        # A copy when recorded: the static step overwrites its logits buffer on the next replay.
        raw = logits.to(torch.float32, copy=want_logits or want_scores)
        seq = out[:, : ids_len + step]
        scores = raw
        for process in processors:
            scores = process(seq, scores)
        if want_scores:
            scores_out.append(scores)
        if want_logits:
            logits_out.append(raw)
        tok = sample(scores, generator) if cfg.do_sample else scores.argmax(dim=-1)
        if can_finish:
            tok = torch.where(finished, pad_t, tok)
        out[:, ids_len + step] = tok
        if streamer is not None:
            streamer.put(tok.cpu())
        if can_finish:
            if eos:
                finished |= torch.isin(tok, eos_t)
            if stop is not None:
                finished |= stop(out[:, : ids_len + step + 1], finished)
            if bool(finished.all()):  # the loop's one host sync, and only when rows can finish
                out = out[:, : ids_len + step + 1]
                break
        if step + 1 < max_new:
            if static_step is not None:
                logits = static_step(tok)
            else:
                step_mask = mask[:, : ctx_len + step + 1] if has_padding else None
                logits = decode_step(model, tok, step_mask, cache)
    if streamer is not None:
        streamer.end()
    if not cfg.return_dict_in_generate:
        return out
    return GenerateDecoderOnlyOutput(
        sequences=out, scores=tuple(scores_out) if want_scores else None,
        logits=tuple(logits_out) if want_logits else None, past_key_values=cache,
    )


def _check_supported(cfg: GenerationConfig, tokenizer: Any) -> None:
    """Refuse, with the reason, what transformers would do but this ``generate`` does not."""
    if cfg.num_beams != 1:
        raise NotImplementedError(f"beam search (num_beams={cfg.num_beams}) is not supported by mixtral's "
                                  "generate: use num_beams=1, with do_sample=False (greedy) or True (sampling)")
    if cfg.num_return_sequences > 1 and not cfg.do_sample:
        raise ValueError("Greedy methods (do_sample != True) without beam search do not support "
                         f"`num_return_sequences` different than 1 (got {cfg.num_return_sequences}).")
    for name in ("output_attentions", "output_hidden_states"):
        if getattr(cfg, name):
            raise NotImplementedError(f"generate does not return {name[len('output_'):]}: call the model's "
                                      f"forward with {name}=True on the generated sequences instead")
    if cfg.cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, "
                         f"got {cfg.cache_implementation!r}")
    if cfg.stop_strings is not None and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer to read the text: pass "
                         "generate(..., stop_strings=..., tokenizer=tokenizer)")


# -- streamers -------------------------------------------------------------------------------------


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
