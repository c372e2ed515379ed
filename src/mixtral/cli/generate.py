"""``mixtral generate``, and the loading every model-running command shares: which model
(``--model`` or the demo model), on which device, and how decode runs there."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..demo import DEMO_NOTICE, ensure_demo_model
from ..generation import TextStreamer
from ..generation.cuda_graph import graph_unsafe_modules
from ..kernels import triton_available
from ..model import MixtralForCausalLM
from ..perf import configure_threads
from ..tokenizer import Tokenizer


def resolve_model(path: str | None) -> Path:
    """``--model`` or, when absent, the demo model (fetched and converted on first use)."""
    if path:
        return Path(path)
    return ensure_demo_model()


def load_for_cli(path: Path, dtype: str | None = "float32", quantize: str | None = None,
                 device: str = "cpu") -> tuple[MixtralForCausalLM, Tokenizer]:
    if dtype is None:  # fp32 on the CPU (its bf16 products are slow there), bf16 on a GPU
        dtype = "bfloat16" if device == "cuda" else "float32"
    model = MixtralForCausalLM.from_pretrained(path, dtype=dtype, quantize=quantize, device=device)
    tokenizer = Tokenizer.from_pretrained(path)
    return model, tokenizer


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when a GPU is visible; asking for CUDA without one is an error, not a fallback."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
    return device


def decode_cache_for(model: MixtralForCausalLM) -> str | None:
    """On CUDA, decode as a captured graph (``cache_implementation="static"``) when the model allows
    it (Triton installed, SiLU experts: ``graph_unsafe_modules``); otherwise step by step."""
    if model.device.type != "cuda":
        return None
    return "static" if triton_available() and not graph_unsafe_modules(model) else None


def cmd_generate(args: argparse.Namespace) -> int:
    configure_threads(args.threads)
    device = resolve_device(args.device)
    path = resolve_model(args.model)
    model, tok = load_for_cli(path, args.dtype, args.quantize, device)
    if args.model is None:
        print(DEMO_NOTICE, file=sys.stderr)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_dict=False)
    else:
        ids = tok.encode(args.prompt)
    if not ids:
        raise SystemExit("error: the prompt encodes to no tokens")
    input_ids = torch.tensor([ids], device=device)
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = TimedStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    out = model.generate(
        input_ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p, top_k=args.top_k,
        streamer=streamer, generator=generator, cache_implementation=decode_cache_for(model),
    )
    elapsed = time.perf_counter() - start
    new = out.shape[1] - input_ids.shape[1]
    first = (streamer.first_token_at or time.perf_counter()) - start
    decode = (new - 1) / (elapsed - first) if new > 1 and elapsed > first else float("nan")
    print(f"[prompt {input_ids.shape[1]} tokens, generated {new} tokens, {new / elapsed:.1f} tokens/s "
          f"(first token after {first:.2f} s, then {decode:.1f} tokens/s)]")
    return 0


class TimedStreamer:
    """A TextStreamer that also notes when the first new token arrived (time to first token)."""

    def __init__(self, tokenizer: Tokenizer, **kwargs) -> None:
        self.inner = TextStreamer(tokenizer, **kwargs)
        self.first_token_at: float | None = None
        self._puts = 0

    def put(self, token_ids: torch.Tensor) -> None:
        self._puts += 1
        if self._puts == 2:  # the first put is the prompt
            self.first_token_at = time.perf_counter()
        self.inner.put(token_ids)

    def end(self) -> None:
        self.inner.end()
