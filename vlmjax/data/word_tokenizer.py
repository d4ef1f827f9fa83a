"""`WordTokenizer`: a word-level vocabulary trained locally from captions.

Lower-cased text is split on whitespace and punctuation, each punctuation character kept as a
token of its own. Ids: `pad=0`, `bos=1`, `eos=2`, `unk=3`, then the words by decreasing
frequency, ties broken alphabetically, so training is deterministic. It is saved and loaded
as JSON, and follows `vlmjax.data.tokenizer_base.Tokenizer`.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from vlmjax.data import tokenizer_base as base

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # their ids are their positions here

FORMAT = "vlmjax.WordTokenizer"  # the "format" entry of its JSON file
_VERSION = 1
_TOKEN_RE = re.compile(r"[^\W_]+|[^\w\s]|_")  # runs of letters/digits; single punctuation chars
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%")
_NO_SPACE_AFTER = frozenset("([{")


def split_words(text: base.Text) -> list[str]:
    """Lower-cases and splits on whitespace and punctuation, keeping each punctuation char."""
    return _TOKEN_RE.findall(base.as_str(text).lower())


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
        cls, texts: Iterable[base.Text], min_count: int = 1, max_vocab_size: int | None = None
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

    def tokenize(self, text: base.Text) -> list[int]:
        """One text -> its token ids without bos/eos."""
        return [self._ids.get(word, self.unk_id) for word in split_words(text)]

    def encode(self, texts: base.Text | Iterable[base.Text], context_length: int) -> np.ndarray:
        """Texts (str or UTF-8 bytes; a single one counts as a batch of 1) -> int32
        [n, context_length] `[bos] tokens... [eos] [pad]...`, truncated keeping `eos` last."""
        rows = [self.tokenize(text) for text in base.as_texts(texts)]
        return base.pack(rows, context_length, self.bos_id, self.eos_id, self.pad_id)

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
        return {"format": FORMAT, "version": _VERSION, "tokens": self._tokens}

    @classmethod
    def from_json(cls, data: dict) -> WordTokenizer:
        if data.get("format") != FORMAT or data.get("version") != _VERSION:
            raise ValueError(f"not a {FORMAT} v{_VERSION} file: {data.get('format')!r}")
        return cls(data["tokens"])

    def save(self, path: str | os.PathLike) -> None:
        """Writes the vocabulary as JSON (atomically)."""
        base.write_atomically(
            path, json.dumps(self.to_json(), ensure_ascii=False, indent=0).encode()
        )

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
    texts: Iterable[base.Text], path: str | os.PathLike, min_count: int = 1
) -> WordTokenizer:
    """Loads the tokenizer saved at `path`, or trains one on `texts` and saves it there.

    `texts` is only iterated when training, so it may be a lazy generator over a dataset."""
    if os.path.exists(path):
        return WordTokenizer.load(path)
    tokenizer = WordTokenizer.train(texts, min_count=min_count)
    tokenizer.save(path)
    return tokenizer
