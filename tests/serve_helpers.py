"""A tiny random Mixtral checkpoint with a real tokenizer.json and chat template, for the serving tests.

The tokenizer is a word-level one (one token per word, decoded joined by spaces) with Mixtral's
special tokens and an ``[INST] ... [/INST]`` chat template, so generated text is readable words and
stop strings can be picked from it.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch

from mixtral import MixtralConfig, MixtralForCausalLM

SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
WORDS = ("the a cat dog sat on mat and ran to house tree big small red blue green quick slow fox jumps over "
         "lazy sun moon star sky sea hello hi how are you what is your name my i am fine thanks good bad yes "
         "no maybe one two three four five six seven eight nine ten . , ? !").split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


def build_tokenizer_json(directory: Path) -> int:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
              "tokenizer_class": "LlamaTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def tiny_checkpoint(directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a 2-layer random Mixtral plus tokenizer into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer_json(directory)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**kw))
    with torch.no_grad():  # larger than the default init, so logits are spread and greedy has no near-ties
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    model.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
