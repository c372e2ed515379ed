"""Mixtral: a decoder-only transformer with a sparse mixture-of-experts block in every layer.

Shape legend (used in comments throughout):
    B batch, T new tokens this step, S keys attended (cache + new), H hidden_size,
    nh query heads, nkv key/value heads, hd head dim, E experts, K experts per token, V vocab.

A forward step: embed -> ``plan_step`` (positions, rotary phases, the cache's view of the step,
the attention path and its mask, all decided once) -> every ``DecoderLayer`` -> final norm -> head.
The building blocks (RMSNorm, rotary, the mask rule, attention math) are in ``mixtral.layers``, the
MoE block in ``mixtral.moe``; decode loops and their fast steppers are in ``mixtral.generation``.

Parameter names follow transformers v5 (``mlp.gate``, ``mlp.experts.gate_up_proj``), except that
q/k/v are one fused ``qkv_proj`` (one matrix product instead of three). Checkpoint layouts are
translated in ``mixtral.checkpoint``; this file knows none of them. The classes' shared base
(loading, saving, what transformers' Trainer calls) is ``mixtral.pretrained``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .cache import KVCache, StepLayout
from .config import MixtralConfig
from .generation import GenerateDecoderOnlyOutput, GenerationConfig, generate
from .hf_cache import is_transformers_cache, to_kv_cache, write_back
from .kernels import cpu_decode_kernels, cpu_row_kernels
from .kernels.attention import attention as layout_attention
from .layers import (
    RMSNorm,
    Step,
    apply_rotary,
    build_mask,
    derive_position_ids,
    eager_attention,
    linear,
    needs_mask,
    rotary_cos_sin,
    rotary_inv_freq,
    sdpa_attention,
)
from .moe import SparseMoeBlock, load_balancing_loss
from .outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast, SequenceClassifierOutputWithPast
from .packed import PackedLayers, decode_all_layers
from .pretrained import CheckpointPlan, MixtralPreTrainedModel


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

    def forward(self, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, H) -> (B, T, H), and the attention probabilities (B, nh, T, S) on the eager path."""
        B, T, _ = x.shape
        qkv = linear(self.qkv_proj, x)
        if step.attention == "cpu_decode":
            return linear(self.o_proj, self.decode_kernel(qkv, step)), None
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, step.cos, step.sin), apply_rotary(k, step.cos, step.sin)
        if step.cache is not None:
            k, v = step.cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        probs = None
        if step.attention == "layout":
            out = layout_attention(q, k, v, step.layout, self.window)
        elif step.attention == "eager":
            out, probs = eager_attention(q, k, v, step.mask, step.dropout)
        else:
            out = sdpa_attention(q, k, v, step.mask, step.dropout)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return linear(self.o_proj, out), probs

    def decode_kernel(self, qkv: torch.Tensor, step: Step) -> torch.Tensor:
        """This layer's attention of a decode step in one C++ call: rotary on q and k, k/v written into
        each row's cache slot, GQA attention over the keys held under the mask rule (evaluated from
        the step's layout). The same numbers as the torch path, without its many small ops, which
        cost more than the arithmetic at one query. qkv (B, 1, (nh + 2 nkv) hd) -> (B, 1, nh hd)."""
        B, rows, layout = qkv.shape[0], step.rows, step.layout
        out = cpu_decode_kernels(qkv).decode_attention(
            qkv.reshape(B, -1).contiguous(), step.cos, step.sin, rows.keys(self.layer_idx),
            rows.values(self.layer_idx), rows.slots, rows.lengths, layout.key_index, layout.key_valid,
            rows.query_index, self.window or 0, self.num_heads,
        )
        return out.view(B, 1, -1)


