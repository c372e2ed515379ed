"""Mixtral: a decoder-only transformer with a sparse mixture-of-experts block in every layer.

Shape legend (used in comments throughout):
    B batch, T new tokens this step, S keys attended (cache + new), H hidden_size,
    nh query heads, nkv key/value heads, hd head dim, E experts, K experts per token, V vocab.

Parameter names follow transformers v5 (``mlp.gate``, ``mlp.experts.gate_up_proj``), except that
q/k/v are one fused ``qkv_proj`` (one matrix product instead of three). Checkpoint layouts are
translated in ``mixtral.checkpoint``; this file knows none of them. The classes' shared base
(loading, saving, what transformers' Trainer calls) is ``mixtral.pretrained``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .cache import KVCache, RaggedDecodeView, StepLayout
from .config import MixtralConfig
from .generation import GenerateDecoderOnlyOutput, GenerationConfig, generate
from .moe import SparseMoeBlock, load_balancing_loss
from .outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast, SequenceClassifierOutputWithPast
from .pretrained import CheckpointPlan, MixtralPreTrainedModel


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if x.device.type == "cpu" and x.numel() <= 8 * x.shape[-1] and not torch.is_grad_enabled():
                from .kernels.cpu import cpu_kernels

                ck = cpu_kernels()
                if ck is not None:  # decode: torch's rms_norm costs ~40 us a call on small CPUs
                    return ck.rms_norm(x.contiguous(), self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op: same numbers
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_inv_freq(config: MixtralConfig, device: torch.device | str | None = None) -> torch.Tensor:
    hd = config.dim_per_head
    return 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))


def rotary_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """position_ids (B, T) -> cos, sin (B, 1, T, hd), in the rotate-half layout of HF checkpoints."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def build_mask(layout: StepLayout, window: int | None) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask, True = may attend; None when plain causal attention suffices.

    Query i sees key j iff j is real (not padding, not an empty slot), j <= i, and, with a sliding
    window W, i - W < j. Queries that may see nothing (padding queries) are let see everything:
    their outputs are never used, and an all-masked row would produce NaNs that leak into the
    next layer through the values.
    """
    q = layout.query_index[:, None]
    k = layout.key_index[None, :]
    allowed = (k <= q) & (k >= 0)  # (T, S)
    if window is not None:
        allowed &= k > q - window
    allowed = allowed[None] & layout.key_valid[:, None, :]  # (B, T, S)
    empty = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | empty
    return allowed[:, None]


def uses_layout_attention(implementation: str, x: torch.Tensor) -> bool:
    """``flash_attention_2`` on CUDA attends from the StepLayout (``mixtral.kernels.attention``);
    on the CPU it is the SDPA path, since FlexAttention runs only eagerly (slowly) there."""
    return implementation == "flash_attention_2" and x.is_cuda


def needs_mask(layout: StepLayout, config: MixtralConfig, cache: KVCache | None) -> bool:
    """False when attention needs no mask tensor: one query that sees every key held, or a
    square causal block (SDPA's ``is_causal``). Both are common (decode, unpadded prefill)."""
    T, S = layout.query_index.shape[0], layout.key_index.shape[0]
    if not layout.all_valid:
        return True
    window = config.sliding_window
    if T == 1 and (window is None or (cache is not None and cache.window is not None)):
        return False
    return not (S == T and (window is None or window >= T))


class Attention(nn.Module):
    def __init__(self, config: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.dim_per_head
        self.dropout = config.attention_dropout
        self.window = config.sliding_window
        self.qkv_sizes = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                          self.num_kv_heads * self.head_dim)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_sizes), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | StepLayout | None,
        cache: KVCache | None,
        implementation: str,
        want_probs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``mask`` is a boolean (B, 1, T, S) tensor, None (causal or all-visible), or on the
        layout-driven GPU path (``flash_attention_2`` on CUDA) the step's ``StepLayout`` itself."""
        B, T, _ = x.shape
        qkv = project(self.qkv_proj, x)
        if fused_decode_applies(x, cache, implementation, want_probs, self.training and self.dropout > 0):
            return project(self.o_proj, decode_attention(self, qkv, cos, sin, cache)), None
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        dropout = self.dropout if self.training else 0.0
        probs = None
        if isinstance(mask, StepLayout):
            from .kernels.attention import attention

            out = attention(q, k, v, mask, self.window)
        elif implementation == "eager" or want_probs:
            out, probs = eager_attention(q, k, v, mask, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout,
                is_causal=mask is None and T > 1, enable_gqa=self.num_kv_heads != self.num_heads,
            )
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return project(self.o_proj, out), probs


