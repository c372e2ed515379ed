"""``mixtral chat``: a multi-turn conversation in the terminal, streamed token by token.

Each line read is a user turn; ``/reset`` forgets the conversation (keeping ``--system``), ``/exit``
or end of input quits. Piped stdin works the same way, so a conversation can be scripted; then only
the replies go to stdout, one per line, and notices go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TextIO

import torch

from ..demo import DEMO_NOTICE
from ..generation import TextStreamer
from ..perf import configure_threads
from ..serve.chat import fit_context
from .generate import load_for_cli, resolve_model


class _ReplyStreamer(TextStreamer):
    """Prints the reply as it comes and keeps its text for the conversation history."""

    def __init__(self, tokenizer, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.text = ""

    def on_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def _lines(stream: TextIO, interactive: bool, out: TextIO) -> Iterator[str]:
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                out.write("\n")
                return
        else:
            line = stream.readline()
            if not line:
                return
        yield line.rstrip("\n")


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Read user turns from ``stdin`` (a terminal or a pipe) and stream each reply to ``stdout``."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty() and stdout.isatty()
    configure_threads(args.threads)
    path = resolve_model(args.model)
    model, tokenizer = load_for_cli(path, args.dtype, args.quantize)
    if args.model is None:
        print(DEMO_NOTICE, file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    budget = model.config.max_position_embeddings - args.max_new_tokens
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    if interactive:
        print("Chatting with the model. /reset starts over, /exit quits.", file=sys.stderr)
    for line in _lines(stdin, interactive, stdout):
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(system)
            print("[conversation reset]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        try:
            ids = fit_context(tokenizer, messages, budget)
        except ValueError as e:
            messages.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        if interactive:
            stdout.write("mixtral> ")
        streamer = _ReplyStreamer(tokenizer, stdout)
        try:
            model.generate(
                torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
                streamer=streamer, generator=generator,
            )
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            stdout.write("\n")
        messages.append({"role": "assistant", "content": streamer.text.strip()})
    return 0
