"""Where one decode step's time goes on CPU: the layers kernel, the output head, and everything else.

    python bench/decode_profile.py                      # demo model, fp32 / int8 / int4, 2 threads
    python bench/decode_profile.py --modes int8 --steps 96

Times ``decode_layers`` (all decoder layers in one C++ call, the fused stepper) and the output projection inside real
decode steps (greedy, after a 16-token prompt), and prints medians per step with the bandwidth the
layers call reached on the bytes it must read (attention weights plus the two chosen experts per
layer). Quantized models are made in memory as the comparison bench makes them (group 32, int8 head).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def layer_bytes(model) -> int:
    """Bytes of weights one decode step's layers read: attention, router, and top-k experts' rows."""
    total = 0
    for layer in model.model.layers:
        attn, moe = layer.self_attn, layer.mlp
        for proj in (attn.qkv_proj, attn.o_proj):
            q = getattr(proj, "weight_q", None)
            total += q.nbytes() if q is not None else proj.weight.numel() * proj.weight.element_size()
        total += moe.gate.weight.numel() * 4
        ex = moe.experts
        k = model.config.num_experts_per_tok
        if hasattr(ex, "gate_up_q"):
            total += (ex.gate_up_q.nbytes() + ex.down_q.nbytes()) * k // ex.num_experts
        else:
            total += (ex.gate_up_proj.numel() + ex.down_proj.numel()) * 4 * k // ex.num_experts
    return total


def profile(model, steps: int) -> dict:
    import mixtral.generation.steppers as steppers
    from mixtral.cache import KVCache
    from mixtral.generation import CpuFusedStepper, choose_stepper, prefill

    timings: dict[str, list[float]] = {"layers": [], "head": []}

    def timed(name, fn):
        def wrapper(*args):
            t = time.perf_counter()
            out = fn(*args)
            timings[name].append(time.perf_counter() - t)
            return out
        return wrapper

    class TimedKernels:  # the compiled module, with decode_layers timed
        def __init__(self, ck):
            self.ck = ck

        def __getattr__(self, name):
            fn = getattr(self.ck, name)
            return timed("layers", fn) if name == "decode_layers" else fn

    stepper = choose_stepper(model)
    if not isinstance(stepper, CpuFusedStepper):
        raise SystemExit(f"decode runs the {stepper.name} stepper here, not the fused CPU kernels")
    real_kernels, real_linear = steppers.cpu_row_kernels, steppers.linear
    steppers.cpu_row_kernels = lambda x: TimedKernels(real_kernels(x))
    steppers.linear = timed("head", real_linear)  # the stepper applies only the output head through it
    try:
        with torch.inference_mode():
            cache = KVCache.for_model(model.config, 1)
            tok = prefill(model, torch.randint(100, 20000, (1, 16)), None, cache).argmax(-1)
            step = []
            for _ in range(steps):
                t = time.perf_counter()
                tok = stepper.step(tok, cache).argmax(-1)
                step.append(time.perf_counter() - t)
    finally:
        steppers.cpu_row_kernels, steppers.linear = real_kernels, real_linear
    skip = steps // 8  # warm-up
    med = {k: statistics.median(v[skip:]) * 1e3 for k, v in timings.items() if v}
    med["step"] = statistics.median(step[skip:]) * 1e3
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: the demo model)")
    ap.add_argument("--modes", default="fp32,int8,int4")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mixtral import MixtralForCausalLM
    from mixtral.demo import ensure_demo_model
    from mixtral.quant import quantize_model

    path = args.model or ensure_demo_model()
    print("| mode | step ms | layers call ms | layers GB/s | output head ms | everything else ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in args.modes.split(","):
        model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32)  # the fp32 CPU paths, whatever was saved
        if mode != "fp32":
            quantize_model(model, mode, group_size=32, lm_head=True)
        m = profile(model, args.steps)
        if "layers" not in m:
            print(f"| {mode} | {m['step']:.1f} | (the fused layers call did not run) | | | |")
            continue
        gbs = layer_bytes(model) / (m["layers"] / 1e3) / 1e9
        rest = m["step"] - m["layers"] - m.get("head", 0.0)
        print(f"| {mode} | {m['step']:.1f} | {m['layers']:.1f} | {gbs:.1f} | {m.get('head', 0.0):.1f} | {rest:.1f} |")
        del model


if __name__ == "__main__":
    main()