class DecoderLayer(nn.Module):
    def __init__(self, config: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = SparseMoeBlock(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        h, probs = self.self_attn(self.input_layernorm(x), step)
        x = x + h
        h, router_logits = self.mlp(self.post_attention_layernorm(x))
        if step.record is not None:
            step.record.add(probs, router_logits)
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


def attention_path(implementation: str, x: torch.Tensor, cache: Any, want_probs: bool, training: bool,
                   dropout: bool) -> str:
    """The attention path of a step (see ``Step``), decided once for all its layers.

    ``flash_attention_2`` on CUDA attends from the layout (``mixtral.kernels.attention``); on the
    CPU it is the SDPA path, since FlexAttention runs only eagerly (slowly) there. One fp32 query
    per row on the CPU, with our cache (or the server's view of several), goes to the decode kernel.
    ``eager`` stays the written-out reference, and is the only path that returns probabilities.
    """
    if implementation == "eager" or want_probs:
        return "eager"
    if implementation == "flash_attention_2" and x.is_cuda and not training:
        return "layout"
    if (x.shape[1] == 1 and hasattr(cache, "decode_rows") and cache.dtype == torch.float32 and not dropout
            and cpu_decode_kernels(x) is not None):
        return "cpu_decode"
    return "sdpa"


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() == 0:
        raise ValueError("empty input: input_ids has no tokens")
    lo, hi = (int(t) for t in torch.aminmax(input_ids))  # one pass over the ids instead of two
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise ValueError(f"token id {bad} is out of range for vocab_size={vocab_size}")


def new_tokens_valid(attention_mask: torch.Tensor | None, B: int, T: int, past: int,
                     device: torch.device) -> torch.Tensor | None:
    """The new tokens' columns of ``attention_mask`` as (B, T) bool, or None (no mask given). Only
    those columns are read (the cache keeps the past's); more columns than past + T would mean the
    mask and the cache disagree about where the row is."""
    if attention_mask is None:
        return None
    columns = attention_mask.shape[-1]
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B or not T <= columns <= past + T:
        also = f" (or ({B}, {T}): the new tokens' columns alone)" if past else ""
        raise ValueError(f"attention_mask must be (batch, past + seq_len) = ({B}, {past + T}){also}, "
                         f"got shape {tuple(attention_mask.shape)}")
    return attention_mask[:, -T:].to(device=device).bool()


class MixtralModel(MixtralPreTrainedModel):
    """The decoder stack: embeddings, layers, final norm. Returns hidden states."""

    checkpoint_prefix = "model."  # its checkpoint keys carry this prefix, its parameter names do not

    def __init__(self, config: MixtralConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__(config, attn_implementation)
        config = self.config  # ours, also when a transformers config was passed
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", rotary_inv_freq(config.dim_per_head, config.rope_theta), persistent=False)
        self.gradient_checkpointing: CheckpointPlan | None = None  # set by activation_checkpointing_enable
        self.init_weights()

    @property
    def model(self) -> MixtralModel:  # so MixtralPreTrainedModel helpers work on the bare model too
        return self

    def reset_rotary(self, device: torch.device | str | None = None) -> None:
        self.inv_freq = rotary_inv_freq(self.config.dim_per_head, self.config.rope_theta, device=device)

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
        past = cache if cache is not None else past_key_values
        h = self.embed(input_ids, inputs_embeds)
        T = h.shape[1]
        checkpointing = self.gradient_checkpointing is not None and self.training and torch.is_grad_enabled()
        # A cache written during the backward pass's recomputation would be written twice.
        use_cache = (config.use_cache if use_cache is None else use_cache) and not checkpointing
        record = Recorder.of(
            bool(output_attentions if output_attentions is not None else config.output_attentions),
            bool(output_router_logits if output_router_logits is not None else config.output_router_logits),
            bool(output_hidden_states if output_hidden_states is not None else config.output_hidden_states),
        )
        hf_cache = past if is_transformers_cache(past) else None
        past = to_kv_cache(past, config, h.shape[0], attention_mask, T)
        if use_cache and past is None:
            past = KVCache.for_model(config, h.shape[0], dtype=h.dtype, device=h.device)

        step = self.plan_step(h, attention_mask, position_ids, past, record)
        h = self.run_layers(h, step, checkpointing)
        h = self.norm(h)
        if past is not None:
            past.end()
            if hf_cache is not None:  # transformers code reuses its cache object in place
                write_back(hf_cache, past, T)
        if record is not None and record.hidden_states is not None:
            record.hidden_states[-1] = h  # transformers' convention: the last entry is after the norm
        out = MoeModelOutputWithPast(
            last_hidden_state=h,
            past_key_values=past if use_cache else None,
            hidden_states=tuple(record.hidden_states) if record and record.hidden_states is not None else None,
            attentions=tuple(record.attentions) if record and record.attentions is not None else None,
            router_logits=tuple(record.router_logits) if record and record.router_logits is not None else None,
        )
        return out if (return_dict if return_dict is not None else config.return_dict) else out.to_tuple()

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token ids (B, T), checked against the vocabulary, or given embeddings -> (B, T, H)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
            check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if inputs_embeds.shape[1] == 0:
            raise ValueError("empty input: the sequence has no tokens")
        return inputs_embeds

    def plan_step(self, h: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                  cache: Any, record: Recorder | None) -> Step:
        """Everything the layers of this step share (see ``Step``): the cache's view of the new
        tokens (``begin``), positions and rotary phases, the attention path and its mask."""
        B, T = h.shape[:2]
        new_valid = new_tokens_valid(attention_mask, B, T, cache.seen if cache is not None else 0, h.device)
        if cache is not None:
            layout, row_start = cache.begin(new_valid, T), cache.row_positions
        else:
            query_index = torch.arange(T, device=h.device)
            key_valid = new_valid if new_valid is not None else torch.ones(B, T, dtype=torch.bool, device=h.device)
            layout = StepLayout(query_index, key_valid, query_index, new_valid is None or bool(new_valid.all()))
            row_start = torch.zeros(B, dtype=torch.long, device=h.device)
        if position_ids is None:
            position_ids = derive_position_ids(new_valid, row_start, T)
        cos, sin = rotary_cos_sin(self.inv_freq, position_ids, h.dtype)
        dropout = self.config.attention_dropout if self.training else 0.0
        path = attention_path(self.attn_implementation, h, cache, record is not None and record.attentions is not None,
                              self.training, dropout > 0)
        step = Step(cos, sin, path, cache=cache, layout=layout, dropout=dropout, record=record)
        window = self.config.sliding_window
        if path == "cpu_decode":  # the kernel takes (B, hd) phases: position_ids may be (1, 1) for all rows
            step.cos, step.sin = (t.expand(B, 1, 1, t.shape[-1]).reshape(B, -1).contiguous() for t in (cos, sin))
            step.rows = cache.decode_rows()
        elif path != "layout" and needs_mask(layout, window, rolling=cache is not None and cache.window is not None):
            step.mask = build_mask(layout, window)
        return step

    def run_layers(self, h: torch.Tensor, step: Step, checkpointing: bool) -> torch.Tensor:
        record = step.record
        if step.attention == "cpu_decode" and record is None and not self.training:
            fused = self.decode_fused(h, step)
            if fused is not None:
                return fused
        if record is not None and record.hidden_states is not None:
            record.hidden_states.append(h)  # the embeddings come first, as in transformers
        for i, layer in enumerate(self.layers):
            if checkpointing and self.gradient_checkpointing.covers(i):
                h = checkpointed_layer(layer, h, step, self.gradient_checkpointing)
            else:
                h = layer(h, step)
            if record is not None and record.hidden_states is not None:
                record.hidden_states.append(h)
        return h


    def decode_fused(self, h: torch.Tensor, step: Step) -> torch.Tensor | None:
        """All layers of a one-token CPU step in one C++ call (``mixtral.packed``), or None where it
        does not cover the step (more rows than the row kernels serve) or the layers. The same
        numbers as the layer-by-layer path up to float rounding; the stepper generate uses packs
        once per call, a direct call packs afresh, as its modules may have been swapped since."""
        ck = cpu_row_kernels(h)
        packed = PackedLayers.of(self.layers) if ck is not None else None
        if packed is None:
            return None
        B = h.shape[0]
        out = decode_all_layers(ck, packed, h.reshape(B, -1), step.cos, step.sin, step.layout, step.rows, self.config)
        return out.view(B, 1, -1)


def checkpointed_layer(layer: DecoderLayer, h: torch.Tensor, step: Step, plan: CheckpointPlan) -> torch.Tensor:
    """One layer under ``torch.utils.checkpoint`` (no cache: training). The backward pass re-runs
    the layer, so the optional outputs come back as return values, collected by a recorder made
    per call, and are added to the step's recorder once, from the first run."""
    record = step.record
    want_probs = record is not None and record.attentions is not None
    want_router = record is not None and record.router_logits is not None

    def run(h, cos, sin):
        local = Recorder.of(want_probs, want_router, False)
        out = layer(h, dataclasses.replace(step, cos=cos, sin=sin, cache=None, record=local))
        return out, local.attentions[0] if want_probs else None, local.router_logits[0] if want_router else None

    with (torch.autograd.graph.save_on_cpu(pin_memory=h.is_cuda) if plan.offload else contextlib.nullcontext()):
        h, probs, router_logits = torch.utils.checkpoint.checkpoint(
            run, h, step.cos, step.sin, **{"use_reentrant": False, **plan.kwargs}
        )
    if record is not None:
        record.add(probs, router_logits)
    return h


def _normal_(weight: torch.Tensor, std: float) -> None:
    if weight.device.type != "meta":
        nn.init.normal_(weight, mean=0.0, std=std)


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
        logits = linear(self.lm_head, h)
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
