"""What every tokenizer shares: the `Tokenizer` protocol, the row layout (`pack`), text
coercion, atomic saving, and the special-token roles a Hugging Face folder names.

The tokenizer modules (`word_tokenizer`, `bpe`, `spm`, `hf_tokenizer`) import only this
one, never each other; `vlmjax.data.tokenizer.load_tokenizer` is the one place that knows
every kind.

Every tokenizer follows `Tokenizer`:

  * `encode(texts, context_length)` -> int32 [n, context_length] laid out as
    `[bos] tokens... [eos] [pad]...`; a text too long keeps its first `context_length - 2`
    tokens so that the last position holds `eos` (as OpenAI CLIP's `truncate=True`).
    `bytes` inputs are decoded as UTF-8 (tfds returns text features as bytes).
  * `decode(ids)` -> str: the inverse for one row, skipping the special tokens.
  * `vocab_size`, `pad_id`, `bos_id`, `eos_id`: the embedding-table size and special ids
    (`bos_id` is None for a tokenizer without one, whose rows start with the text). Pooling
    must locate the end of text with `eos_id` (e.g. `ids == tok.eos_id`), never by assuming the
    `eos` id is the largest in the vocabulary as CLIP's `argmax` pooling does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

Text = str | bytes

# Where a Hugging Face tokenizer folder names its special tokens (the first to name a role wins).
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
HF_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


@runtime_checkable
class Tokenizer(Protocol):
    """What the text pipeline and the text tower need from any tokenizer (see module doc)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, texts: Text | Iterable[Text], context_length: int) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


def as_str(text: Text) -> str:
    """str, or UTF-8 bytes (as tfds gives text), -> str."""
    if isinstance(text, bytes):
        return bytes(text).decode("utf-8")
    if isinstance(text, str):
        return str(text)
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


def as_texts(texts: Text | Iterable[Text]) -> list[Text]:
    """One text, a list, or a numpy array of texts -> a flat list (one text is a batch of 1)."""
    if isinstance(texts, str | bytes):  # np.str_ / np.bytes_ are subclasses
        return [texts]
    if isinstance(texts, np.ndarray):
        return list(texts.reshape(-1))
    return list(texts)


def pack(
    token_ids: Sequence[Sequence[int]],
    context_length: int,
    bos: int | None,
    eos: int,
    pad: int,
) -> np.ndarray:
    """Rows of token ids (no specials) -> int32 [n, context_length]: `[bos] ids [eos] [pad]...`,
    each row truncated so that `eos` stays in the last position. Shared by all tokenizers;
    `bos=None` (a tokenizer without one, e.g. T5's) starts the rows with the text."""
    head = [] if bos is None else [bos]
    if context_length < len(head) + 1:
        raise ValueError(
            f"context_length must be >= {len(head) + 1} ({'bos and ' if head else ''}eos), "
            f"got {context_length}"
        )
    out = np.full((len(token_ids), context_length), pad, dtype=np.int32)
    for row, ids in enumerate(token_ids):
        ids = [*head, *list(ids)[: context_length - len(head) - 1]]
        out[row, : len(ids)] = ids
        out[row, len(ids)] = eos
    return out


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file and a rename, so that a reader (or a
    concurrent writer of the same data) never sees a partial file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def hf_special_tokens(folder: str) -> dict[str, str]:
    """{"bos_token": ..., ...} from a HF folder's tokenizer_config.json and
    special_tokens_map.json (the first to name a role wins); roles named nowhere are absent."""
    found: dict[str, str] = {}
    for name in HF_CONFIG_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        for role in HF_ROLES:
            token = config.get(role)
            if isinstance(token, dict):  # {"content": "<|endoftext|>", "lstrip": false, ...}
                token = token.get("content")
            if isinstance(token, str) and role not in found:
                found[role] = token
    return found
