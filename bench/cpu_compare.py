"""CPU decode/prefill speed and peak memory: ours vs transformers vs llama.cpp, same model, same threads.

    python bench/cpu_compare.py                      # demo model, 2 threads, 3 alternating rounds
    python bench/cpu_compare.py --model DIR --threads 2 --rounds 3 --new-tokens 128 --prefill 512
    python bench/cpu_compare.py --only ours-fp32,llama-F32
    python bench/cpu_compare.py --quality            # int8 greedy agreement, int4 perplexity

Every measurement runs in a fresh subprocess (so peak resident memory is its own), and the
implementations alternate round by round, so a noisy shared machine hits all of them alike;
the table shows medians over rounds and ratios to llama.cpp and transformers. llama.cpp runs through
llama-cpp-python (optional: ``pip install llama-cpp-python``) on GGUFs exported from the same
checkpoint by ``mixtral convert to-gguf``, written next to the checkpoint on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ["ours-fp32", "ours-int8", "ours-int4", "transformers-fp32", "llama-F32", "llama-Q8_0", "llama-Q4_1"]
PEERS = {"ours-fp32": "llama-F32", "ours-int8": "llama-Q8_0", "ours-int4": "llama-Q4_1"}

TEXT = (
    "The history of computing is a story of abstractions layered on abstractions. Early machines were "
    "programmed by rewiring panels; later, stored programs let the same hardware compute anything that "
    "could be written down as a sequence of instructions. Assemblers gave names to those instructions, "
    "compilers translated arithmetic expressions into them, and operating systems hid the details of "
    "disks, terminals and memory behind files and processes. Each layer made programmers more productive "
    "and each one cost some speed, which the next generation of hardware usually paid back. Today a "
    "language model running on a laptop rests on all of these layers at once: a tensor library written "
    "in C++, linear algebra kernels tuned for a particular processor, a Python interpreter orchestrating "
    "the whole computation, and a tokenizer that turns text into the integers the model actually sees. "
    "Whether such a program is fast depends less on the arithmetic, which modern processors do very "
    "quickly, than on how many bytes must move between memory and the cores for every word produced."
)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stored_mb(path: Path) -> float:
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 1e6


# -- one measurement (runs in a child process) -----------------------------------------------------

def measure(impl: str, model_dir: Path, threads: int, new_tokens: int, prefill_len: int) -> dict:
    import torch

    torch.manual_seed(0)
    prompt = torch.randint(100, 20000, (1, prefill_len))
    short = prompt[:, :16]
    if impl.startswith("llama-"):
        return measure_llama(gguf_path(model_dir, impl.split("-", 1)[1]), threads, new_tokens, prompt, short)
    torch.set_num_threads(threads)
    if impl.startswith("ours-"):
        from mixtral import MixtralForCausalLM
        from mixtral.cache import KVCache
        from mixtral.generation import choose_stepper, prefill

        mode = impl.split("-", 1)[1]
        path = quantized_path(model_dir, mode) if mode != "fp32" else model_dir
        model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32)  # the fp32 CPU paths, whatever was saved
        stored = stored_mb(path)

        def run_prefill(ids):
            cache = KVCache.for_model(model.config, 1, capacity=ids.shape[1] + new_tokens + 1)
            return prefill(model, ids, None, cache), cache

        stepper = choose_stepper(model)  # what generate and the server decode with

        def run_decode(logits, cache, n):
            tok = logits.argmax(-1)
            for _ in range(n):
                tok = stepper.step(tok, cache).argmax(-1)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        stored = stored_mb(model_dir)

        def run_prefill(ids):
            out = model(ids, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1], out.past_key_values

        def run_decode(logits, cache, n):
            tok = logits.argmax(-1)
            for _ in range(n):
                out = model(tok[:, None], past_key_values=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1)

    with torch.inference_mode():
        logits, cache = run_prefill(short)  # warm-up: kernels built, caches touched
        run_decode(logits, cache, 4)
        t = time.perf_counter()
        run_prefill(prompt)
        prefill_s = time.perf_counter() - t
        logits, cache = run_prefill(short)
        t = time.perf_counter()
        run_decode(logits, cache, new_tokens)
        decode_s = time.perf_counter() - t
    return {"decode": new_tokens / decode_s, "prefill": prefill_len / prefill_s, "rss_mb": rss_mb(),
            "stored_mb": stored}


def measure_llama(path: Path, threads: int, new_tokens: int, prompt, short) -> dict:
    from llama_cpp import Llama

    llm = Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512, verbose=False)
    ptoks, stoks = prompt[0].tolist(), short[0].tolist()
    llm.eval(stoks)  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(ptoks)
    prefill_s = time.perf_counter() - t
    llm.reset()
    count, t = 0, None
    for _ in llm.generate(stoks, top_k=1, temp=0.0, reset=True):
        if t is None:  # the first token comes after the prompt's evaluation: start the clock there
            t = time.perf_counter()
            continue
        count += 1
        if count == new_tokens:
            break
    decode_s = time.perf_counter() - t
    return {"decode": new_tokens / decode_s, "prefill": len(ptoks) / prefill_s, "rss_mb": rss_mb(),
            "stored_mb": stored_mb(path)}


# -- artefacts -------------------------------------------------------------------------------------

def gguf_path(model_dir: Path, gtype: str) -> Path:
    path = model_dir / f"bench-{gtype}.gguf"
    if not path.exists():
        run([sys.executable, "-m", "mixtral.cli", "convert", "to-gguf", str(model_dir), str(path), "--type", gtype])
    return path


def quantized_path(model_dir: Path, mode: str) -> Path:
    path = model_dir / f"bench-{mode}"
    if not (path / "config.json").exists():
        import torch

        from mixtral import MixtralForCausalLM
        from mixtral.quant import quantize_model

        model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        # Group 32 for int4: the precision of llama.cpp's Q4_1 it is compared with.
        quantize_model(model, mode, group_size=32, lm_head=True)
        model.save_pretrained(path)
    return path


def run(cmd: list[str], env: dict | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


# -- quality ---------------------------------------------------------------------------------------

def quality(model_dir: Path, threads: int) -> None:
    import torch

    from mixtral import MixtralForCausalLM, Tokenizer
    from mixtral.cache import KVCache
    from mixtral.generation import choose_stepper, prefill

    torch.set_num_threads(threads)
    tok = Tokenizer.from_pretrained(model_dir)
    text_ids = torch.tensor([tok.encode(TEXT)])
    results = {}
    for mode in ("fp32", "int8", "int4"):
        model = MixtralForCausalLM.from_pretrained(model_dir if mode == "fp32" else quantized_path(model_dir, mode),
                                                   dtype=torch.float32)
        with torch.inference_mode():
            gens = [model.generate(torch.tensor([tok.encode(p)]), max_new_tokens=32)[0].tolist() for p in PROMPTS]
            # Perplexity twice: over the whole text at once (the prefill path: fp32 activations) and
            # token by token (the decode kernels: int8 activations for quantized weights).
            logits = model(text_ids).logits[0, :-1].float()
            ppl = float(torch.exp(torch.nn.functional.cross_entropy(logits, text_ids[0, 1:])))
            cache = KVCache.for_model(model.config, 1)
            steps = [prefill(model, text_ids[:, :1], None, cache)]
            stepper = choose_stepper(model)
            steps += [stepper.step(text_ids[:, t], cache) for t in range(1, text_ids.shape[1] - 1)]
            ppl_decode = float(torch.exp(torch.nn.functional.cross_entropy(torch.stack(steps, 1)[0], text_ids[0, 1:])))
        results[mode] = (gens, ppl, ppl_decode)
        del model
    fp_gens, fp_ppl, fp_ppl_decode = results["fp32"]
    for mode in ("int8", "int4"):
        gens, ppl, ppl_decode = results[mode]
        same = [next((i for i, (a, b) in enumerate(zip(g, f)) if a != b), len(g)) for g, f in zip(gens, fp_gens)]
        plen = [len(tok.encode(p)) for p in PROMPTS]
        agree = [s - n for s, n in zip(same, plen)]
        print(f"{mode}: greedy tokens equal to fp32 for the first {agree} of 32 new tokens; "
              f"perplexity {ppl:.3f} vs fp32 {fp_ppl:.3f} ({100 * (ppl / fp_ppl - 1):+.2f}%) over the whole text, "
              f"{ppl_decode:.3f} vs {fp_ppl_decode:.3f} ({100 * (ppl_decode / fp_ppl_decode - 1):+.2f}%) "
              "token by token (decode kernels)")


# -- driver ----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="HF checkpoint directory (default: the demo model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--quality", action="store_true", help="int8 greedy agreement and int4 perplexity instead")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from mixtral.demo import ensure_demo_model

        args.model = ensure_demo_model()
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.threads, args.new_tokens, args.prefill)))
        return
    if args.quality:
        quality(args.model, args.threads)
        return
    impls = args.only.split(",") if args.only else IMPLS
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python not installed: skipping llama.cpp", file=sys.stderr)
        impls = [i for i in impls if not i.startswith("llama-")]
    for impl in impls:  # build artefacts before timing anything
        if impl.startswith("llama-"):
            gguf_path(args.model, impl.split("-", 1)[1])
        elif impl in ("ours-int8", "ours-int4"):
            quantized_path(args.model, impl.split("-", 1)[1])
    results: dict[str, list[dict]] = {i: [] for i in impls}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for r in range(args.rounds):
        for impl in impls:
            out = run([sys.executable, __file__, "--child", impl, "--model", str(args.model),
                       "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                       "--prefill", str(args.prefill)], env)
            results[impl].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {impl}: {results[impl][-1]}", file=sys.stderr, flush=True)
    med = {i: {k: statistics.median(x[k] for x in v) for k in v[0]} for i, v in results.items()}
    print(f"\n{args.model.name}, {args.threads} threads, {args.new_tokens} new tokens, prefill {args.prefill}, "
          f"medians of {args.rounds} alternating rounds\n")
    print("| implementation | decode tok/s | prefill tok/s | peak RSS MB | stored MB | RSS/stored | "
          "decode vs llama.cpp | decode vs transformers | prefill vs transformers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    hf = med.get("transformers-fp32")
    for impl, m in med.items():
        peer = med.get(PEERS.get(impl, ""))
        vs_llama = f"{m['decode'] / peer['decode']:.2f}x" if peer else ""
        vs_hf = f"{m['decode'] / hf['decode']:.2f}x" if hf else ""
        pf_hf = f"{m['prefill'] / hf['prefill']:.2f}x" if hf else ""
        print(f"| {impl} | {m['decode']:.1f} | {m['prefill']:.0f} | {m['rss_mb']:.0f} | {m['stored_mb']:.0f} | "
              f"{m['rss_mb'] / m['stored_mb']:.2f} | {vs_llama} | {vs_hf} | {pf_hf} |")


if __name__ == "__main__":
    main()
