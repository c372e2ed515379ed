"""Tokenizers: ``tokenizer.json`` through the ``tokenizers`` library, or a SentencePiece ``tokenizer.model``.

The interface is the part of transformers' tokenizers that Mixtral users call: ``tok(texts,
return_tensors="pt", padding=True)``, ``encode``/``decode``/``batch_decode`` and
``apply_chat_template`` with the checkpoint's Jinja template (rendered the way transformers
renders it: sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception`` and ``tojson``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


class BatchEncoding(dict):
    """A dict of ``input_ids``/``attention_mask`` that also allows attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def to(self, device: torch.device | str) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # tokenizer_config.json may store AddedToken dicts
        return value.get("content")
    return value


class Tokenizer:
    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool = False,
        padding_side: str = "left",
    ) -> None:
        self.backend = backend
        self.is_sentencepiece = not hasattr(backend, "encode_batch")
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self.add_eos_token = add_eos_token
        self.padding_side = padding_side
        self._special = [t for t in (bos_token, eos_token, unk_token, pad_token) if t]
        if not self.is_sentencepiece:
            self._special += [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
        self._special = list(dict.fromkeys(self._special))
        if add_bos_token is None:
            # tokenizer.json usually adds BOS in its post-processor; a bare SentencePiece model never does.
            add_bos_token = self.is_sentencepiece
        self.add_bos_token = add_bos_token

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """From a checkpoint directory (tokenizer.json or tokenizer.model), or a .gguf file."""
        from .checkpoint import resolve_path

        path = resolve_path(path)
        if path.is_file() and path.suffix == ".gguf":
            from .checkpoint.gguf import tokenizer_from_gguf

            return tokenizer_from_gguf(path)
        if path.is_file():
            path = path.parent
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            config = json.loads((path / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template", template)
        kwargs = dict(
            bos_token=_token_text(config.get("bos_token", "<s>")),
            eos_token=_token_text(config.get("eos_token", "</s>")),
            unk_token=_token_text(config.get("unk_token", "<unk>")),
            pad_token=_token_text(config.get("pad_token")),
            chat_template=template,
            add_eos_token=bool(config.get("add_eos_token", False)),
            padding_side=config.get("padding_side", "left") if config.get("padding_side") == "right" else "left",
        )
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer

            backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
            backend.no_padding()
            backend.no_truncation()
            # When the post-processor inserts BOS itself, adding it again would double it.
            add_bos = False if _adds_bos_itself(backend) else bool(config.get("add_bos_token", False))
            return cls(backend, add_bos_token=add_bos, **kwargs)
        if (path / "tokenizer.model").exists():
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            return cls(sp, add_bos_token=config.get("add_bos_token", True), **kwargs)
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model found")

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.is_sentencepiece:
            (directory / "tokenizer.model").write_bytes(self.backend.serialized_model_proto())
        else:
            self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
            "pad_token": self.pad_token, "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
            "padding_side": self.padding_side, "tokenizer_class": "LlamaTokenizerFast",
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # -- vocabulary ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self.is_sentencepiece:
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def convert_tokens_to_ids(self, token: str | None) -> int | None:
        if token is None:
            return None
        if self.is_sentencepiece:
            i = self.backend.piece_to_id(token)
            return None if i == self.backend.unk_id() and token != self.unk_token else i
        return self.backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        one = isinstance(ids, int)
        ids = [ids] if one else list(ids)
        f = self.backend.id_to_piece if self.is_sentencepiece else self.backend.id_to_token
        out = [f(int(i)) for i in ids]
        return out[0] if one else out

    @property
    def bos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.pad_token)

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in (self.convert_tokens_to_ids(t) for t in self._special) if i is not None]

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.is_sentencepiece:
            ids = self._sp_encode(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
                ids = [self.bos_token_id] + ids
            if self.add_eos_token and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def _sp_encode(self, text: str) -> list[int]:
        """SentencePiece knows no special tokens in text; split them out first (as transformers does)."""
        if not self._special:
            return self.backend.encode(text)
        pattern = "(" + "|".join(re.escape(t) for t in self._special) + ")"
        ids: list[int] = []
        for i, part in enumerate(re.split(pattern, text)):
            if i % 2:
                ids.append(self.convert_tokens_to_ids(part))
            elif part:
                ids += self.backend.encode(part)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        ids = [int(i) for i in ids]
        if self.is_sentencepiece:
            special = set(self.all_special_ids)
            if skip_special_tokens:
                ids = [i for i in ids if i not in special]
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False
                     ) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        return_tensors: str | None = None,
        padding: bool | str = False,
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
        padding_side: str | None = None,
    ) -> BatchEncoding:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if truncation and max_length is not None:
            rows = [r[:max_length] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding or (return_tensors == "pt" and len({len(r) for r in rows}) > 1):
            if return_tensors == "pt" and not padding:
                raise ValueError("rows have different lengths: pass padding=True to batch them into one tensor")
            width = max(len(r) for r in rows)
            if padding == "max_length" and max_length:
                width = max_length
            pad_id = self.pad_token_id if self.pad_token_id is not None else (self.eos_token_id or 0)
            side = padding_side or self.padding_side
            for r, m in zip(rows, masks):
                n = width - len(r)
                if side == "left":
                    r[:0], m[:0] = [pad_id] * n, [0] * n
                else:
                    r += [pad_id] * n
                    m += [0] * n
        if return_tensors == "pt":
            return BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long),
                                 attention_mask=torch.tensor(masks, dtype=torch.long))
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (use 'pt' or None)")
        if single:
            return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=rows, attention_mask=masks)

    # -- chat --------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_tensors: str | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int] | torch.Tensor:
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no 'chat_template')")
        text = render_chat_template(
            template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs,
        )
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)  # the template writes BOS itself
        if return_tensors == "pt":
            return torch.tensor([ids], dtype=torch.long)
        return ids


def _adds_bos_itself(backend) -> bool:
    """Whether a tokenizer.json's post-processor already inserts special tokens."""
    try:
        return len(backend.encode("a", add_special_tokens=True).ids) > len(
            backend.encode("a", add_special_tokens=False).ids)
    except Exception:
        return False


def render_chat_template(template: str, messages: Sequence[dict[str, Any]], **context: Any) -> str:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=list(messages), **context)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from e
