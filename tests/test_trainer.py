"""Fine-tuning with transformers' ``Trainer``: ours and transformers' Mixtral, given the same tiny
weights, data and seed, log the same per-step losses and end with the same weights; Trainer's
checkpoints load back with our ``from_pretrained`` and resume; activation checkpointing and PEFT's
LoRA work through it."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, hf_pair, transformers

from mixtral import MixtralForCausalLM, MixtralForSequenceClassification

pytest.importorskip("accelerate")  # transformers' Trainer needs it
# The spelling every transformers 5.x takes; newer ones warn and call it activation_checkpointing.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing.*` is deprecated:FutureWarning")

STEPS = 4


class CausalData(torch.utils.data.Dataset):
    """Rows with different numbers of labelled tokens (some with the first label kept), so the loss
    under gradient accumulation depends on ``num_items_in_batch`` being counted as transformers does."""

    def __init__(self, n: int = 16, T: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, TINY["vocab_size"], (n, T), generator=g)
        self.labels = self.ids.clone()
        for i in range(n):
            self.labels[i, : (3 * i) % 7] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class ClassificationData(torch.utils.data.Dataset):
    """Right-padded rows (pad id 0) of different lengths, three classes."""

    def __init__(self, n: int = 8, T: int = 10, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, TINY["vocab_size"], (n, T), generator=g)
        self.mask = torch.ones(n, T, dtype=torch.long)
        for i in range(n):
            length = 4 + (i * 5) % (T - 3)
            self.ids[i, length:] = 0
            self.mask[i, length:] = 0
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def train(model, out, data, resume=None, **overrides):
    """A few logged, checkpointed steps with gradient accumulation; returns (trainer, per-step losses)."""
    kw = dict(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, seed=0,
        learning_rate=1e-3, disable_tqdm=True,
    )
    kw.update(overrides)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**kw), train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_same_weights(ours, ref, cls, rtol):
    """Our trained weights against transformers' trained weights, read into our layout."""
    from conftest import from_hf_model

    theirs = from_hf_model(ref, cls, ours.config).state_dict()
    for name, p in ours.state_dict().items():
        scale = theirs[name].abs().max().clamp(min=1e-6)
        assert (p - theirs[name]).abs().max() / scale < rtol, name


# SGD rather than AdamW for the weight comparison: Adam divides each gradient by its own running
# size, so a loss scaled wrongly (e.g. a miscounted num_items_in_batch) would leave the weights alike.
@pytest.mark.parametrize("case", ["plain", "router_aux_loss", "checkpointing", "reentrant_every_2nd"])
def test_causal_lm_fine_tune_matches_transformers(tmp_path, monkeypatch, case):
    config = {"output_router_logits": True} if case == "router_aux_loss" else {}
    args = {"optim": "sgd", "learning_rate": 0.5}
    if case == "checkpointing":
        args["gradient_checkpointing"] = True
    if case == "reentrant_every_2nd":
        args.update(gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": True, "every_n_layers": 2})
    hm, m = hf_pair(**config)
    _, ref_losses = train(hm, tmp_path / "hf", CausalData(), **args)

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*a, **kw):
        calls.append(kw.get("use_reentrant"))
        return checkpoint(*a, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    trainer, losses = train(m, tmp_path / "ours", CausalData(), **args)

    assert len(losses) == len(ref_losses) == STEPS
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert losses[0] != pytest.approx(losses[-1], rel=1e-3)  # training moved the weights
    assert_same_weights(m, hm, MixtralForCausalLM, rtol=1e-4)
    forwards = STEPS * 2  # micro-batches
    if case == "plain" or case == "router_aux_loss":
        assert calls == []
    elif case == "checkpointing":
        assert m.is_activation_checkpointing and calls == [False] * forwards * TINY["num_hidden_layers"]
    else:  # layers 0, 2, ... of the two
        assert calls == [True] * forwards


def test_checkpointing_every_other_layer_with_offload_keeps_the_gradients(monkeypatch):
    """The two options Trainer passes besides torch's keywords (``every_n_layers``, ``offload``).
    On a CPU-only machine offloading moves nothing: this checks it is applied, to layer 0 only."""
    offloaded = []
    save_on_cpu = torch.autograd.graph.save_on_cpu

    def counting_save_on_cpu(*a, **kw):
        offloaded.append(1)
        return save_on_cpu(*a, **kw)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counting_save_on_cpu)
    _, m = hf_pair()
    m.train()
    ids, labels = CausalData().ids[:2], CausalData().labels[:2]

    def grads():
        m.zero_grad()
        m(ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain = grads()
    m.activation_checkpointing_enable(every_n_layers=2, offload=True)
    checkpointed = grads()
    assert len(offloaded) == 1  # one forward, layer 0 of 2
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="every_n_layers"):
        m.activation_checkpointing_enable(every_n_layers=0)


