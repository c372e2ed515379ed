"""Mixtral-8x7B on one GPU: our decode/prefill against the card's own ceilings and transformers.

    python bench/gpu.py                 # everything, ~5 min on an H100/H200; table + JSON
    python bench/gpu.py --quick         # fewer steps and batch sizes (a smoke run)
    python bench/gpu.py --tune-only     # the ceilings, then candidate block sizes (--tune-budget s),
                                        # each case also as weight GB/s against the copy bandwidth
    python bench/gpu.py --json out.json # write the results ($OUT/gpu_bench.json by default if $OUT is set)

What it does, in one process:
1. Ceilings: copy bandwidth (a 4 GiB device-to-device copy; read + write bytes) and the bf16
   matmul rate (8192^3). Every later figure is stated as a fraction of these two.
2. Builds Mixtral-8x7B-shaped weights directly on the device (random, std 0.02; no checkpoint).
   Format: bf16 when the card holds the 93 GB (H200), else int8 weight-only attention and experts
   (``mixtral.quant``'s format, 47 GB) -- the format is printed in the table.
3. Decode: prefill a 128-token prompt, then time graph-replayed decode steps (``GraphDecoder``,
   layers compiled by torch.compile; batch 1 also without) at batch 1/8/32/64. Roofline for a
   step = bytes that must be read (attention + lm_head weights, the experts actually routed to in
   each layer -- counted with a hook in one eager step -- and the KV cache) / copy bandwidth.
4. Prefill of 4096 tokens at batch 1: FLOPs of the expert and attention products / time, against
   the measured matmul rate.
5. transformers' MixtralForCausalLM (its default experts path, bf16, eager decode with its cache)
   with a reduced layer count beside ours holding its very weights, compared per layer; the
   relative error of our prompt logits against its logits checks the GPU path end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from mixtral import MixtralConfig, MixtralForCausalLM
from mixtral.cache import KVCache
from mixtral.checkpoint import from_state_dict
from mixtral.kernels.cuda_graph import GraphDecoder, StaticCache
from mixtral.kernels.fused_moe import fused_experts, fused_experts_quantized, quantized_linear
from mixtral.kernels.moe_configs import MoeConfig, get_config
from mixtral.quant import quantize_int4, quantize_int8, quantize_model

GiB = 1 << 30


def cuda_time(fn, iters: int, warmup: int = 2) -> float:
    """Mean seconds per call, by CUDA events around ``iters`` calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth() -> float:
    """Device-to-device copy of 4 GiB: bytes read + written per second."""
    src = torch.empty(4 * GiB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / cuda_time(lambda: dst.copy_(src), 10)


def matmul_rate(n: int = 8192) -> float:
    """bf16 (n x n) @ (n x n): FLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / cuda_time(lambda: a @ b, 20)


def build_model(config: MixtralConfig, fmt: str, device: str = "cuda") -> MixtralForCausalLM:
    """Random Mixtral on the device, nothing on the host: meta construction, then fill in place.

    int8/int4 are ``mixtral.quant``'s formats, made by its own ``quantize_model`` (which runs on
    meta tensors too): attention and experts quantized (int8 with fp32 per-row scales, int4 with
    fp16 scales and mins per group of 32); router, norms, embeddings and lm_head bf16 -- exactly
    what loading a ``mixtral quantize`` checkpoint gives."""
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
        for param in model.parameters():  # bf16 before allocating (fp32 Mixtral would be 187 GB)
            param.data = param.data.to(torch.bfloat16)
        if fmt != "bf16":
            quantize_model(model, fmt)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype == torch.int8:
                t.random_(-127, 128)
            elif t.dtype == torch.uint8:  # int4: two uniform nibbles a byte
                t.random_(0, 256)
            elif name.endswith(".scales"):
                # Weights of std ~0.02: uniform int8 has std ~73.3, a uniform nibble ~4.6 (min -7.5 scales).
                t.fill_(0.02 / 73.3 if t.dtype == torch.float32 else 0.02 / 4.6)
            elif name.endswith(".mins"):
                t.fill_(-7.5 * 0.02 / 4.6)
            elif "norm" in name:
                t.fill_(1.0)
            else:
                t.normal_(0, 0.02)
    model.model.reset_rotary(device)
    return model.eval()


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of expert weights per expert per layer, bytes of everything else read per token)."""
    layer = model.model.layers[0]
    experts = layer.mlp.experts
    per_expert = sum(t.numel() * t.element_size() for t in
                     list(experts.parameters()) + list(experts.buffers())) // experts.num_experts
    total_experts = per_expert * experts.num_experts * len(model.model.layers)
    everything = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    embed = model.model.embed_tokens.weight
    other = everything - total_experts - embed.numel() * embed.element_size()  # one embedding row read
    return per_expert, other


