"""``mixtral serve``: the OpenAI-compatible server (``mixtral.serve.server``) over the batching engine."""

from __future__ import annotations

import argparse
import signal
import sys

from ..demo import DEMO_NOTICE
from ..perf import configure_threads
from ..serve.engine import Engine
from .generate import load_for_cli, resolve_model

SHUTDOWN_GRACE_S = 10.0  # on SIGINT/SIGTERM, in-flight requests get this long to finish, then are cancelled


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, start the engine, serve until SIGINT/SIGTERM."""
    import uvicorn

    from ..serve.server import create_app  # it imports fastapi, which the other commands need not load

    configure_threads(args.threads)
    path = resolve_model(args.model)
    model, tokenizer = load_for_cli(path, args.dtype, args.quantize)
    if args.model is None:
        print(DEMO_NOTICE, file=sys.stderr)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_context=args.max_context)
    name = args.served_model_name or path.resolve().name
    app = create_app(engine, name)
    print(f"serving '{name}' at http://{args.host}:{args.port}/v1 (max batch {engine.max_batch}, "
          f"context {engine.max_context})", file=sys.stderr, flush=True)
    # uvicorn installs its own SIGINT/SIGTERM handlers while it runs: it stops accepting, lets in-flight
    # requests finish for SHUTDOWN_GRACE_S, cancels the rest, then the lifespan hook stops the engine.
    # Afterwards it re-raises the signal against the handlers it found; these note it so that a clean
    # shutdown exits 0 instead of dying by the signal.
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, frame: caught.append(sig))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                    timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        print(f"stopped by {signal.Signals(caught[0]).name}", file=sys.stderr)
    return 0
