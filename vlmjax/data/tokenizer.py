"""Offline text tokenizers producing fixed-length int32 token arrays for a CLIP-style text tower.

Every tokenizer follows the `Tokenizer` protocol below, so CLIP's byte-level BPE
(`vlmjax.data.bpe`), SentencePiece models (`vlmjax.data.spm`) and `WordTokenizer` are
interchangeable for their callers, and `load_tokenizer(path)` opens any of them from its files:

  * `encode(texts, context_length)` -> int32 [n, context_length] laid out as
    `[bos] tokens... [eos] [pad]...`; a text too long keeps its first `context_length - 2`
    tokens so that the last position holds `eos` (as OpenAI CLIP's `truncate=True`).
    `bytes` inputs are decoded as UTF-8 (tfds returns text features as bytes).
  * `decode(ids)` -> str: the inverse for one row, skipping the special tokens.
  * `vocab_size`, `pad_id`, `bos_id`, `eos_id`: the embedding-table size and special ids
    (`bos_id` is None for a tokenizer without one, whose rows start with the text). Pooling
    must locate the end of text with `eos_id` (e.g. `ids == tok.eos_id`), never by assuming the
    `eos` id is the largest in the vocabulary as CLIP's `argmax` pooling does.

`WordTokenizer` is a word-level vocabulary trained locally from captions: lower-cased text is
split on whitespace and punctuation, each punctuation character kept as a token of its own.
Ids: `pad=0`, `bos=1`, `eos=2`, `unk=3`, then the words by decreasing frequency, ties broken
alphabetically, so training is deterministic. It is saved and loaded as JSON.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # their ids are their positions here

_FORMAT = "vlmjax.WordTokenizer"
_VERSION = 1
_TOKEN_RE = re.compile(r"[^\W_]+|[^\w\s]|_")  # runs of letters/digits; single punctuation chars
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%")
_NO_SPACE_AFTER = frozenset("([{")

Text = str | bytes


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
    if isinstance(text, bytes):
        return bytes(text).decode("utf-8")
    if isinstance(text, str):
        return str(text)
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


def split_words(text: Text) -> list[str]:
    """Lower-cases and splits on whitespace and punctuation, keeping each punctuation char."""
    return _TOKEN_RE.findall(as_str(text).lower())


def as_texts(texts: Text | Iterable[Text]) -> list[Text]:
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


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary whose first entries are `SPECIAL_TOKENS`."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}, got {tokens[:4]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has duplicate tokens")
        self._tokens = tokens
        self._ids = {token: i for i, token in enumerate(tokens)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(len(SPECIAL_TOKENS))

    @classmethod
    def train(
        cls, texts: Iterable[Text], min_count: int = 1, max_vocab_size: int | None = None
    ) -> WordTokenizer:
        """Vocabulary of every word seen at least `min_count` times, most frequent first, ties
        alphabetical; `max_vocab_size` (specials included) keeps only the most frequent."""
        counts = collections.Counter(word for text in texts for word in split_words(text))
        words = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
            key=lambda w: (-counts[w], w),
        )
        if max_vocab_size is not None:
            words = words[: max(0, max_vocab_size - len(SPECIAL_TOKENS))]
        return cls([*SPECIAL_TOKENS, *words])

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[str]:
        """The vocabulary, indexed by id."""
        return list(self._tokens)

    def token_to_id(self, token: str) -> int:
        return self._ids.get(token, self.unk_id)

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[token_id]

    def tokenize(self, text: Text) -> list[int]:
        """One text -> its token ids without bos/eos."""
        return [self._ids.get(word, self.unk_id) for word in split_words(text)]

    def encode(self, texts: Text | Iterable[Text], context_length: int) -> np.ndarray:
        """Texts (str or UTF-8 bytes; a single one counts as a batch of 1) -> int32
        [n, context_length] `[bos] tokens... [eos] [pad]...`, truncated keeping `eos` last."""
        rows = [self.tokenize(text) for text in as_texts(texts)]
        return pack(rows, context_length, self.bos_id, self.eos_id, self.pad_id)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """One row of ids -> text, stopping at the first `eos` and skipping pad/bos; unknown
        words come back as `<unk>`. Punctuation is re-attached (`"a , b ."` -> `"a, b."`)."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes one row of ids, got shape {ids.shape}")
        out = ""
        previous = ""
        for token_id in ids.tolist():
            if token_id == self.eos_id:
                break
            if token_id in (self.pad_id, self.bos_id):
                continue
            token = self._tokens[token_id]
            if out and token not in _NO_SPACE_BEFORE and previous not in _NO_SPACE_AFTER:
                out += " "
            out += token
            previous = token
        return out

    def to_json(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "tokens": self._tokens}

    @classmethod
    def from_json(cls, data: dict) -> WordTokenizer:
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ValueError(f"not a {_FORMAT} v{_VERSION} file: {data.get('format')!r}")
        return cls(data["tokens"])

    def save(self, path: str | os.PathLike) -> None:
        """Writes the vocabulary as JSON (atomically)."""
        write_atomically(path, json.dumps(self.to_json(), ensure_ascii=False, indent=0).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        with open(os.fspath(path), encoding="utf-8") as f:
            return cls.from_json(json.load(f))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and self._tokens == other._tokens

    def __hash__(self) -> int:
        return hash(tuple(self._tokens))

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


def build_for_captions(
    texts: Iterable[Text], path: str | os.PathLike, min_count: int = 1
) -> WordTokenizer:
    """Loads the tokenizer saved at `path`, or trains one on `texts` and saves it there.

    `texts` is only iterated when training, so it may be a lazy generator over a dataset."""
    if os.path.exists(path):
        return WordTokenizer.load(path)
    tokenizer = WordTokenizer.train(texts, min_count=min_count)
    tokenizer.save(path)
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved at `path`: a `WordTokenizer.save` JSON file; a SentencePiece
    `.model` file, or a folder holding one (`spiece.model`, `tokenizer.model`: SigLIP, T5,
    Gemma); else CLIP's byte-level BPE from a Hugging Face folder, a tokenizer.json, or
    OpenAI's bpe_simple_vocab .txt[.gz] (see `vlmjax.data.bpe.load`)."""
    # imported here: bpe and spm import this module
    from vlmjax.data import bpe, spm

    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and data.get("format") == _FORMAT:
            return WordTokenizer.from_json(data)
    model = spm.model_file(path)
    if model is not None:
        return spm.SentencePieceTokenizer.load(model)
    return bpe.load(path)