def experts_read(model, tokens: torch.Tensor, cache: KVCache) -> int:
    """Distinct experts routed to, summed over layers, in one eager decode step (a hook, with syncs)."""
    counts = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: counts.append(o[2].unique().numel()))
             for layer in model.model.layers]
    model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True)
    for h in hooks:
        h.remove()
    return sum(counts)


def bench_decode(model, batch: int, prompt: int, steps: int, bw: float, compile: bool = True) -> dict:
    config = model.config
    capacity = prompt + steps + 8
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device="cuda")
    static = StaticCache(config, batch, capacity, torch.bfloat16, "cuda")
    t0 = time.perf_counter()
    decoder = GraphDecoder(model, static, compile=compile)
    capture_s = time.perf_counter() - t0
    cache = KVCache.for_model(config, batch, capacity=capacity, dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    tok = logits.argmax(-1)
    static.load(cache)
    read = experts_read(model, tok, cache)  # advances the eager cache only
    per_expert, other = weight_bytes(model)
    kv_bytes = sum(t.numel() * t.element_size() for t in static.k + static.v)
    step_bytes = other + read * per_expert + kv_bytes
    state = {"tok": tok}

    def step():
        state["tok"] = decoder.step(state["tok"])

    sec = cuda_time(step, steps, warmup=3)
    tok_s = batch / sec
    roof = batch * bw / step_bytes
    return dict(batch=batch, compiled=compile, step_ms=sec * 1e3, tok_s=tok_s, roofline_tok_s=roof,
                pct_roofline=100 * tok_s / roof,
                experts_read_per_layer=read / len(model.model.layers), step_gb=step_bytes / 1e9,
                capture_s=capture_s)


def bench_prefill(model, T: int, flops_rate: float) -> dict:
    config = model.config
    ids = torch.randint(0, config.vocab_size, (1, T), device="cuda")

    def run():
        cache = KVCache.for_model(config, 1, capacity=T, dtype=torch.bfloat16, device="cuda")
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

    sec = cuda_time(run, 3, warmup=1)
    H, I, L, K = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_experts_per_tok
    nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.dim_per_head
    expert = T * K * 2 * (H * 2 * I + I * H)
    proj = T * 2 * H * (nh * hd + 2 * nkv * hd + nh * hd)
    span = T if config.sliding_window is None else min(T, config.sliding_window)
    scores = 2 * 2 * nh * hd * T * span / 2  # QK^T and PV, causal half
    flops = L * (expert + proj + scores)
    return dict(tokens=T, seconds=sec, tok_s=T / sec, tflops=flops / sec / 1e12,
                pct_matmul=100 * flops / sec / flops_rate)


def bench_transformers(layers: int, batch: int, steps: int) -> dict | None:
    """transformers' MixtralForCausalLM (its default experts path, bf16, eager decode with its
    cache) and ours holding its very weights (``from_state_dict``), side by side with the same layer
    count: per-layer decode time, and how far our logits are from its logits on one prompt."""
    try:
        import transformers
    except ImportError:
        return None
    hcfg = transformers.MixtralConfig(num_hidden_layers=layers)
    with torch.device("cuda"):
        hm = transformers.MixtralForCausalLM(hcfg).to(torch.bfloat16).eval()
    ours = from_state_dict(MixtralForCausalLM, hm.state_dict(), MixtralConfig(num_hidden_layers=layers),
                           dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, hcfg.vocab_size, (batch, 128), device="cuda")
    out = hm(input_ids=ids, use_cache=True)
    want = out.logits[:, -1].float()
    got = ours(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
    rel_err = ((got - want).norm() / want.norm()).item()
    state = {"tok": want.argmax(-1), "cache": out.past_key_values}

    def step():
        o = hm(input_ids=state["tok"][:, None], past_key_values=state["cache"], use_cache=True)
        state["tok"] = o.logits[:, -1].argmax(-1)

    hf_sec = cuda_time(step, steps)
    ours_sec = bench_decode(ours, batch, 128, steps, 1.0)["step_ms"] / 1e3
    return dict(layers=layers, batch=batch, hf_ms_per_layer=hf_sec * 1e3 / layers,
                ours_ms_per_layer=ours_sec * 1e3 / layers, speedup=hf_sec / ours_sec,
                prompt_logits_rel_err=rel_err)


def _as_dict(c) -> dict:
    """A config, or a (gate_up, down) pair of them, for the JSON."""
    return c._asdict() if isinstance(c, MoeConfig) else {"gate_up": c[0]._asdict(), "down": c[1]._asdict()}


def _best(name: str, current, candidates, run, deadline: float) -> dict:
    """Time ``current`` (the table's entry, or its (gate_up, down) pair) first, then candidates
    until ``deadline``."""
    timed = {}
    for c in [current] + [c for c in candidates if c != current]:
        if c is not current and time.perf_counter() > deadline:
            break
        try:
            timed[c] = cuda_time(lambda c=c: run(c), 10)
        except Exception as exc:  # e.g. out of shared memory for a large tile
            print(f"  skip {c}: {type(exc).__name__}")
    best = min(timed, key=timed.get)
    print(f"tune {name}: table {timed.get(current, float('nan')) * 1e6:.1f} us, best {best} "
          f"{timed[best] * 1e6:.1f} us ({len(timed)}/{len(candidates) + 1} tried)")
    return dict(case=name, table=_as_dict(current), table_us=timed.get(current, float("nan")) * 1e6,
                best=_as_dict(best), us=timed[best] * 1e6, tried=len(timed), candidates=len(candidates) + 1)


def _streamed(row: dict, weight_bytes: int, bw: float) -> dict:
    """A tuning row with the weight bytes the call must read, as GB/s and % of copy bandwidth: for
    decode sizes, how close the kernels come to streaming at the card's rate (kernels.md predicts
    bf16 and int8 near it, int4 at no more than ~50-60%: instruction bound)."""
    for key in ("table", "best"):
        us = row["table_us" if key == "table" else "us"]
        row[f"{key}_gb_s"] = weight_bytes / us / 1e3
        row[f"{key}_pct_copy"] = 100 * weight_bytes / (us * 1e-6) / bw
    row["weight_mb"] = weight_bytes / 1e6
    print(f"  reads {weight_bytes / 1e6:.0f} MB: table {row['table_gb_s']:.0f} GB/s ({row['table_pct_copy']:.0f}% of "
          f"copy), best {row['best_gb_s']:.0f} GB/s ({row['best_pct_copy']:.0f}%)")
    return row


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def tune(fmt: str, budget_s: float, bw: float) -> list[dict]:
    """Time candidate block sizes for one layer's experts (and, for int8, the attention
    projections) in the benchmark's format, within ``budget_s`` seconds: the table's current
    entry first, so each row says what tuning would gain. Rows are for ``moe_configs``; each also
    gives the weight bytes read per call against the copy bandwidth ``bw``."""
    deadline = time.perf_counter() + budget_s
    E, H, I = 8, 4096, 14336
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02
    if fmt == "bf16":
        experts = lambda x, ids, w, c: fused_experts(x, ids, w, w13, w2, config=c)  # noqa: E731
        per_expert = _nbytes([w13, w2]) // E
    else:
        quantize = quantize_int8 if fmt == "int8" else lambda t: quantize_int4(t, 32)
        up, down = quantize(w13), quantize(w2)
        del w13, w2
        experts = lambda x, ids, w, c: fused_experts_quantized(x, ids, w, up, down, config=c)  # noqa: E731
        per_expert = _nbytes(up + down) // E  # weights, scales and mins
    decode = [MoeConfig(16, n, k, w, s) for n in (32, 64, 128) for k in (64, 128, 256) for w in (4, 8)
              for s in (3, 4)]
    prefill = [MoeConfig(m, n, k, w, s) for m in (64, 128) for n in (64, 128) for k in (32, 64) for w in (4, 8)
               for s in (3, 4)]
    rows = []
    for N in (1, 8, 32, 64, 4096):
        x = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
        ids = torch.rand(N, E, device="cuda").topk(2, dim=-1).indices
        w = torch.full((N, 2), 0.5, device="cuda")
        fits = decode if N <= 64 else prefill
        if N <= 8:  # few programs in the down product: try splitting its K (I) two and four ways
            fits = fits + [c._replace(split_k=sk) for c in fits for sk in (2, 4)]
        # The table's (gate_up, down) pair first, as the model would run it; candidates use one
        # config for both products (they share block_m anyway).
        current = (get_config("gate_up", fmt, N, 2, E, 2 * I, H), get_config("down", fmt, N, 2, E, H, I))
        row = _best(f"{fmt} experts N={N}", current, fits, lambda c, x=x, ids=ids, w=w: experts(x, ids, w, c),
                    deadline)
        rows.append(_streamed(row, ids.unique().numel() * per_expert, bw))
    if fmt != "bf16":
        for out in (6144, 4096):  # q|k|v and o
            stored = quantize(torch.randn(out, H, device="cuda") * 0.02)
            for N in (1, 8, 64):
                x = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
                current = get_config("linear", fmt, N, 1, 1, out, H)
                row = _best(f"{fmt} linear {out}x{H} N={N}", current, decode,
                            lambda c, x=x, w=stored: quantized_linear(x, w, config=c), deadline)
                rows.append(_streamed(row, _nbytes(stored), bw))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tune", action="store_true", help="also time candidate block sizes (before the rest)")
    p.add_argument("--tune-only", action="store_true", help="the ceilings and the tuning, nothing else")
    p.add_argument("--tune-budget", type=float, default=420, help="seconds the tuning may take (default 420)")
    p.add_argument("--format", choices=("auto", "bf16", "int8", "int4"), default="auto",
                   help="auto: bf16 where the card holds 93 GB (H200), else int8 (mixtral.quant's formats)")
    p.add_argument("--layers", type=int, default=32, help="layers of our full model (32 = Mixtral-8x7B)")
    p.add_argument("--hf-layers", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="capture the eager decode step only")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    props = torch.cuda.get_device_properties(0)
    fmt = args.format
    if fmt == "auto":
        fmt = "bf16" if props.total_memory > 120 * GiB else "int8"
    results: dict = dict(device=props.name, memory_gib=props.total_memory / GiB, format=fmt,
                         torch=torch.__version__)
    import triton

    results["triton"] = triton.__version__
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else None)

    def save() -> None:  # after every stage, so a run cut short still leaves what it measured
        if path:
            with open(path, "w") as f:
                json.dump(results, f, indent=2)

    bw, mm = copy_bandwidth(), matmul_rate()
    torch.cuda.empty_cache()
    results.update(copy_gb_s=bw / 1e9, bf16_tflops=mm / 1e12)
    print(f"{props.name}: copy {bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s, format {fmt}")
    save()

    if args.tune or args.tune_only:
        results["tune"] = tune(fmt, args.tune_budget, bw)
        torch.cuda.empty_cache()
        save()
        if args.tune_only:
            return

    with torch.inference_mode():
        if not args.quick:
            results["transformers"] = bench_transformers(args.hf_layers, 1, 16)
            print("transformers vs ours, per layer:", results["transformers"])
            save()
        model = build_model(MixtralConfig(num_hidden_layers=args.layers), fmt)
        results["weights_gb"] = sum(t.numel() * t.element_size()
                                    for t in list(model.parameters()) + list(model.buffers())) / 1e9
        batches = (1, 8) if args.quick else (1, 8, 32, 64)
        results["decode"] = []
        steps = 16 if args.quick else 64
        # Batch 1 both ways: what torch.compile's fusion of the small ops is worth inside the graph.
        runs = [(b, c) for b in batches for c in ((False, True) if b == 1 else (True,))]
        compile_ok = not args.no_compile
        for b, compiled in runs:
            if compiled and not compile_ok:
                continue
            try:
                r = bench_decode(model, b, 128, steps, bw, compile=compiled)
            except Exception as exc:  # record and go on with the eager-captured step
                results["compile_error"] = f"{type(exc).__name__}: {exc}"[:2000]
                print("compiled decode failed, continuing without it:", results["compile_error"])
                compile_ok = False
                if b != 1:
                    r = bench_decode(model, b, 128, steps, bw, compile=False)
                else:
                    continue
            results["decode"].append(r)
            print(f"decode b={b} compiled={r['compiled']}: {r['tok_s']:.1f} tok/s, {r['pct_roofline']:.0f}% of "
                  f"{r['roofline_tok_s']:.1f} (capture {r['capture_s']:.0f} s)")
            save()
        torch.cuda.empty_cache()
        results["prefill"] = bench_prefill(model, 1024 if args.quick else 4096, mm)
        print("prefill:", results["prefill"])
        save()

    print()
    print(f"| {props.name} | {fmt} | {args.layers} layers | copy {bw / 1e9:.0f} GB/s | "
          f"bf16 {mm / 1e12:.0f} TFLOP/s |")
    print("| run | tok/s | roofline tok/s | % of roofline |")
    print("|---|---:|---:|---:|")
    for r in results["decode"]:
        how = "compiled graph" if r["compiled"] else "eager graph"
        print(f"| decode batch {r['batch']}, {how} | {r['tok_s']:.1f} | {r['roofline_tok_s']:.1f} "
              f"| {r['pct_roofline']:.0f}% |")
    pf = results["prefill"]
    print(f"| prefill {pf['tokens']} | {pf['tok_s']:.0f} | - | {pf['pct_matmul']:.0f}% of matmul rate |")
    hf = results.get("transformers")
    if hf:
        print(f"| transformers ({hf['layers']} layers, bf16, batch 1) | {hf['hf_ms_per_layer']:.3f} ms/layer | "
              f"ours {hf['ours_ms_per_layer']:.3f} ms/layer | {hf['speedup']:.1f}x |")
        print(f"| our prompt logits vs transformers' (same weights, bf16) | rel. error "
              f"{hf['prompt_logits_rel_err']:.2e} | | |")
    if path:
        print("wrote", path)


if __name__ == "__main__":
    main()
