"""Weight-only int8 and int4 quantization: formats and modules (the command is ``mixtral.cli.convert``).

Formats (activations stay fp32; only weights are stored in fewer bits):

* ``int8``: symmetric, one fp32 scale per output row. ``w[o, k] = qweight[o, k] * scales[o]``.
* ``int4``: asymmetric, group-wise along the input dimension (as llama.cpp's Q4_1), one fp16 scale
  and min per group of G inputs. ``w[o, k] = nibble[o, k] * scales[o, k // G] + mins[o, k // G]``,
  nibbles in 0..15 packed two per byte in blocks of 32 inputs. Blocks pair up: bytes
  [32p, 32p + 32) of a row hold block 2p (inputs 64p + j) in their low nibbles and block 2p + 1
  (inputs 64p + 32 + j) in their high nibbles, so one 32-byte load and two masks unpack 64
  weights; when K / 32 is odd, the last block stands alone, byte j holding its inputs j (low) and
  j + 16 (high). G is a multiple of 32 dividing the input size; ``quantize_model`` uses one G for
  the whole model, the requested one lowered to the largest multiple of 32 dividing every quantized
  input size (576 inputs with G=128 -> G=96), and records that G in ``quantization_config``.
  Layout version 2; version 1 (fp32 scales and mins, every block packed alone like the odd last
  block) is converted when loaded.

What is quantized: attention (``qkv_proj``, ``o_proj``) and expert weights (``gate_up_proj``,
``down_proj``). The router, norms and embeddings stay full precision; ``lm_head=True`` also
quantizes the output projection, always to int8 (a separate copy when tied to the embeddings).

Checkpoint layout (safetensors, internal parameter names, see ``mixtral.model``): a quantized
tensor ``NAME`` is stored as ``NAME.qweight`` (int8, or uint8 for int4), ``NAME.scales`` (fp32 for
int8, fp16 for int4) and, for int4, ``NAME.mins`` (fp16), where NAME is e.g.
``model.layers.3.self_attn.qkv_proj.weight`` or ``model.layers.3.mlp.experts.gate_up_proj``
(stacked: leading expert dimension). Everything else is stored as in ``save_pretrained`` but under
internal names. ``config.json`` carries
``"quantization_config": {"quant_method": "mixtral-weight-only", "bits": 8|4, "group_size": G,
"lm_head": bool, "activations": "int8"|"fp32", "version": 2}``.

Speed on CUDA: int8 and int4 weights run Triton kernels that read them as stored (``mixtral.kernels.triton_applies``).
Speed on the CPU: decode (few rows) runs AVX2 kernels (``mixtral.kernels.cpu``). By default they quantize the
activations too, to int8 in blocks of 32 with one fp32 scale each (llama.cpp's Q8_0/Q8_1 scheme), so
the inner loop is an integer dot product: widening every weight to fp32 is what bounds decode on a
small CPU, not memory. That adds a small activation rounding error per product (docs/performance.md);
``activations="fp32"`` (in ``quantize_model`` and ``quantization_config``) keeps fp32 activations and
computes exactly the dequantized weights' products, more slowly. Many rows (prefill) dequantize one
matrix at a time and use fp32 matrix products (fp32 activations either way), which are
compute-bound there anyway. Without the kernels everything falls back to dequantize + torch.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_kernels, cpu_row_kernels, triton_applies, using_reference
from ..moe import Experts, experts_grouped_by

MODES = ("int8", "int4")
LAYOUT_VERSION = 2  # of the int4 packing (see above); int8 has one layout


# -- formats ---------------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., O, K) float -> qweight (..., O, K) int8, scales (..., O) fp32."""
    w = w.float()
    scales = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[..., None]


def int4_group_size(K: int, requested: int) -> int:
    """The group size actually used for K inputs: the largest multiple of 32 <= requested dividing K."""
    if K % 32:
        raise ValueError(f"int4 needs the input size to be a multiple of 32, got {K}")
    for g in range(max(32, requested - requested % 32), 31, -32):
        if K % g == 0:
            return g
    return 32


