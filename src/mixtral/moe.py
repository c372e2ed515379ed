"""The sparse mixture-of-experts block: a router and a set of SwiGLU experts.

One signature for every experts implementation::

    experts(x, ids, weights) -> y
    x: (N, H) tokens, ids: (N, K) chosen experts, weights: (N, K) fp32 routing weights, y: (N, H)

``experts_reference`` is the plain definition (a loop over all experts, masks, index_add); the
fast paths below and elsewhere (quantized experts, the Triton kernel) are tested against it.

Expert weights are stored stacked, as transformers v5 does: ``gate_up_proj`` (E, 2I, H) holds w1
(gate) rows then w3 (up) rows, so one matrix product computes both; ``down_proj`` (E, H, I) is w2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import cpu_row_kernels, triton_applies, using_reference

ACT_FNS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Router(nn.Module):
    """Linear gate over the experts. Softmax in fp32, top-k, renormalized (never quantized)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> logits (N, E) in x's dtype, weights (N, K) fp32, ids (N, K).

        Decode on CPU: the whole router in one kernel call, since its five small torch ops cost
        more than the E x H products at a few rows. Same numbers up to float rounding."""
        ck = cpu_row_kernels(x) if self.weight.dtype == torch.float32 else None
        if ck is not None:
            logits, weights, ids = ck.route(x.contiguous(), self.weight.contiguous(), self.top_k)
            return logits, weights, ids
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, ids


def experts_reference(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act=F.silu,
) -> torch.Tensor:
    """The definition: every expert, its tokens picked by mask, results scattered back."""
    out = torch.zeros_like(x)
    inter = down_proj.shape[-1]
    for e in range(gate_up_proj.shape[0]):
        token, slot = torch.where(ids == e)
        if token.numel() == 0:
            continue
        h = x[token] @ gate_up_proj[e].t()
        h = act(h[:, :inter]) * h[:, inter:]
        y = (h @ down_proj[e].t()) * weights[token, slot, None]
        out.index_add_(0, token, y.to(x.dtype))
    return out


def experts_grouped(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act=F.silu,
) -> torch.Tensor:
    """Touch only the experts the router chose, one matrix product per expert hit.

    For decode (N*K small) that is K products of one row each against weight *views*: no copy of
    expert weights is ever made.
    """
    return experts_grouped_by(
        x, ids, weights, gate_up_proj.__getitem__, down_proj.__getitem__, gate_up_proj.shape[0], act
    )


def experts_grouped_by(x, ids, weights, gate_up_of, down_of, num_experts: int, act=F.silu) -> torch.Tensor:
    """``experts_grouped`` with the weights of expert e given by ``gate_up_of(e)``, ``down_of(e)``
    (quantized experts pass functions that dequantize one expert at a time).

    Token slots are sorted by expert once, so each expert reads a contiguous run of rows; the
    expert ids come to the host in one transfer (``tolist``), the only synchronisation.
    """
    N, K = ids.shape
    flat_ids = ids.reshape(-1)
    if N == 1:
        # Decode: K experts, one row each; skip the sort.
        out = None
        for k, e in enumerate(flat_ids.tolist()):
            gu, dn = gate_up_of(e), down_of(e)
            inter = dn.shape[-1]
            h = F.linear(x, gu)
            h = act(h[:, :inter]) * h[:, inter:]
            y = F.linear(h, dn) * weights[:, k : k + 1]
            out = y if out is None else out + y
        return out.to(x.dtype)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_of = order // K
    xs = x[token_of]  # (N*K, H) rows grouped by expert
    ys = torch.empty(N * K, x.shape[1], dtype=torch.float32 if weights.dtype == torch.float32 else x.dtype,
                     device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        gu, dn = gate_up_of(e), down_of(e)
        inter = dn.shape[-1]
        rows = slice(start, start + c)
        h = F.linear(xs[rows], gu)
        h = act(h[:, :inter]) * h[:, inter:]
        ys[rows] = F.linear(h, dn)
        start += c
    ys *= weights.reshape(-1)[order, None]
    out = torch.zeros(N, x.shape[1], dtype=ys.dtype, device=x.device)
    out.index_add_(0, token_of, ys)
    return out.to(x.dtype)


def experts_triton(x, ids, weights, gate_up_proj, down_proj, act=F.silu) -> torch.Tensor:
    """The fused Triton kernel (``mixtral.kernels.fused_moe``). SiLU experts only; no host
    synchronisation, so it can be captured in a CUDA graph."""
    # Imported on first use: Triton is an optional dependency, absent from CPU installs.
    from .kernels.fused_moe import fused_experts

    return fused_experts(x, ids, weights, gate_up_proj, down_proj, act)


def experts_cpu(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act=F.silu,
) -> torch.Tensor:
    """Decode on CPU: the whole experts step in one AVX2 kernel call (``mixtral.kernels.cpu``).

    Reads only the chosen experts' rows, no Python loop, no host synchronisation. Fast for a few
    tokens only: prefill (many tokens) and anything the kernel does not cover (not fp32 on CPU, an
    activation other than SiLU, no compiler) goes to ``experts_grouped``.
    """
    ck = cpu_row_kernels(x) if gate_up_proj.dtype == torch.float32 and act is F.silu else None
    if ck is not None:
        return ck.experts(x.contiguous(), ids.long().contiguous(), weights.float().contiguous(),
                          [gate_up_proj.contiguous()], [down_proj.contiguous()], False)
    return experts_grouped(x, ids, weights, gate_up_proj, down_proj, act)


EXPERT_IMPLEMENTATIONS = {
    "reference": experts_reference, "grouped": experts_grouped, "triton": experts_triton, "cpu": experts_cpu,
}


def default_implementation(x: torch.Tensor, act) -> str:
    """The Triton kernel for SiLU experts where ``triton_applies`` (so on a GPU, run inference under
    ``torch.inference_mode()``); "cpu" on the CPU outside autograd (the row kernel for a few fp32
    tokens, grouped products otherwise); "grouped" elsewhere; "reference" inside ``reference()``."""
    if using_reference():
        return "reference"
    if act is F.silu and triton_applies(x):
        return "triton"
    return "cpu" if x.device.type == "cpu" and not torch.is_grad_enabled() else "grouped"


class Experts(nn.Module):
    """E SwiGLU experts stored stacked. ``implementation`` picks the path (same numbers)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act = ACT_FNS[hidden_act]
        self.implementation = "auto"  # or a key of EXPERT_IMPLEMENTATIONS

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        name = default_implementation(x, self.act) if self.implementation == "auto" else self.implementation
        fn = EXPERT_IMPLEMENTATIONS[name]
        return fn(x, ids, weights, self.gate_up_proj, self.down_proj, self.act)

    def kernel_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], bool | None] | None:
        """(gate_up, down, int8 activations: None for float) as the CPU kernels take them, or None
        where they do not cover these experts (another dtype or activation, a forced path)."""
        params = self._parameters
        gate_up, down = params["gate_up_proj"], params["down_proj"]
        if (self.act is not F.silu or self.implementation not in ("auto", "cpu") or gate_up.dtype != torch.float32
                or down.dtype != torch.float32):
            return None
        return [gate_up.contiguous()], [down.contiguous()], None