def test_router_aux_loss_is_in_the_trained_loss(tmp_path):
    """The aux-loss run above would also pass if the flag did nothing in both libraries."""
    _, plain = train(hf_pair()[1], tmp_path / "a", CausalData(), max_steps=1, save_strategy="no")
    _, aux = train(hf_pair(output_router_logits=True)[1], tmp_path / "b", CausalData(), max_steps=1,
                   save_strategy="no")
    assert aux[0] > plain[0] + 1e-3


def test_sequence_classification_fine_tune_matches_transformers(tmp_path):
    hm, m = hf_pair(MixtralForSequenceClassification, num_labels=3, pad_token_id=0)
    args = dict(optim="sgd", learning_rate=0.5, max_steps=2)
    _, ref_losses = train(hm, tmp_path / "hf", ClassificationData(), **args)
    _, losses = train(m, tmp_path / "ours", ClassificationData(), **args)
    assert len(losses) == 2 and losses == pytest.approx(ref_losses, rel=1e-5)
    assert_same_weights(m, hm, MixtralForSequenceClassification, rtol=1e-4)


def test_trainer_checkpoint_loads_and_resumes(tmp_path):
    """Trainer writes our model's state_dict() as model.safetensors and no config.json (it writes
    config.json only for a transformers PreTrainedModel): from_pretrained reads it given the
    config, and resuming from the halfway checkpoint ends where the uninterrupted run ended."""
    _, m = hf_pair()
    _, losses = train(m, tmp_path / "run", CausalData())
    last = tmp_path / "run" / f"checkpoint-{STEPS}"
    with pytest.raises(Exception, match="pass config=model.config"):
        MixtralForCausalLM.from_pretrained(last)
    loaded = MixtralForCausalLM.from_pretrained(last, config=m.config)
    ids = CausalData().ids[:2]
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, m(ids).logits, atol=0, rtol=0)

    _, fresh = hf_pair()
    _, resumed = train(fresh, tmp_path / "resumed", CausalData(), resume=tmp_path / "run" / "checkpoint-2")
    assert resumed == pytest.approx(losses, rel=1e-6)  # the first two come from the checkpoint's log
    for name, p in fresh.state_dict().items():
        torch.testing.assert_close(p, m.state_dict()[name], atol=1e-6, rtol=1e-6, msg=name)


def test_trainer_saves_a_tied_model(tmp_path):
    """safetensors refuses shared tensors; Trainer saves a model that is not transformers' own as
    save_file(model.state_dict()), which with tied embeddings held the embeddings twice as one tensor."""
    _, m = hf_pair(tie_word_embeddings=True)
    train(m, tmp_path / "run", CausalData())
    assert m.lm_head.weight is m.model.embed_tokens.weight  # still tied in the model itself
    loaded = MixtralForCausalLM.from_pretrained(tmp_path / "run" / f"checkpoint-{STEPS}", config=m.config)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = CausalData().ids[:2]
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, m(ids).logits, atol=0, rtol=0)


def test_save_pretrained_takes_trainers_keywords(tmp_path):
    _, a = hf_pair(seed=1)
    _, b = hf_pair(seed=2)
    a.save_pretrained(tmp_path / "not_main", is_main_process=False)
    assert not (tmp_path / "not_main").exists()
    a.save_pretrained(tmp_path / "b", state_dict=b.state_dict(), safe_serialization=True)  # b's tensors
    ids = CausalData().ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(MixtralForCausalLM.from_pretrained(tmp_path / "b")(ids).logits, b(ids).logits)
    ref = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "b")  # in the hub layout
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, b(ids).logits, atol=1e-4, rtol=1e-4)


def test_lora_on_the_fused_projections_through_trainer(tmp_path):
    """PEFT's LoRA targets our fused ``qkv_proj`` (there is no q_proj/k_proj/v_proj to target) and
    ``o_proj``; only the adapters train, and the saved adapter reloads onto fresh base weights."""
    peft = pytest.importorskip("peft")
    _, m = hf_pair()
    model = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"],
                                                   task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, losses = train(model, tmp_path, CausalData(), max_steps=2, learning_rate=1e-2, gradient_checkpointing=True,
                      gradient_checkpointing_kwargs={"use_reentrant": True})
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in changed} == {"qkv_proj", "o_proj"}
    _, base = hf_pair()
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "checkpoint-2")
    ids = CausalData().ids[:2]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="not found"):
        peft.get_peft_model(hf_pair()[1], peft.LoraConfig(target_modules=["q_proj", "v_proj"]))