def fused_decode_applies(x: torch.Tensor, cache: Any, implementation: str, want_probs: bool,
                         dropout: bool) -> bool:
    """Whether attention of this step runs as one ``decode_attention`` kernel call: one fp32 query
    per row on CPU, no autograd or dropout, our own ``KVCache`` or the server's view of several, and
    no attention probabilities wanted. ``eager`` stays the written-out reference. The kernel applies
    the mask rule itself, so the model builds no mask tensor for such a step."""
    if (x.shape[1] != 1 or type(cache) not in (KVCache, RaggedDecodeView) or x.device.type != "cpu"
            or x.dtype != torch.float32
            or cache.dtype != torch.float32 or want_probs or dropout or implementation == "eager"
            or torch.is_grad_enabled()):
        return False
    from .kernels.cpu import cpu_kernels

    return cpu_kernels() is not None


def decode_attention(attn: Attention, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cache: KVCache) -> torch.Tensor:
    """Decode attention in one C++ call (``fused_decode_applies`` says when): rotary on q and k, k/v
    written into the cache slot, GQA attention over the keys held with the layout's mask rule.

    Same numbers as the plain path (rotary, ``cache.update``, SDPA with ``build_mask``), without its
    ~20 small torch ops per layer, which cost more than the arithmetic at one query.
    qkv (B, 1, (nh + 2 nkv) hd), cos/sin (B, 1, 1, hd) -> (B, 1, nh hd).
    """
    from .kernels.cpu import cpu_kernels

    B = qkv.shape[0]
    cos, sin, rows, layout = decode_geometry(cache, cos, sin, B)
    out = cpu_kernels().decode_attention(
        qkv.reshape(B, -1).contiguous(), cos, sin, rows.keys(attn.layer_idx), rows.values(attn.layer_idx),
        rows.slots, rows.lengths, layout.key_index, layout.key_valid, rows.query_index, attn.window or 0,
        attn.num_heads,
    )
    return out.view(B, 1, -1)


def decode_geometry(cache: KVCache | RaggedDecodeView, cos: torch.Tensor, sin: torch.Tensor, B: int):
    """What the decode kernels take about a one-token step: cos/sin as contiguous (B, hd) (position_ids
    may be (1, 1) for the whole batch, so they are expanded here), the caches with each row's slot
    and length (``DecodeRows``), and the step's layout (key_index, key_valid)."""
    hd = cos.shape[-1]
    cos = cos.expand(B, 1, 1, hd).reshape(B, hd).contiguous()
    sin = sin.expand(B, 1, 1, hd).reshape(B, hd).contiguous()
    return cos, sin, cache.decode_rows(), cache._layout


# The gathering below reads modules' ``_modules`` / ``_parameters`` dicts directly: nn.Module's
# ``__getattr__`` costs ~1 us a lookup, and a step gathers ~30 tensors a layer.

def _kernel_weight(module: nn.Module) -> list[torch.Tensor] | None:
    """A projection's weight in the kernels' formats ([w] fp32, [q, scale] int8, [q, scale, min]
    int4), or None when the kernels do not cover it (a bias, another dtype, a custom module)."""
    if type(module) is nn.Linear:
        params = module._parameters
        w = params["weight"]
        return [w] if params["bias"] is None and w.dtype == torch.float32 and w.is_contiguous() else None
    q = module._modules.get("weight_q")  # mixtral.quant.QuantLinear
    return q.kernel_args() if q is not None else None


def _kernel_experts(experts: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], bool | None] | None:
    """(gate_up, down, int8 activations or None for float) in the kernels' formats, or None."""
    if experts.act is not F.silu:
        return None
    sub = experts._modules
    if "gate_up_q" in sub:  # mixtral.quant.QuantExperts
        return sub["gate_up_q"].kernel_args(), sub["down_q"].kernel_args(), sub["gate_up_q"].int8_activations
    params = experts._parameters
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if (experts.implementation not in ("auto", "cpu") or gate_up is None or gate_up.dtype != torch.float32
            or down.dtype != torch.float32):
        return None
    return [gate_up.contiguous()], [down.contiguous()], None


