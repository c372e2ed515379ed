"""Sparse upcycling: a dense Llama/Mistral-architecture checkpoint -> a Mixtral with copied experts.

Every expert starts as a copy of the layer's dense MLP (optionally plus Gaussian noise, so that the
experts can drift apart in training), and the router is drawn from a seed. With exact copies the
mixture computes the dense MLP whatever the router picks: the top-k weights are renormalized to sum
to 1, and sum_k w_k * f(x) = f(x).

Dense sources are read through the same rule tables as everything else: a Hugging Face directory
(``model_type`` llama or mistral, ``mlp.gate_proj/up_proj/down_proj``) through ``dense_hf_rules``, a
dense GGUF through ``mixtral.checkpoint.gguf`` (which already reads it as one expert). Upcycling
then wraps the one-expert rules: ``upcycle_rules``; ``read_upcycled`` gives the (config, source,
rules) of the upcycled model, which ``mixtral.loader.upcycle`` builds, and ``save_upcycled`` writes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import MixtralConfig
from .gguf import read_gguf
from .hf import hf_rules
from .loading import (
    CheckpointError,
    Rule,
    SafetensorsSource,
    TensorSource,
    dense_as_one_expert,
    read_json,
    write_atomically,
)

# Where transformers' LlamaConfig/MistralConfig defaults differ from MixtralConfig's: a config.json
# that omits these fields means the dense model's default, not ours.
DENSE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048, sliding_window=None),
    "mistral": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096 * 32, sliding_window=4096),
}


def config_from_dense_hf(data: dict[str, Any], path: Path) -> MixtralConfig:
    """A Llama/Mistral ``config.json`` -> a one-expert, top-1 MixtralConfig."""
    model_type = data.get("model_type")
    if model_type not in DENSE_DEFAULTS:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a dense Llama/Mistral model "
                              f"(expected one of {', '.join(DENSE_DEFAULTS)})")
    for flag in ("attention_bias", "mlp_bias"):
        if data.get(flag):
            raise CheckpointError(f"{path}: {flag}=true is not supported (Mixtral has no biases)")
    data = dict(data)
    for key, value in DENSE_DEFAULTS[model_type].items():
        if key == "rope_theta" and isinstance(data.get("rope_parameters") or data.get("rope_scaling"), dict):
            continue
        data.setdefault(key, value)
    data.setdefault("num_key_value_heads", data.get("num_attention_heads"))
    data.update(num_local_experts=1, num_experts_per_tok=1)
    try:
        return MixtralConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def dense_hf_rules(config: MixtralConfig, keys: set[str]) -> dict[str, Rule]:
    """The hub layout's attention/norm rules, with the dense MLP read as one expert and no router."""
    rules = {k: v for k, v in hf_rules(config, keys).items() if ".mlp." not in k}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        mlp = p + "mlp."
        rules.update(dense_as_one_expert(p, mlp + "gate_proj.weight", mlp + "up_proj.weight",
                                         mlp + "down_proj.weight", config.hidden_size, config.intermediate_size))
    return rules


def read_dense(path: Path) -> tuple[MixtralConfig, TensorSource, dict[str, Rule]]:
    """(one-expert config, source, rules) for a dense HF directory or a dense GGUF file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        config, source, rules = read_gguf(path)
        if config.num_local_experts != 1:
            raise CheckpointError(f"{path}: already a mixture of {config.num_local_experts} experts, not dense")
        return config, source, rules
    config_path = path / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: neither a .gguf file nor a directory with config.json")
    data = read_json(config_path)
    config = config_from_dense_hf(data, config_path)
    source = SafetensorsSource.from_directory(path)
    return config, source, dense_hf_rules(config, set(source.keys()))


def _seeded(seed: int, layer: int, which: int) -> torch.Generator:
    """One generator per (layer, tensor): the result does not depend on the order tensors load in."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer * 4 + which)


def upcycle_rules(
    config: MixtralConfig, rules: dict[str, Rule], experts: int, top_k: int, noise: float = 0.0, seed: int = 0
) -> tuple[MixtralConfig, dict[str, Rule]]:
    """Wrap one-expert rules so that each layer has ``experts`` copies and a seeded router."""
    if config.num_local_experts != 1:
        raise ValueError(f"upcycling needs a dense (one-expert) model, got {config.num_local_experts} experts")
    if noise < 0:
        raise ValueError(f"--noise must be >= 0, got {noise}")
    new = dataclasses.replace(config, num_local_experts=experts, num_experts_per_tok=top_k)
    std = config.initializer_range
    out = dict(rules)

    def copies(rule: Rule, layer: int, which: int) -> Rule:
        def combine(ts: list[torch.Tensor]) -> torch.Tensor:
            one = rule.build(ts).to(torch.float32)  # (1, rows, cols)
            many = one.expand(experts, *one.shape[1:]).clone()
            if noise:
                many += noise * torch.randn(many.shape, generator=_seeded(seed, layer, which))
            return many

        return dataclasses.replace(rule, combine=combine)  # keeps the source shapes to check

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        out[p + "experts.gate_up_proj"] = copies(rules[p + "experts.gate_up_proj"], i, 0)
        out[p + "experts.down_proj"] = copies(rules[p + "experts.down_proj"], i, 1)
        out[p + "gate.weight"] = Rule((), lambda ts, i=i: std * torch.randn(
            experts, config.hidden_size, generator=_seeded(seed, i, 2)))
    return new, out


def read_upcycled(
    path: Path, experts: int, top_k: int, noise: float = 0.0, seed: int = 0
) -> tuple[MixtralConfig, TensorSource, dict[str, Rule]]:
    """(config, source, rules) of the Mixtral upcycled from the dense checkpoint at ``path``."""
    config, source, rules = read_dense(Path(path))
    config, rules = upcycle_rules(config, rules, experts, top_k, noise, seed)
    return config, source, rules


def save_upcycled(model, tokenizer, dst: Path, max_shard_size: int | str = "5GB", source: Path | None = None) -> None:
    """Checkpoint and tokenizer into ``dst``, all or nothing; ``dst`` ends up holding exactly these
    files (no stale ones of an earlier checkpoint), and is refused when it is ``source`` or lies
    inside it."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_atomically(Path(dst), write, replace=True, sources=[source] if source is not None else [])

