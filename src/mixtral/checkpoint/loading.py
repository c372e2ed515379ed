"""Format-independent checkpoint machinery: tensor sources, renaming rules, and loading into a model.

Each checkpoint format provides (1) a ``TensorSource`` that reads its tensors by key and (2) a table
of ``Rule``s: for every internal parameter name, the checkpoint keys it is made from, the shape
each of them must have, and how to combine them. ``materialize`` checks every source tensor's shape
and dtype from the file headers first, then fills a model built on the meta device, one parameter at
a time, so peak memory stays near one copy of the weights. Anything missing, unexpected or misshapen
is an error naming the file and tensor, raised before any weight is read.
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


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Rule:
    """An internal parameter built from checkpoint ``keys`` by ``combine`` (identity for one key).

    ``shapes`` is the shape each key must have, as the config implies. The parameter's own shape is
    not enough for combined tensors: a q_proj/k_proj pair with their sizes swapped concatenates to
    the right qkv size, and a transposed (H, E*I) w2 reshapes without complaint. Without ``shapes``,
    a single-key identity rule is checked against the parameter itself.
    """

    keys: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
    shapes: tuple[Shape, ...] | None = None

    def __post_init__(self) -> None:
        if self.shapes is not None and len(self.shapes) != len(self.keys):
            raise ValueError(f"Rule for {self.keys[:2]}...: {len(self.shapes)} shapes for {len(self.keys)} keys")

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


def dense_as_one_expert(prefix: str, gate: str, up: str, down: str, hidden_size: int,
                        inter: int | None = None) -> dict[str, Rule]:
    """Rules loading a dense SwiGLU MLP (checkpoint keys ``gate``/``up``/``down``) as the single
    expert of layer ``prefix``. Its router gets a zero row: with one expert the softmax weight is 1
    whatever the logit, so the layer computes exactly the dense MLP."""
    return {
        prefix + "mlp.gate.weight": Rule((), lambda ts: torch.zeros(1, hidden_size)),
        prefix + "mlp.experts.gate_up_proj": Rule((gate, up), lambda ts: torch.cat(ts)[None],
                                                  None if inter is None else ((inter, hidden_size),) * 2),
        prefix + "mlp.experts.down_proj": Rule((down,), lambda ts: ts[0][None],
                                               None if inter is None else ((hidden_size, inter),)),
    }


class TensorSource:
    """Read-only mapping from checkpoint key to tensor; ``where(key)`` names the file for errors.

    ``shape`` and ``dtype`` come from headers (or memory-mapped metadata) without reading the data,
    so that every tensor can be checked before the first one is loaded.
    """

    def keys(self) -> Iterable[str]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def shape(self, key: str) -> Shape:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def where(self, key: str) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        """The checkpoint as a whole, for errors that are about no single tensor's file."""
        keys = list(self.keys())
        return self.where(keys[0]) if keys else "checkpoint"

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

    def shape(self, key: str) -> Shape:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def where(self, key: str) -> str:
        return self.origin

    def describe(self) -> str:
        return self.origin


