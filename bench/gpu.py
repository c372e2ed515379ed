"""Mixtral-8x7B on one GPU: our decode/prefill against the card's own ceilings and transformers.

    python bench/gpu.py                 # the stages below, most important first, within --budget s
    python bench/gpu.py --tune          # ... and candidate block sizes with the time left
    python bench/gpu.py --tune-only     # the ceilings, then candidate block sizes (--tune-budget s),
                                        # each case also as weight GB/s against the copy bandwidth
    python bench/gpu.py --smoke         # every stage on the CPU with a tiny model (a CI test runs it
                                        # under TRITON_INTERPRET=1): no device time goes to a typo
    python bench/gpu.py --json out.json # write the results ($OUT/gpu_bench.json by default if $OUT is set)

Why a budget: a lent GPU comes with 15 minutes of device time per task, its start included, so a
session gets one full call and perhaps a rerun. The stages run in order of what the GPU issue most
needs; one that would not fit in what is left of ``--budget`` is skipped (and says so), one that
fails is recorded and the rest go on, and the JSON is written after every stage with the seconds
each took, so a later call can be planned from those.

The stages, in one process:
1. Ceilings: copy bandwidth (a 4 GiB device-to-device copy; read + write bytes) and the bf16
   matmul rate (8192^3). Every later figure is stated as a fraction of these two.
2. Builds Mixtral-8x7B-shaped weights directly on the device (random, std 0.02; no checkpoint).
   Format: bf16 when the card holds the 93 GB (H200), else int8 weight-only attention and experts
   (``mixtral.quant``'s format, 47 GB) -- the format is printed in the table.
3. Decode at batch 1: prefill a 128-token prompt, then time graph-replayed decode steps
   (``GraphDecoder``, layers compiled by torch.compile). Roofline for a step = bytes that must be
   read (attention + lm_head weights, the experts actually routed to in each layer -- counted with
   a hook in one eager step -- and the KV cache) / copy bandwidth.
4. transformers' MixtralForCausalLM (its default experts path, bf16, eager decode with its cache)
   with a reduced layer count beside ours holding its very weights, compared per layer; the
   relative error of our prompt logits against its logits checks the GPU path end to end.
5. Prefill of 4096 tokens at batch 1: FLOPs of the expert and attention products / time, against
   the measured matmul rate.
6. Batch 1 captured without torch.compile (what the compiled fusion is worth), then batch 8/32/64.
7. With ``--tune``: candidate block sizes in the time left.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch

from mixtral import MixtralConfig, MixtralForCausalLM
from mixtral.cache import KVCache, StaticCache
from mixtral.generation.cuda_graph import GraphDecoder, decode_step, sample_on_device
from mixtral.kernels.fused_moe import fused_experts, fused_experts_quantized, quantized_linear
from mixtral.kernels.moe_configs import MoeConfig, get_config
from mixtral.loader import from_state_dict
from mixtral.quant import quantize_int4, quantize_int8, quantize_model

GiB = 1 << 30

# The smoke run's model: every stage's code on shapes the CPU (and Triton's interpreter) run in seconds.
SMOKE_CONFIG = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)


def per_call(fn, device, iters: int, warmup: int = 2) -> float:
    """Mean seconds per call over ``iters`` calls after ``warmup``: CUDA events around them when the
    work runs on a GPU, the wall clock otherwise (the smoke run, also on a GPU machine)."""
    for _ in range(warmup):
        fn()
    if torch.device(device).type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth(device: str, nbytes: int = 4 * GiB) -> float:
    """Device-to-device copy of ``nbytes``: bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    return 2 * src.numel() / per_call(lambda: dst.copy_(src), device, 10)


