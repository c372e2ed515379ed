"""Load benchmark: N concurrent streaming clients against a running ``mixtral serve``.

    mixtral serve --model PATH --max-batch 8 &
    python bench/load.py --clients 8 --requests 64 --max-tokens 64

Each client sends its requests one after another (streamed chat completions, greedy unless
``--temperature``), so at most ``--clients`` are in flight. Reported: requests/s and output tokens/s
over the whole run, p50/p99 time to first token, and p50/p99 time per output token after the first
(each request's (last token time - first token time) / (tokens - 1)). Output token counts come from
the server's ``usage``. Only loopback servers are accepted: this is a benchmark, not a load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "Tell me a story about a fox.", "What is the capital of France?", "Explain mixture-of-experts models.",
    "Write a haiku about the sea.", "How do I sort a list in Python?", "Why is the sky blue?",
    "Give me three ideas for dinner.", "Summarize the plot of Hamlet.",
]
MAX_CLIENTS = 256


@dataclass
class Sample:
    ttft_s: float
    latency_s: float
    output_tokens: int
    tpot_s: float | None  # time per output token after the first; None for one-token replies


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, args) -> Sample:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message"))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and (chunk["choices"][0]["delta"].get("content") or
                                     chunk["choices"][0].get("finish_reason")):
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
    end = time.perf_counter()
    first = first if first is not None else end
    tpot = (last - first) / (tokens - 1) if tokens > 1 and last is not None else None
    return Sample(first - start, end - start, tokens, tpot)


async def run(args) -> dict:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), timeout=args.timeout, limits=limits) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        todo = list(range(args.requests))
        samples: list[Sample] = []
        errors: list[str] = []

        async def worker() -> None:
            while todo:
                i = todo.pop()
                try:
                    samples.append(await one_request(client, model, PROMPTS[i % len(PROMPTS)], args))
                except (httpx.HTTPError, RuntimeError) as e:
                    errors.append(str(e))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - start
    ttft = [s.ttft_s for s in samples]
    tpot = [s.tpot_s for s in samples if s.tpot_s is not None]
    out_tokens = sum(s.output_tokens for s in samples)
    return {
        "model": model, "clients": args.clients, "requests": len(samples), "errors": len(errors),
        "max_tokens": args.max_tokens, "wall_s": wall,
        "requests_per_s": len(samples) / wall, "output_tokens_per_s": out_tokens / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "tpot_p50_ms": percentile(tpot, 50) * 1e3, "tpot_p99_ms": percentile(tpot, 99) * 1e3,
        "first_error": errors[0] if errors else None,
        "samples": [asdict(s) for s in samples] if args.samples else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--model", help="model name (default: the server's first)")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=32, help="requests in total")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--samples", action="store_true", help="include per-request samples in the JSON")
    args = p.parse_args(argv)
    host = urlparse(args.base_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        p.error(f"--base-url must be a loopback address, got {host!r}")
    if not 1 <= args.clients <= MAX_CLIENTS or args.requests < 1 or args.max_tokens < 1:
        p.error(f"--clients must be in [1, {MAX_CLIENTS}]; --requests and --max-tokens at least 1")
    report = asyncio.run(run(args))
    print(f"{report['requests']} requests ({report['errors']} failed) from {args.clients} clients "
          f"in {report['wall_s']:.1f} s")
    print(f"  requests/s        {report['requests_per_s']:.2f}")
    print(f"  output tokens/s   {report['output_tokens_per_s']:.1f}")
    print(f"  TTFT p50 / p99    {report['ttft_p50_ms']:.1f} / {report['ttft_p99_ms']:.1f} ms")
    print(f"  per token p50/p99 {report['tpot_p50_ms']:.1f} / {report['tpot_p99_ms']:.1f} ms")
    if report["first_error"]:
        print(f"  first error: {report['first_error']}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