# safetensors' dtype names (the header's "dtype" field)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsSource(TensorSource):
    """One ``model.safetensors`` or the shards listed by ``model.safetensors.index.json``.

    Tensors are memory-mapped, and each file is opened only for the duration of one read: a
    handle kept open would keep every page read through it counted in the process's memory,
    on top of the copies that fused parameters (q|k|v, stacked experts) are built into.
    Shapes and dtypes come from the headers, read once here.
    """

    def __init__(self, files: list[Path], index: dict[str, str] | None = None, index_path: Path | None = None):
        from safetensors import safe_open

        self.files, self.index_path = list(files), index_path
        self._file_of: dict[str, Path] = {}
        self._header: dict[str, dict] = {}
        for f in files:
            listed = f" (listed in {index_path})" if index_path else ""
            if f.is_dir():
                raise CheckpointError(f"{f}: a directory, not a safetensors file{listed}")
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {index_path or 'the checkpoint'} does not exist")
            header = _read_safetensors_header(f, f.stat().st_size)
            try:
                with safe_open(str(f), framework="pt") as handle:
                    keys = list(handle.keys())
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
            for k in keys:
                if k in self._file_of:
                    raise CheckpointError(f"{f}: tensor {k!r} also appears in {self._file_of[k]}")
                self._file_of[k], self._header[k] = f, header[k]
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
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: not a valid safetensors index (weight_map should map tensor "
                                      f"names to shard files, found {type(weight_map).__name__})")
            for key, name in weight_map.items():
                if not isinstance(name, str):
                    raise CheckpointError(f"{index_path}: weight_map[{key!r}] is {name!r}, expected a shard file name")
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

    def shape(self, key: str) -> Shape:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self._header[key]["dtype"]
        if name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self._file_of[key]}: tensor {key!r} has dtype {name}, which is not supported")
        return SAFETENSORS_DTYPES[name]

    def where(self, key: str) -> str:
        return str(self._file_of.get(key, "?"))

    def describe(self) -> str:
        if self.index_path is None:
            return str(self.files[0]) if len(self.files) == 1 else str(self.files[0].parent)
        # Tensors missing from an index usually mean a shard it forgot: name the files it leaves out.
        unlisted = sorted(p.name for p in self.index_path.parent.glob("*.safetensors") if p not in self.files)
        return str(self.index_path) + (f" (which does not list {', '.join(unlisted)}, found beside it)"
                                       if unlisted else "")


def _read_safetensors_header(path: Path, size: int) -> dict:
    """The header of ``path``, checked against the file's size: a truncated file must fail here, not
    later as garbage, and a corrupt header length must not make us allocate it."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file: the header claims {n} bytes, "
                                  f"the file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: the header describes {8 + n + end} bytes, the file has {size}")
    return header


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
    params = _distinct_parameters(model)
    absent = _absent_optional(params, rules, source, set(optional))
    _check_unused(model, params, rules, source, set(absent), ignore)
    _check_sources(params, {n: r for n, r in rules.items() if n in params and n not in absent}, source)
    _fill(model, params, rules, source, set(absent), dtype=dtype, device=device, progress=progress)
    return absent


def _distinct_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters by name, each once."""
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights: filled once, through their first name
            continue
        seen.add(id(p))
        params[name] = p
    return params


def _absent_optional(params: dict[str, nn.Parameter], rules: dict[str, Rule], source: TensorSource,
                     optional: set[str]) -> list[str]:
    """The optional parameters whose tensors ``source`` lacks; a CheckpointError if any other's are."""
    available = set(source.keys())
    missing, absent = [], []
    for name in params:
        rule = rules.get(name)
        lacking = [k for k in rule.keys if k not in available] if rule else [name]
        if lacking:
            if name in optional:
                absent.append(name)
            else:
                missing.append((name, lacking))
    if missing:
        lines = ", ".join(f"{name} (needs {', '.join(lack[:3])}{'...' if len(lack) > 3 else ''})"
                          for name, lack in missing[:8])
        raise CheckpointError(f"{source.describe()}: missing tensors for {len(missing)} parameters: {lines}")
    return absent


def _check_unused(model: nn.Module, params: dict[str, nn.Parameter], rules: dict[str, Rule], source: TensorSource,
                  absent: set[str], ignore: Callable[[str], bool]) -> None:
    """A CheckpointError for checkpoint tensors that no parameter is built from and ``ignore`` does not excuse."""
    used = {k for name in params if name in rules and name not in absent for k in rules[name].keys}
    unexpected = sorted(k for k in set(source.keys()) - used if not ignore(k))
    if unexpected:
        shown = ", ".join(f"{k} (in {source.where(k)})" for k in unexpected[:8])
        raise CheckpointError(f"unexpected tensors not used by {type(model).__name__}: {shown}"
                              + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))