def matmul_rate(device: str, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """(n x n) @ (n x n) on random data: FLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / per_call(lambda: a @ b, device, 20)


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


class EagerDecoder:
    """The smoke run's stand-in for ``GraphDecoder`` (no graphs on a CPU): the same static-cache step,
    run eagerly, behind the same ``step(tokens) -> next tokens``."""

    def __init__(self, model, cache: StaticCache) -> None:
        self.model, self.cache = model, cache
        self.valid = torch.ones(cache.slot_valid.shape[0], dtype=torch.bool, device=cache.seen.device)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return sample_on_device(decode_step(self.model, self.cache, tokens, self.valid), 0.0, None)


def bench_decode(model, batch: int, prompt: int, steps: int, bw: float, compile: bool = True) -> dict:
    config, device = model.config, model.device
    capacity = prompt + steps + 8
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device=device)
    static = StaticCache(config, batch, capacity, model.dtype, device)
    t0 = time.perf_counter()
    decoder = GraphDecoder(model, static, compile=compile) if device.type == "cuda" else EagerDecoder(model, static)
    capture_s = time.perf_counter() - t0
    cache = KVCache.for_model(config, batch, capacity=capacity, dtype=model.dtype, device=device)
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

    sec = per_call(step, device, steps, warmup=3)
    tok_s = batch / sec
    roof = batch * bw / step_bytes
    graph = device.type == "cuda"
    return dict(batch=batch, graph=graph, compiled=compile and graph, step_ms=sec * 1e3, tok_s=tok_s,
                roofline_tok_s=roof, pct_roofline=100 * tok_s / roof,
                experts_read_per_layer=read / len(model.model.layers), step_gb=step_bytes / 1e9,
                capture_s=capture_s)


def prefill_flops(config: MixtralConfig, T: int) -> float:
    """FLOPs of a T-token prefill's matrix products: experts (top-k of them per token), attention
    projections, and the causal QK^T and PV products (over the window when there is one)."""
    H, I, L, K = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_experts_per_tok
    nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.dim_per_head
    expert = T * K * 2 * (H * 2 * I + I * H)
    proj = T * 2 * H * (nh * hd + 2 * nkv * hd + nh * hd)
    span = T if config.sliding_window is None else min(T, config.sliding_window)
    scores = 2 * 2 * nh * hd * T * span / 2  # QK^T and PV, causal half
    return L * (expert + proj + scores)


def bench_prefill(model, T: int, flops_rate: float) -> dict:
    config, device = model.config, model.device
    ids = torch.randint(0, config.vocab_size, (1, T), device=device)

    def run():
        cache = KVCache.for_model(config, 1, capacity=T, dtype=model.dtype, device=device)
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

    sec = per_call(run, device, 3, warmup=1)
    flops = prefill_flops(config, T)
    return dict(tokens=T, seconds=sec, tok_s=T / sec, tflops=flops / sec / 1e12,
                pct_matmul=100 * flops / sec / flops_rate)


def bench_transformers(config: MixtralConfig, batch: int, steps: int, device: str, compile: bool = True) -> dict | None:
    """transformers' MixtralForCausalLM (its default experts path, bf16, eager decode with its
    cache) and ours holding its very weights (``from_state_dict``), side by side with the same layer
    count (``config``'s): per-layer decode time, and how far our logits are from its logits on one
    prompt."""
    try:
        import transformers
    except ImportError:
        return None
    hcfg = transformers.MixtralConfig.from_dict(config.to_dict())
    with torch.device(device):  # made in bf16: an fp32 copy of even 2 layers is 12 GB beside our model
        hm = transformers.MixtralForCausalLM._from_config(hcfg, dtype=torch.bfloat16).eval()
    ours = from_state_dict(MixtralForCausalLM, hm.state_dict(), config, dtype=torch.bfloat16, device=device)
    prompt = min(128, config.max_position_embeddings // 4)
    ids = torch.randint(0, hcfg.vocab_size, (batch, prompt), device=device)
    out = hm(input_ids=ids, use_cache=True)
    want = out.logits[:, -1].float()
    got = ours(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
    rel_err = ((got - want).norm() / want.norm()).item()
    state = {"tok": want.argmax(-1), "cache": out.past_key_values}

    def step():
        o = hm(input_ids=state["tok"][:, None], past_key_values=state["cache"], use_cache=True)
        state["tok"] = o.logits[:, -1].argmax(-1)

    hf_sec = per_call(step, device, steps)
    ours_sec = bench_decode(ours, batch, prompt, steps, 1.0, compile)["step_ms"] / 1e3
    layers = config.num_hidden_layers
    return dict(layers=layers, batch=batch, transformers=transformers.__version__,
                experts_implementation=getattr(hm.config, "_experts_implementation", None),
                hf_ms_per_layer=hf_sec * 1e3 / layers, ours_ms_per_layer=ours_sec * 1e3 / layers,
                speedup=hf_sec / ours_sec, prompt_logits_rel_err=rel_err)


def _as_dict(c) -> dict:
    """A config, or a (gate_up, down) pair of them, for the JSON."""
    return c._asdict() if isinstance(c, MoeConfig) else {"gate_up": c[0]._asdict(), "down": c[1]._asdict()}


def _best(name: str, current, candidates, run, deadline: float, device: str, iters: int = 10) -> dict:
    """Time ``current`` (the table's entry, or its (gate_up, down) pair) first, then candidates
    until ``deadline``."""
    timed = {}
    for c in [current] + [c for c in candidates if c != current]:
        if c is not current and time.perf_counter() > deadline:
            break
        try:
            timed[c] = per_call(lambda c=c: run(c), device, iters, warmup=min(iters, 2))
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


def tune(fmt: str, budget_s: float, bw: float, config: MixtralConfig, device: str, smoke: bool = False) -> list[dict]:
    """Time candidate block sizes for one layer's experts (and, for int8/int4, the attention
    projections) of ``config`` in the benchmark's format, within ``budget_s`` seconds: the table's
    current entry first, so each row says what tuning would gain. Rows are for ``moe_configs``; each
    also gives the weight bytes read per call against the copy bandwidth ``bw``. ``smoke``: one
    candidate a case, one timed call each, and prefill at 80 tokens, for the interpreter."""
    deadline = time.perf_counter() + budget_s
    E, H, I, K = config.num_local_experts, config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter's dots run in fp32
    w13 = torch.randn(E, 2 * I, H, device=device, dtype=dtype) * 0.02
    w2 = torch.randn(E, H, I, device=device, dtype=dtype) * 0.02
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
    sizes, splits, iters = (1, 8, 32, 64, 4096), (2, 4), 10
    if smoke:
        decode, prefill, sizes, splits, iters = decode[:1], prefill[:1], (1, 80), (2,), 1
    rows = []
    for N in sizes:
        x = torch.randn(N, H, device=device, dtype=dtype)
        ids = torch.rand(N, E, device=device).topk(K, dim=-1).indices
        w = torch.full((N, K), 1 / K, device=device)
        fits = decode if N <= 64 else prefill
        if N <= 8:  # few programs in the down product: try splitting its K (I) two and four ways
            fits = fits + [c._replace(split_k=sk) for c in fits for sk in splits]
        # The table's (gate_up, down) pair first, as the model would run it; candidates use one
        # config for both products (they share block_m anyway).
        current = (get_config("gate_up", fmt, N, K, E, 2 * I, H), get_config("down", fmt, N, K, E, H, I))
        row = _best(f"{fmt} experts N={N}", current, fits, lambda c, x=x, ids=ids, w=w: experts(x, ids, w, c),
                    deadline, device, iters)
        rows.append(_streamed(row, ids.unique().numel() * per_expert, bw))
    if fmt != "bf16":
        qkv_out = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.dim_per_head
        for out, inp in ((qkv_out, H), (H, config.num_attention_heads * config.dim_per_head)):  # q|k|v and o
            stored = quantize(torch.randn(out, inp, device=device) * 0.02)
            for N in sizes[:1] if smoke else (1, 8, 64):
                x = torch.randn(N, inp, device=device, dtype=dtype)
                current = get_config("linear", fmt, N, 1, 1, out, inp)
                row = _best(f"{fmt} linear {out}x{inp} N={N}", current, decode,
                            lambda c, x=x, w=stored: quantized_linear(x, w, config=c), deadline, device, iters)
                rows.append(_streamed(row, _nbytes(stored), bw))
    return rows


class Stages:
    """Runs the benchmark's stages against one deadline and keeps the results.

    A stage that needs more than the time left is skipped and named in ``results["skipped"]``; one
    that raises is recorded in ``results["errors"]`` (its traceback printed) and the rest go on,
    unless ``strict`` (the smoke run, where any error is a bug to fix before a GPU sees it). After
    every stage the JSON is rewritten with what exists so far, including ``stage_s``: the seconds each
    stage took, which is what the next device call is planned from."""

    def __init__(self, budget_s: float, results: dict, path: str | None, strict: bool) -> None:
        self.deadline = time.perf_counter() + budget_s
        self.results, self.path, self.strict = results, path, strict
        results.update(budget_s=budget_s, stage_s={}, skipped={}, errors={})

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.results, f, indent=2)

    def run(self, name: str, need_s: float, fn):
        """``fn()`` if ``need_s`` (a rough guess of what the stage takes on an H100/H200) fits in the
        time left (0: always run); its result, or None when skipped or failed."""
        if need_s > 0 and self.left() < need_s:
            self.results["skipped"][name] = f"needs ~{need_s:.0f} s, {max(self.left(), 0):.0f} s left"
            print(f"skip {name}: {self.results['skipped'][name]}")
            self.save()
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:
            if self.strict:
                raise
            traceback.print_exc()
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            out = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.results["stage_s"][name] = round(time.perf_counter() - t0, 1)
        self.save()
        return out


def print_table(results: dict) -> None:
    print()
    print(f"| {results['device']} | {results['format']} | {results['layers']} layers | copy "
          f"{results.get('copy_gb_s', float('nan')):.0f} GB/s | bf16 {results.get('bf16_tflops', float('nan')):.0f} "
          "TFLOP/s |")
    print("| run | tok/s | roofline tok/s | % of roofline |")
    print("|---|---:|---:|---:|")
    for r in results.get("decode", []):
        how = "compiled graph" if r["compiled"] else "eager graph" if r["graph"] else "eager, no graph"
        print(f"| decode batch {r['batch']}, {how} | {r['tok_s']:.1f} | {r['roofline_tok_s']:.1f} "
              f"| {r['pct_roofline']:.0f}% |")
    pf = results.get("prefill")
    if pf:
        print(f"| prefill {pf['tokens']} | {pf['tok_s']:.0f} | - | {pf['pct_matmul']:.0f}% of matmul rate |")
    hf = results.get("transformers")
    if hf:
        print(f"| transformers ({hf['layers']} layers, bf16, batch 1) | {hf['hf_ms_per_layer']:.3f} ms/layer | "
              f"ours {hf['ours_ms_per_layer']:.3f} ms/layer | {hf['speedup']:.1f}x |")
        print(f"| our prompt logits vs transformers' (same weights, bf16) | rel. error "
              f"{hf['prompt_logits_rel_err']:.2e} | | |")
    print("stage seconds:", results["stage_s"])
    for key in ("skipped", "errors"):
        if results[key]:
            print(f"{key}:", results[key])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and batch sizes, prefill 1024")
    p.add_argument("--budget", type=float, default=420, help="seconds for all stages (default 420)")
    p.add_argument("--tune", action="store_true", help="also time candidate block sizes, with the time left")
    p.add_argument("--tune-only", action="store_true", help="the ceilings and the tuning, nothing else")
    p.add_argument("--tune-budget", type=float, default=420, help="seconds --tune-only may tune (default 420)")
    p.add_argument("--format", choices=("auto", "bf16", "int8", "int4"), default="auto",
                   help="auto: bf16 where the card holds 93 GB (H200), else int8 (mixtral.quant's formats)")
    p.add_argument("--layers", type=int, default=32, help="layers of our full model (32 = Mixtral-8x7B)")
    p.add_argument("--hf-layers", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="capture the eager decode step only")
    p.add_argument("--smoke", action="store_true", help="every stage on the CPU with a tiny model (tests the script)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        device, shape = "cpu", dict(SMOKE_CONFIG)
    elif torch.cuda.is_available():
        device, shape = "cuda", {}
    else:
        raise SystemExit("bench/gpu.py needs a CUDA GPU (or --smoke, which runs it small on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, memory = props.name, props.total_memory
    else:
        name, memory = "CPU (smoke run)", 0
    fmt = args.format
    if fmt == "auto":
        fmt = "bf16" if memory > 120 * GiB or args.smoke else "int8"
    import triton

    results: dict = dict(device=name, memory_gib=memory / GiB, format=fmt, layers=args.layers,
                         torch=torch.__version__, triton=triton.__version__)
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else None)
    stages = Stages(args.tune_budget + 60 if args.tune_only else args.budget, results, path, strict=args.smoke)

    def ceilings() -> None:
        bw = copy_bandwidth(device, 4 * GiB if device == "cuda" else 1 << 26)
        mm = matmul_rate(device, 8192, torch.bfloat16) if device == "cuda" else matmul_rate(device, 256, torch.float32)
        results.update(copy_gb_s=bw / 1e9, bf16_tflops=mm / 1e12)
        print(f"{name}: copy {bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s, format {fmt}")

    stages.run("ceilings", 0, ceilings)
    bw, mm = results["copy_gb_s"] * 1e9, results["bf16_tflops"] * 1e12  # no ceilings, no figures: let it raise
    if device == "cuda":
        torch.cuda.empty_cache()

    def run_tune(budget: float):
        results["tune"] = tune(fmt, budget, bw, MixtralConfig(**shape), device, smoke=args.smoke)
        if device == "cuda":
            torch.cuda.empty_cache()

    if args.tune_only:
        stages.run("tune", 0, lambda: run_tune(args.tune_budget))
        print_table(results)
        return results

    smoke = args.smoke
    steps = 4 if smoke else 16 if args.quick else 64
    prompt = 8 if smoke else 128
    compile_ok = not args.no_compile
    results["decode"] = []

    def decode(model, batch: int, compiled: bool) -> None:
        r = bench_decode(model, batch, prompt, steps, bw, compile=compiled)
        results["decode"].append(r)
        print(f"decode b={batch} compiled={r['compiled']}: {r['tok_s']:.1f} tok/s, {r['pct_roofline']:.0f}% of "
              f"{r['roofline_tok_s']:.1f} (capture {r['capture_s']:.0f} s)")

    with torch.inference_mode():
        model = stages.run("build model", 30, lambda: build_model(
            MixtralConfig(**{**shape, "num_hidden_layers": args.layers}), fmt, device))
        if model is None:
            print_table(results)
            return results
        results["weights_gb"] = _nbytes(list(model.parameters()) + list(model.buffers())) / 1e9
        # Batch 1 first: the headline figure, and its torch.compile is the one every later stage reuses.
        stages.run("decode b=1", 120, lambda: decode(model, 1, compile_ok))
        if "decode b=1" in results["errors"] and compile_ok:  # the rest captures the eager step instead
            compile_ok = False
            stages.run("decode b=1 eager graph", 20, lambda: decode(model, 1, False))
        if not args.quick:
            def versus() -> None:
                results["transformers"] = bench_transformers(
                    MixtralConfig(**{**shape, "num_hidden_layers": args.hf_layers}), 1, 16, device, compile_ok)
                print("transformers vs ours, per layer:", results["transformers"])
            stages.run("transformers", 45, versus)
        if device == "cuda":
            torch.cuda.empty_cache()

        def prefill(model) -> None:
            T = 16 if smoke else 1024 if args.quick else 4096
            results["prefill"] = bench_prefill(model, T, mm)
            print("prefill:", results["prefill"])

        stages.run("prefill", 30, lambda: prefill(model))
        if compile_ok and device == "cuda":  # what torch.compile's fusion of the small ops is worth in the graph
            stages.run("decode b=1 eager graph", 20, lambda: decode(model, 1, False))
        for b in (2,) if smoke else (8,) if args.quick else (8, 32, 64):
            stages.run(f"decode b={b}", 45, lambda b=b: decode(model, b, compile_ok))
        model = None  # frees the weights before tuning (the lambdas above ran already)
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.tune:
        margin = 15  # to print and save
        stages.run("tune", 60, lambda: run_tune(max(stages.left() - margin, 0)))
    print_table(results)
    if path:
        print("wrote", path)
    return results


if __name__ == "__main__":
    main()
