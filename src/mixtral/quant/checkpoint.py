"""Saving and loading quantized checkpoints (layout documented in ``mixtral.quant``).

Loading goes through the ordinary ``from_pretrained`` path: ``mixtral.checkpoint.quantized`` gives
the rules for the float parameters (identity: the file uses internal names) and remembers which
stored tensors are quantized; the model's ``prepare_for_checkpoint`` then calls ``prepare`` here,
which swaps in quantized modules filled straight from the file (int8 stays int8: no float copy is
ever made), and reports the keys it consumed so the float loader does not count them as unexpected.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.loading import CheckpointError, TensorSource, write_atomically
from ..checkpoint.quantized import SUFFIXES, QuantizedRules
from . import (
    LAYOUT_VERSION,
    QuantExperts,
    QuantizedTensor,
    QuantLinear,
    quantization_config,
    set_activations,
    upgrade_int4,
)


def prepare(model: nn.Module, rules: QuantizedRules, source: TensorSource, device) -> set[str]:
    """Swap the modules holding quantized tensors for quantized ones, filled from ``source``."""
    prefix = getattr(model, "checkpoint_prefix", "")  # "model." for a bare MixtralModel: in stored names, not its own
    bits = rules.qconfig["bits"]
    consumed: set[str] = set()
    groups: set[int] = set()  # int4 group sizes as stored (each tensor's is its K / scales columns)
    for name in rules.quantized:
        local = name[len(prefix):] if prefix and name.startswith(prefix) else name
        tensors = {}
        for s in SUFFIXES:
            if name + s in source:
                tensors[s] = source.get(name + s).to(device)
                consumed.add(name + s)
        if ".qweight" not in tensors or ".scales" not in tensors or (
                bits == 4 and ".mins" not in tensors and not name.startswith("lm_head")):
            raise CheckpointError(f"{source.where(name + '.qweight')}: {name} lacks scales or mins")
        # Each tensor's format is what it holds: the output head is int8 in an int4 checkpoint.
        problem = _shape_problem(tensors)
        if problem:
            raise CheckpointError(f"{source.where(name + '.qweight')}: {name}: {problem}")
        if ".mins" in tensors:
            try:  # an older int4 layout is repacked once, here
                q, scales, mins = upgrade_int4(tensors[".qweight"], tensors[".scales"], tensors[".mins"],
                                               rules.qconfig.get("version", 1))
            except (RuntimeError, ValueError) as e:
                raise CheckpointError(f"{source.where(name + '.qweight')}: bad int4 tensors for {name}: {e}") from e
            qt = QuantizedTensor(4, q, scales, mins)
            groups.add(qt.group_size)
        else:
            qt = QuantizedTensor(8, tensors[".qweight"], tensors[".scales"])
        module_name, _, leaf = local.rpartition(".")  # e.g. (...self_attn.qkv_proj, weight)
        if leaf == "weight":
            _replace(model, module_name, QuantLinear(qt))
        elif leaf in ("gate_up_proj", "down_proj"):
            experts = model.get_submodule(module_name)
            pending = getattr(experts, "_pending", {})
            pending[leaf] = qt
            if len(pending) == 2:
                _replace(model, module_name, QuantExperts(pending["gate_up_proj"], pending["down_proj"], experts.act))
            else:
                experts._pending = pending
        else:
            raise CheckpointError(f"{source.where(name + '.qweight')}: don't know how to load quantized {name}")
    # What it holds now. The group size is read off the tensors: older versions recorded the
    # requested size even where a smaller one was used, and a re-save must not repeat that.
    model.quantization_config = {**rules.qconfig, "version": LAYOUT_VERSION,
                                 "group_size": groups.pop() if len(groups) == 1 else None}
    set_activations(model, rules.qconfig.get("activations", "int8"))
    return consumed


def _shape_problem(t: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with one quantized weight's stored tensors, or None (see the layout in mixtral.quant)."""
    q, scales, mins = t[".qweight"], t[".scales"], t.get(".mins")
    if mins is None:
        if q.dtype != torch.int8 or tuple(scales.shape) != tuple(q.shape[:-1]):
            return (f"int8 weight needs int8 qweight (..., O, K) and scales (..., O), got {q.dtype} "
                    f"{tuple(q.shape)} and {tuple(scales.shape)}")
        return None
    K = 2 * q.shape[-1]
    if (q.dtype != torch.uint8 or scales.shape != mins.shape or tuple(scales.shape[:-1]) != tuple(q.shape[:-1])
            or scales.shape[-1] == 0 or K % scales.shape[-1] or (K // scales.shape[-1]) % 32):
        return (f"int4 weight needs uint8 qweight (..., O, K/2) and scales/mins (..., O, K/G) with G a multiple "
                f"of 32, got {q.dtype} {tuple(q.shape)}, {tuple(scales.shape)} and {tuple(mins.shape)}")
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    path, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(path) if path else model, leaf, new)


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor under its checkpoint name; tied weights once."""
    out, seen = {}, set()
    tied = model.config.tie_word_embeddings
    for mname, module in model.named_modules():
        if isinstance(module, QuantizedTensor):
            # QuantLinear holds `weight_q` for `<linear>.weight`; QuantExperts `gate_up_q` / `down_q`.
            owner, _, attr = mname.rpartition(".")
            base = {"weight_q": "weight", "gate_up_q": "gate_up_proj", "down_q": "down_proj"}[attr]
            for s, t in (("qweight", module.qweight), ("scales", module.scales), ("mins", module.mins)):
                if t is not None:
                    out[f"{owner}.{base}.{s}"] = t
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or (name == "lm_head.weight" and tied):
            continue
        seen.add(id(p))
        out[name] = p.detach()
    return out


def save_quantized(model: nn.Module, directory: Path, copy_from: Path | None = None, *, tokenizer=None,
                   replace: bool = False, sources: Iterable[Path] = ()) -> None:
    """Write config.json (with ``quantization_config``) and model.safetensors, plus the tokenizer:
    ``tokenizer`` (e.g. one read from a GGUF) saved, or the tokenizer files of ``copy_from`` copied.
    ``replace`` and ``sources`` are ``write_atomically``'s: the quantize command replaces its
    destination whole; ``save_pretrained`` adds to it, as for float models."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().clone() for k, v in quantized_state(model).items()}
    qconfig = getattr(model, "quantization_config", None) or quantization_config("int8", 128, False)
    qconfig = {**qconfig, "version": LAYOUT_VERSION}  # tensors in memory are always in the current layout

    def write(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = qconfig
        cfg["torch_dtype"] = "float32"
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if getattr(model, "generation_config", None) is not None:  # the model's, as save_pretrained writes it
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif copy_from is not None and copy_from.is_dir():
            for f in copy_from.iterdir():
                if f.is_file() and (f.name.startswith("tokenizer") or f.name in (
                        "special_tokens_map.json", "chat_template.jinja")):
                    shutil.copy(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    directory = Path(directory)
    stale = set() if replace else set(directory.glob("model-*.safetensors")) | set(
        directory.glob("model.safetensors.index.json"))
    write_atomically(directory, write, replace=replace, sources=sources)
    for f in stale:  # an index left by an earlier sharded save would be loaded instead of the new file
        f.unlink(missing_ok=True)
