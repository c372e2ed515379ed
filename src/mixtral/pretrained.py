"""What every Mixtral model class shares, and what transformers' code calls on a model.

``MixtralPreTrainedModel`` is the base of ``MixtralModel``, ``MixtralForCausalLM`` and
``MixtralForSequenceClassification`` (in ``mixtral.model``, which holds the architecture): the
config and attention-implementation settings, weight initialization, ``from_pretrained`` /
``save_pretrained``, and the utilities transformers' ``Trainer``, accelerate and PEFT expect of a
``PreTrainedModel`` (embedding accessors, ``resize_token_embeddings``, activation checkpointing,
``num_parameters``). Reading order: the checkpointing plan, the base class, then its helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import hf
from .config import MixtralConfig
from .loader import load_pretrained
from .quant.checkpoint import prepare, save_quantized

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


@dataclass(frozen=True)
class CheckpointPlan:
    """Activation checkpointing as enabled: ``torch.utils.checkpoint``'s keywords, which layers
    (every ``every_n_layers``-th from layer 0) and whether saved tensors go to host memory."""

    kwargs: dict
    every_n_layers: int = 1
    offload: bool = False

    def covers(self, layer_idx: int) -> bool:
        return layer_idx % self.every_n_layers == 0


class MixtralPreTrainedModel(nn.Module):
    """Shared construction, initialization and checkpoint I/O."""

    config_class = MixtralConfig
    base_model_prefix = "model"
    checkpoint_prefix = ""  # what parameter names lack against checkpoint keys (see mixtral.loader)
    # What transformers' Trainer, accelerate and PEFT read off a PreTrainedModel.
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]  # accelerate's device maps and FSDP's auto-wrap: never split a layer
    _keys_to_ignore_on_save: set[str] | None = None
    _tied_weights_keys: dict[str, str] | None = None
    # transformers' LOSS_MAPPING name of the loss ``forward`` computes. Trainer reads it to count
    # ``num_items_in_batch`` over ``labels[..., 1:]`` for a shifted causal-LM loss; without it the
    # count includes each row's first label and every accumulated loss comes out slightly too small.
    loss_type: str | None = None

    @classmethod
    def can_generate(cls) -> bool:
        return callable(getattr(cls, "generate", None))

    def __init__(self, config: MixtralConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}"
            )
        if not isinstance(config, MixtralConfig) and hasattr(config, "to_dict"):
            config = MixtralConfig.from_dict(config.to_dict())  # a transformers MixtralConfig
        self.config = config
        self.attn_implementation = attn_implementation

    @property
    def attn_implementation(self) -> str:
        return self._attn_impl

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        # A head model's setting is its decoder's: switching one after construction switches both.
        self._attn_impl = value
        if "model" in self._modules and self.model is not self:
            self.model.attn_implementation = value

    def init_weights(self) -> None:
        """normal(0, initializer_range) for every matrix, ones for norms (transformers' scheme)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        if self.config.pad_token_id is not None:
            embed = self.get_input_embeddings()
            with torch.no_grad():
                embed.weight[self.config.pad_token_id].zero_()

    # -- transformers' model utilities -----------------------------------------------------------
    def get_decoder(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.get_decoder().embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.get_decoder().embed_tokens = value

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self, "lm_head", None)

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def tie_weights(self) -> None:
        """Share the input embeddings with the output head when ``config.tie_word_embeddings``."""
        head = self.get_output_embeddings()
        if self.config.tie_word_embeddings and isinstance(head, nn.Linear):
            head.weight = self.get_input_embeddings().weight

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Grow or shrink the vocabulary (input embeddings and output head), as transformers does:
        kept rows are copied; new rows are drawn around the old rows' mean with 1e-9 of their
        covariance (``mean_resizing``, so new tokens do not disturb the output distribution at
        first) or from normal(0, initializer_range)."""
        old = self.get_input_embeddings()
        if new_num_tokens is None:
            new_num_tokens = old.num_embeddings
        if pad_to_multiple_of is not None:
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens < 1:
            raise ValueError(f"resize_token_embeddings: new_num_tokens must be >= 1, got {new_num_tokens}")
        if new_num_tokens == old.num_embeddings:
            return old
        head = self.get_output_embeddings()
        tied = head is not None and getattr(head, "weight", None) is old.weight
        if head is not None and not isinstance(head, nn.Linear):
            raise ValueError("resize_token_embeddings: the output head is quantized; resize the float model")
        embed = nn.Embedding(new_num_tokens, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        embed.weight.data = _resized_rows(old.weight.data, new_num_tokens, mean_resizing, self.config)
        self.set_input_embeddings(embed)
        if head is not None and tied:
            head.weight = embed.weight
        elif head is not None:
            new_head = nn.Linear(head.in_features, new_num_tokens, bias=False, device=head.weight.device,
                                 dtype=head.weight.dtype)
            new_head.weight.data = _resized_rows(head.weight.data, new_num_tokens, mean_resizing, self.config)
            self.set_output_embeddings(new_head)
        self.config.vocab_size = new_num_tokens
        return embed

    def enable_input_require_grads(self) -> None:
        """Make the embeddings' output require grad, so gradient checkpointing works with frozen
        embeddings (adapters such as LoRA train only inner weights)."""
        def hook(module, inputs, output):
            output.requires_grad_(True)

        if getattr(self, "_input_grad_hook", None) is None:
            self._input_grad_hook = self.get_input_embeddings().register_forward_hook(hook)

    def disable_input_require_grads(self) -> None:
        hook = getattr(self, "_input_grad_hook", None)
        if hook is not None:
            hook.remove()
            self._input_grad_hook = None

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute decoder layers in the backward pass instead of keeping their activations
        (``torch.utils.checkpoint``, non-reentrant unless ``{"use_reentrant": True}`` is passed), as
        transformers 5 does: every ``every_n_layers``-th layer from the first; ``offload`` keeps what
        the checkpoints save in host memory. The embeddings' output is made to require grad too, so
        reentrant checkpointing still reaches the layers when the embeddings are frozen (adapters)."""
        if every_n_layers < 1:
            raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
        self.get_decoder().gradient_checkpointing = CheckpointPlan(
            dict(activation_checkpointing_kwargs or {}), every_n_layers, offload
        )
        self.enable_input_require_grads()

    def activation_checkpointing_disable(self) -> None:
        # The input-grad hook stays, as in transformers: the caller (PEFT) may have set it itself.
        self.get_decoder().gradient_checkpointing = None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """transformers' deprecated name for ``activation_checkpointing_enable`` (older Trainers call it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.get_decoder().gradient_checkpointing is not None

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once (tied weights are one tensor); ``exclude_embeddings`` leaves out
        the input embeddings (transformers' rule: the ``nn.Embedding`` modules, not the head)."""
        skip = {id(self.get_input_embeddings().weight)} if exclude_embeddings else set()
        unique = {id(p): p for p in self.parameters() if id(p) not in skip}
        return sum(p.numel() for p in unique.values() if p.requires_grad or not only_trainable)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str = "auto",
        device: torch.device | str | None = None,
        attn_implementation: str = "sdpa",
        quantize: str | None = None,
        **kwargs: Any,
    ):
        """Load from an HF directory, a raw Mistral release, a GGUF file, or a hub repo id.

        As in transformers 5, ``dtype="auto"`` (the default) keeps the dtype the checkpoint was
        saved in (bf16 for Mistral's releases; fp32 for a GGUF file, which is dequantized). On a
        CPU without fast bf16 products pass ``dtype=torch.float32``. transformers' keywords are
        taken: ``torch_dtype``, ``device_map`` (one device: a name, ``"auto"`` or ``{"": dev}``),
        ``config`` (ours or transformers'), config attributes to override (``num_labels=3``), and
        ``low_cpu_mem_usage``/``trust_remote_code``/``use_safetensors``, which change nothing here
        (loading is always lazy and local code only; only safetensors and GGUF are read).
        """
        if "torch_dtype" in kwargs:
            dtype = kwargs.pop("torch_dtype")
        device = _device_of(kwargs.pop("device_map", None), device)
        for flag in ("low_cpu_mem_usage", "trust_remote_code"):
            kwargs.pop(flag, None)
        if kwargs.pop("use_safetensors", None) is False:
            raise ValueError("use_safetensors=False: only safetensors (and GGUF) checkpoints are read")
        config = kwargs.pop("config", None)
        if config is not None and not isinstance(config, MixtralConfig):
            config = MixtralConfig.from_dict(config.to_dict())
        progress = kwargs.pop("progress", None)
        return load_pretrained(
            cls, path, dtype=dtype, device=device, attn_implementation=attn_implementation,
            quantize=quantize, config=config, progress=progress, config_overrides=kwargs,
        )

    def save_pretrained(
        self, directory: str | Path, max_shard_size: int | str = "5GB", safe_serialization: bool = True, *,
        is_main_process: bool = True, state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False, variant: str | None = None,
    ) -> None:
        """Write the hub layout (config.json + safetensors, sharded with an index when large);
        a quantized model writes the quantized layout of ``mixtral.quant`` instead.

        As transformers' keywords: ``state_dict`` (our parameter names, e.g. this model's
        ``state_dict()`` gathered elsewhere) is written instead of the model's own tensors, and
        only the main process writes (``is_main_process``)."""
        if not safe_serialization:
            raise ValueError("save_pretrained writes safetensors only (safe_serialization=False is not supported)")
        if push_to_hub or variant is not None:
            raise ValueError("save_pretrained: push_to_hub and variant are not supported; save, then upload the folder")
        if not is_main_process:
            return
        self.config.architectures = [type(self).__name__]
        if getattr(self, "quantization_config", None) is not None:
            if state_dict is not None:
                raise ValueError("save_pretrained: state_dict= is not supported for a quantized model")
            save_quantized(self, Path(directory))
            return
        hf.save_pretrained(self, directory, max_shard_size=max_shard_size, state_dict=state_dict)

    def prepare_for_checkpoint(self, rules, source, device) -> set[str]:
        """Before float weights load: a quantized checkpoint swaps in quantized modules, filled from
        ``source``; returns the checkpoint keys consumed that way."""
        if getattr(rules, "quantized", None) is None:
            return set()
        return prepare(self, rules, source, device)


