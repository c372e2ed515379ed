"""`mixtral generate` end to end on a tiny saved checkpoint with a real tokenizer."""

from __future__ import annotations

import re

import pytest
import torch
from test_tokenizer import hf_tokenizer_dir  # noqa: F401  (fixture)

from mixtral import MixtralConfig, MixtralForCausalLM, Tokenizer
from mixtral.cli import build_parser, main


@pytest.fixture
def tiny_checkpoint(tmp_path, hf_tokenizer_dir):  # noqa: F811
    tok = Tokenizer.from_pretrained(hf_tokenizer_dir)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, bos_token_id=1,
                        eos_token_id=2)
    directory = tmp_path / "ckpt"  # a subdirectory: outputs go beside it, never inside their source
    MixtralForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_generate_streams_and_reports_counts(tiny_checkpoint, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "the lazy fox",
                 "--max-new-tokens", "6", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"\[prompt (\d+) tokens, generated (\d+) tokens, [\d.]+ tokens/s \(first token after [\d.]+ s", out)
    assert m and int(m.group(1)) == len(Tokenizer.from_pretrained(tiny_checkpoint).encode("the lazy fox"))
    assert 1 <= int(m.group(2)) <= 6


def test_generate_chat_sampling_is_seeded(tiny_checkpoint, capsys):
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "hello", "--chat", "--max-new-tokens", "8",
            "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out.split("[prompt")[0] == first.split("[prompt")[0]


def test_generate_bad_model_path_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_generate_device_cuda_without_a_gpu_is_a_clear_error(tiny_checkpoint, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    # auto picks the CPU here, in fp32
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "2",
                 "--device", "auto"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--threads", "0"], "--threads: must be >= 1, got 0"),
    (["generate", "--prompt", "x", "--threads", "-2"], "--threads: must be >= 1, got -2"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature: must be >= 0"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["chat", "--temperature", "-0.5"], "--temperature: must be >= 0"),
    (["serve", "--max-context", "0"], "--max-context: must be >= 2, got 0"),
    (["serve", "--max-context", "-5"], "--max-context: must be >= 2, got -5"),
    (["serve", "--threads", "x"], "--threads: expected an integer, got 'x'"),
    (["quantize", "a", "b", "--int4", "--group-size", "0"], "--group-size: must be >= 32, got 0"),
    (["quantize", "a", "b", "--int4", "--group-size", "-64"], "--group-size: must be >= 32"),
    (["quantize", "a", "b", "--int4", "--group-size", "48"], "--group-size: must be a multiple of 32, got 48"),
])
def test_bad_numbers_are_refused_when_parsed(argv, message, capsys):
    """Before: --threads 0 was a RuntimeError traceback, --temperature -1 ran greedy, --max-context 0
    served the model's full length and -5 started a server that refused every request."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_outputs_that_would_destroy_the_source_are_refused(tiny_checkpoint, capsys):
    src = str(tiny_checkpoint)
    before = sorted(p.name for p in tiny_checkpoint.iterdir())
    for argv, what in ((["quantize", src, src, "--int8"], "is the source"),
                       (["quantize", src, src + "/q", "--int8"], "lies inside the source"),
                       (["quantize", src, str(tiny_checkpoint.parent), "--int8"], "contains the source"),
                       (["convert", "mistral", src, src], "is the source"),
                       (["upcycle", src, src + "/up"], "lies inside the source"),
                       (["convert", "to-gguf", src, src], "is the source")):
        assert main(argv) == 2, argv
        assert what in capsys.readouterr().err, argv
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == before
    assert sorted(p.name for p in tiny_checkpoint.parent.iterdir()) == ["ckpt"]


def test_outputs_of_the_wrong_kind_are_clear_errors(tiny_checkpoint, capsys):
    """Before: `convert gguf` onto a file was a FileExistsError traceback, `to-gguf` onto a directory
    an IsADirectoryError one."""
    root, src = tiny_checkpoint.parent, str(tiny_checkpoint)
    gguf = root / "m.gguf"
    assert main(["convert", "to-gguf", src, str(gguf), "--type", "F32"]) == 0
    capsys.readouterr()
    (root / "taken").write_text("keep")
    (root / "dir").mkdir()
    for argv, message in ((["convert", "gguf", str(gguf), str(root / "taken")], "taken: exists and is not a directory"),
                          (["quantize", src, str(root / "taken"), "--int8"], "taken: exists and is not a directory"),
                          (["quantize", src, str(root / "taken" / "q"), "--int8"], "is a file"),
                          (["convert", "to-gguf", src, str(root / "dir")], "dir: is a directory")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, argv
    assert (root / "taken").read_text() == "keep" and not any((root / "dir").iterdir())
    # an existing .gguf file is replaced, atomically
    assert main(["convert", "to-gguf", src, str(gguf), "--type", "F16"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["ckpt", "dir", "m.gguf", "taken"]


def test_write_errors_are_one_line_naming_the_output(tiny_checkpoint, monkeypatch, capsys):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    dst = tiny_checkpoint.parent / "q"
    assert main(["quantize", str(tiny_checkpoint), str(dst), "--int8"]) == 2
    assert capsys.readouterr().err == f"error: {dst}: No space left on device\n"
    assert sorted(p.name for p in tiny_checkpoint.parent.iterdir()) == ["ckpt"]  # no partial output


def test_quantize_replaces_an_existing_checkpoint_whole(tiny_checkpoint):
    """A stale chat template and float shard index left in the destination were loaded in place of
    the new files (the index even won over the quantized model.safetensors)."""
    dst = tiny_checkpoint.parent / "q"
    MixtralForCausalLM.from_pretrained(tiny_checkpoint).save_pretrained(dst, max_shard_size="20KB")
    assert (dst / "model.safetensors.index.json").exists()
    (dst / "chat_template.jinja").write_text("STALE {{ messages }}")
    assert main(["quantize", str(tiny_checkpoint), str(dst), "--int8"]) == 0
    # exactly the new weights plus the source's config and tokenizer files: no shard, index or template
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in tiny_checkpoint.iterdir())
    assert MixtralForCausalLM.from_pretrained(dst).quantization_config["bits"] == 8
    assert Tokenizer.from_pretrained(dst).chat_template == Tokenizer.from_pretrained(tiny_checkpoint).chat_template
    assert sorted(p.name for p in tiny_checkpoint.parent.iterdir()) == ["ckpt", "q"]


def test_quantize_from_gguf_writes_its_tokenizer(tiny_checkpoint, capsys):
    root = tiny_checkpoint.parent
    assert main(["convert", "to-gguf", str(tiny_checkpoint), str(root / "m.gguf"), "--type", "F32"]) == 0
    assert main(["quantize", str(root / "m.gguf"), str(root / "q"), "--int8"]) == 0
    text = "the lazy fox"
    assert Tokenizer.from_pretrained(root / "q").encode(text) == Tokenizer.from_pretrained(tiny_checkpoint).encode(text)
    assert main(["generate", "--model", str(root / "q"), "--prompt", text, "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