def _fill(model: nn.Module, params: dict[str, nn.Parameter], rules: dict[str, Rule], source: TensorSource,
          absent: set[str], *, dtype: torch.dtype, device: torch.device | str, progress: bool | None) -> None:
    """Set every parameter: built from its checkpoint tensors, or freshly initialized if ``absent``."""
    from tqdm.auto import tqdm

    total = sum(p.numel() for p in params.values())
    bar = tqdm(total=total * torch.finfo(dtype).bits // 8, unit="B", unit_scale=True, desc="loading weights",
               disable=(not progress) if progress is not None else (total < 250_000_000 or None))
    for name, p in params.items():
        if name in absent:
            t = torch.empty(p.shape, dtype=dtype, device=device)
            nn.init.normal_(t, std=getattr(getattr(model, "config", None), "initializer_range", 0.02))
        else:
            t = _build_parameter(name, p, rules[name], source).to(device=device, dtype=dtype)
        _set_parameter(model, name, t)
        bar.update(t.numel() * t.element_size())
    bar.close()


def _build_parameter(name: str, p: nn.Parameter, rule: Rule, source: TensorSource) -> torch.Tensor:
    """Parameter ``name``'s tensor from its checkpoint tensors, in the checkpoint's dtype."""
    t = rule.build([source.get(k) for k in rule.keys])
    if tuple(t.shape) != tuple(p.shape):  # only rules without ``shapes`` can get here
        where = ", ".join(f"{k} in {source.where(k)}" for k in rule.keys[:2])
        raise CheckpointError(
            f"{where}: shape {tuple(t.shape)} does not fit {name} of shape {tuple(p.shape)}"
        )
    return t


def _check_sources(params: dict[str, nn.Parameter], rules: dict[str, Rule], source: TensorSource) -> None:
    """Every source tensor's shape and dtype, from headers, before any data is read: a misfit is
    named as the checkpoint tensor it is, not as a combined parameter or a crash inside cat/reshape."""
    problems = []
    for name, rule in rules.items():
        expected = rule.shapes
        if expected is None and rule.combine is None:
            expected = (tuple(params[name].shape),)
        for i, key in enumerate(rule.keys):
            dtype = source.dtype(key)
            # int/bool tensors would be cast to float silently (quantized weights load elsewhere)
            if not dtype.is_floating_point:
                problems.append(f"{key} in {source.where(key)}: dtype {str(dtype).replace('torch.', '')} "
                                f"cannot be loaded into {name}, which holds floating-point weights")
            if expected is not None and tuple(source.shape(key)) != tuple(expected[i]):
                problems.append(f"{key} in {source.where(key)}: shape {tuple(source.shape(key))} does not fit "
                                f"{name}: expected {tuple(expected[i])}")
    if len(problems) == 1:
        raise CheckpointError(problems[0])
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{len(problems)} checkpoint tensors do not fit the model:\n  {shown}")


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    old = module._parameters[leaf]
    module._parameters[leaf] = nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad)


# What a checkpoint directory written here (or downloaded from the hub) holds. Replacing a directory
# deletes it, so only one that holds nothing else is replaced (see ``check_output_path``).
CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def check_output_path(dst: Path, sources: Iterable[Path] = (), *, directory: bool = True,
                      replace: bool = False) -> None:
    """Refuse, before anything is written, an output path that would destroy an input or is of the
    wrong kind. A directory ``dst`` must not be a source, lie inside one or contain one (replacing
    it would delete the very files being read); a file ``dst`` must not be a source (a new file
    inside a source directory deletes nothing). An existing ``dst`` must be a directory when a
    directory is written and a file when a file is. With ``replace`` (``write_atomically``'s) an
    existing directory must hold checkpoint files only (``CHECKPOINT_FILES``), no subdirectory, and
    must not be the working directory: anything else (a project folder that happens to hold a
    config.json, a home directory given by mistake) is not ours to delete."""
    real = Path(dst).expanduser().resolve()
    for src in sources:
        src = Path(src).expanduser()
        if not src.exists():  # e.g. a hub id: nothing local to destroy
            continue
        s = src.resolve()
        if real == s or directory and (s in real.parents or real in s.parents):
            what = "is" if real == s else "lies inside" if s in real.parents else "contains"
            raise CheckpointError(f"{dst}: the output {what} the source {src}; write to another path")
    if directory and real.exists() and not real.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a directory; the output is a checkpoint directory")
    if not directory and real.is_dir():
        raise CheckpointError(f"{dst}: is a directory; the output is a single file (e.g. {Path(dst).name}.gguf)")
    parent = next(p for p in real.parents if p.exists())
    if not parent.is_dir():
        raise CheckpointError(f"{dst}: {parent} is a file, so nothing can be written below it")
    if replace and real.is_dir():
        import fnmatch

        cwd = Path.cwd().resolve()
        if real == cwd or real in cwd.parents:
            raise CheckpointError(f"{dst}: is (or contains) the working directory; write to a new path")
        foreign = sorted(e.name + ("/" if e.is_dir() else "") for e in real.iterdir()
                         if e.is_dir() or not any(fnmatch.fnmatch(e.name, pat) for pat in CHECKPOINT_FILES))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise CheckpointError(f"{dst}: exists and holds files that are not a checkpoint's ({shown}); "
                                  "refusing to replace it (remove it or pick a new path)")