def _resized_rows(weight: torch.Tensor, rows: int, mean_resizing: bool, config: MixtralConfig) -> torch.Tensor:
    """``weight``'s first rows, extended to ``rows`` (see ``resize_token_embeddings``)."""
    out = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    kept = min(rows, weight.shape[0])
    out[:kept] = weight[:kept]
    added = rows - kept
    if added == 0:
        return out
    if not mean_resizing:
        nn.init.normal_(out[kept:], mean=0.0, std=config.initializer_range)
        return out
    old = weight.float()
    mean = old.mean(dim=0)
    centered = old - mean
    covariance = centered.T @ centered / old.shape[0]
    try:
        dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=1e-9 * covariance)
        out[kept:] = dist.sample((added,)).to(weight.dtype)
    except ValueError:  # covariance not positive definite (fewer rows than columns): the mean
        out[kept:] = mean.to(weight.dtype)
    return out


def _device_of(device_map: Any, device: torch.device | str | None) -> torch.device | str:
    """transformers' ``device_map`` for one device -> a device; the default is the CPU."""
    if device_map is None:
        return device if device is not None else "cpu"
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(
                "device_map: a per-module map is not supported; the model loads whole onto one device "
                "(pass a device name, 'auto' or {'': device})"
            )
        device_map = device_map[""]
    if device_map == "auto":
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, int):
        device_map = f"cuda:{device_map}"
    if device is not None and torch.device(device) != torch.device(device_map):
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree")
    return device_map
