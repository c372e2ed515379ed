"""The ``mixtral`` command. Each subcommand's work lives in its own module here; this file only parses.

``generate`` (``cli.generate``), ``chat`` (``cli.chat``), ``serve`` (``cli.serve``), ``bench``
(``cli.bench``), and the commands that write checkpoints, ``convert``, ``upcycle`` and ``quantize``
(``cli.convert``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoint.loading import CheckpointError, check_output_path
from . import bench, chat, convert, generate, serve


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
    for add in (_add_generate, _add_chat, _add_serve, _add_bench, _add_convert, _add_upcycle, _add_quantize):
        add(sub)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory, .gguf file or hub id (default: the demo model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", choices=["int8", "int4"], help="quantize weights at load time")
    p.add_argument("--threads", type=POSITIVE_INT, help="CPU threads (default: physical cores)")


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    _model_args(g)
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
    g.set_defaults(func=generate.cmd_generate)


def _add_chat(sub) -> None:
    c = sub.add_parser("chat", help="interactive multi-turn chat in the terminal (reads piped stdin too)")
    _model_args(c)
    c.add_argument("--system", help="system prompt")
    c.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256)
    c.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 = greedy")
    c.add_argument("--top-p", type=float)
    c.add_argument("--seed", type=int)
    c.set_defaults(func=chat.run_chat)


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=POSITIVE_INT, default=8)
    s.add_argument("--max-context", type=_bounded(int, 2),
                   help="tokens per request, prompt + output (default: model's)")
    s.add_argument("--served-model-name", help="the name clients use (default: the directory name)")
    s.set_defaults(func=serve.run_serve)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="prefill/decode throughput, time to first token, peak memory")
    _model_args(b)
    b.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,4,16")
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--gen-len", type=int, default=128)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--json", help="also write the results as JSON to this file")
    b.set_defaults(func=bench.run_bench)


def _add_convert(sub) -> None:
    # ``output``: (the argument naming the source, whether the output is a directory), for main's checks.
    conv = sub.add_parser("convert", help="convert between checkpoint formats")
    csub = conv.add_subparsers(dest="format", required=True)
    cm = csub.add_parser("mistral", help="raw Mistral release (params.json + consolidated.*) -> HF layout")
    cm.add_argument("src")
    cm.add_argument("dst")
    cm.add_argument("--max-shard-size", default="5GB")
    cm.set_defaults(func=convert.run_convert_mistral, output=("src", True))
    cg = csub.add_parser("gguf", help="llama.cpp GGUF -> HF layout")
    cg.add_argument("src")
    cg.add_argument("dst")
    cg.add_argument("--max-shard-size", default="5GB")
    cg.set_defaults(func=convert.run_convert_gguf, output=("src", True))
    ct = csub.add_parser("to-gguf", help="HF layout -> llama.cpp GGUF")
    ct.add_argument("src")
    ct.add_argument("dst")
    ct.add_argument("--type", default="F16", choices=["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
    ct.set_defaults(func=convert.run_export, output=("src", False))


def _add_upcycle(sub) -> None:
    u = sub.add_parser("upcycle", help="dense Llama/Mistral checkpoint -> Mixtral with copied experts")
    u.add_argument("dense")
    u.add_argument("dst")
    u.add_argument("--experts", type=int, default=8)
    u.add_argument("--top-k", type=int, default=2)
    u.add_argument("--noise", type=float, default=0.0, help="std of noise added to each expert copy")
    u.add_argument("--seed", type=int, default=0)
    u.set_defaults(func=convert.run_upcycle, output=("dense", True))


def _add_quantize(sub) -> None:
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
    q.set_defaults(func=convert.run_quantize, output=("src", True))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