def write_atomically(directory: Path, write: Callable[[Path], None], *, replace: bool = False,
                     sources: Iterable[Path] = ()) -> None:
    """Run ``write(tmp)`` into a fresh temporary directory, then put its files at ``directory``.

    ``replace=False`` moves the files into ``directory``, keeping the others there (what
    ``save_pretrained`` does: a tokenizer saved beside the weights survives). config.json moves
    last, since loaders look for it first.

    ``replace=True`` makes ``directory`` hold exactly what was written: stale files of an earlier
    checkpoint (a tokenizer.json, a chat template, an old shard set and its index) would otherwise
    sit beside the new ones and be loaded in their place. The new directory is renamed in and the
    old one deleted afterwards; if the swap fails the old one is put back.

    ``sources`` are the inputs being read; ``check_output_path`` says what is refused. Either way
    a crash leaves no destination that looks complete but is not, and no temporary directory
    survives an exception.
    """
    import shutil
    import tempfile

    check_output_path(directory, sources, replace=replace)
    real = Path(directory).expanduser().resolve()  # through a symlink: replace what it points to
    real.parent.mkdir(parents=True, exist_ok=True)
    # Replacing renames the directory itself, which a mount point (a container's volume) or a folder
    # in a parent we may not write cannot be: there the old checkpoint's files (check_output_path
    # allowed nothing else) are removed and the new ones moved in, config.json last.
    swap = replace and not (real.exists() and (os.path.ismount(real) or not os.access(real.parent, os.W_OK)))
    if not swap:
        real.mkdir(exist_ok=True)
    # A sibling (swap) or a child (merge), so the final renames stay on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=real.parent if swap else real))
    try:
        write(tmp)
        umask = _make_public(tmp)
        if swap:
            os.chmod(tmp, 0o777 & ~umask)
            _swap_in(tmp, real)
        else:
            _move_files(tmp, real, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_public(tmp: Path) -> int:
    """Give what was written under ``tmp`` the permissions of any new file; returns the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.rglob("*"):  # safetensors creates files private (0600), mkdtemp directories 0700
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
    return umask


def _move_files(tmp: Path, real: Path, *, replace: bool) -> None:
    """Move ``tmp``'s files into ``real`` (``tmp`` lies inside it), config.json last; with ``replace``,
    first delete the files already there."""
    if replace:
        for entry in real.iterdir():
            if entry != tmp:
                entry.unlink()
    for n in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
        os.replace(tmp / n, real / n)


def _swap_in(tmp: Path, real: Path) -> None:
    """Rename ``tmp`` to ``real``: an existing ``real`` is renamed aside first, put back if the rename
    fails and deleted once it succeeded."""
    import shutil
    import uuid

    old: Path | None = None
    try:
        if real.exists():
            old = real.parent / f".{real.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(real, old)
        try:
            os.rename(tmp, real)
        except BaseException:
            if old is not None:
                os.rename(old, real)
                old = None
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
