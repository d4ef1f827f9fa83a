"""CLIP's byte-level BPE tokenizer in pure Python, offline, from the files OpenAI and Hugging
Face ship.

`vlmjax.data.tokenizer.load_tokenizer` reads a tokenizer.json with the Rust `tokenizers`
library (`hf_tokenizer`) and comes here only where that library cannot read the files as
they are: a folder with vocab.json + merges.txt and no tokenizer.json, and OpenAI's
bpe_simple_vocab .txt[.gz]. `load` itself still reads a CLIP tokenizer.json too (the tests
check both paths give the same ids).

    tok = bpe.load("path/to/clip-folder")        # tokenizer.json, or vocab.json + merges.txt
    tok = bpe.load("bpe_simple_vocab_16e6.txt.gz")  # OpenAI's merges file
    ids = tok.encode(["a photo of a cat"], context_length=77)  # int32 [1, 77]

What happens to one text (as transformers' CLIPTokenizer does, whose ids tests/data/test_bpe.py
checks against):
  1. Special tokens written in the text (`<|endoftext|>`) are cut out and become their ids.
  2. The rest is NFC-normalised and lower-cased one character at a time.
  3. It is split into words: a contraction (`'s 't 're 've 'm 'll 'd`), a run of letters
     (Unicode category L*), one digit (N*), or a run of anything else that is not whitespace.
     Whitespace only separates. This is the regex
     `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`, written out because the
     standard `re` module has no `\\p{...}` classes.
  4. Each word's UTF-8 bytes become printable characters (GPT-2's byte-to-unicode table), the
     last one marked with `</w>`, and adjacent symbols are merged, lowest-ranked pair first,
     until no pair in the merge list is left. Each final symbol is one vocabulary id.

Rows are padded with the source's pad token: `<|endoftext|>` for Hugging Face files (or what
their tokenizer_config.json names), id 0 for OpenAI's file, as `clip.tokenize` and open_clip
pad. OpenAI's `clip.tokenize` also runs `ftfy.fix_text` and `html.unescape` first ("&amp;" ->
"&"); transformers does not, and neither do we. Decoding is lossy the way CLIP's is: a word
boundary becomes one space, so "a cat, here" decodes as "a cat , here".
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

from vlmjax.data import tokenizer_base as base

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# OpenAI's merges file holds 262,145 lines, of which CLIP uses the 48,894 after the header:
# 49,408 ids = 256 bytes + 256 bytes-at-word-end + 48,894 merges + 2 special tokens.
OPENAI_NUM_MERGES = 49152 - 256 - 2

# Unicode's White_Space property (what the regex `\s` means in transformers' tokenizers);
# Python's str.isspace() differs (it also counts the separators U+001C..U+001F).
_WHITESPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@functools.cache
def byte_chars() -> dict[int, str]:
    """byte -> the printable character standing for it, in CLIP's base-vocabulary order.

    Bytes that print as themselves (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) keep their character;
    the other 68 (controls, space, soft hyphen, ...) take chr(256), chr(257), ... in byte
    order, so no symbol is whitespace or invisible and every byte string has a spelling.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update((b, chr(256 + n)) for n, b in enumerate(others))
    return table


@functools.cache
def _char_bytes() -> dict[str, int]:
    return {c: b for b, c in byte_chars().items()}


def _kind(char: str) -> str:
    """How the split regex sees one character: as "space", "letter", "number" or "other"."""
    if char in _WHITESPACE:
        return "space"
    category = unicodedata.category(char)[0]
    return {"L": "letter", "N": "number"}.get(category, "other")


def split_words(text: str) -> list[str]:
    """Step 3 of the module doc on normalised text: CLIP's regex split, whitespace dropped."""
    words = []
    i, n = 0, len(text)
    while i < n:
        kind = _kind(text[i])
        if kind == "space":
            i += 1
            continue
        # Contractions come first in the regex's alternation, so "'s" wins over "'" + "s";
        # they only start a match, so "!'s" is "!'" + "s", as in the regex.
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if contraction:
            end = i + len(contraction)
        elif kind == "number":
            end = i + 1  # one digit per word: numbers are spelled digit by digit
        else:
            end = i + 1
            while end < n and _kind(text[end]) == kind:
                end += 1
        words.append(text[i:end])
        i = end
    return words


def normalize(text: str) -> str:
    """Step 2: NFC, then lower-case each character on its own.

    Character by character, as the tokenizers library does: str.lower() on the whole
    string would turn a word-final capital sigma into "ς" where CLIP's tokenizer gives "σ".
    """
    return "".join(c.lower() for c in unicodedata.normalize("NFC", text))


