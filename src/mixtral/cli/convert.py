"""The commands that write checkpoints: ``convert mistral|gguf|to-gguf``, ``upcycle`` and ``quantize``.

Each loads its source as a model (``mixtral.loader`` through ``from_pretrained``, or
``mixtral.loader.upcycle``) and writes it through a format writer, replacing its destination whole
(no stale files of an earlier checkpoint survive).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from ..checkpoint import resolve_path
from ..checkpoint.gguf import write_gguf
from ..checkpoint.loading import CheckpointError, check_output_path, read_json, write_atomically
from ..checkpoint.mistral import sentencepiece_file
from ..checkpoint.quantized import is_quantized
from ..checkpoint.upcycle import save_upcycled
from ..loader import upcycle
from ..model import MixtralForCausalLM
from ..quant import quantize_model
from ..quant.checkpoint import save_quantized
from ..tokenizer import Tokenizer


def run_convert_mistral(args: argparse.Namespace) -> int:
    """``mixtral convert mistral SRC DST``: raw release -> Hugging Face layout (config, shards, tokenizer)."""
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    if not (src / "params.json").exists():
        raise CheckpointError(f"{src}: no params.json (not a raw Mistral release)")
    model = MixtralForCausalLM.from_pretrained(src, dtype="auto", progress=True)
    tokenizer = sentencepiece_file(src)
    if tokenizer is None:
        print(f"warning: {src}: no tokenizer.model found; the converted checkpoint has no tokenizer")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=args.max_shard_size)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
            Tokenizer.from_pretrained(tmp).save_pretrained(tmp)

    write_atomically(dst, write, replace=True, sources=[src])  # no stale files of an earlier checkpoint
    print(f"wrote {dst} ({model.num_parameters() / 1e6:.1f}M parameters)")
    return 0


def run_convert_gguf(args: argparse.Namespace) -> int:
    """``mixtral convert gguf SRC DST``: GGUF -> Hugging Face layout (config, safetensors, tokenizer)."""
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such GGUF file")
    model = MixtralForCausalLM.from_pretrained(src, progress=True)
    tokenizer = Tokenizer.from_gguf(src)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(tmp)

    write_atomically(dst, write, replace=True, sources=[src])  # no stale files of an earlier checkpoint
    print(f"wrote {dst} ({model.num_parameters() / 1e6:.1f}M parameters, "
          f"{model.config.num_local_experts} experts, top-{model.config.num_experts_per_tok})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``mixtral convert to-gguf SRC DST.gguf --type T``: any readable checkpoint -> GGUF."""
    src = Path(args.src)
    if Path(args.dst).suffix != ".gguf":  # loaders (ours, llama.cpp's tools) recognize GGUF by its suffix
        raise CheckpointError(f"{args.dst}: the output of to-gguf must end in .gguf")
    if src.is_dir() and is_quantized(src):  # checked first: loading 90 GB only to fail would waste minutes
        raise CheckpointError(f"{src}: a quantized checkpoint (config.json has quantization_config) cannot be "
                              "exported to GGUF; to-gguf needs a float checkpoint, which it quantizes itself "
                              "(--type)")
    model = MixtralForCausalLM.from_pretrained(src, progress=True)
    tokenizer = None
    try:
        tokenizer = _tokenizer_for_export(src)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"warning: {src}: no tokenizer written to the GGUF ({e}); llama.cpp needs one to run it")
    write_gguf(model, tokenizer, args.dst, type=args.type, name=src.stem if src.is_file() else src.name)
    print(f"wrote {args.dst} ({args.type})")
    return 0


def _tokenizer_for_export(src: Path) -> Tokenizer:
    """Prefer a SentencePiece model when the checkpoint has one: its scores are exact in GGUF."""
    if src.is_dir() and (src / "tokenizer.model").exists() and (src / "tokenizer.json").exists():
        import sentencepiece as spm

        tok = Tokenizer.from_pretrained(src)
        sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
        return Tokenizer(sp, bos_token=tok.bos_token, eos_token=tok.eos_token, unk_token=tok.unk_token,
                         pad_token=tok.pad_token, chat_template=tok.chat_template, add_bos_token=True)
    return Tokenizer.from_pretrained(src)


def run_upcycle(args: argparse.Namespace) -> int:
    """``mixtral upcycle DENSE DST --experts E --top-k K [--noise STD --seed S]``."""
    src = Path(args.dense)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    model = upcycle(MixtralForCausalLM, src, args.experts, args.top_k, args.noise, args.seed, progress=True)
    try:
        tokenizer = Tokenizer.from_pretrained(src)  # a dense GGUF's vocabulary, or the directory's files
    except FileNotFoundError:
        tokenizer = None
        print(f"warning: {src}: no tokenizer found; the upcycled checkpoint has none")
    save_upcycled(model, tokenizer, Path(args.dst), source=src)
    print(f"wrote {args.dst}: {args.experts} experts (top-{args.top_k}), "
          f"{model.num_parameters() / 1e6:.1f}M parameters, noise std {args.noise}, seed {args.seed}")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    """``mixtral quantize SRC DST --int8|--int4 [--group-size G]``: DST is replaced whole."""
    mode = "int8" if args.int8 else "int4"
    group_size = getattr(args, "group_size", None)
    if mode == "int8" and group_size is not None:
        raise ValueError("--group-size applies to --int4 only (int8 has one scale per output row)")
    src, dst = resolve_path(args.src), Path(args.dst)
    check_output_path(dst, [src], replace=True)  # before the load, which can take minutes
    if src.is_dir() and (src / "config.json").exists():
        qconfig = read_json(src / "config.json").get("quantization_config")
        if qconfig is not None:  # rounding rounded weights again only loses more, and the bits would mix
            raise CheckpointError(f"{src}: already quantized ({qconfig.get('bits')} bits); quantize from the "
                                  "float checkpoint it was made from")
    tokenizer = None
    if src.is_file():  # a GGUF file carries its tokenizer in its metadata
        try:
            tokenizer = Tokenizer.from_gguf(src)
        except CheckpointError as e:
            print(f"warning: {e}; the quantized checkpoint has no tokenizer", file=sys.stderr)
    elif not any(src.glob("tokenizer*")):
        print(f"warning: {src}: no tokenizer files found; the quantized checkpoint has no tokenizer",
              file=sys.stderr)
    model = MixtralForCausalLM.from_pretrained(src, dtype=torch.float32)
    quantize_model(model, mode, 32 if group_size is None else group_size,
                   lm_head=bool(getattr(args, "lm_head", False)), activations=getattr(args, "activations", "int8"))
    save_quantized(model, dst, copy_from=src if src.is_dir() else None, tokenizer=tokenizer, replace=True,
                   sources=[src])
    g = model.quantization_config["group_size"]
    print(f"wrote {mode} checkpoint to {dst}" + (f" (group size {g})" if g else ""))
    return 0
