"""Generation: prefill once, then decode one token at a time through the KV cache.

``generate`` follows transformers' ``model.generate`` for greedy decoding and sampling: the same
defaults, the same ``GenerationConfig`` fields and ``generation_config.json`` files, and the same
logits processors applied in the same order, so ``output_scores`` match. The steps are small
functions (``prefill``, ``decode_step``, ``next_token``) so the server and the benchmarks reuse them
and fast paths can replace them one at a time.

Reading order: the sampling filters the server shares (``SamplingParams``, ``next_token``), the
``GenerationConfig``, the logits processors ``generate`` builds from it, stop strings, then
``generate`` itself and the streamers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cache import KVCache
from .outputs import ModelOutput

CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
GENERATION_CONFIG_NAME = "generation_config.json"

# -- token choice: shared with the server ----------------------------------------------------------


@dataclass
class SamplingParams:
    """The per-request knobs of the server's decode loop. ``top_k=None`` means no top-k filter
    (``generate``'s default is transformers' 50; the server keeps its own default)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    min_p: float | None = None

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: a seen token's logit is divided by the penalty if positive, else multiplied.
    ``seen`` (B, T) may hold the id ``V`` (one past the vocabulary) for positions to ignore."""
    vocab = logits.shape[-1]
    hit = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    hit = hit.scatter_(1, seen, True)[:, :vocab]
    return torch.where(hit, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


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


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the most likely one (which always stays)."""
    probs = logits.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def warp_for_sampling(
    logits: torch.Tensor, temperature: float | None, top_k: int | None, top_p: float | None, min_p: float | None
) -> torch.Tensor:
    """transformers' sampling warpers, in its order: temperature, top-k, top-p, min-p (min-p after
    temperature on purpose, as llama.cpp defines it). ``None``, ``top_k=0`` and ``top_p=1`` are off."""
    if temperature is not None and temperature != 1.0:
        logits = logits / temperature
    if top_k:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    if min_p is not None:
        logits = filter_min_p(logits, min_p)
    return logits


