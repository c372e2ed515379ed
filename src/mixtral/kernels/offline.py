"""Compile the Triton kernels for a GPU on a machine without one, and report what the compiler made.

The interpreter (``TRITON_INTERPRET=1``) checks what a kernel computes, not whether it compiles: it
runs the kernel as Python, so errors only the compiler raises (it type-checks every ``return`` of a
function, even one a constexpr rules out) and resource limits (shared memory, registers) never show
there. Here the host code of a call runs as usual on CPU tensors; each Triton launch is intercepted
before it would compile (Triton's ``jit_cache_hook``, which sees the exact specialisation a real
launch gets: argument types, 16-byte alignment, constexprs, warps, stages), and is then compiled by
``triton.compile`` for a named GPU architecture. Nothing runs on a device and no driver is needed:
the wheel's own ptxas assembles, its cuobjdump reads registers and stack, its nvdisasm the SASS.

What a report says, per kernel: shared memory and registers against the architecture's limits, stack
(spilled registers), how many programs fit on one SM, the tensor-core instruction the dots became,
and, from the SASS of the main loop: its instructions (``issue_cycles`` bounds how fast an SM can
stream a kernel's weights) and its global loads by width (16-byte ``LDGSTS``/``LDG.128`` move
weights at full rate; 2-byte scalar loads cost one instruction per element). Run
``python bench/kernel_report.py`` for the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.compiler import ASTSource
from triton.runtime.driver import driver
from triton.runtime.errors import OutOfResources

from . import fused_moe
from .fused_moe import fused_experts, fused_experts_quantized, quantized_linear

# Per-SM limits from NVIDIA's CUDA C programming guide (compute capability table): max dynamic
# shared memory per block, shared memory per SM, 32-bit registers per SM, resident threads per SM.
ARCH_LIMITS = {
    80: dict(shared_per_block=163 * 1024, shared_per_sm=164 * 1024, regs_per_sm=65536, threads_per_sm=2048),
    86: dict(shared_per_block=99 * 1024, shared_per_sm=100 * 1024, regs_per_sm=65536, threads_per_sm=1536),
    89: dict(shared_per_block=99 * 1024, shared_per_sm=100 * 1024, regs_per_sm=65536, threads_per_sm=1536),
    90: dict(shared_per_block=227 * 1024, shared_per_sm=228 * 1024, regs_per_sm=65536, threads_per_sm=2048),
}


@dataclass
class CompiledKernel:
    """One kernel specialisation as compiled for ``arch`` (compute capability, e.g. 90 = H100/H200)."""
    name: str
    arch: int
    constants: dict[str, object]
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    stack_bytes: int  # local memory per thread: spilled registers (0 is the healthy value)
    mma: str  # "wgmma", "mma.sync" or "none" (products on CUDA cores)
    loop_instructions: int = 0  # SASS instructions in the main loop's body, per warp and iteration
    loop_loads: Counter = field(default_factory=Counter)  # global loads in that body: {bytes: count}
    refused: bool = False  # over the SM's shared memory: the launch raised OutOfResources, as on a device

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def fits(self) -> bool:
        return self.shared_bytes <= ARCH_LIMITS[self.arch]["shared_per_block"] and self.registers <= 255

    def programs_per_sm(self) -> int:
        """Resident programs per SM: the tightest of shared memory, registers and threads."""
        lim = ARCH_LIMITS[self.arch]
        by_shared = lim["shared_per_sm"] // max(self.shared_bytes, 1)
        # Registers are allocated per warp in units of 256 (8 per thread, rounded up).
        regs_per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = lim["regs_per_sm"] // (regs_per_warp * self.num_warps)
        return min(by_shared, by_regs, lim["threads_per_sm"] // self.threads, 32)

    def issue_cycles(self) -> float:
        """SM cycles to issue one iteration of the main loop for all the program's warps: an SM's four
        schedulers issue one warp instruction each per cycle. A memory-bound kernel must move its
        bytes faster than this, or instruction issue, not bandwidth, sets its speed."""
        return self.loop_instructions * self.num_warps / 4

    def load_bytes(self, width: int | None = None) -> int:
        """Bytes per thread and iteration moved by the main loop's global loads (of one width, if given)."""
        return sum(n * b for b, n in self.loop_loads.items() if width is None or b == width)


