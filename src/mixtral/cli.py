"""The ``mixtral`` command. Each subcommand's work lives in its own module; this file only parses."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def resolve_model(path: str | None) -> Path:
    """``--model`` or, when absent, the demo model (fetched and converted on first use)."""
    if path:
        return Path(path)
    from .demo import ensure_demo_model

    return ensure_demo_model()


def load_for_cli(path: Path, dtype: str | None = "float32", quantize: str | None = None, device: str = "cpu"):
    from . import MixtralForCausalLM, Tokenizer

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


def decode_cache_for(model) -> str | None:
    """On CUDA, decode as a captured graph (``cache_implementation="static"``) when the model allows
    it (Triton installed, SiLU experts: ``graph_unsafe_modules``); otherwise step by step."""
    if model.device.type != "cuda":
        return None
    from .kernels import triton_available
    from .kernels.cuda_graph import graph_unsafe_modules

    return "static" if triton_available() and not graph_unsafe_modules(model) else None


def cmd_generate(args: argparse.Namespace) -> int:
    from .perf import configure_threads

    configure_threads(args.threads)
    device = resolve_device(args.device)
    path = resolve_model(args.model)
    model, tok = load_for_cli(path, args.dtype, args.quantize, device)
    if args.model is None:
        from .demo import DEMO_NOTICE

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

    def __init__(self, tokenizer, **kwargs) -> None:
        from .generation import TextStreamer

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


def _bounded(kind: type, low: float, *, inclusive: bool = True, multiple: int | None = None):
    """An argparse ``type`` that parses ``kind`` and refuses values below ``low`` (or equal to it when
    not ``inclusive``) or not a multiple of ``multiple``: a bad number is a usage error naming the
    option, not a traceback from deep inside (``--threads 0``) or a silently different run
    (``--temperature -1`` running greedy)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value < low or (not inclusive and value == low) or value != value:  # (value != value: NaN)
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {text}")
        if multiple and value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


POSITIVE_INT = _bounded(int, 1)
NON_NEGATIVE = _bounded(float, 0.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixtral", description="Run, convert, quantize and serve Mixtral models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="checkpoint directory, .gguf file or hub id (default: the demo model)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--quantize", choices=["int8", "int4"], help="quantize weights at load time")
        p.add_argument("--threads", type=POSITIVE_INT, help="CPU threads (default: physical cores)")

    g = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    model_args(g)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when a GPU is visible (bf16, decode as a CUDA graph), else CPU")
    g.set_defaults(dtype=None)  # per device: float32 on the CPU, bfloat16 on CUDA
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=POSITIVE_INT, default=128)
    g.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat in the terminal (reads piped stdin too)")
    model_args(c)
    c.add_argument("--system", help="system prompt")
    c.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256)
    c.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 = greedy")
    c.add_argument("--top-p", type=float)
    c.add_argument("--seed", type=int)
    c.set_defaults(func=lambda a: _lazy("mixtral.serve.chat", "run_chat")(a))

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=POSITIVE_INT, default=8)
    s.add_argument("--max-context", type=_bounded(int, 2),
                   help="tokens per request, prompt + output (default: model's)")
    s.add_argument("--served-model-name", help="the name clients use (default: the directory name)")
    s.set_defaults(func=lambda a: _lazy("mixtral.serve.server", "run_serve")(a))

    b = sub.add_parser("bench", help="prefill/decode throughput, time to first token, peak memory")
    model_args(b)
    b.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,4,16")
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--gen-len", type=int, default=128)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--json", help="also write the results as JSON to this file")
    b.set_defaults(func=lambda a: _lazy("mixtral.serve.bench", "run_bench")(a))

    conv = sub.add_parser("convert", help="convert between checkpoint formats")
    csub = conv.add_subparsers(dest="format", required=True)
    cm = csub.add_parser("mistral", help="raw Mistral release (params.json + consolidated.*) -> HF layout")
    cm.add_argument("src")
    cm.add_argument("dst")
    cm.add_argument("--max-shard-size", default="5GB")
    cm.set_defaults(func=lambda a: _lazy("mixtral.checkpoint.mistral", "run_convert")(a), output=("src", True))
    cg = csub.add_parser("gguf", help="llama.cpp GGUF -> HF layout")
    cg.add_argument("src")
    cg.add_argument("dst")
    cg.add_argument("--max-shard-size", default="5GB")
    cg.set_defaults(func=lambda a: _lazy("mixtral.checkpoint.gguf", "run_convert")(a), output=("src", True))
    ct = csub.add_parser("to-gguf", help="HF layout -> llama.cpp GGUF")
    ct.add_argument("src")
    ct.add_argument("dst")
    ct.add_argument("--type", default="F16", choices=["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
    ct.set_defaults(func=lambda a: _lazy("mixtral.checkpoint.gguf", "run_export")(a), output=("src", False))

    u = sub.add_parser("upcycle", help="dense Llama/Mistral checkpoint -> Mixtral with copied experts")
    u.add_argument("dense")
    u.add_argument("dst")
    u.add_argument("--experts", type=int, default=8)
    u.add_argument("--top-k", type=int, default=2)
    u.add_argument("--noise", type=float, default=0.0, help="std of noise added to each expert copy")
    u.add_argument("--seed", type=int, default=0)
    u.set_defaults(func=lambda a: _lazy("mixtral.checkpoint.upcycle", "run_upcycle")(a), output=("dense", True))

    q = sub.add_parser("quantize", help="weight-only int8/int4 quantization of a checkpoint")
    q.add_argument("src")
    q.add_argument("dst")
    mode = q.add_mutually_exclusive_group(required=True)
    mode.add_argument("--int8", action="store_true")
    mode.add_argument("--int4", action="store_true")
    q.add_argument("--group-size", type=_bounded(int, 32, multiple=32),
                   help="int4 group size, a multiple of 32 (default 32, lowered where it does not divide the "
                        "input sizes); 32 keeps perplexity within 0.1%% on the demo model")
    q.add_argument("--lm-head", action="store_true", help="also quantize the output head (always int8)")
    q.add_argument("--activations", choices=["int8", "fp32"], default="int8",
                   help="decode kernels round activations to int8 blocks (fast, default) or keep fp32 (exact)")
    q.set_defaults(func=lambda a: _lazy("mixtral.quant", "run_quantize")(a), output=("src", True))
    return parser


def _lazy(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint.loading import CheckpointError, check_output_path

    try:
        if getattr(args, "output", None):  # commands writing args.dst: refuse a bad one before the load
            source, directory = args.output
            check_output_path(Path(args.dst), [Path(getattr(args, source))], directory=directory,
                              replace=directory)  # directory outputs are replaced whole (write_atomically)
        return int(args.func(args) or 0)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # missing input, unwritable or full disk: the user's to fix, not a bug to trace
        where = e.filename or getattr(args, "dst", None)
        detail = e.strerror or str(e)
        print(f"error: {where}: {detail}" if where else f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