class BPETokenizer:
    """CLIP's byte-level BPE over a vocabulary {symbol: id} and ranked merges [(a, b)].

    Follows vlmjax.data.tokenizer_base.Tokenizer: `encode` gives int32 [n, L] rows
    `[bos] tokens [eos] [pad]...`. `special_tokens` are matched verbatim in the text
    (default: bos and eos). A symbol missing from the vocabulary becomes `unk_token`
    (never happens with a complete byte alphabet, as CLIP's has).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = START,
        eos_token: str = END,
        pad_token: str = END,
        unk_token: str = END,
        special_tokens: Iterable[str] | None = None,
    ):
        self._vocab = dict(vocab)
        for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if token not in self._vocab:
                raise ValueError(f"{role} token {token!r} is not in the vocabulary")
        self._ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self._tokens = {i: t for t, i in self._vocab.items()}
        self.bos_id = self._vocab[bos_token]
        self.eos_id = self._vocab[eos_token]
        self.pad_id = self._vocab[pad_token]
        self.unk_id = self._vocab.get(unk_token, self.eos_id)
        specials = set(special_tokens if special_tokens is not None else (bos_token, eos_token))
        missing = sorted(t for t in specials if t not in self._vocab)
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary")
        # Longest first, so a special token that contains another is matched whole.
        self._specials = sorted(specials, key=len, reverse=True)
        self._special_ids = {self._vocab[t] for t in specials} | {self.bos_id, self.eos_id}
        self._word_ids = functools.lru_cache(maxsize=1 << 16)(self._word_ids_uncached)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the embedding-table size."""
        return max(self._tokens) + 1

    @property
    def vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _merge(self, symbols: list[str]) -> list[str]:
        """Step 4's merge loop on one word's symbols."""
        while len(symbols) > 1:
            pairs = zip(symbols, symbols[1:], strict=False)
            best = min(pairs, key=lambda p: self._ranks.get(p, float("inf")))
            if best not in self._ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # every occurrence, left to right, not overlapping
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        table = byte_chars()
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        return tuple(self._vocab.get(s, self.unk_id) for s in self._merge(symbols))

    def tokenize(self, text: base.Text) -> list[int]:
        """One text -> its token ids without bos/eos."""
        ids: list[int] = []
        for piece, is_special in self._split_specials(base.as_str(text)):
            if is_special:
                ids.append(self._vocab[piece])
            else:
                for word in split_words(normalize(piece)):
                    ids.extend(self._word_ids(word))
        return ids

    def _split_specials(self, text: str) -> list[tuple[str, bool]]:
        """Step 1: [(piece, is_special)], special tokens cut out wherever they occur."""
        pieces, start, i = [], 0, 0
        while self._specials and i < len(text):
            token = next((t for t in self._specials if text.startswith(t, i)), None)
            if token is None:
                i += 1
                continue
            pieces += [(text[start:i], False), (token, True)]
            i = start = i + len(token)
        pieces.append((text[start:], False))
        return [(p, s) for p, s in pieces if p]

    def encode(self, texts: base.Text | Iterable[base.Text], context_length: int) -> np.ndarray:
        """Texts (str or UTF-8 bytes; one counts as a batch of 1) -> int32 [n, context_length]
        `[bos] tokens... [eos] [pad]...`, truncated keeping `eos` last."""
        rows = [self.tokenize(text) for text in base.as_texts(texts)]
        return base.pack(rows, context_length, self.bos_id, self.eos_id, self.pad_id)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """One row of ids -> text: stops at the first `eos`, skips special tokens, turns each
        `</w>` into a space, and replaces byte sequences that are not UTF-8 with U+FFFD."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes one row of ids, got shape {ids.shape}")
        symbols = []
        for token_id in ids.tolist():
            if token_id == self.eos_id:
                break
            if token_id not in self._special_ids:
                symbols.append(self._tokens[token_id])
        lookup = _char_bytes()
        # `</w>` is spelt with printable characters, so it survives the byte mapping whole.
        data = bytes(lookup[c] for c in "".join(symbols))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self._ranks)})"


# ---------------------------------------------------------------------------------------------
# Loading from files.

VOCAB_FILE, MERGES_FILE, TOKENIZER_FILE = "vocab.json", "merges.txt", "tokenizer.json"


def _merge_pair(merge: str | Sequence[str], where: str) -> tuple[str, str]:
    """A merge as "a b" (merges.txt, older tokenizer.json) or ["a", "b"] (newer ones)."""
    pair = merge.split(" ") if isinstance(merge, str) else list(merge)
    if len(pair) != 2:
        raise ValueError(f"bad merge {merge!r} in {where}: expected two symbols")
    return pair[0], pair[1]


def _read_merges_txt(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [_merge_pair(line, path) for line in lines if line]


def _hf_roles(found: dict[str, str]) -> dict[str, str]:
    """All four roles: those the folder names, transformers' CLIPTokenizer defaults for the
    rest (bos `<|startoftext|>`; eos, pad and unk `<|endoftext|>`)."""
    return {"bos_token": START, "eos_token": END, "pad_token": END, "unk_token": END, **found}


def from_vocab_merges(folder: str) -> BPETokenizer:
    """A HF CLIP folder's vocab.json + merges.txt, with its special tokens from
    tokenizer_config.json / special_tokens_map.json when present (transformers' CLIPTokenizer
    defaults otherwise: pad, eos and unk are all `<|endoftext|>`)."""
    with open(os.path.join(folder, VOCAB_FILE), encoding="utf-8") as f:
        vocab = json.load(f)
    merges = _read_merges_txt(os.path.join(folder, MERGES_FILE))
    roles = _hf_roles(base.hf_special_tokens(folder))
    # transformers cuts every special token it knows out of the text before splitting it.
    return BPETokenizer(vocab, merges, **roles, special_tokens=set(roles.values()))


def from_tokenizer_json(path: str) -> BPETokenizer:
    """A HF tokenizer.json whose model is CLIP's BPE (`end_of_word_suffix` "</w>"), with
    special tokens from a tokenizer_config.json beside it, else from its own padding setting
    and the defaults of transformers' CLIPTokenizer."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(
            f"{path}: no 'model' entry, so not a tokenizer.json (for vocab.json + merges.txt, "
            f"pass the folder that holds both)"
        )
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not BPE")
    if model.get("end_of_word_suffix") != END_OF_WORD or model.get("continuing_subword_prefix"):
        raise ValueError(
            f"{path}: not CLIP's byte-level BPE (end_of_word_suffix="
            f"{model.get('end_of_word_suffix')!r}, continuing_subword_prefix="
            f"{model.get('continuing_subword_prefix')!r}; CLIP's are '</w>' and none)"
        )
    vocab = dict(model["vocab"])
    added = data.get("added_tokens") or []
    vocab.update((token["content"], token["id"]) for token in added)
    merges = [_merge_pair(m, path) for m in model.get("merges", [])]

    specials = base.hf_special_tokens(os.path.dirname(os.path.abspath(path)))
    padding = data.get("padding") or {}
    if "pad_token" not in specials and padding.get("pad_token"):
        specials["pad_token"] = padding["pad_token"]
    roles = _hf_roles(specials)
    special_tokens = {t["content"] for t in added if t.get("special")} | set(roles.values())
    return BPETokenizer(vocab, merges, **roles, special_tokens=special_tokens)


