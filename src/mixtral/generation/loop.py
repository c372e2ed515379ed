"""``generate``: prefill the prompt once, then decode one token at a time through the KV cache.

It follows transformers' ``model.generate`` for greedy decoding and sampling: the same defaults,
the same ``GenerationConfig`` fields and ``generation_config.json`` files (``config``), and the same
logits processors applied in the same order (``sampling``), so ``output_scores`` match.

Reading order: ``generate`` (a short sequence of named steps), then its steps: ``read_prompt``
(ids, mask, embeddings), ``prefill``, and ``Decoding`` (the per-step token choice, EOS and stop
strings, recorded scores). The decode step itself is a stepper (``steppers``), chosen once per
call by ``choose_stepper``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import KVCache
from ..outputs import ModelOutput
from .config import GenerationConfig, _field_names, _is_int, resolve_generation_config
from .sampling import StopStrings, build_logits_processors, sample
from .steppers import CACHE_IMPLEMENTATIONS, choose_stepper


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
    (``steppers.StaticStepper``); the prompt is still prefilled eagerly. On the CPU the default
    path serves it. The kept graph owns its cache, so two such calls of the same batch size must
    not run at once from different threads (the server does not use it).
    """
    unknown = sorted(set(kwargs) - _field_names())
    if unknown:
        raise TypeError(f"generate() got unsupported arguments: {', '.join(unknown)}")
    cfg = resolve_generation_config(model, generation_config, **kwargs)
    _check_supported(cfg, tokenizer)
    prompt = read_prompt(model, cfg, input_ids, inputs, attention_mask, inputs_embeds)
    run = Decoding(model, cfg, prompt, tokenizer)
    # A static cache and graph pay off only when there is a decode step to replay.
    stepper = choose_stepper(model, cfg.cache_implementation if run.max_new > 1 else None)
    cache = KVCache.for_model(model.config, prompt.batch, capacity=prompt.context + run.max_new,
                              dtype=model.dtype, device=model.device)
    if streamer is not None:
        streamer.put(prompt.ids.cpu())
    logits = prefill(model, prompt.ids if prompt.embeds is None else None, prompt.mask, cache, prompt.embeds)
    cache = stepper.begin(cache)
    for step in range(run.max_new):
        token = run.choose(logits, step, generator)
        if streamer is not None:
            streamer.put(token.cpu())
        if run.all_finished(step):
            break
        if step + 1 < run.max_new:
            logits = stepper.step(token, cache)
    if streamer is not None:
        streamer.end()
    return run.result(cache if stepper.hands_out_cache else None)