def sample(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) processed scores -> (B,) ids drawn from their softmax, on the device (no host sync)."""
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(-1)


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
    return sample(warp_for_sampling(logits, params.temperature, params.top_k, params.top_p, params.min_p),
                  generator)


# -- GenerationConfig ------------------------------------------------------------------------------


@dataclass
class GenerationConfig:
    """transformers' ``GenerationConfig`` fields that ``generate`` implements, with the values
    transformers falls back to when nothing sets them (``top_k=50``, ``temperature=1.0``, ...).

    ``max_length=None`` means transformers' default rule: 20 new tokens, capped so that prompt plus
    new tokens fit ``max_position_embeddings``. ``max_length`` set means total length, prompt
    included; ``max_new_tokens`` wins over it. Keys of a ``generation_config.json`` that are not
    fields here land in ``extra``: kept, written back, not acted on (``generate`` warns when one
    would have changed transformers' output).
    """

    # Length.
    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    min_length: int | None = 0
    stop_strings: str | list[str] | None = None
    # Strategy: greedy or sampling; beam search is not implemented (num_beams must be 1).
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    early_stopping: bool | str = False  # beam search only
    length_penalty: float = 1.0  # beam search only
    # Logits processors, applied in transformers' order (see ``build_logits_processors``).
    temperature: float | None = 1.0
    top_k: int | None = 50
    top_p: float | None = 1.0
    min_p: float | None = None
    repetition_penalty: float | None = 1.0
    no_repeat_ngram_size: int | None = 0
    bad_words_ids: list[list[int]] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    # Special tokens.
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    # Cache and outputs.
    use_cache: bool = True
    cache_implementation: str | None = None
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    output_attentions: bool = False
    output_hidden_states: bool = False
    # Keys of a generation_config.json that are not fields above.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"GenerationConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise bad(name, "a positive integer or None")
        for name in ("min_new_tokens", "min_length", "no_repeat_ngram_size", "top_k"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise bad(name, "a non-negative integer or None")
        for name in ("num_beams", "num_return_sequences"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        if self.do_sample and not (self.temperature is None or self.temperature > 0):
            raise ValueError(f"GenerationConfig.temperature must be > 0 when sampling (do_sample=True), got "
                             f"{self.temperature}; for greedy decoding set do_sample=False")
        for name in ("top_p", "min_p"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise bad(name, "in [0, 1] or None")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "> 0")
        if self.bad_words_ids is not None and (
            isinstance(self.bad_words_ids, (str, bytes)) or not self.bad_words_ids
            or any(_is_int(s) or not s or not all(_is_int(t) and t >= 0 for t in s) for s in self.bad_words_ids)
        ):
            raise bad("bad_words_ids", "a non-empty list of non-empty lists of token ids")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            value = getattr(self, name)
            if value is not None and (_is_int(value) or not all(_is_int(t) for t in value)):
                raise bad(name, "a list of token ids or None")
        stops = [self.stop_strings] if isinstance(self.stop_strings, str) else self.stop_strings
        if stops is not None and (not stops or not all(isinstance(s, str) and s for s in stops)):
            raise bad("stop_strings", "a non-empty string, a list of them, or None")

    # -- construction and files ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationConfig:
        """Fields by name; ``None`` values count as unset (transformers writes them so); other keys
        go to ``extra``."""
        names = _field_names()
        known = {k: v for k, v in data.items() if k in names and v is not None}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """The special tokens of a model config (ours or transformers'), every other field default."""
        return cls(**{name: getattr(config, name, None) for name in ("eos_token_id", "bos_token_id", "pad_token_id")
                      if getattr(config, name, None) is not None})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> GenerationConfig:
        """A checkpoint directory's ``generation_config.json`` (or that file's path). No file: the
        defaults, as when a checkpoint ships none."""
        file = Path(path)
        if file.is_dir():
            file = file / GENERATION_CONFIG_NAME
        if not file.exists():
            return cls()
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """Every field (and the ``extra`` keys), as transformers' ``to_dict`` gives them."""
        data = {name: getattr(self, name) for name in _field_names()}
        return {**self.extra, **data}

    def to_diff_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults, and the ``extra`` keys."""
        defaults = _DEFAULTS.to_dict()
        return {k: v for k, v in self.to_dict().items() if k not in defaults or v != defaults[k]}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``generation_config.json`` (non-default values only, as transformers writes it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_diff_dict(), indent=2, sort_keys=True) + "\n"
        (directory / GENERATION_CONFIG_NAME).write_text(text, encoding="utf-8")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(GenerationConfig)} - {"extra"}


_DEFAULTS = GenerationConfig()

# transformers generation settings generate does not implement, at values that change nothing
# (older transformers wrote them into every generation_config.json). Any other value is warned about.
_INERT_FOREIGN = {
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "num_beam_groups": 1, "diversity_penalty": 0.0, "guidance_scale": 1.0,
    "remove_invalid_values": False, "renormalize_logits": False, "token_healing": False,
}


def _stated_settings(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the fields ``config`` sets, its other keys). Ours sets what differs from the defaults; a
    transformers ``GenerationConfig`` (read through ``to_dict()``) sets what is not ``None``."""
    if isinstance(config, GenerationConfig):
        names = _field_names()
        diff = config.to_diff_dict()
        return {k: v for k, v in diff.items() if k in names}, dict(config.extra)
    data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    names = _field_names()
    known = {k: v for k, v in data.items() if k in names and v is not None}
    return known, {k: v for k, v in data.items() if k not in names}


def resolve_generation_config(model, generation_config: Any = None, **overrides: Any) -> GenerationConfig:
    """transformers' precedence: explicit keyword arguments > ``generation_config`` > the model's
    ``generation_config`` > its config's special tokens > the defaults. A keyword passed as ``None``
    is set to ``None`` (``top_k=None`` turns top-k off, as in transformers)."""
    settings = GenerationConfig.from_model_config(model.config).to_diff_dict()
    foreign: dict[str, Any] = {}
    for layer in (getattr(model, "generation_config", None), generation_config):
        if layer is not None:
            known, unknown = _stated_settings(layer)
            settings.update(known)
            foreign.update(unknown)
    settings.update(overrides)
    acted_on = sorted(k for k, v in foreign.items() if not k.startswith("_") and k != "transformers_version"
                      and v is not None and _INERT_FOREIGN.get(k, object()) != v)
    if acted_on:
        warnings.warn(f"generate ignores generation settings it does not implement: {', '.join(acted_on)}",
                      stacklevel=3)
    return GenerationConfig(**settings)


# -- logits processors -----------------------------------------------------------------------------

# One step's processing: (sequence so far (B, t), scores (B, V)) -> new scores (B, V), out of place.
Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")


def build_logits_processors(
    config: GenerationConfig,
    *,
    eos: Sequence[int],
    vocab_size: int,
    prompt_length: int,
    min_length: int,
    penalty_skip: torch.Tensor | None,
    device: torch.device | str,
) -> list[Processor]:
    """The processors ``config`` asks for, in the order transformers applies them (so the scores
    match its ``output_scores``): repetition penalty, no-repeat n-grams, bad words, minimum length,
    suppressed tokens, suppressed first tokens, then (sampling only) temperature, top-k, top-p,
    min-p. One not asked for is not in the list, so it costs nothing.

    ``prompt_length`` is the length of the sequence the first step sees (``begin_suppress_tokens``
    applies there); ``min_length`` the sequence length below which EOS is banned (``min_length``
    and ``min_new_tokens`` resolved into one); ``penalty_skip`` (B,) the leading positions of each
    row the repetition penalty ignores (its left padding, as transformers does), or ``None``.
    """
    processors: list[Processor] = []
    eos_t = torch.tensor(list(eos), dtype=torch.long, device=device)
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(_repetition_penalty(config.repetition_penalty, vocab_size, penalty_skip))
    if config.no_repeat_ngram_size:
        n = config.no_repeat_ngram_size
        processors.append(lambda seq, scores: ban_repeated_ngrams(seq, scores, n))
    if config.bad_words_ids is not None:
        ban = _bad_words(config.bad_words_ids, eos, vocab_size, device)
        if ban is not None:
            processors.append(ban)
    if min_length > prompt_length and len(eos):
        processors.append(lambda seq, scores: scores.index_fill(1, eos_t, NEG_INF)
                          if seq.shape[1] < min_length else scores)
    if config.suppress_tokens is not None:
        banned = _token_ids(config.suppress_tokens, vocab_size, device)
        processors.append(lambda seq, scores: scores.index_fill(1, banned, NEG_INF))
    if config.begin_suppress_tokens is not None:
        first = _token_ids(config.begin_suppress_tokens, vocab_size, device)
        processors.append(lambda seq, scores: scores.index_fill(1, first, NEG_INF)
                          if seq.shape[1] == prompt_length else scores)
    if config.do_sample:
        t, k, p, m = config.temperature, config.top_k, config.top_p, config.min_p
        if (t is not None and t != 1.0) or k or (p is not None and p < 1.0) or m is not None:
            processors.append(lambda seq, scores: warp_for_sampling(scores, t, k, p, m))
    return processors


def _repetition_penalty(penalty: float, vocab_size: int, skip: torch.Tensor | None) -> Processor:
    if skip is None:
        return lambda seq, scores: apply_repetition_penalty(scores, seq, penalty)

    def penalize(seq: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(seq.shape[1], device=seq.device)
        return apply_repetition_penalty(scores, seq.masked_fill(positions < skip[:, None], vocab_size), penalty)

    return penalize


def ban_repeated_ngrams(seq: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Ban each token that would complete an n-gram already in the row. Only an n-gram whose first
    n-1 tokens equal the row's last n-1 can be completed, so that suffix is compared against every
    window at once, on the device."""
    t = seq.shape[1]
    if t < n:
        return scores
    vocab = scores.shape[-1]
    windows = seq.unfold(1, n, 1)  # (B, t-n+1, n)
    matches = (windows[..., :-1] == seq[:, t - n + 1:].unsqueeze(1)).all(dim=-1)
    # Windows that don't match go to a spare column past the vocabulary.
    banned = torch.zeros(seq.shape[0], vocab + 1, dtype=torch.bool, device=seq.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1], vocab), True)
    return scores.masked_fill(banned[:, :vocab], NEG_INF)


def _bad_words(bad_words_ids: Sequence[Sequence[int]], eos: Sequence[int], vocab_size: int,
               device: torch.device | str) -> Processor | None:
    """A single-token bad word is always banned; a longer one bans its last token whenever the row
    ends with the rest. EOS alone is never a bad word (transformers drops it)."""
    words = [tuple(w) for w in bad_words_ids if not (len(w) == 1 and w[0] in eos)]
    out_of_range = sorted({t for w in words for t in w if t >= vocab_size})
    if out_of_range:
        raise ValueError(f"bad_words_ids has token ids {out_of_range} outside the vocabulary (size {vocab_size})")
    if not words:
        return None
    always = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    always[[w[0] for w in words if len(w) == 1]] = True
    by_prefix_length: dict[int, list[tuple[int, ...]]] = {}
    for w in words:
        if len(w) > 1:
            by_prefix_length.setdefault(len(w) - 1, []).append(w)
    groups = [(torch.tensor([w[:-1] for w in ws], device=device), torch.tensor([w[-1] for w in ws], device=device))
              for ws in by_prefix_length.values()]

    def ban(seq: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        banned = always.expand_as(scores)
        for prefixes, last in groups:  # prefixes (G, k), last (G,)
            k = prefixes.shape[1]
            if k > seq.shape[1]:
                continue
            hit = (seq[:, None, -k:] == prefixes).all(dim=-1)  # (B, G)
            extra = torch.zeros(seq.shape[0], vocab_size + 1, dtype=torch.bool, device=seq.device)
            extra.scatter_(1, torch.where(hit, last, vocab_size), True)
            banned = banned | extra[:, :vocab_size]
        return scores.masked_fill(banned, NEG_INF)

    return ban


def _token_ids(ids: Sequence[int], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    # Ids outside the vocabulary match no score, as in transformers.
    return torch.tensor([i for i in ids if 0 <= i < vocab_size], dtype=torch.long, device=device)


# -- stop strings ----------------------------------------------------------------------------------


class StopStrings:
    """Ends a row once the token just generated completes one of the strings: the string occurs in
    the decoded text and ends inside that last token (a token may run past the string's end, and
    the string may start inside an earlier token or the prompt), as transformers'
    ``StopStringCriteria`` decides. Checking decodes text on the host, one sync per step, so it
    runs only when stop strings are asked for."""

    def __init__(self, stop_strings: str | Sequence[str], tokenizer: Any) -> None:
        self.strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        self.tokenizer = tokenizer
        # Enough tokens to hold the longest string even at one byte per token, plus one before it, so
        # a tokenizer dropping the first token's leading space cannot hide a match.
        self.window = 4 * max(len(s) for s in self.strings) + 1

    def __call__(self, seq: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """seq (B, t) -> (B,) bool: rows that a stop string ends now (finished rows are skipped)."""
        rows = seq[:, -self.window:].tolist()
        done = finished.tolist()
        hits = [not d and self._completes(row) for row, d in zip(rows, done)]
        return torch.tensor(hits, dtype=torch.bool, device=seq.device)

    def _completes(self, tokens: list[int]) -> bool:
        if not tokens:
            return False
        text = self.tokenizer.decode(tokens)
        before = len(self.tokenizer.decode(tokens[:-1]))
        return any(s in text[max(0, before - len(s) + 1):] for s in self.strings)


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
    ``static_decode_applies`` for the CPU.
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
