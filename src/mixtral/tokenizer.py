"""Tokenizers: ``tokenizer.json`` through the ``tokenizers`` library, a SentencePiece ``tokenizer.model``,
or the vocabulary in a GGUF file's metadata (``Tokenizer.from_gguf``).

The interface is the part of transformers' (v5) tokenizers that Mixtral users call: ``tok(texts,
return_tensors="pt", padding=True)``, ``encode``/``decode``/``batch_decode``/``tokenize`` and
``apply_chat_template`` with the checkpoint's Jinja template (rendered the way transformers
renders it: sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception`` and ``tojson``).

Special tokens around a sequence: with a ``tokenizer.json`` its post-processor decides, and the
``add_bos_token``/``add_eos_token`` entries of ``tokenizer_config.json`` are ignored, as in
transformers 5; passing either to ``from_pretrained`` (or setting it) rewrites the post-processor.
A bare SentencePiece model has no post-processor, so there the flags are applied here.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, resolve_path
from .checkpoint.gguf import BYTE, CONTROL, NORMAL, UNUSED, USER_DEFINED, gguf_metadata
from .checkpoint.loading import read_json

VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when tokenizer_config.json names none
LARGE_INTEGER = int(1e20)  # above this, model_max_length means "no limit" for padding and truncation

# from_pretrained arguments that matter only to transformers' loading machinery. ``legacy`` changes how
# transformers' slow SentencePiece tokenizer spaces text after special tokens; this class always
# behaves as ``legacy=True`` (what Mixtral's tokenizer_config.json says).
_IGNORED_LOAD_KWARGS = frozenset({
    "use_fast", "trust_remote_code", "legacy", "revision", "cache_dir", "token", "use_auth_token",
    "local_files_only", "force_download", "proxies",
})
_INIT_KWARGS = frozenset({
    "bos_token", "eos_token", "unk_token", "pad_token", "chat_template", "add_bos_token", "add_eos_token",
    "padding_side", "model_max_length", "clean_up_tokenization_spaces",
})
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


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
        add_eos_token: bool | None = None,
        padding_side: str = "left",
        model_max_length: int = VERY_LARGE_INTEGER,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        """``add_bos_token``/``add_eos_token``: None keeps what the backend does (a tokenizer.json's
        post-processor; for SentencePiece, BOS and no EOS); True/False changes it."""
        self.backend = backend
        self.is_sentencepiece = not hasattr(backend, "encode_batch")
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        if self.is_sentencepiece:
            self._add_bos = True if add_bos_token is None else bool(add_bos_token)
            self._add_eos = bool(add_eos_token)
        else:
            self._add_bos, self._add_eos = _post_processor_adds(backend, self.bos_token_id, self.eos_token_id)
            want = (self._add_bos if add_bos_token is None else bool(add_bos_token),
                    self._add_eos if add_eos_token is None else bool(add_eos_token))
            if want != (self._add_bos, self._add_eos):
                self._add_bos, self._add_eos = want
                self.update_post_processor()

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> Tokenizer:
        """From a checkpoint directory (tokenizer.json or tokenizer.model), or a .gguf file.

        Keyword arguments override tokenizer_config.json (``padding_side``, ``pad_token``,
        ``model_max_length``, ``add_eos_token``, ...), as in transformers; ``use_fast``,
        ``trust_remote_code``, ``legacy`` and hub-download options are accepted and ignored.
        """
        unknown = set(kwargs) - _INIT_KWARGS - _IGNORED_LOAD_KWARGS
        if unknown:
            raise TypeError(f"Tokenizer.from_pretrained() got unexpected keyword arguments: {sorted(unknown)}")
        overrides = {k: v for k, v in kwargs.items() if k in _INIT_KWARGS}
        path = resolve_path(path)
        if path.is_file() and path.suffix == ".gguf":
            tok = cls.from_gguf(path)
            for k, v in overrides.items():
                setattr(tok, k, v)
            return tok
        if path.is_file():
            path = path.parent
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            config = read_json(path / "tokenizer_config.json")  # bad JSON: an error naming the file
        init = _init_from_config(config, path)
        if (path / "tokenizer.json").exists():
            # The config's add_bos_token/add_eos_token are ignored here: the post-processor decides.
            return cls(_read_tokenizer_json(path / "tokenizer.json"), **{**init, **overrides})
        if (path / "tokenizer.model").exists():
            init.update(add_bos_token=config.get("add_bos_token", True), add_eos_token=config.get("add_eos_token"))
            return cls(_read_sentencepiece(path / "tokenizer.model"), **{**init, **overrides})
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model found")

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The vocabulary a GGUF file carries in its metadata."""
        return cls.from_gguf_metadata(gguf_metadata(path), str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], origin: str = "GGUF") -> Tokenizer:
        """From GGUF ``tokenizer.*`` metadata: a ``gpt2`` vocabulary as byte-level BPE with its merges,
        a ``llama`` one as SentencePiece-style BPE with byte fallback, merges ranked by piece score
        (llama.cpp's own SPM tokenizer merges the best-scoring pair first, which this ranking
        reproduces). ``origin`` names the file in errors."""
        from tokenizers import AddedToken

        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or tokens is None:
            raise CheckpointError(f"{origin}: no tokenizer vocabulary in the metadata (tokenizer.ggml.tokens)")
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        unk = token("unknown")
        if kind == "gpt2":
            backend, add_bos_default = _gguf_byte_level_bpe(meta, tokens), False
        elif kind == "llama":
            backend, add_bos_default = _gguf_sentencepiece_bpe(meta, tokens, types, unk, origin), True
        else:
            raise CheckpointError(f"{origin}: tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama')")
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                            for i, t in enumerate(types) if t == USER_DEFINED])
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, t in enumerate(types) if t == CONTROL])
        return cls(
            backend, bos_token=token("bos"), eos_token=token("eos"), unk_token=unk, pad_token=token("padding"),
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        )

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
            "padding_side": self.padding_side, "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "tokenizer_class": "LlamaTokenizerFast",
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # -- special tokens around a sequence --------------------------------------------------------
    @property
    def add_bos_token(self) -> bool:
        return self._add_bos

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos = bool(value)
        self.update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos = bool(value)
        self.update_post_processor()

    def update_post_processor(self) -> None:
        """Rewrite a tokenizer.json's post-processor from ``add_bos_token``/``add_eos_token`` and the
        current BOS/EOS (call it after changing ``bos_token``/``eos_token``, as in transformers)."""
        if self.is_sentencepiece:
            return  # no post-processor: encode() reads the flags
        from tokenizers import processors

        bos = self.bos_token if self._add_bos and self.bos_token_id is not None else None
        eos = self.eos_token if self._add_eos and self.eos_token_id is not None else None

        def seq(name: str, type_id: int) -> str:
            return " ".join(([f"{bos}:{type_id}"] if bos else []) + [f"${name}:{type_id}"]
                            + ([f"{eos}:{type_id}"] if eos else []))

        special = [(t, self.convert_tokens_to_ids(t)) for t in dict.fromkeys(t for t in (bos, eos) if t)]
        self.backend.post_processor = processors.TemplateProcessing(
            single=seq("A", 0), pair=seq("A", 0) + " " + seq("B", 1), special_tokens=special)

    # -- vocabulary ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self.is_sentencepiece:
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        if self.is_sentencepiece:
            return {self.backend.id_to_piece(i): i for i in range(self.backend.get_piece_size())}
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str] | None) -> int | list[int | None] | None:
        if tokens is None:
            return None
        if not isinstance(tokens, str):
            return [self.convert_tokens_to_ids(t) for t in tokens]
        if self.is_sentencepiece:
            i = self.backend.piece_to_id(tokens)
            return None if i == self.backend.unk_id() and tokens != self.unk_token else i
        return self.backend.token_to_id(tokens)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        one = isinstance(ids, numbers.Integral)
        ids = [ids] if one else list(ids)
        f = self.backend.id_to_piece if self.is_sentencepiece else self.backend.id_to_token
        out = [f(int(i)) for i in ids]
        return out[0] if one else out

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        if self.is_sentencepiece:
            return self.backend.decode_pieces(list(tokens))
        decoder = self.backend.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    @property
    def bos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.pad_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in _NAMED_SPECIAL if getattr(self, k) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = list(self.special_tokens_map.values())
        if not self.is_sentencepiece:
            tokens += [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in (self.convert_tokens_to_ids(t) for t in self.all_special_tokens) if i is not None]

    def add_special_tokens(self, special_tokens_dict: Mapping[str, str | Sequence[str]]) -> int:
        """Set named special tokens (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``) and add
        ``additional_special_tokens``; returns how many tokens were new to the vocabulary (resize the
        model's embeddings to ``len(tokenizer)`` when it is not 0). A SentencePiece model cannot grow:
        there every token must already be in the vocabulary."""
        new: list[str] = []
        for key, value in special_tokens_dict.items():
            if key in _NAMED_SPECIAL:
                new.append(_token_text(value) if isinstance(value, dict) else str(value))
            elif key in ("additional_special_tokens", "extra_special_tokens"):
                new += [str(v) for v in value]
            else:
                raise ValueError(f"add_special_tokens: unknown key {key!r} (use {', '.join(_NAMED_SPECIAL)} "
                                 "or additional_special_tokens)")
        added = 0
        if self.is_sentencepiece:
            missing = [t for t in new if self.convert_tokens_to_ids(t) is None]
            if missing:
                raise NotImplementedError(f"a SentencePiece tokenizer cannot add tokens to its vocabulary: {missing}")
        else:
            from tokenizers import AddedToken

            added = self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        for key, value in special_tokens_dict.items():
            if key in _NAMED_SPECIAL:
                setattr(self, key, _token_text(value) if isinstance(value, dict) else str(value))
        return added

    # -- encoding --------------------------------------------------------------------------------
    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        *,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> list[int] | torch.Tensor:
        """Token ids of one text; ``return_tensors="pt"`` gives a ``(1, T)`` tensor.

        Text is encoded as SentencePiece does: " hello" keeps its leading space as an extra "▁"
        (as transformers 4 did; transformers 5's LlamaTokenizer drops it, we deliberately do not).
        """
        return self(text, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length,
                    return_tensors=return_tensors, return_attention_mask=False)["input_ids"]

    def _encode_one(self, text: str, add_special_tokens: bool) -> list[int]:
        if not self.is_sentencepiece:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._sp_encode(text)
        if add_special_tokens:
            if self._add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
                ids = [self.bos_token_id] + ids
            if self._add_eos and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def _sp_encode(self, text: str) -> list[int]:
        """SentencePiece knows no special tokens in text; split them out first (as transformers does)."""
        special = [t for t in self.all_special_tokens if self.convert_tokens_to_ids(t) is not None]
        if not special:
            return self.backend.encode(text)
        pattern = "(" + "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for i, part in enumerate(re.split(pattern, text)):
            if i % 2:
                ids.append(self.convert_tokens_to_ids(part))
            elif part:
                ids += self.backend.encode(part)
        return ids

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        if self.is_sentencepiece:
            return self.convert_ids_to_tokens(self._encode_one(text, add_special_tokens))
        return self.backend.encode(text, add_special_tokens=add_special_tokens).tokens

    def decode(
        self,
        token_ids: int | Sequence[int] | torch.Tensor | Mapping[str, Any],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Text of one sequence (an id, a list, a tensor or a BatchEncoding's ``input_ids``).

        ``clean_up_tokenization_spaces`` is ignored for BPE vocabularies (tokenizer.json BPE, and
        Mixtral's BPE tokenizer.model), as transformers 5 does: its WordPiece clean-up would strip
        real spaces before punctuation. Other keyword arguments are accepted for compatibility.
        """
        if isinstance(token_ids, Mapping):
            token_ids = token_ids["input_ids"]
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()
        elif isinstance(token_ids, numbers.Integral):
            token_ids = [token_ids]
        ids = [int(i) for i in token_ids]
        if self.is_sentencepiece:
            if skip_special_tokens:
                special = set(self.all_special_ids)
                ids = [i for i in ids if i not in special]
            text = self.backend.decode(ids)
        else:
            text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        bpe = self.is_sentencepiece or type(self.backend.model).__name__ == "BPE"
        if clean_up_tokenization_spaces and not bpe:
            text = _clean_up_tokenization(text)
        return text

    def batch_decode(
        self,
        sequences: Sequence[Sequence[int]] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> list[str]:
        if isinstance(sequences, Mapping):
            sequences = sequences["input_ids"]
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens,
                            clean_up_tokenization_spaces=clean_up_tokenization_spaces) for s in sequences]

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> BatchEncoding:
        """``input_ids`` (and ``attention_mask`` unless ``return_attention_mask=False``) of one text or a
        batch. Padding and truncation strategies and their defaults follow transformers: ``max_length``
        alone truncates, and without a length the limit is ``model_max_length`` when it is finite."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (use 'pt' or None)")
        pad = _padding_strategy(padding)
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # transformers' backward-compatible default
        truncate = truncation not in (None, False, "do_not_truncate")
        if max_length is None and (pad == "max_length" or truncate):
            if self.model_max_length > LARGE_INTEGER:
                pad = None if pad == "max_length" else pad
                truncate = False
            else:
                max_length = self.model_max_length
        if pad is not None and self.pad_token_id is None:
            raise ValueError(
                "Asking to pad but the tokenizer does not have a padding token. Set one first, for example "
                "`tokenizer.pad_token = tokenizer.eos_token`, or add one with "
                "`tokenizer.add_special_tokens({'pad_token': '[PAD]'})`.")

        single = isinstance(text, str)
        texts = [text] if single else list(text)
        rows = [self._encode_one(t, add_special_tokens) for t in texts]
        if truncate and max_length is not None:
            rows = [r[:max_length] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if pad is not None:
            width = max_length if pad == "max_length" else max((len(r) for r in rows), default=0)
            _pad(rows, masks, width, padding_side or self.padding_side, self.pad_token_id)
        if return_tensors == "pt":
            if len({len(r) for r in rows}) > 1:
                raise ValueError("rows have different lengths: pass padding=True to batch them into one tensor")
            out = BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long),
                                attention_mask=torch.tensor(masks, dtype=torch.long))
        elif single:
            out = BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        else:
            out = BatchEncoding(input_ids=rows, attention_mask=masks)
        if return_attention_mask is False:
            del out["attention_mask"]
        return out

    # -- chat --------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        tools: list[dict] | None = None,
        documents: list[dict[str, str]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str | list[str] | list[int] | list[list[int]] | torch.Tensor | BatchEncoding:
        """A conversation (list of messages), or a batch of them, through the chat template.

        As in transformers 5: ``tokenize=True`` returns a BatchEncoding (``input_ids`` and
        ``attention_mask``) unless ``return_dict=False``, which gives the ids alone; a batch gives
        one row per conversation (``padding=True`` to make them one tensor). The template writes
        BOS itself, so no special tokens are added. ``continue_final_message`` leaves the last
        message open (no EOS or closing tags) for the model to continue. Other keyword arguments
        are template variables.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no 'chat_template')")
        if isinstance(conversation, (list, tuple)) and not conversation:
            raise ValueError("cannot apply a chat template to an empty conversation")
        batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        conversations = list(conversation) if batched else [conversation]
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible: the first "
                             "continues the final message, the second starts a new assistant message")
        context = {**self.special_tokens_map, **kwargs}
        rendered = [
            render_chat_template(template, getattr(c, "messages", c), add_generation_prompt=add_generation_prompt,
                                 continue_final_message=continue_final_message, tools=tools, documents=documents,
                                 **context)
            for c in conversations
        ]
        if not tokenize:
            return rendered if batched else rendered[0]
        out = self(rendered if batched else rendered[0], padding=padding, truncation=truncation,
                   max_length=max_length, add_special_tokens=False, return_tensors=return_tensors,
                   **(tokenizer_kwargs or {}))
        return out if return_dict else out["input_ids"]


def _init_from_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """``Tokenizer`` keywords from a tokenizer_config.json (``{}`` when there is none) and the chat
    template files beside it."""
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    elif (path / "chat_template.json").exists():
        template = read_json(path / "chat_template.json").get("chat_template", template)
    return dict(
        bos_token=_token_text(config.get("bos_token", "<s>")),
        eos_token=_token_text(config.get("eos_token", "</s>")),
        unk_token=_token_text(config.get("unk_token", "<unk>")),
        pad_token=_token_text(config.get("pad_token")),
        chat_template=template,
        padding_side="right" if config.get("padding_side") == "right" else "left",
        model_max_length=int(config.get("model_max_length") or VERY_LARGE_INTEGER),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
    )


def _read_tokenizer_json(file: Path) -> Any:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception that names no file
        raise CheckpointError(f"{file}: not a readable tokenizers file ({e})") from e
    backend.no_padding()
    backend.no_truncation()
    return backend


def _read_sentencepiece(file: Path) -> Any:
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(file))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a readable SentencePiece model ({e})") from e


def _post_processor_adds(backend, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
    """Whether a tokenizer.json's post-processor puts BOS before and EOS after a single sequence."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    before, after = full[:start], full[start + len(plain):]
    return bos_id is not None and bos_id in before, eos_id is not None and eos_id in after


def _pad(rows: list[list[int]], masks: list[list[int]], width: int, side: str, pad_id: int) -> None:
    """Pad every row (and its mask, with 0) to ``width`` in place, on the ``side`` given."""
    for r, m in zip(rows, masks):
        n = width - len(r)
        if side == "left":
            r[:0], m[:0] = [pad_id] * n, [0] * n
        else:
            r += [pad_id] * n
            m += [0] * n


def _padding_strategy(padding: bool | str) -> str | None:
    strategy = {True: "longest", False: None, "longest": "longest", "max_length": "max_length",
                "do_not_pad": None}.get(getattr(padding, "value", padding), "?")
    if strategy == "?":
        raise ValueError(f"padding={padding!r}: use True/'longest', 'max_length' or False/'do_not_pad'")
    return strategy


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of WordPiece spacing before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def render_chat_template(
    template: str, messages: Sequence[Mapping[str, Any]], *, continue_final_message: bool | str = False,
    **context: Any,
) -> str:
    """One conversation through a chat template. Keys whose value is None are dropped from each
    message first, as transformers does (templates test ``message.tool_calls is defined``)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    final = None
    if continue_final_message:
        messages, final = _tag_final_message(template, messages, continue_final_message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(template).render(messages=messages, **context)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from e
    if final is None:
        return text
    # Cut the rendering where the final message ends. A template that strips message text also
    # strips the tag's trailing space; then strip the message's own trailing space too.
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise ValueError("continue_final_message is set but the final message does not appear in the rendered "
                         f"chat (the template changes it):\n{text}")
    at = text.rindex(tag)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def _tag_final_message(template: str, messages: list[dict[str, Any]], field: bool | str
                       ) -> tuple[list[dict[str, Any]], str]:
    """A copy of the messages with a marker after the text to continue, and that text."""
    if not messages:
        raise ValueError("continue_final_message is set but the conversation is empty")
    field = field if isinstance(field, str) else "content"
    last = dict(messages[-1])
    value = last.get(field)
    if value is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue')
    if field not in template:
        raise ValueError(f"continue_final_message={field!r} is not a field the chat template reads")
    if isinstance(value, str):
        final, last[field] = value, value + _CONTINUE_TAG
    else:  # content blocks: continue the last text block
        blocks = [dict(b) for b in value]
        text_blocks = [b for b in blocks if "text" in b]
        if not text_blocks:
            raise ValueError("continue_final_message is set but the final message has no text to continue")
        final = text_blocks[-1]["text"]
        text_blocks[-1]["text"] = final + _CONTINUE_TAG
        last[field] = blocks
    return messages[:-1] + [last], final


# -- GGUF vocabularies ---------------------------------------------------------------------------

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) for byte-level BPE, as `tokenizers` pre-tokenizers.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


def _gguf_byte_level_bpe(meta: Mapping[str, Any], tokens: list[str]) -> Any:
    """A ``gpt2`` GGUF vocabulary: byte-level BPE with the file's merges and pre-tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders
    from tokenizers.models import BPE

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    backend = HFTokenizer(BPE(vocab, merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    return backend


def _gguf_sentencepiece_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int], unk: str | None,
                            origin: str) -> Any:
    """A ``llama`` GGUF vocabulary: SentencePiece-style BPE, merges ranked by piece score."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, normalizers
    from tokenizers.models import BPE

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise CheckpointError(f"{origin}: a 'llama' vocabulary needs tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _spm_merges(tokens, scores, types)
    backend = HFTokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=BYTE in types))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    # Prepend "▁" to every text segment (also after special tokens), as llama.cpp and legacy
    # SentencePiece tokenization in transformers do.
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _byte_level_pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # "gpt2", "default"


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece-BPE: every split of a piece into two pieces, best score first."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED, UNUSED)}
    merges = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]
