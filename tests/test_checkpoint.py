"""HF checkpoints: both libraries load each other's files; bad files fail loudly, naming file and tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import hf_pair, tiny_kwargs, transformers

from mixtral import MixtralConfig, MixtralForCausalLM, MixtralForSequenceClassification, MixtralModel
from mixtral.checkpoint import CheckpointError


def logits_equal(a, b, ids):
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_ours_saved_loads_in_transformers(tmp_path, tied):
    hm_ref, m = hf_pair(tie_word_embeddings=tied)
    m.save_pretrained(tmp_path)
    names = set(json.loads((tmp_path / "config.json").read_text()))
    assert {"rope_theta", "num_local_experts", "model_type"} <= names
    hm = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 101, (2, 7))
    logits_equal(hm, m, ids)


def test_transformers_saved_loads_in_ours_v5_fused_layout(tmp_path):
    hm, _ = hf_pair()
    hm.save_pretrained(tmp_path)  # transformers 5 writes its own layout
    m = MixtralForCausalLM.from_pretrained(tmp_path)
    logits_equal(hm, m, torch.randint(0, 101, (2, 7)))


def test_hub_layout_sharded_roundtrip(tmp_path):
    hm, m = hf_pair()
    m.save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / s).exists() for s in shards)
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]
    assert "model.layers.1.self_attn.q_proj.weight" in index["weight_map"]
    again = MixtralForCausalLM.from_pretrained(tmp_path)
    logits_equal(again, m, torch.randint(0, 101, (1, 9)))
    hm2 = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    logits_equal(hm2, m, torch.randint(0, 101, (1, 9)))


def test_sharded_transformers_checkpoint_loads(tmp_path):
    hm, _ = hf_pair()
    hm.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    logits_equal(hm, MixtralForCausalLM.from_pretrained(tmp_path), torch.randint(0, 101, (1, 5)))


def test_config_only_v4_rope_theta_and_v5_rope_parameters(tmp_path):
    _, m = hf_pair(rope_theta=5000.0)
    m.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.pop("rope_theta")
    data["rope_parameters"] = {"rope_theta": 5000.0, "rope_type": "default"}
    data["some_future_key"] = 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert MixtralConfig.from_pretrained(tmp_path).rope_theta == 5000.0
    logits_equal(MixtralForCausalLM.from_pretrained(tmp_path), m, torch.randint(0, 101, (1, 6)))


def test_bare_model_and_classifier_from_causal_checkpoint(tmp_path):
    hm, m = hf_pair()
    m.save_pretrained(tmp_path)
    ids = torch.randint(0, 101, (1, 6))
    base = MixtralModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, m.model(ids).last_hidden_state)
    with pytest.warns(UserWarning, match="score.weight"):
        clf = MixtralForSequenceClassification.from_pretrained(tmp_path)
    assert clf(ids).logits.shape == (1, 2)
    base.save_pretrained(tmp_path / "bare")
    hbase = transformers.MixtralModel.from_pretrained(tmp_path / "bare").eval()
    with torch.no_grad():
        torch.testing.assert_close(hbase(ids).last_hidden_state, base(ids).last_hidden_state)


def test_dtype_argument(tmp_path):
    _, m = hf_pair()
    m.save_pretrained(tmp_path)
    half = MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.model.layers[0].mlp.experts.down_proj.dtype == torch.bfloat16
    assert MixtralForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.float32


# -- bad input ------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    _, m = hf_pair()
    m.save_pretrained(tmp_path, max_shard_size="100KB")
    return tmp_path


def test_missing_shard_is_named(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        MixtralForCausalLM.from_pretrained(saved)


def test_truncated_file_is_named(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        MixtralForCausalLM.from_pretrained(saved)


def test_corrupt_header_is_named(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=shard.name):
        MixtralForCausalLM.from_pretrained(saved)


def _rewrite(directory, edit):
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_wrong_shape_names_tensor(tmp_path):
    _, m = hf_pair()
    m.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(63,\)"):
        MixtralForCausalLM.from_pretrained(tmp_path)


def test_source_shapes_and_dtypes_checked_before_combining(tmp_path):
    """q/k swapped still concatenate to the qkv size, and an int tensor would be cast: both refused."""
    _, m = hf_pair()
    m.save_pretrained(tmp_path)
    a = "model.layers.0.self_attn."
    _rewrite(tmp_path, lambda t: t.update({a + "q_proj.weight": t[a + "k_proj.weight"],
                                           a + "k_proj.weight": t[a + "q_proj.weight"]}))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight in .*model\.safetensors: shape \(32, 64\) does not fit "
                                              r"model\.layers\.0\.self_attn\.qkv_proj\.weight: expected \(64, 64\)"):
        MixtralForCausalLM.from_pretrained(tmp_path)
    m.save_pretrained(tmp_path)
    w1 = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    _rewrite(tmp_path, lambda t: t.__setitem__(w1, t[w1].T.contiguous()))
    with pytest.raises(CheckpointError, match=r"experts\.2\.w1\.weight.*\(64, 96\).*expected \(96, 64\)"):
        MixtralForCausalLM.from_pretrained(tmp_path)
    for dtype in (torch.int32, torch.int8, torch.bool):
        m.save_pretrained(tmp_path)
        _rewrite(tmp_path, lambda t, dtype=dtype: t.__setitem__("model.norm.weight", t["model.norm.weight"].to(dtype)))
        with pytest.raises(CheckpointError, match=rf"model\.norm\.weight in .*: dtype {str(dtype)[6:]}"):
            MixtralForCausalLM.from_pretrained(tmp_path)


def test_malformed_index_and_shards_are_named(saved):
    index_path = saved / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))

    for weight_map, problem in [
        (["model-00001.safetensors"], r"weight_map should map tensor names to shard files, found list"),
        (index["weight_map"] | {"model.norm.weight": 5}, r"weight_map\['model\.norm\.weight'\] is 5"),
        # an index that forgets a whole shard: the error names the index and the shard it leaves out
        ({k: v for k, v in index["weight_map"].items() if v != shards[2]},
         rf"\(which does not list {shards[2]}, found beside it\): missing tensors"),
    ]:
        index_path.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*" + problem):
            MixtralForCausalLM.from_pretrained(saved)
    index_path.write_text(json.dumps(index))
    shard = saved / shards[1]
    data = shard.read_bytes()
    shard.write_bytes((10**12).to_bytes(8, "little") + b"{}")  # a header length no file has
    with pytest.raises(CheckpointError, match=rf"{shard.name}: corrupt or truncated.*claims 1000000000000 bytes"):
        MixtralForCausalLM.from_pretrained(saved)
    shard.unlink()
    shard.mkdir()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: a directory, not a safetensors file"):
        MixtralForCausalLM.from_pretrained(saved)
    shard.rmdir()
    shard.write_bytes(data)
    MixtralForCausalLM.from_pretrained(saved)


def test_missing_tensor_is_named(tmp_path):
    _, m = hf_pair()
    m.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(CheckpointError, match=r"experts\.2\.w3"):
        MixtralForCausalLM.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    _, m = hf_pair()
    m.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("model.layers.7.extra.weight", torch.ones(2)))
    with pytest.raises(CheckpointError, match=r"unexpected.*layers\.7\.extra"):
        MixtralForCausalLM.from_pretrained(tmp_path)


def test_config_mismatch_is_an_error(tmp_path):
    _, m = hf_pair()
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="layers.2"):
        MixtralForCausalLM.from_pretrained(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        MixtralForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        MixtralForCausalLM.from_pretrained(tmp_path / "nope")


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="mistralai/Mixtral-8x7B-v0.1.*hub"):
        MixtralForCausalLM.from_pretrained("mistralai/Mixtral-8x7B-v0.1")


def test_save_replaces_old_shards(tmp_path):
    _, m = hf_pair()
    m.save_pretrained(tmp_path, max_shard_size="60KB")
    m.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("model-0*.safetensors"))
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    MixtralForCausalLM.from_pretrained(tmp_path)


def test_config_fields_and_defaults_match_transformers():
    ours = MixtralConfig()
    theirs = transformers.MixtralConfig()
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                 "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
                 "tie_word_embeddings", "sliding_window", "attention_dropout", "num_experts_per_tok",
                 "num_local_experts", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
                 "num_labels", "problem_type"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 1e6
    assert ours.num_experts == 8


@pytest.mark.parametrize("field,value", [
    ("num_experts_per_tok", 9), ("num_key_value_heads", 3), ("hidden_size", 65), ("intermediate_size", 0),
    ("num_hidden_layers", -1), ("hidden_act", "tanhh"), ("sliding_window", 0), ("vocab_size", 0),
    ("num_local_experts", 0), ("head_dim", -8),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MixtralConfig(**tiny_kwargs(**{field: value}))


def test_config_json_roundtrip(tmp_path):
    cfg = MixtralConfig(**tiny_kwargs(sliding_window=16, eos_token_id=[2, 5]))
    cfg.save_pretrained(tmp_path)
    again = MixtralConfig.from_pretrained(tmp_path)
    assert again == cfg
    theirs = transformers.MixtralConfig.from_pretrained(tmp_path)
    assert theirs.sliding_window == 16 and theirs.num_local_experts == cfg.num_local_experts


def test_from_state_dict_checks_every_tensor():
    """A transformers state dict in memory loads like files do: renamed, and refused when wrong."""
    from mixtral.loader import from_state_dict

    hm, _ = hf_pair()
    config = MixtralConfig(**tiny_kwargs())
    state = {k: v.detach().clone() for k, v in hm.state_dict().items()}
    bad = dict(state)
    bad["model.layers.1.self_attn.k_proj.weight"] = bad["model.layers.1.self_attn.k_proj.weight"][:-1]
    with pytest.raises(CheckpointError, match=r"k_proj.weight in state dict.*does not fit"):
        from_state_dict(MixtralForCausalLM, bad, config)
    missing = {k: v for k, v in state.items() if k != "model.layers.0.mlp.experts.down_proj"}
    with pytest.raises(CheckpointError, match=r"state dict: missing tensors .*layers.0.mlp.experts.down_proj"):
        from_state_dict(MixtralForCausalLM, missing, config)
    with pytest.raises(CheckpointError, match="unexpected tensors.*stray"):
        from_state_dict(MixtralForCausalLM, state | {"stray": torch.zeros(1)}, config)
    loaded = from_state_dict(MixtralForCausalLM, state, config)
    logits_equal(hm, loaded, torch.randint(0, 101, (2, 5)))


# -- write_atomically: what every command writing a checkpoint directory goes through -----------------

def _files(directory) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def _writer(**files: str):
    def write(tmp):
        for name, text in files.items():
            (tmp / name.replace("_", ".")).write_text(text)
    return write


def test_write_atomically_replace_leaves_only_the_new_files(tmp_path):
    """Stale files of an earlier checkpoint (a tokenizer, a chat template, an old shard index) would be
    loaded in place of the new ones if they survived beside them."""
    import os

    from mixtral.checkpoint.loading import write_atomically

    dst = tmp_path / "out"
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors.index.json"):
        (dst / name).write_text("old")
    write_atomically(dst, _writer(config_json="new", model_safetensors="w"), replace=True)
    assert _files(dst) == {"config.json": "new", "model.safetensors": "w"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old directory left
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o777 & ~umask  # the umask's, not mkdtemp's private 0700
    # merging (save_pretrained's way) keeps the others
    write_atomically(dst, _writer(tokenizer_json="tok"))
    assert _files(dst) == {"config.json": "new", "model.safetensors": "w", "tokenizer.json": "tok"}


def test_write_atomically_failure_keeps_the_old_directory(tmp_path, monkeypatch):
    import os

    from mixtral.checkpoint import loading
    from mixtral.checkpoint.loading import write_atomically

    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "config.json").write_text("old")

    def failing(tmp):
        (tmp / "config.json").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(dst, failing, replace=True)
    assert _files(dst) == {"config.json": "old"} and [p.name for p in tmp_path.iterdir()] == ["out"]
    # the rename of the new directory into place fails: the old one is put back
    real_rename = os.rename

    def rename(a, b):
        if ".tmp-" in str(a):
            raise OSError(18, "Invalid cross-device link")
        real_rename(a, b)

    monkeypatch.setattr(loading.os, "rename", rename)
    with pytest.raises(OSError, match="cross-device"):
        write_atomically(dst, _writer(config_json="new"), replace=True)
    assert _files(dst) == {"config.json": "old"} and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_atomically_never_replaces_its_source(tmp_path):
    from mixtral.checkpoint.loading import write_atomically

    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("source")
    for dst, what in ((src, "is the source"), (src / "sub", "lies inside the source"),
                      (tmp_path, "contains the source")):
        with pytest.raises(CheckpointError, match=what):
            write_atomically(dst, _writer(config_json="new"), replace=True, sources=[src])
    assert (src / "config.json").read_text() == "source" and sorted(p.name for p in src.iterdir()) == [
        "config.json", "sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_write_atomically_refuses_a_destination_of_the_wrong_kind(tmp_path):
    from mixtral.checkpoint.loading import check_output_path, write_atomically

    (tmp_path / "file").write_text("keep")
    for replace in (False, True):
        with pytest.raises(CheckpointError, match="file: exists and is not a directory"):
            write_atomically(tmp_path / "file", _writer(config_json="new"), replace=replace)
    assert (tmp_path / "file").read_text() == "keep"
    with pytest.raises(CheckpointError, match="is a directory"):
        check_output_path(tmp_path, directory=False)
    # a full directory that is not a checkpoint is not ours to delete
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep")
    with pytest.raises(CheckpointError, match=r"not a checkpoint's \(todo.txt\)"):
        write_atomically(tmp_path / "notes", _writer(config_json="new"), replace=True)
    assert _files(tmp_path / "notes") == {"todo.txt": "keep"}
    # ... nor is a project folder that happens to hold a config.json beside its other files
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text("{}")
    (project / "thesis.tex").write_text("keep")
    with pytest.raises(CheckpointError, match=r"not a checkpoint's \(src/, thesis.tex\)"):
        write_atomically(project, _writer(config_json="new"), replace=True)
    assert sorted(p.name for p in project.iterdir()) == ["config.json", "src", "thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes", "project"]


def test_write_atomically_refuses_the_working_directory(tmp_path, monkeypatch):
    from mixtral.checkpoint.loading import write_atomically

    (tmp_path / "config.json").write_text("old")
    monkeypatch.chdir(tmp_path)
    for dst in (Path("."), tmp_path.parent):
        with pytest.raises(CheckpointError, match="working directory"):
            write_atomically(dst, _writer(config_json="new"), replace=True)
    assert (tmp_path / "config.json").read_text() == "old"


def test_write_atomically_replaces_a_mount_point_file_by_file(tmp_path, monkeypatch):
    """A mount point (a container's output volume) cannot be renamed: its files are swapped instead."""
    import os

    from mixtral.checkpoint import loading
    from mixtral.checkpoint.loading import write_atomically

    dst = tmp_path / "volume"
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "model-00001-of-00002.safetensors"):
        (dst / name).write_text("old")
    monkeypatch.setattr(loading.os.path, "ismount", lambda p: os.fspath(p) == os.fspath(dst))
    real_rename = os.rename

    def rename(a, b):  # what the kernel answers for a mount point
        if os.fspath(a) == os.fspath(dst):
            raise OSError(16, "Device or resource busy")
        real_rename(a, b)

    monkeypatch.setattr(loading.os, "rename", rename)
    write_atomically(dst, _writer(config_json="new", model_safetensors="w"), replace=True)
    assert _files(dst) == {"config.json": "new", "model.safetensors": "w"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]
