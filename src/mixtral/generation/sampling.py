"""Token choice: from one step's logits to the next token ids.

The sampling filters the server shares (``SamplingParams``, ``next_token``) come first; then the
logits processors ``generate`` builds from a ``GenerationConfig``, applied in transformers' order
so ``output_scores`` match; then stop strings. Everything here stays on the device (no host sync)
except the stop-string check, which decodes text.

Reading order: ``SamplingParams`` and the filters, ``next_token``, ``build_logits_processors`` and
the processors it uses, then ``StopStrings``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import GenerationConfig


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
