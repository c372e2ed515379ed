"""Chat prompts: a conversation through the model's chat template, for the server's
``/v1/chat/completions`` and the terminal chat (``mixtral.cli.chat``), trimmed to fit the context.
"""

from __future__ import annotations


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The conversation through the chat template, ready for the assistant's turn.

    Mixtral's original template rejects a system message; then the system text is folded into the
    first user turn, which is what Mistral's own tooling does.
    """
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    except ValueError:
        if not messages or messages[0]["role"] != "system" or len(messages) < 2:
            raise
        system, first, rest = messages[0], messages[1], messages[2:]
        merged = {"role": first["role"], "content": system["content"] + "\n\n" + first["content"]}
        return tokenizer.apply_chat_template([merged, *rest], add_generation_prompt=True, return_dict=False)


def fit_context(tokenizer, messages: list[dict[str, str]], budget: int) -> list[int]:
    """Drop the oldest exchanges (never the system prompt or the newest turn) until the prompt fits."""
    ids = chat_prompt(tokenizer, messages)
    start = 1 if messages and messages[0]["role"] == "system" else 0
    while len(ids) > budget and len(messages) - start > 1:
        del messages[start : start + 2]  # one user turn and the reply to it
        ids = chat_prompt(tokenizer, messages)
    if len(ids) > budget:
        raise ValueError(f"the message is too long for the context ({len(ids)} > {budget} tokens)")
    return ids