class _NoDevice(DriverBase):
    """A stand-in for the CUDA driver: reports the target; ``capture_launches``'s hook stops every launch."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("nothing can be timed without a GPU")

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextlib.contextmanager
def capture_launches(arch: int = 90) -> Iterator[list[CompiledKernel]]:
    """Within the block, each Triton launch is compiled for ``arch`` instead of run, and listed.
    One that needs more shared memory than the SM has raises ``OutOfResources``, as the CUDA
    driver would at launch (and is listed, marked ``refused``), so host code that steps down to a
    smaller config does so here too. Kernels must be compiled ones (under ``TRITON_INTERPRET=1``
    there is nothing to capture) and not yet launched on a real GPU in this process (those would run
    from the JIT's cache)."""
    launches: list[CompiledKernel] = []
    compiled: dict[tuple, CompiledKernel] = {}
    touched: set = set()  # kernels whose JIT cache the stand-in driver reached
    limit = ARCH_LIMITS[arch]["shared_per_block"]

    def hook(*, fn, compile, **_) -> bool:
        kernel = fn.jit_function
        touched.add(kernel)
        key = (kernel.__name__, str(compile["key"]))
        if key not in compiled:
            compiled[key] = compile_launch(kernel, compile, arch)
        k = compiled[key]
        if k.shared_bytes > limit:
            launches.append(dataclasses.replace(k, refused=True))
            raise OutOfResources(k.shared_bytes, limit, "shared memory")
        launches.append(k)
        return True  # "handled": the JIT neither compiles nor launches

    previous_hook = knobs.runtime.jit_cache_hook
    driver.set_active(_NoDevice(GPUTarget("cuda", arch, 32)))
    knobs.runtime.jit_cache_hook = hook
    fused_moe._FITTED.clear()  # kept per device, and every arch here is the "cpu" device
    try:
        yield launches
    finally:
        fused_moe._FITTED.clear()
        knobs.runtime.jit_cache_hook = previous_hook
        if _has_default_driver():
            driver.reset_active()
        else:  # no GPU backend: leave the driver unset, as it was before the first launch
            driver._active = None
        for kernel in touched:  # each kernel cached the stand-in's target for device 0
            kernel.device_caches.clear()


def _has_default_driver() -> bool:
    try:
        driver.default  # noqa: B018 - raises without an active GPU backend
    except RuntimeError:
        return False
    return True


def _tool(name: str) -> str:
    from triton.backends import nvidia
    return os.path.join(os.path.dirname(nvidia.__file__), "bin", name)


def _loop_body(sass: str) -> list[str]:
    """Instructions of the longest loop in ``sass`` (``nvdisasm`` output): from a label to the
    branch back to it. The K loop of a GEMM kernel is its longest."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    longest: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\s+`?\(?\.(L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)]:i + 1] if re.match(r"\s*/\*[0-9a-f]{4,}\*/", x)]
            longest = max(longest, body, key=len)
    return longest


# SASS global loads (LDG, and LDGSTS: global to shared, cp.async) and their width suffixes.
_LOAD_OP = re.compile(r"\b(LDG|LDGSTS)((?:\.[A-Z0-9_]+)*)\s")
_LOAD_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _loop_loads(body: list[str]) -> Counter:
    loads: Counter = Counter()
    for line in body:
        if m := _LOAD_OP.search(line):
            widths = [_LOAD_WIDTH[x] for x in m.group(2).split(".") if x in _LOAD_WIDTH]
            loads[widths[-1] if widths else 4] += 1
    return loads


def compile_launch(kernel, spec: dict, arch: int) -> CompiledKernel:
    """Compile one captured launch for ``arch`` and read back its resources."""
    src = ASTSource(kernel, spec["signature"], spec["constants"], spec["configs"][0])
    options = dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"], num_ctas=spec["num_ctas"])
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1)) + int(re.search(r"LOCAL:(\d+)", usage).group(1))
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma." in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    body = _loop_body(sass)
    names = kernel.arg_names
    constants = {names[k[0]]: v for k, v in spec["constants"].items() if len(k) == 1}
    return CompiledKernel(kernel.__name__, arch, constants, spec["num_warps"], spec["num_stages"],
                          compiled.metadata.shared, regs, stack, mma, len(body), _loop_loads(body))


def compile_calls(call: Callable[[], object], arch: int = 90) -> list[CompiledKernel]:
    """Run ``call`` (host code launching Triton kernels on CPU tensors) and compile each distinct
    launch it makes for ``arch``, in launch order; refused launches (see ``capture_launches``) are
    listed before the config that replaced them."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("offline compilation needs TRITON_INTERPRET unset: interpreted kernels have no "
                           "compiled form to capture")
    with capture_launches(arch) as launches:
        call()
    out: list[CompiledKernel] = []
    for k in launches:
        if k not in out:
            out.append(k)
    return out


# ---------------------------------------------------------------------------------------------
# The launches of a Mixtral layer
# ---------------------------------------------------------------------------------------------
def moe_call(fmt: str, tokens: int, E: int = 8, H: int = 4096, I: int = 14336, top_k: int = 2,
             group: int = 32) -> Callable[[], object]:
    """The experts of one layer on ``tokens`` rows, weights in ``fmt`` (bf16 | int8 | int4), tensors
    allocated but never written (pages of ``torch.empty`` are not touched)."""

    def weight(n: int, k: int) -> list[torch.Tensor]:
        if fmt == "int8":
            return [torch.empty(E, n, k, dtype=torch.int8), torch.empty(E, n, dtype=torch.float32)]
        return [torch.empty(E, n, k // 2, dtype=torch.uint8), torch.empty(E, n, k // group, dtype=torch.float16),
                torch.empty(E, n, k // group, dtype=torch.float16)]

    def call():
        x = torch.empty(tokens, H, dtype=torch.bfloat16)
        ids = (torch.arange(tokens * top_k) % E).view(tokens, top_k)
        weights = torch.full((tokens, top_k), 1.0 / top_k)
        if fmt == "bf16":
            return fused_experts(x, ids, weights, torch.empty(E, 2 * I, H, dtype=torch.bfloat16),
                                 torch.empty(E, H, I, dtype=torch.bfloat16))
        return fused_experts_quantized(x, ids, weights, weight(2 * I, H), weight(H, I))

    return call


def linear_call(fmt: str, tokens: int, N: int, K: int = 4096, group: int = 32) -> Callable[[], object]:
    """A quantized attention projection (``quantized_linear``) on ``tokens`` rows."""

    def call():
        x = torch.empty(tokens, K, dtype=torch.bfloat16)
        if fmt == "int8":
            w = [torch.empty(N, K, dtype=torch.int8), torch.empty(N, dtype=torch.float32)]
        else:
            w = [torch.empty(N, K // 2, dtype=torch.uint8), torch.empty(N, K // group, dtype=torch.float16),
                 torch.empty(N, K // group, dtype=torch.float16)]
        return quantized_linear(x, w)

    return call
