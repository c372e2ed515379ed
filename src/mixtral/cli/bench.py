"""``mixtral bench``: prefill and decode throughput, time to first token and peak memory per batch size.

Prompts are random token ids (the numbers depend on lengths, not content), decoded greedily for a
fixed number of steps with no early stop, through the same ``prefill`` and decode stepper
(``choose_stepper``) that the server's engine uses.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..cache import KVCache
from ..generation import choose_stepper, prefill
from ..perf import configure_threads
from .generate import load_for_cli, resolve_model


@dataclass
class BenchResult:
    batch: int
    prompt_len: int
    gen_len: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    ttft_s: float  # prefill plus sampling the first token
    peak_memory_mb: float  # CUDA: peak allocated on the device; CPU: the process's peak resident set


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


@torch.inference_mode()
def bench_one(model, batch: int, prompt_len: int, gen_len: int, seed: int = 0) -> tuple[float, float, float]:
    """One run: (prefill seconds, time to first token, decode seconds for gen_len - 1 steps)."""
    device = model.device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).to(device)
    cache = KVCache.for_model(model.config, batch, capacity=prompt_len + gen_len, dtype=model.dtype, device=device)
    stepper = choose_stepper(model)  # before the clock: packing the layers is set-up, not decode
    _sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, None, cache)
    _sync(device)
    t1 = time.perf_counter()
    token = logits.argmax(dim=-1)
    token.tolist()  # the first token reaches the host: that is when a client could see it
    t2 = time.perf_counter()
    cache = stepper.begin(cache)
    for _ in range(gen_len - 1):
        token = stepper.step(token, cache).argmax(dim=-1)
    token.tolist()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t0, t3 - t2


def run_benchmarks(model, batches: list[int], prompt_len: int, gen_len: int, repeats: int = 1) -> list[BenchResult]:
    if prompt_len < 1 or gen_len < 1 or repeats < 1:
        raise ValueError("--prompt-len, --gen-len and --repeats must be at least 1")
    if prompt_len + gen_len > model.config.max_position_embeddings:
        raise ValueError(f"--prompt-len + --gen-len exceeds the model's context "
                         f"({model.config.max_position_embeddings} tokens)")
    device = model.device
    bench_one(model, 1, min(prompt_len, 8), 2)  # warm-up: first-call allocations and kernel selection
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = []
    for batch in batches:
        runs = [bench_one(model, batch, prompt_len, gen_len, seed=r) for r in range(repeats)]
        prefill_s = statistics.median(r[0] for r in runs)
        ttft_s = statistics.median(r[1] for r in runs)
        decode_s = statistics.median(r[2] for r in runs)
        decode_tps = batch * (gen_len - 1) / decode_s if gen_len > 1 else float("nan")
        results.append(BenchResult(batch, prompt_len, gen_len, batch * prompt_len / prefill_s, decode_tps, ttft_s,
                                   _peak_memory_mb(device)))
    return results


def print_table(results: list[BenchResult], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in ("batch", "prompt", "gen", "prefill tok/s", "decode tok/s", "TTFT ms", "peak MiB"):
        table.add_column(name, justify="right")
    for r in results:
        table.add_row(str(r.batch), str(r.prompt_len), str(r.gen_len), f"{r.prefill_tokens_per_s:,.1f}",
                      f"{r.decode_tokens_per_s:,.1f}", f"{r.ttft_s * 1e3:,.1f}", f"{r.peak_memory_mb:,.0f}")
    Console().print(table)


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch must be comma-separated integers, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch sizes must be >= 1, got {text!r}")
    return batches


def run_bench(args) -> int:
    threads = configure_threads(args.threads)
    batches = parse_batches(args.batch)
    path = resolve_model(args.model)
    model, _ = load_for_cli(path, args.dtype, args.quantize)
    model.eval()
    results = run_benchmarks(model, batches, args.prompt_len, args.gen_len, args.repeats)
    device = model.device
    where = f"{device.type}, {threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print_table(results, f"{path.name} · {args.dtype}{' · ' + args.quantize if args.quantize else ''} · {where}")
    if args.json:
        report = {"model": str(path), "dtype": args.dtype, "quantize": args.quantize, "device": str(device),
                  "threads": threads, "torch": torch.__version__, "results": [asdict(r) for r in results]}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0
