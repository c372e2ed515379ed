"""`mixtral bench`: a rich table on stdout and the same numbers as JSON."""

from __future__ import annotations

import json

import pytest
from serve_helpers import tiny_checkpoint

from mixtral.cli import main
from mixtral.cli.bench import parse_batches


def test_bench_prints_table_and_writes_json(tmp_path, capsys):
    d = tiny_checkpoint(tmp_path / "m")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(d), "--batch", "1,3", "--prompt-len", "8", "--gen-len", "4",
                 "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "prefill tok/s" in table and "decode tok/s" in table and "TTFT ms" in table
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        assert (r["prompt_len"], r["gen_len"]) == (8, 4)
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert 0 < r["ttft_s"] < 60 and r["peak_memory_mb"] > 0


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert parse_batches("1, 4,16") == [1, 4, 16]
    with pytest.raises(ValueError):
        parse_batches("1,x")
    d = tiny_checkpoint(tmp_path / "m")
    assert main(["bench", "--model", str(d), "--batch", "0"]) == 2
    assert main(["bench", "--model", str(d), "--prompt-len", "300", "--gen-len", "8"]) == 2
    assert "error:" in capsys.readouterr().err