def fused_layers_args(layers: nn.ModuleList) -> tuple[list[torch.Tensor], list[int], bool] | None:
    """Every layer's weights as ``decode_layers`` takes them: (tensors, counts, quantize activations),
    or None when some layer holds something the kernel does not cover (then the layers run one by one).

    Gathered afresh each step rather than cached, so swapped modules or reassigned parameters can
    never leave the kernel reading stale weights; it costs a few microseconds a layer.
    """
    tensors: list[torch.Tensor] = []
    counts: list[int] = []
    quant: set[bool] = set()
    for layer in layers._modules.values():
        sub = layer._modules
        attn, moe = sub["self_attn"]._modules, sub["mlp"]._modules
        qkv_mod, o_mod = attn["qkv_proj"], attn["o_proj"]
        qkv, o, ex = _kernel_weight(qkv_mod), _kernel_weight(o_mod), _kernel_experts(moe["experts"])
        norms = (sub["input_layernorm"]._parameters["weight"], sub["post_attention_layernorm"]._parameters["weight"],
                 moe["gate"]._parameters["weight"])
        if (qkv is None or o is None or ex is None or type(sub["input_layernorm"]) is not RMSNorm
                or type(sub["post_attention_layernorm"]) is not RMSNorm
                or any(t.dtype != torch.float32 for t in norms)):
            return None
        for proj in (qkv_mod, o_mod):
            if "weight_q" in proj._modules:
                quant.add(proj._modules["weight_q"].int8_activations)
        if ex[2] is not None:
            quant.add(ex[2])
        tensors += [norms[0], *qkv, *o, norms[1], norms[2].contiguous(), *ex[0], *ex[1]]
        counts += [len(qkv), len(o), len(ex[0]), len(ex[1])]
    if len(quant) > 1:  # mixed activation settings: leave it to the per-module paths
        return None
    return tensors, counts, quant.pop() if quant else False


def decode_layers(model: MixtralModel, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cache: KVCache) -> torch.Tensor | None:
    """All decoder layers of a decode step in one C++ call (``decode_layers`` in the CPU kernels), or
    None when this step or model is not covered. Same numbers as the layer-by-layer path (up to float
    rounding); it only removes the ~30 torch ops and module calls per layer between the kernels."""
    from .kernels.cpu import cpu_kernels
    from .moe import CPU_KERNEL_MAX_TOKENS

    config = model.config
    if h.shape[0] > CPU_KERNEL_MAX_TOKENS:  # more rows: grouped matrix products beat the row kernels
        return None
    args = fused_layers_args(model.layers)
    if args is None:
        return None
    tensors, counts, quant_act = args
    B = h.shape[0]
    cos, sin, rows, layout = decode_geometry(cache, cos, sin, B)
    layers = range(len(model.layers))
    out = cpu_kernels().decode_layers(
        h.reshape(B, -1).contiguous(), cos, sin, tensors, counts, [rows.keys(i) for i in layers],
        [rows.values(i) for i in layers], rows.slots, rows.lengths, layout.key_index, layout.key_valid,
        rows.query_index, config.sliding_window or 0,
        config.num_attention_heads, config.rms_norm_eps, config.num_experts_per_tok, quant_act,
    )
    return out.view(B, 1, -1)


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``, through the AVX2 matrix-vector kernel for a few fp32 rows on CPU (decode).

    MKL's fp32 matrix-vector product reaches about half the memory bandwidth on small CPUs; the
    kernel streams the weight at full speed. Many rows (prefill) and anything else go to ``linear``.
    """
    if (type(linear) is nn.Linear and linear.bias is None and x.dtype == torch.float32
            and linear.weight.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and linear.weight.is_contiguous() and x.numel() <= 8 * x.shape[-1]):
        from .kernels.cpu import cpu_kernels

        ck = cpu_kernels()
        if ck is not None:
            y = ck.linear(x.reshape(-1, x.shape[-1]).contiguous(), [linear.weight], False)
            return y.view(*x.shape[:-1], y.shape[-1])
    return linear(x)


def eager_attention(q, k, v, mask, dropout: float = 0.0):
    """Attention written out, returning the probabilities (B, nh, T, S) too."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is None:
        T, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs_dropped = F.dropout(probs, p=dropout) if dropout > 0 else probs
    return probs_dropped @ v, probs


