"""Offline text tokenizers producing fixed-length int32 token arrays for a text tower: the
front door. `load_tokenizer(path)` opens any kind from its files, and this is the one module
that knows every kind; the kinds themselves import only `tokenizer_base`:

  * `word_tokenizer.WordTokenizer`: a word-level vocabulary trained locally from captions;
  * `spm.SentencePieceTokenizer`: SentencePiece `.model` files (SigLIP, T5, Gemma);
  * `hf_tokenizer.HFTokenizer`: Hugging Face tokenizer.json files, any model, through the
    Rust `tokenizers` library;
  * `bpe.BPETokenizer`: CLIP's byte-level BPE in pure Python, for the files `tokenizers`
    does not read as they are: vocab.json + merges.txt without a tokenizer.json, and
    OpenAI's bpe_simple_vocab .txt[.gz].

All follow `tokenizer_base.Tokenizer` (the row layout and special ids are described there);
its names are re-exported here for callers.
"""

from __future__ import annotations

import json
import os

from vlmjax.data import bpe, hf_tokenizer, spm
from vlmjax.data.tokenizer_base import (  # noqa: F401  (re-exported)
    Text,
    Tokenizer,
    as_str,
    as_texts,
    pack,
    write_atomically,
)
from vlmjax.data.word_tokenizer import (  # noqa: F401  (re-exported)
    BOS,
    EOS,
    FORMAT,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    WordTokenizer,
    build_for_captions,
    split_words,
)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved at `path`, the first that applies of:

    a `WordTokenizer.save` JSON file; a SentencePiece `.model` file, or a folder holding one
    (`spiece.model`, `tokenizer.model`: SigLIP, T5, Gemma); a Hugging Face tokenizer.json, or
    a folder holding one (any BPE / WordPiece / Unigram model, through `tokenizers`); a
    folder with CLIP's vocab.json + merges.txt, or OpenAI's bpe_simple_vocab .txt[.gz]
    (CLIP's BPE in pure Python: `vlmjax.data.bpe`)."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return WordTokenizer.from_json(data)
        return hf_tokenizer.HFTokenizer.load(path)
    model = spm.model_file(path)
    if model is not None:
        return spm.SentencePieceTokenizer.load(model)
    folder_json = os.path.join(path, hf_tokenizer.TOKENIZER_FILE)
    if os.path.isdir(path) and os.path.isfile(folder_json):
        return hf_tokenizer.HFTokenizer.load(folder_json)
    return bpe.load(path)
