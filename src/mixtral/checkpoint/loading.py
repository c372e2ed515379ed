"""Format-independent checkpoint machinery: tensor sources, renaming rules, and loading into a model.

Each checkpoint format provides (1) a ``TensorSource`` that reads its tensors by key and (2) a table
of ``Rule``s: for every internal parameter name, the checkpoint keys it is made from and how to
combine them. ``materialize`` fills a model built on the meta device from those, one parameter at a
time, so peak memory stays near one copy of the weights. Anything missing, unexpected or misshapen
is an error naming the file and tensor, raised before the model is returned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model; the message names file and tensor."""


@dataclass(frozen=True)
class Rule:
    """An internal parameter built from checkpoint ``keys`` by ``combine`` (identity for one key)."""

    keys: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None

    def build(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.combine is None:
            (t,) = tensors
            return t
        return self.combine(tensors)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else is a CheckpointError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def dense_as_one_expert(prefix: str, gate: str, up: str, down: str, hidden_size: int) -> dict[str, Rule]:
    """Rules loading a dense SwiGLU MLP (checkpoint keys ``gate``/``up``/``down``) as the single
    expert of layer ``prefix``. Its router gets a zero row: with one expert the softmax weight is 1
    whatever the logit, so the layer computes exactly the dense MLP."""
    return {
        prefix + "mlp.gate.weight": Rule((), lambda ts: torch.zeros(1, hidden_size)),
        prefix + "mlp.experts.gate_up_proj": Rule((gate, up), lambda ts: torch.cat(ts)[None]),
        prefix + "mlp.experts.down_proj": Rule((down,), lambda ts: ts[0][None]),
    }


class TensorSource:
    """Read-only mapping from checkpoint key to tensor; ``where(key)`` names the file for errors."""

    def keys(self) -> Iterable[str]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def where(self, key: str) -> str:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())


class DictSource(TensorSource):
    """Tensors already in memory (used by converters that produce them on the fly)."""

    def __init__(self, tensors: dict[str, torch.Tensor], origin: str) -> None:
        self.tensors = tensors
        self.origin = origin

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def where(self, key: str) -> str:
        return self.origin


class SafetensorsSource(TensorSource):
    """One ``model.safetensors`` or the shards listed by ``model.safetensors.index.json``.

    Tensors are memory-mapped, and each file is opened only for the duration of one read: a
    handle kept open would keep every page read through it counted in the process's memory,
    on top of the copies that fused parameters (q|k|v, stacked experts) are built into.
    """

    def __init__(self, files: list[Path], index: dict[str, str] | None = None, index_path: Path | None = None):
        from safetensors import safe_open

        self._file_of: dict[str, Path] = {}
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {index_path or 'the checkpoint'} does not exist")
            _check_safetensors_extent(f, f.stat().st_size)
            try:
                with safe_open(str(f), framework="pt") as handle:
                    keys = list(handle.keys())
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
            for k in keys:
                if k in self._file_of:
                    raise CheckpointError(f"{f}: tensor {k!r} also appears in {self._file_of[k]}")
                self._file_of[k] = f
        if index is not None:
            for key, shard in index.items():
                got = self._file_of.get(key)
                if got is None:
                    raise CheckpointError(f"{index_path}: tensor {key!r} is listed in {shard} but not found there")

    @classmethod
    def from_directory(cls, directory: Path) -> SafetensorsSource:
        index_path = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
            files = sorted({directory / name for name in weight_map.values()})
            return cls(files, weight_map, index_path)
        if single.exists():
            return cls([single])
        shards = sorted(directory.glob("*.safetensors"))
        if shards:
            return cls(shards)
        raise CheckpointError(f"{directory}: no model.safetensors, index or *.safetensors files found")

    def keys(self) -> Iterable[str]:
        return self._file_of.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self._file_of[key]
        try:
            with safe_open(str(f), framework="pt") as handle:
                return handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{f}: could not read tensor {key!r} ({e})") from e

    def where(self, key: str) -> str:
        return str(self._file_of.get(key, "?"))


def _check_safetensors_extent(path: Path, size: int) -> None:
    """A truncated file must fail here, not later as garbage: the header says how long the data is."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: the header describes {8 + n + end} bytes, the file has {size}")


def parse_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    name = str(dtype).replace("torch.", "")
    if name not in names:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")
    return names[name]


def materialize(
    model: nn.Module,
    rules: dict[str, Rule],
    source: TensorSource,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    optional: Iterable[str] = (),
    ignore: Callable[[str], bool] = lambda key: False,
    progress: bool | None = None,
) -> list[str]:
    """Fill ``model``'s (meta) parameters from ``source`` through ``rules``.

    ``optional`` parameters may be absent (they are then initialized and returned, e.g. a fresh
    classification head); checkpoint keys for which ``ignore(key)`` is true may be left unused.
    """
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights: filled once, through their first name
            continue
        seen.add(id(p))
        params[name] = p
    optional = set(optional)
    available = set(source.keys())
    missing, absent_optional = [], []
    for name in params:
        rule = rules.get(name)
        lacking = [k for k in rule.keys if k not in available] if rule else [name]
        if lacking:
            (absent_optional if name in optional else missing).append((name, lacking))
    if missing:
        lines = ", ".join(f"{name} (needs {', '.join(lack[:3])}{'...' if len(lack) > 3 else ''})"
                          for name, lack in missing[:8])
        raise CheckpointError(f"{_origin(source)}: missing tensors for {len(missing)} parameters: {lines}")
    used = {k for name in params if name in rules and name not in dict(absent_optional) for k in rules[name].keys}
    unexpected = sorted(k for k in available - used if not ignore(k))
    if unexpected:
        shown = ", ".join(f"{k} (in {source.where(k)})" for k in unexpected[:8])
        raise CheckpointError(f"unexpected tensors not used by {type(model).__name__}: {shown}"
                              + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))

    from tqdm.auto import tqdm

    total = sum(p.numel() for p in params.values())
    bar = tqdm(total=total * torch.finfo(dtype).bits // 8, unit="B", unit_scale=True, desc="loading weights",
               disable=(not progress) if progress is not None else (total < 250_000_000 or None))
    absent = dict(absent_optional)
    for name, p in params.items():
        if name in absent:
            t = torch.empty(p.shape, dtype=dtype, device=device)
            nn.init.normal_(t, std=getattr(getattr(model, "config", None), "initializer_range", 0.02))
        else:
            rule = rules[name]
            t = rule.build([source.get(k) for k in rule.keys])
            if tuple(t.shape) != tuple(p.shape):
                where = ", ".join(f"{k} in {source.where(k)}" for k in rule.keys[:2])
                raise CheckpointError(
                    f"{where}: shape {tuple(t.shape)} does not fit {name} of shape {tuple(p.shape)}"
                )
            t = t.to(device=device, dtype=dtype)
        _set_parameter(model, name, t)
        bar.update(t.numel() * t.element_size())
    bar.close()
    return [name for name, _ in absent_optional]


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    old = module._parameters[leaf]
    module._parameters[leaf] = nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad)


def _origin(source: TensorSource) -> str:
    keys = list(source.keys())
    return source.where(keys[0]) if keys else "checkpoint"


def write_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` into a fresh sibling directory, then move its files into ``directory``.

    A crash leaves only the hidden temporary directory behind, never a destination that looks
    complete; config.json moves last, since loaders look for it first.
    """
    import shutil
    import tempfile

    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    try:
        write(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        umask = os.umask(0)
        os.umask(umask)
        for n in names:
            os.chmod(tmp / n, 0o666 & ~umask)  # safetensors creates files private (0600)
            os.replace(tmp / n, directory / n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