def prefill(model, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, cache: KVCache,
            inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt (ids, or embeddings) through the model, filling ``cache``; returns
    last-position logits (B, V)."""
    out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


# -- the prompt --------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """The prompt as generate decodes it: ``ids`` (B, L) start the output (L = 0 for embeddings
    alone), ``mask`` (B, context) only when some row is padded, ``embeds`` when given; rows
    repeated ``num_return_sequences`` times."""

    ids: torch.Tensor
    mask: torch.Tensor | None
    embeds: torch.Tensor | None
    context: int  # positions the model sees: the prompt's length in ids or embeddings

    @property
    def batch(self) -> int:
        return self.ids.shape[0]


def read_prompt(model, cfg: GenerationConfig, input_ids: Any, inputs: Any, attention_mask: torch.Tensor | None,
                inputs_embeds: torch.Tensor | None) -> Prompt:
    """The prompt (ids, or the BOS token when nothing is given, embeddings, or both), checked, with
    the mask inferred from ``pad_token_id`` where transformers infers it."""
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
    device = model.device
    input_ids = input_ids.to(device)
    context = inputs_embeds.shape[1] if inputs_embeds is not None else input_ids.shape[1]
    eos = _eos_ids(cfg)
    if (attention_mask is None and cfg.pad_token_id is not None and cfg.pad_token_id not in eos
            and input_ids.shape[1] == context):
        inferred = input_ids.ne(cfg.pad_token_id).long()
        if not bool(inferred.all()):  # a host sync, once per call (the padding check below is another)
            attention_mask = inferred
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if attention_mask.shape != (input_ids.shape[0], context):
            raise ValueError(f"attention_mask must be (batch, prompt length) = {(input_ids.shape[0], context)}, "
                             f"got shape {tuple(attention_mask.shape)}")
        if bool(attention_mask.all()):
            attention_mask = None
    embeds = inputs_embeds.to(device) if inputs_embeds is not None else None
    n = cfg.num_return_sequences  # each prompt's rows next to each other, as transformers orders them
    return Prompt(*(t.repeat_interleave(n, dim=0) if t is not None and n > 1 else t
                    for t in (input_ids, attention_mask, embeds)), context)


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


def _eos_ids(cfg: GenerationConfig) -> list[int]:
    if cfg.eos_token_id is None:
        return []
    return [cfg.eos_token_id] if _is_int(cfg.eos_token_id) else list(cfg.eos_token_id)


# -- the decoding state ------------------------------------------------------------------------------


class Decoding:
    """What generate keeps across steps: the output ids, the logits processors, which rows have
    finished (EOS, stop strings) and the scores asked for. ``choose`` picks each step's tokens."""

    def __init__(self, model, cfg: GenerationConfig, prompt: Prompt, tokenizer: Any) -> None:
        device, L = prompt.ids.device, prompt.ids.shape[1]
        self.cfg, self.prompt_length = cfg, L
        self.max_new, min_length = generated_length(cfg, L, prompt.context if prompt.embeds is not None else None,
                                                    getattr(model.config, "max_position_embeddings", None))
        eos = _eos_ids(cfg)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else None)
        self.out = torch.full((prompt.batch, L + self.max_new), pad if pad is not None else 0, dtype=torch.long,
                              device=device)
        self.out[:, :L] = prompt.ids
        mask = prompt.mask
        self.processors = build_logits_processors(
            cfg, eos=eos, vocab_size=model.config.vocab_size, prompt_length=L, min_length=min_length,
            # transformers' repetition penalty skips each row's left padding (its first real position)
            penalty_skip=(mask != 0).int().argmax(dim=1) if mask is not None else None, device=device,
        )
        self.stop = StopStrings(cfg.stop_strings, tokenizer) if cfg.stop_strings is not None else None
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.pad = torch.tensor(pad if pad is not None else 0, dtype=torch.long, device=device)
        self.finished = torch.zeros(prompt.batch, dtype=torch.bool, device=device)
        self.scores: list[torch.Tensor] | None = [] if cfg.return_dict_in_generate and cfg.output_scores else None
        self.logits: list[torch.Tensor] | None = [] if cfg.return_dict_in_generate and cfg.output_logits else None

    @property
    def can_finish(self) -> bool:
        return self.eos is not None or self.stop is not None

    def choose(self, logits: torch.Tensor, step: int, generator: torch.Generator | None) -> torch.Tensor:
        """The processed scores of logits (B, V), the next token per row (pad for finished rows),
        written into the output."""
        recorded = self.scores is not None or self.logits is not None
        # A copy when recorded: the static stepper overwrites its logits buffer on the next replay.
        raw = logits.to(torch.float32, copy=recorded)
        scores = raw
        for process in self.processors:
            scores = process(self.out[:, : self.prompt_length + step], scores)
        if self.scores is not None:
            self.scores.append(scores)
        if self.logits is not None:
            self.logits.append(raw)
        token = sample(scores, generator) if self.cfg.do_sample else scores.argmax(dim=-1)
        if self.can_finish:
            token = torch.where(self.finished, self.pad, token)
        self.out[:, self.prompt_length + step] = token
        return token

    def all_finished(self, step: int) -> bool:
        """Update which rows are done after ``step``'s token; True (and the output trimmed) when all are."""
        if not self.can_finish:
            return False
        end = self.prompt_length + step + 1
        if self.eos is not None:
            self.finished |= torch.isin(self.out[:, end - 1], self.eos)
        if self.stop is not None:
            self.finished |= self.stop(self.out[:, :end], self.finished)
        if bool(self.finished.all()):  # the loop's one host sync, and only when rows can finish
            self.out = self.out[:, :end]
            return True
        return False

    def result(self, cache: Any) -> torch.LongTensor | GenerateDecoderOnlyOutput:
        if not self.cfg.return_dict_in_generate:
            return self.out
        return GenerateDecoderOnlyOutput(
            sequences=self.out, scores=tuple(self.scores) if self.scores is not None else None,
            logits=tuple(self.logits) if self.logits is not None else None, past_key_values=cache,
        )


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
