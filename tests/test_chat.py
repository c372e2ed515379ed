"""`mixtral chat` driven through a pipe: replies stream to stdout, history is kept, /reset forgets it."""

from __future__ import annotations

import subprocess
import sys

import torch
from serve_helpers import tiny_checkpoint

from mixtral import MixtralForCausalLM, Tokenizer


def greedy_reply(model, tok, messages, max_new_tokens):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens)[0, len(ids):]
    return tok.decode(out, skip_special_tokens=True).strip()


def test_piped_conversation(tmp_path):
    d = tiny_checkpoint(tmp_path / "m")
    conversation = "hello how are you\n\nwhat is your name\n/reset\nhello how are you\n/exit\nnever read\n"
    proc = subprocess.run(
        [sys.executable, "-m", "mixtral.cli", "chat", "--model", str(d), "--max-new-tokens", "8", "--threads", "1",
         "--system", "you are a small dog"],
        input=conversation, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.splitlines()
    assert len(replies) == 3 and "[conversation reset]" in proc.stderr

    model, tok = MixtralForCausalLM.from_pretrained(d).eval(), Tokenizer.from_pretrained(d)
    history = [{"role": "system", "content": "you are a small dog"}, {"role": "user", "content": "hello how are you"}]
    first = greedy_reply(model, tok, history, 8)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "what is your name"}]
    second = greedy_reply(model, tok, history, 8)
    assert replies == [first, second, first]  # the second turn saw the first; after /reset it starts over
    assert first != greedy_reply(model, tok, history[1:2], 8)  # the system prompt was used
