"""SentencePiece tokenizers (SigLIP, T5, Gemma, LLaMA-style `.model` files), offline.

A `.model` file is a serialized SentencePiece ModelProto: its pieces, their scores, the
algorithm (unigram or BPE), the normalizer and the special ids. `SentencePieceTokenizer`
segments text with the `sentencepiece` library, so ids are exactly the original's, and lays
rows out like every vlmjax tokenizer (`vlmjax.data.tokenizer_base.pack`):

  `[bos] pieces... [eos] [pad]...`, truncated so that `eos` stays last.

Special ids come from the model. Many models define no BOS (T5: pad 0, eos 1, unk 2) or no
PAD (sentencepiece's trainer default: unk 0, bos 1, eos 2): rows then start directly with the
text, or are padded with `eos` (as Hugging Face's SigLIP tokenizer does). A model without an
EOS piece is refused: text towers pool at EOS and decoders stop there.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np

from vlmjax.data import tokenizer_base as base

# The names the model file goes by in Hugging Face folders (T5/SigLIP, LLaMA/Gemma) and others.
MODEL_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.model")


def _sentencepiece():
    """The library, imported on first use (machines that never tokenize need not have it)."""
    try:
        import sentencepiece
    except ImportError as e:  # a dependency of vlmjax; only a partial install lacks it
        raise ImportError("SentencePiece models need `pip install sentencepiece`") from e
    return sentencepiece


def _processor(model: bytes):
    processor = _sentencepiece().SentencePieceProcessor()
    processor.LoadFromSerializedProto(model)
    return processor


class SentencePieceTokenizer:
    """A SentencePiece model as a vlmjax `Tokenizer` (see the module doc for the layout)."""

    def __init__(self, model: bytes, name: str = "<bytes>"):
        try:
            self._sp = _processor(model)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{name}: not a SentencePiece model ({e})") from e
        self._model, self.name = model, name
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"{name}: the SentencePiece model defines no EOS piece, which the text tower "
                "pools at and generation stops at; retrain it with eos_id >= 0"
            )
        self.eos_id = int(self._sp.eos_id())
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eos_id
        self.unk_id = int(self._sp.unk_id())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        with open(os.fspath(path), "rb") as f:
            return cls(f.read(), name=os.fspath(path))

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def model_proto(self) -> bytes:
        """The serialized model, as in a `.model` file."""
        return self._model

    def token_id(self, token: str) -> int | None:
        """The id of one piece (e.g. Fuyu's "|SPEAKER|"), None if the model has none."""
        piece = int(self._sp.piece_to_id(token))
        return piece if piece != self.unk_id or token == self._sp.id_to_piece(piece) else None

    def tokenize(self, text: base.Text) -> list[int]:
        """One text -> its piece ids, without bos/eos."""
        return list(self._sp.encode(base.as_str(text), out_type=int))

    def encode(self, texts: base.Text | Iterable[base.Text], context_length: int) -> np.ndarray:
        """Texts (str or UTF-8 bytes; a single one counts as a batch of 1) -> int32
        [n, context_length] `[bos] pieces... [eos] [pad]...` (no bos if the model has none)."""
        texts = [base.as_str(t) for t in base.as_texts(texts)]
        rows = self._sp.encode(texts, out_type=int)
        return base.pack(rows, context_length, self.bos_id, self.eos_id, self.pad_id)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """One row of ids -> text, stopping at the first `eos`; bos, pad and other control
        pieces are skipped."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes one row of ids, got shape {ids.shape}")
        pieces = []
        for token_id in ids.tolist():
            if token_id == self.eos_id:
                break
            if not self._sp.is_control(token_id):
                pieces.append(token_id)
        return self._sp.decode(pieces)

    def __getstate__(self) -> dict:  # the processor itself does not pickle (data workers)
        return {"model": self._model, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"], state["name"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SentencePieceTokenizer) and self._model == other._model

    def __hash__(self) -> int:
        return hash(self._model)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def model_file(path: str | os.PathLike) -> str | None:
    """The SentencePiece model at `path`: the file itself if it ends in `.model`, else the
    first of `MODEL_FILES` in the folder `path`; None if there is none."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path if path.endswith(".model") else None
    if os.path.isdir(path):
        for name in MODEL_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
    return None


def train(
    texts: Iterable[base.Text], vocab_size: int, model_type: str = "unigram"
) -> SentencePieceTokenizer:
    """A SentencePiece model of about `vocab_size` pieces trained on `texts` (a small corpus
    may yield fewer), with the ids of `WordTokenizer`: pad 0, bos 1, eos 2, unk 3.

    Deterministic for the same texts in the same order (one training thread)."""
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type={model_type!r} is not 'unigram' or 'bpe'")
    model = io.BytesIO()
    try:
        _sentencepiece().SentencePieceTrainer.train(
            sentence_iterator=(base.as_str(t) for t in texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            hard_vocab_limit=False,
            character_coverage=1.0,
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. more distinct characters than pieces
        raise ValueError(
            f"training a {vocab_size}-piece SentencePiece {model_type} model failed: {e}"
        ) from e
    return SentencePieceTokenizer(model.getvalue(), name=f"<trained {model_type} {vocab_size}>")


def save(tokenizer: SentencePieceTokenizer, path: str | os.PathLike) -> None:
    """Writes the `.model` file (atomically)."""
    base.write_atomically(path, tokenizer.model_proto)