@functools.cache
def _pack_order(K: int, version: int = LAYOUT_VERSION) -> torch.Tensor:
    """Input index held by each (byte, nibble) of a packed row, in order (byte 0 low, byte 0 high, ...)."""
    blocks = torch.arange(K).view(-1, 32)
    nb = blocks.shape[0]
    paired = nb - nb % 2 if version >= 2 else 0
    # pairs: byte j holds block 2p's input j (low) and block 2p + 1's input j (high)
    pairs = blocks[:paired].view(-1, 2, 32).transpose(1, 2).reshape(-1)
    # a block alone: byte j holds its inputs j (low) and j + 16 (high)
    alone = blocks[paired:].view(-1, 2, 16).transpose(1, 2).reshape(-1)
    return torch.cat([pairs, alone])


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (..., O, K) -> qweight (..., O, K/2) uint8, scales and mins (..., O, K/G) fp16."""
    *lead, O, K = w.shape
    G = int4_group_size(K, group_size)
    g = w.float().reshape(*lead, O, K // G, G)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    if not w.is_meta and max(-lo.min().item(), hi.max().item()) > 65504:  # (meta: shapes only, no values)
        raise ValueError("int4 quantization stores fp16 scales and mins: weights beyond +-65504 do not fit")
    # Nibbles are chosen against the fp16 scale and min actually stored.
    scales, mins = ((hi - lo) / 15.0).half(), lo.half()
    s = scales.float().clamp(min=1e-12)
    n = torch.round((g - mins.float()[..., None]) / s[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(n.reshape(*lead, O, K)), scales, mins


def pack_int4(n: torch.Tensor, version: int = LAYOUT_VERSION) -> torch.Tensor:
    """Nibbles (..., K) uint8 in input order -> packed (..., K/2) uint8."""
    K = n.shape[-1]
    n = n[..., _pack_order(K, version)].reshape(*n.shape[:-1], K // 2, 2)
    return (n[..., 0] | (n[..., 1] << 4)).contiguous()


def unpack_int4(q: torch.Tensor, version: int = LAYOUT_VERSION) -> torch.Tensor:
    """Packed (..., K/2) uint8 -> nibbles (..., K) uint8 in input order."""
    K = 2 * q.shape[-1]
    n = torch.stack((q & 0x0F, q >> 4), dim=-1).reshape(*q.shape[:-1], K)
    return n[..., torch.argsort(_pack_order(K, version))]


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    *lead, O, half = q.shape
    K, ng = 2 * half, scales.shape[-1]
    n = unpack_int4(q).float().reshape(*lead, O, ng, K // ng)
    return (n * scales.float()[..., None] + mins.float()[..., None]).reshape(*lead, O, K)


def upgrade_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, version: int):
    """Tensors of an int4 weight stored in layout ``version`` -> the current layout."""
    if version == LAYOUT_VERSION:
        return q, scales, mins
    if version != 1:
        raise ValueError(f"unknown int4 layout version {version}")
    return pack_int4(unpack_int4(q, 1)), scales.half(), mins.half()


class QuantizedTensor(nn.Module):
    """One quantized weight (or a stack of expert weights): the stored tensors as buffers."""

    def __init__(self, bits: int, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None):
        super().__init__()
        self.bits = bits
        self.register_buffer("qweight", qweight)
        # int8: fp32 scale per row; int4: fp16 scale and min per group (see the formats above).
        dtype = torch.float32 if bits == 8 else torch.float16
        self.register_buffer("scales", scales.to(dtype).contiguous())
        self.register_buffer("mins", mins.to(dtype).contiguous() if mins is not None else None)
        # Decode kernels quantize activations to int8 blocks when True (see the module docstring).
        self.int8_activations = True

    @classmethod
    def quantize(cls, w: torch.Tensor, mode: str, group_size: int = 32) -> QuantizedTensor:
        if mode == "int8":
            return cls(8, *quantize_int8(w))
        if mode == "int4":
            return cls(4, *quantize_int4(w, group_size))
        raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-1] * (2 if self.bits == 4 else 1)

    @property
    def group_size(self) -> int | None:
        return self.in_features // self.scales.shape[-1] if self.bits == 4 else None

    def dequantize(self, index: int | None = None) -> torch.Tensor:
        """The fp32 weight (of expert ``index`` for a stack)."""
        sel = (lambda t: t) if index is None else (lambda t: t[index])
        one_matrix = self.qweight.device.type == "cpu" and self.qweight.dim() - (index is not None) == 2
        ck = cpu_kernels() if one_matrix and not using_reference() else None
        if ck is not None:  # one fused pass instead of torch's several
            fn = ck.dequantize_q8 if self.bits == 8 else ck.dequantize_q4
            return fn(*(sel(t) for t in self.kernel_args()))
        if self.bits == 8:
            return dequantize_int8(sel(self.qweight), sel(self.scales))
        return dequantize_int4(sel(self.qweight), sel(self.scales), sel(self.mins))

    def kernel_args(self) -> list[torch.Tensor]:
        """[qweight, scales] (int8) or [qweight, scales, mins] (int4), as the CPU kernels take them.
        Reads the buffer dict directly: this runs for every weight at every decode step."""
        b = self._buffers
        if self.bits == 8:
            return [b["qweight"], b["scales"]]
        return [b["qweight"], b["scales"], b["mins"]]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


TRITON_LINEAR_MAX_ROWS = 64  # beyond this a quantized Linear on CUDA dequantizes and uses cuBLAS (compute bound)


class QuantLinear(nn.Module):
    """A bias-free Linear with an int8 or int4 weight; same call as ``nn.Linear``."""

    def __init__(self, weight: QuantizedTensor) -> None:
        super().__init__()
        self.weight_q = weight
        self.out_features = weight.qweight.shape[0]
        self.in_features = weight.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= TRITON_LINEAR_MAX_ROWS and triton_applies(x2):
            # Imported on first use: Triton is an optional dependency, absent from CPU installs.
            from ..kernels.fused_moe import quantized_linear

            return quantized_linear(x2.contiguous(), self.weight_q.kernel_args()).reshape(*lead, self.out_features)
        ck = cpu_row_kernels(x2)
        if ck is not None:
            y = ck.linear(x2.contiguous(), self.weight_q.kernel_args(), self.weight_q.int8_activations)
        else:
            y = F.linear(x2, self.weight_q.dequantize().to(x.dtype))
        return y.reshape(*lead, self.out_features)

    def kernel_weights(self) -> tuple[list[torch.Tensor], bool]:
        """The weight as the CPU kernels take it, and whether they quantize activations for it."""
        return self.weight_q.kernel_args(), self.weight_q.int8_activations


class QuantExperts(nn.Module):
    """Experts with quantized stacked weights, behind the float ``Experts`` signature.

    CPU decode (few tokens): one AVX2 kernel call per layer that reads only the chosen experts' rows.
    CPU prefill (many tokens): tokens grouped by expert, each expert hit dequantized once and used in
    one fp32 matrix product, as ``experts_grouped`` does for float weights.
    On CUDA: the Triton fused MoE (``fused_experts_quantized``) for any number of tokens.
    """

    def __init__(self, gate_up: QuantizedTensor, down: QuantizedTensor, act) -> None:
        super().__init__()
        if gate_up.bits == 4 and gate_up.group_size != down.group_size:
            raise ValueError("int4 experts need one group size for gate_up_proj and down_proj")
        self.gate_up_q = gate_up
        self.down_q = down
        self.act = act

    @property
    def num_experts(self) -> int:
        return self.gate_up_q.qweight.shape[0]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.act is F.silu and triton_applies(x):
            # Imported on first use: Triton is an optional dependency, absent from CPU installs.
            from ..kernels.fused_moe import fused_experts_quantized

            return fused_experts_quantized(x.contiguous(), ids, weights, self.gate_up_q.kernel_args(),
                                           self.down_q.kernel_args())
        ck = cpu_row_kernels(x)
        if ck is not None and self.act is F.silu:
            return ck.experts(x.contiguous(), ids.long().contiguous(), weights.float().contiguous(),
                              self.gate_up_q.kernel_args(), self.down_q.kernel_args(),
                              self.gate_up_q.int8_activations)
        return experts_grouped_by(
            x, ids, weights, lambda e: self.gate_up_q.dequantize(e).to(x.dtype),
            lambda e: self.down_q.dequantize(e).to(x.dtype), self.num_experts, self.act,
        )

    def kernel_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], bool] | None:
        """(gate_up, down, int8 activations) as the CPU kernels take them; None for non-SiLU experts."""
        if self.act is not F.silu:
            return None
        return self.gate_up_q.kernel_args(), self.down_q.kernel_args(), self.gate_up_q.int8_activations


# -- whole models ------------------------------------------------------------------------------------

def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def quantize_model(model: nn.Module, mode: str, group_size: int = 32, lm_head: bool = False,
                   activations: str = "int8") -> nn.Module:
    """Swap attention and expert weights (and the output head if ``lm_head``) for quantized ones, in place.

    ``activations``: "int8" (decode kernels quantize activations, fast) or "fp32" (exact weight-only).

    One matrix is quantized at a time and its float weight released, so peak memory stays near the
    float model's size.
    """
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")
    held = next((m for m in model.modules() if isinstance(m, QuantizedTensor)), None)
    if held is not None:  # its weights are rounded already, and a config block would misdescribe them
        raise ValueError(f"the model is already quantized (int{held.bits}); quantize from the float checkpoint")
    if mode == "int4":
        group_size = model_group_size(model, group_size)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and (name.endswith(("qkv_proj", "o_proj"))
                                              or (lm_head and name == "lm_head")):
            parent, leaf = _parent(model, name)
            w = module.weight.detach()
            # The output head goes to int8 even in int4 mode: at 4 bits it costs far more quality
            # than it saves in bytes (perplexity figures in docs/performance.md).
            head_mode = "int8" if name == "lm_head" else mode
            setattr(parent, leaf, QuantLinear(QuantizedTensor.quantize(w, head_mode, group_size)))
        elif isinstance(module, Experts):
            parent, leaf = _parent(model, name)
            gu = QuantizedTensor.quantize(module.gate_up_proj.detach(), mode, group_size)
            dn = QuantizedTensor.quantize(module.down_proj.detach(), mode, group_size)
            setattr(parent, leaf, QuantExperts(gu, dn, module.act))
    model.quantization_config = quantization_config(mode, group_size, lm_head, activations)
    set_activations(model, activations)
    return model


def model_group_size(model: nn.Module, requested: int) -> int:
    """The one int4 group size ``quantize_model`` uses for ``model``: the largest multiple of 32 up
    to ``requested`` that divides the input size of every weight going to int4 (the output head
    goes to int8). One size for all keeps the recorded ``group_size`` true for every tensor, and
    the expert kernels need one for gate_up_proj and down_proj anyway."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 32 or requested % 32:
        raise ValueError(f"int4 group_size must be a positive multiple of 32 (32, 64, 128, ...), got {requested!r}")
    sizes: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(("qkv_proj", "o_proj")):
            sizes[name] = module.weight.shape[-1]
        elif isinstance(module, Experts):
            sizes[name + ".gate_up_proj"] = module.gate_up_proj.shape[-1]
            sizes[name + ".down_proj"] = module.down_proj.shape[-1]
    for name, K in sizes.items():
        if K % 32:
            raise ValueError(f"int4 needs input sizes that are multiples of 32: {name} has {K}")
    return int4_group_size(math.gcd(*sizes.values()), requested) if sizes else requested


ACTIVATIONS = ("int8", "fp32")


def set_activations(model: nn.Module, activations: str) -> None:
    """Whether the decode kernels of every quantized weight in ``model`` quantize activations."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    for module in model.modules():
        if isinstance(module, QuantizedTensor):
            module.int8_activations = activations == "int8"


def quantization_config(mode: str, group_size: int, lm_head: bool, activations: str = "int8") -> dict:
    return {"quant_method": "mixtral-weight-only", "bits": 8 if mode == "int8" else 4,
            "group_size": group_size if mode == "int4" else None, "lm_head": lm_head, "activations": activations,
            "version": LAYOUT_VERSION}