class SparseMoeBlock(nn.Module):
    """Router + experts. Returns the mixed output and the router logits (for aux loss / outputs)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.jitter_noise = config.router_jitter_noise
        self.gate = Router(config.hidden_size, config.num_local_experts, config.num_experts_per_tok)
        self.experts = Experts(
            config.num_local_experts, config.hidden_size, config.intermediate_size, config.hidden_act
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H = x.shape
        if self.training and self.jitter_noise > 0:
            # As transformers does: the jittered input feeds both the router and the experts.
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x = x.reshape(B * T, H)
        logits, weights, ids = self.gate(x)
        y = self.experts(x, ids, weights)
        return y.reshape(B, T, H), logits


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor] | torch.Tensor | None,
    num_experts: int,
    top_k: int = 2,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | int:
    """Switch Transformer auxiliary loss (eqs. 4-6), with transformers' numbers.

    ``router_logits``: per layer (B*T, E), concatenated over layers. The fraction of routed slots
    per expert times the mean router probability per expert, summed, times E. With an attention
    mask, padding tokens are left out of both averages.
    """
    if router_logits is None:
        return 0
    if isinstance(router_logits, torch.Tensor):
        router_logits = (router_logits,)
    if len(router_logits) == 0:
        return 0
    device = router_logits[0].device
    logits = torch.cat([t.to(device) for t in router_logits], dim=0).float()  # (L*B*T, E)
    probs = torch.softmax(logits, dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)  # (L*B*T, K)
    counts = F.one_hot(selected, num_experts).float()  # (L*B*T, K, E)
    if attention_mask is None:
        tokens_per_expert = counts.sum(dim=(0, 1)) / logits.shape[0]
        prob_per_expert = probs.mean(dim=0)
    else:
        layers = len(router_logits)
        mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32).repeat(layers)  # (L*B*T,)
        total = mask.sum()
        tokens_per_expert = (counts * mask[:, None, None]).sum(dim=(0, 1)) / total
        prob_per_expert = (probs * mask[:, None]).sum(dim=0) / total
    return torch.sum(tokens_per_expert * prob_per_expert) * num_experts