class DecoderLayer(nn.Module):
    def __init__(self, config: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = SparseMoeBlock(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, implementation, record: Recorder | None) -> torch.Tensor:
        h, probs = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, cache, implementation,
            record is not None and record.attentions is not None,
        )
        x = x + h
        h, router_logits = self.mlp(self.post_attention_layernorm(x))
        if record is not None:
            record.add(probs, router_logits)
        return x + h


@dataclass
class Recorder:
    """Collects the optional per-layer outputs once, instead of threading output_* flags around."""

    attentions: list | None = None
    router_logits: list | None = None
    hidden_states: list | None = None

    def add(self, probs, router_logits) -> None:
        if self.attentions is not None:
            self.attentions.append(probs)
        if self.router_logits is not None:
            self.router_logits.append(router_logits)

    @staticmethod
    def of(attentions: bool, router_logits: bool, hidden_states: bool) -> Recorder | None:
        if not (attentions or router_logits or hidden_states):
            return None
        return Recorder([] if attentions else None, [] if router_logits else None, [] if hidden_states else None)


class MixtralModel(MixtralPreTrainedModel):
    """The decoder stack: embeddings, layers, final norm. Returns hidden states."""

    def __init__(self, config: MixtralConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__(config, attn_implementation)
        config = self.config  # ours, also when a transformers config was passed
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", rotary_inv_freq(config), persistent=False)
        self.gradient_checkpointing: CheckpointPlan | None = None  # set by activation_checkpointing_enable
        self.init_weights()

    @property
    def model(self) -> MixtralModel:  # so MixtralPreTrainedModel helpers work on the bare model too
        return self

    def reset_rotary(self, device: torch.device | str | None = None) -> None:
        self.inv_freq = rotary_inv_freq(self.config, device=device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        cache: KVCache | None = None,
        **kwargs: Any,
    ) -> MoeModelOutputWithPast | tuple:
        config = self.config
        if cache is not None:
            past_key_values = cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
            check_token_ids(input_ids, config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        B, T, _ = inputs_embeds.shape
        if T == 0:
            raise ValueError("empty input: the sequence has no tokens")
        use_cache = config.use_cache if use_cache is None else use_cache
        checkpointing = self.gradient_checkpointing is not None and self.training and torch.is_grad_enabled()
        if checkpointing and use_cache:
            use_cache = False  # a cache written during recomputation would be written twice
        record = Recorder.of(
            bool(output_attentions if output_attentions is not None else config.output_attentions),
            bool(output_router_logits if output_router_logits is not None else config.output_router_logits),
            bool(output_hidden_states if output_hidden_states is not None else config.output_hidden_states),
        )
        hf_cache = past_key_values if is_transformers_cache(past_key_values) else None
        past_key_values = to_kv_cache(past_key_values, self, B, attention_mask, T)
        if use_cache and past_key_values is None:
            past_key_values = KVCache.for_model(config, B, dtype=inputs_embeds.dtype, device=inputs_embeds.device)

        new_valid = None
        if attention_mask is not None:
            past = past_key_values.seen if past_key_values is not None else 0
            columns = attention_mask.shape[-1]
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or not T <= columns <= past + T:
                # Only the last T columns are read (the cache keeps the past's); more columns than
                # past + T would mean the mask and the cache disagree about where the row is.
                also = f" (or ({B}, {T}): the new tokens' columns alone)" if past else ""
                raise ValueError(f"attention_mask must be (batch, past + seq_len) = ({B}, {past + T}){also}, "
                                 f"got shape {tuple(attention_mask.shape)}")
            new_valid = attention_mask[:, -T:].to(device=inputs_embeds.device).bool()
        if past_key_values is not None:
            layout = past_key_values.begin(new_valid, T)
            row_start = past_key_values.row_positions
        else:
            query_index = torch.arange(T, device=inputs_embeds.device)
            key_valid = new_valid if new_valid is not None else torch.ones(B, T, dtype=torch.bool,
                                                                           device=inputs_embeds.device)
            layout = StepLayout(query_index, key_valid, query_index, new_valid is None or bool(new_valid.all()))
            row_start = torch.zeros(B, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = derive_position_ids(new_valid, row_start, T)
        if record is None and not self.training and uses_layout_attention(self.attn_implementation, inputs_embeds):
            mask = layout  # flash-attn / SDPA / FlexAttention evaluate the rule without a dense mask
        elif fused_decode_applies(inputs_embeds, past_key_values, self.attn_implementation,
                                  record is not None and record.attentions is not None,
                                  self.training and config.attention_dropout > 0):
            mask = None  # the decode kernel evaluates the rule from the layout itself
        elif needs_mask(layout, config, past_key_values):
            mask = build_mask(layout, config.sliding_window)
        else:
            mask = None
        cos, sin = rotary_cos_sin(self.inv_freq, position_ids, inputs_embeds.dtype)

        h = inputs_embeds
        if record is not None and record.hidden_states is not None:
            record.hidden_states.append(h)
        fused = None
        if record is None and mask is None and fused_decode_applies(inputs_embeds, past_key_values,
                                                                    self.attn_implementation, False, self.training):
            fused = decode_layers(self, h, cos, sin, past_key_values)
        if fused is not None:
            h = fused
        else:
            for i, layer in enumerate(self.layers):
                if checkpointing and self.gradient_checkpointing.covers(i):
                    h = checkpointed_layer(layer, h, cos, sin, mask, self.attn_implementation, record,
                                           self.gradient_checkpointing)
                else:
                    h = layer(h, cos, sin, mask, past_key_values, self.attn_implementation, record)
                if record is not None and record.hidden_states is not None:
                    record.hidden_states.append(h)
        h = self.norm(h)
        if past_key_values is not None:
            past_key_values.end()
        if hf_cache is not None and past_key_values is not None:
            # transformers code reuses its cache object in place: give it this step's keys and values
            for i in range(config.num_hidden_layers):
                n = past_key_values.seen
                hf_cache.update(past_key_values.k[i][:, :, n - T : n], past_key_values.v[i][:, :, n - T : n], i)
        if record is not None and record.hidden_states is not None:
            record.hidden_states[-1] = h  # transformers' convention: the last entry is after the norm
        out = MoeModelOutputWithPast(
            last_hidden_state=h,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(record.hidden_states) if record and record.hidden_states is not None else None,
            attentions=tuple(record.attentions) if record and record.attentions is not None else None,
            router_logits=tuple(record.router_logits) if record and record.router_logits is not None else None,
        )
        return out if (return_dict if return_dict is not None else config.return_dict) else out.to_tuple()


def checkpointed_layer(layer: DecoderLayer, h, cos, sin, mask, implementation: str, record: Recorder | None,
                       plan: CheckpointPlan) -> torch.Tensor:
    """One layer under ``torch.utils.checkpoint`` (no cache: training). The backward pass re-runs
    the layer, so the optional outputs come back as return values, collected by a recorder made
    per call, and are added to ``record`` once, from the first run."""
    want_probs = record is not None and record.attentions is not None
    want_router = record is not None and record.router_logits is not None

    def run(h, cos, sin):
        local = Recorder.of(want_probs, want_router, False)
        out = layer(h, cos, sin, mask, None, implementation, local)
        return out, local.attentions[0] if want_probs else None, local.router_logits[0] if want_router else None

    with (torch.autograd.graph.save_on_cpu(pin_memory=h.is_cuda) if plan.offload else contextlib.nullcontext()):
        h, probs, router_logits = torch.utils.checkpoint.checkpoint(
            run, h, cos, sin, **{"use_reentrant": False, **plan.kwargs}
        )
    if record is not None:
        record.add(probs, router_logits)
    return h


def _normal_(weight: torch.Tensor, std: float) -> None:
    if weight.device.type != "meta":
        nn.init.normal_(weight, mean=0.0, std=std)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() == 0:
        raise ValueError("empty input: input_ids has no tokens")
    lo, hi = (int(t) for t in torch.aminmax(input_ids))  # one pass over the ids instead of two
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise ValueError(f"token id {bad} is out of range for vocab_size={vocab_size}")


def derive_position_ids(valid: torch.Tensor | None, row_start: torch.Tensor, T: int) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift a row's rotary phases."""
    if valid is None:
        return row_start[:, None] + torch.arange(T, device=row_start.device)[None]
    pos = row_start[:, None] + valid.long().cumsum(dim=1) - 1
    return pos.masked_fill(~valid, 1).clamp_(min=0)


def is_transformers_cache(past: Any) -> bool:
    return hasattr(past, "layers") and hasattr(past, "get_seq_length") and not isinstance(past, KVCache)


def to_kv_cache(past: Any, model: MixtralModel, batch: int, attention_mask: torch.Tensor | None = None,
                num_new: int = 0) -> KVCache | None:
    """Accept our KVCache, the legacy tuple-of-(k, v)-per-layer format transformers used, or a
    transformers ``DynamicCache`` (read through its layers' ``keys``/``values``). Either is copied
    into a new ``KVCache``, which the output's ``past_key_values`` carries on (the forward pass also
    appends the step's keys to a ``DynamicCache``, for code that reuses it in place). Neither
    format records padding, so with an ``attention_mask`` it must cover past + ``num_new`` tokens:
    its past columns mark the held keys that are real."""
    if past is None or isinstance(past, KVCache) or hasattr(past, "begin"):
        return past  # our cache, or any object with its begin/update/end protocol (e.g. the server's)
    if is_transformers_cache(past):
        if model.config.sliding_window is not None or any(getattr(past, "is_sliding", None) or ()):
            raise TypeError("past_key_values: a transformers cache cannot be used with a sliding-window model "
                            "(its keys are kept in a rolling buffer here); pass the mixtral KVCache that the "
                            "previous call returned as past_key_values")
        if past.get_seq_length() == 0:
            return None  # DynamicCache() passed to start: ours is made fresh, and copied back after the step
        past = tuple((layer.keys, layer.values) for layer in past.layers)
    if isinstance(past, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in past):
        if len(past) != model.config.num_hidden_layers:
            raise ValueError(f"past_key_values has {len(past)} layers, the model {model.config.num_hidden_layers}")
        k0 = past[0][0]
        cache = KVCache.for_model(model.config, batch, capacity=k0.shape[2], dtype=k0.dtype, device=k0.device)
        n = k0.shape[2]
        if cache.window is not None and n > cache.window:
            raise ValueError("legacy past_key_values longer than the sliding window cannot be converted")
        valid = torch.ones(batch, n, dtype=torch.bool, device=k0.device)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (batch, n + num_new):
                raise ValueError(
                    f"attention_mask must be (batch, past + seq_len) = ({batch}, {n + num_new}) with past_key_values "
                    f"given as tuples or a transformers cache (they do not record padding), got shape "
                    f"{tuple(attention_mask.shape)}")
            valid = attention_mask[:, :n].to(device=k0.device).bool()
        cache.begin(valid, n)
        for i, (k, v) in enumerate(past):
            cache.update(i, k, v)
        cache.end()
        return cache
    raise TypeError(f"past_key_values must be a mixtral KVCache or a tuple of (k, v) pairs, got {type(past)}")


def _untie_in_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """With tied embeddings, the state dict's output head is a copy, not the embeddings' tensor:
    safetensors refuses shared tensors, and transformers' Trainer saves a model that is not its own
    as ``save_file(model.state_dict())``. Loading it back (``load_state_dict``, ``from_pretrained``)
    is unchanged: the copy holds the same values."""
    head, embed = prefix + "lm_head.weight", prefix + "model.embed_tokens.weight"
    if head in state_dict and embed in state_dict and state_dict[head].data_ptr() == state_dict[embed].data_ptr():
        state_dict[head] = state_dict[head].clone()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Next-token cross-entropy: labels are shifted here, -100 ignored, mean over counted tokens.

    ``num_items_in_batch`` (passed by transformers' Trainer under gradient accumulation) is the
    count of labelled tokens over all accumulated micro-batches: the sum is divided by it instead,
    so every token weighs the same however the tokens fall into micro-batches.
    """
    labels = F.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
    flat = logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(*flat, ignore_index=-100)
    total = F.cross_entropy(*flat, ignore_index=-100, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class MixtralForCausalLM(MixtralPreTrainedModel):
    loss_type = "ForCausalLM"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # when config.tie_word_embeddings

    def __init__(self, config: MixtralConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__(config, attn_implementation)
        config = self.config  # ours, also when a transformers config was passed
        self.model = MixtralModel(config, attn_implementation)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        _normal_(self.lm_head.weight, config.initializer_range)
        # generate()'s defaults; from_pretrained replaces them with the checkpoint's generation_config.json
        self.generation_config = GenerationConfig.from_model_config(config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_state_dict_post_hook(_untie_in_state_dict)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast | tuple:
        want_router = output_router_logits if output_router_logits is not None else self.config.output_router_logits
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            output_router_logits=want_router, return_dict=True,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):  # transformers: the positions to keep
            h = h[:, logits_to_keep.to(h.device)]
        elif logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = project(self.lm_head, h)
        loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch")) if labels is not None else None
        aux_loss = None
        if want_router:
            aux_loss = load_balancing_loss(
                out.router_logits, self.config.num_local_experts, self.config.num_experts_per_tok, attention_mask
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        result = MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions, router_logits=out.router_logits,
        )
        return result if (return_dict if return_dict is not None else self.config.return_dict) else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: Any = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """transformers' per-step input hook, for code that drives ``forward`` step by step itself
        (PEFT's causal-LM wrapper requires it; our ``generate`` does not call it): the tokens the
        cache has not seen, the other inputs as given."""
        if past_key_values is not None:
            seen = past_key_values.seen if isinstance(past_key_values, KVCache) else past_key_values.get_seq_length()
            input_ids = input_ids[:, seen:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, **kwargs}

    def generate(self, input_ids: torch.Tensor | None = None, generation_config: Any = None,
                 **kwargs: Any) -> torch.LongTensor | GenerateDecoderOnlyOutput:
        """transformers-style generation; see ``mixtral.generation.generate``."""
        return generate(self, input_ids, generation_config, **kwargs)


class MixtralForSequenceClassification(MixtralPreTrainedModel):
    """Decoder + a bias-free ``score`` head read at each row's last non-padding token."""

    loss_type = "ForSequenceClassification"

    def __init__(self, config: MixtralConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__(config, attn_implementation)
        config = self.config  # ours, also when a transformers config was passed
        self.model = MixtralModel(config, attn_implementation)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        _normal_(self.score.weight, config.initializer_range)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        cache: KVCache | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast | tuple:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits, return_dict=True,
        )
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        B = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and B != 1:
            raise ValueError("sequence classification of a batch needs config.pad_token_id to find each row's end")
        if pad is None or input_ids is None:
            last = torch.full((B,), -1, dtype=torch.long, device=logits.device)
        else:
            # The rightmost non-pad token: works for right padding and for left padding alike.
            not_pad = (input_ids != pad).to(logits.device, torch.long)
            last = (torch.arange(input_ids.shape[1], device=logits.device) * not_pad).argmax(-1)
        pooled = logits[torch.arange(B, device=logits.device), last]  # (B, num_labels)
        loss = classification_loss(pooled, labels, self.config) if labels is not None else None
        result = SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )
        return result if (return_dict if return_dict is not None else self.config.return_dict) else result.to_tuple()


def classification_loss(pooled: torch.Tensor, labels: torch.Tensor, config: MixtralConfig) -> torch.Tensor:
    """Regression (MSE), single-label (cross-entropy) or multi-label (BCE), chosen as transformers does."""
    n = config.num_labels
    problem = config.problem_type
    if problem is None:
        if n == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
        config.problem_type = problem
    labels = labels.to(pooled.device)
    if problem == "regression":
        if n == 1:
            return F.mse_loss(pooled.squeeze().float(), labels.squeeze().float())
        return F.mse_loss(pooled.float(), labels.float())
    if problem == "single_label_classification":
        return F.cross_entropy(pooled.float().view(-1, n), labels.view(-1))
    return F.binary_cross_entropy_with_logits(pooled.float(), labels.float())
