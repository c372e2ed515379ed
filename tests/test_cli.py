"""`mixtral generate` end to end on a tiny saved checkpoint with a real tokenizer."""

from __future__ import annotations

import re

import pytest
import torch
from test_tokenizer import hf_tokenizer_dir  # noqa: F401  (fixture)

from mixtral import MixtralConfig, MixtralForCausalLM, Tokenizer
from mixtral.cli import main


@pytest.fixture
def tiny_checkpoint(tmp_path, hf_tokenizer_dir):  # noqa: F811
    tok = Tokenizer.from_pretrained(hf_tokenizer_dir)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, bos_token_id=1,
                        eos_token_id=2)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


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