def from_openai(path: str) -> BPETokenizer:
    """OpenAI's `bpe_simple_vocab_16e6.txt[.gz]`: a header line, then merges "a b".

    The vocabulary follows from the merges (see OPENAI_NUM_MERGES); rows are padded with id 0,
    as OpenAI's `clip.tokenize` and open_clip do (id 0 is the symbol "!", and pooling at the
    first EOS never reaches it).
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [_merge_pair(line, path) for line in lines[1 : 1 + OPENAI_NUM_MERGES] if line]
    base = list(byte_chars().values())
    symbols = [*base, *(b + END_OF_WORD for b in base), *("".join(m) for m in merges), START, END]
    vocab = {s: i for i, s in enumerate(symbols)}
    if len(vocab) != len(symbols):
        raise ValueError(f"{path}: merges produce a symbol twice; not a CLIP merges file")
    return BPETokenizer(vocab, merges, pad_token=symbols[0])


def load(path: str | os.PathLike) -> BPETokenizer:
    """A CLIP BPE tokenizer from a folder (tokenizer.json, else vocab.json + merges.txt) or a
    file (tokenizer.json, or OpenAI's merges `*.txt` / `*.txt.gz`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
            return from_tokenizer_json(os.path.join(path, TOKENIZER_FILE))
        if all(os.path.isfile(os.path.join(path, f)) for f in (VOCAB_FILE, MERGES_FILE)):
            return from_vocab_merges(path)
        raise FileNotFoundError(
            f"no {TOKENIZER_FILE}, nor {VOCAB_FILE} with {MERGES_FILE}, in {path!r} "
            f"(found {sorted(os.listdir(path))})"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such tokenizer file or folder: {path!r}")
    if path.endswith(".json"):
        return from_tokenizer_json(path)
    if path.endswith((".txt", ".txt.gz")):
        return from_openai(path)
    raise ValueError(
        f"{path!r}: expected a folder, a tokenizer.json, or OpenAI's bpe_simple_vocab .txt[.gz]"
    )
