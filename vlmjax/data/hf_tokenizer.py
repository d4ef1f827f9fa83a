"""Hugging Face `tokenizer.json` files through the Rust `tokenizers` library: any model it
reads (BPE, WordPiece, Unigram, WordLevel) with its own normalizer and pre-tokenizer, so ids
are exactly the original's, laid out like every vlmjax tokenizer
(`vlmjax.data.tokenizer_base.pack`): `[bos] tokens... [eos] [pad]...`, truncated so that
`eos` stays last.

    tok = HFTokenizer.load("path/to/folder/tokenizer.json")
    ids = tok.encode(["a photo of a cat"], context_length=77)  # int32 [1, 77]

The file's own post-processor, padding and truncation are not run (`pack` does that part,
the same way for every tokenizer); the special tokens come from them instead:

  * bos: the special token the post-processor's template puts before the text (CLIP's
    `<|startoftext|>`, BERT's `[CLS]`); with no template, the `bos_token` of the
    tokenizer_config.json / special_tokens_map.json beside the file; else none (T5).
  * eos: the special token the template puts after the text (CLIP's `<|endoftext|>`,
    BERT's `[SEP]`, T5's `</s>`), else the folder's `eos_token`; a tokenizer with neither is
    refused (text towers pool at eos, decoders stop there).
  * pad: the folder's `pad_token`, else the file's padding token, else eos (as SigLIP pads).

Special tokens written in a text (`<|endoftext|>`) become their ids, as in transformers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from vlmjax.data import tokenizer_base as base

TOKENIZER_FILE = "tokenizer.json"


def _tokenizers():
    """The library, imported on first use (a dependency of vlmjax; only a partial install
    lacks it)."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("tokenizer.json files need `pip install tokenizers`") from e
    return tokenizers


def _template_specials(processor: dict | None) -> tuple[str | None, str | None]:
    """(token before the text, token after it) that a post-processor adds to one sequence:
    TemplateProcessing's `single` template, Roberta/BertProcessing's cls and sep, or the
    first that says in a Sequence of processors; (None, None) when it adds none."""
    if not processor:
        return None, None
    kind = processor.get("type")
    if kind in ("RobertaProcessing", "BertProcessing"):
        return processor["cls"][0], processor["sep"][0]
    if kind == "TemplateProcessing":
        before, after, seen_text = None, None, False
        for piece in processor.get("single", []):
            if "Sequence" in piece:
                seen_text = True
            elif "SpecialToken" in piece:
                token = piece["SpecialToken"]["id"]
                if not seen_text and before is None:
                    before = token
                elif seen_text:
                    after = token
        return before, after
    if kind == "Sequence":
        for inner in processor.get("processors", []):
            found = _template_specials(inner)
            if found != (None, None):
                return found
    return None, None


def special_roles(data: dict[str, Any], folder: str) -> dict[str, str | None]:
    """{"bos": token or None, "eos": token, "pad": token} for the tokenizer.json `data` in
    `folder` (see the module doc for where each comes from)."""
    named = base.hf_special_tokens(folder)
    before, after = _template_specials(data.get("post_processor"))
    has_template = (before, after) != (None, None)
    bos = before if has_template else named.get("bos_token")
    eos = after or named.get("eos_token")
    padding = data.get("padding") or {}
    pad = named.get("pad_token") or padding.get("pad_token") or eos
    return {"bos": bos, "eos": eos, "pad": pad}


class HFTokenizer:
    """A tokenizer.json as a vlmjax `Tokenizer` (see the module doc for the layout and the
    special tokens). `json_text` is the file's content; `roles` as `special_roles` gives."""

    def __init__(self, json_text: str, roles: dict[str, str | None], name: str = "<json>"):
        try:
            tok = _tokenizers().Tokenizer.from_str(json_text)
        except Exception as e:  # the library raises plain Exceptions on bad files
            raise ValueError(
                f"{name}: not a tokenizer.json the tokenizers library reads ({e})"
            ) from e
        # The layout is `pack`'s, the same for every tokenizer: no padding or truncation here.
        tok.no_padding()
        tok.no_truncation()
        self._tok, self._json, self._roles, self.name = tok, json_text, dict(roles), name
        if roles.get("eos") is None:
            raise ValueError(
                f"{name}: no eos token (its post-processor adds none after the text and no "
                "tokenizer_config.json beside it names an eos_token), which the text tower "
                "pools at and generation stops at; put a tokenizer_config.json with "
                '{"eos_token": "..."} next to it'
            )
        ids = {}
        for role, token in roles.items():
            if token is None:
                continue
            ids[role] = tok.token_to_id(token)
            if ids[role] is None:
                raise ValueError(f"{name}: the {role} token {token!r} is not in its vocabulary")
        self.bos_id = ids.get("bos")
        self.eos_id, self.pad_id = ids["eos"], ids["pad"]
        self._special_ids = {t["id"] for t in json.loads(json_text).get("added_tokens") or []}
        self._special_ids |= {i for i in ids.values() if i is not None}

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        """The tokenizer.json at `path`, with the special tokens its folder names."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not JSON ({e})") from e
        if not isinstance(data, dict) or "model" not in data:
            raise ValueError(
                f"{path}: no 'model' entry, so not a tokenizer.json (for vocab.json + "
                f"merges.txt, pass the folder that holds both)"
            )
        folder = os.path.dirname(os.path.abspath(path))
        return cls(text, special_roles(data, folder), name=path)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (added tokens included): the embedding-table size."""
        return max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    def token_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (e.g. Fuyu's "|SPEAKER|"), None if absent."""
        return self._tok.token_to_id(token)

    def tokenize(self, text: base.Text) -> list[int]:
        """One text -> its token ids without bos/eos."""
        return list(self._tok.encode(base.as_str(text), add_special_tokens=False).ids)

    def encode(self, texts: base.Text | Iterable[base.Text], context_length: int) -> np.ndarray:
        """Texts (str or UTF-8 bytes; one counts as a batch of 1) -> int32 [n, context_length]
        `[bos] tokens... [eos] [pad]...` (no bos if there is none), truncated keeping eos."""
        texts = [base.as_str(t) for t in base.as_texts(texts)]
        rows = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return base.pack(rows, context_length, self.bos_id, self.eos_id, self.pad_id)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """One row of ids -> text through the file's decoder, stopping at the first eos and
        skipping special tokens."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes one row of ids, got shape {ids.shape}")
        row = ids.tolist()
        if self.eos_id in row:
            row = row[: row.index(self.eos_id)]
        return self._tok.decode([i for i in row if i not in self._special_ids])

    def __getstate__(self) -> dict:  # pickled as its JSON (data worker processes)
        return {"json_text": self._json, "roles": self._roles, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and (self._json, self._roles) == (
            other._json,
            other._roles,
        )

    def __hash__(self) -> int:
        return hash(self._json)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"
