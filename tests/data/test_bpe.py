"""CLIP's byte-level BPE (vlmjax.data.bpe): hand-computed merges, file formats, and id parity
with transformers' CLIPTokenizer.

The parity tests train a small CLIP-style vocabulary with the tokenizers library and encode
through transformers, by running tests/convert/reference.py under $VLMJAX_PARITY_PYTHON (see
tests/convert/make_parity_env.sh), or under this interpreter if it has torch and transformers;
otherwise they skip. Everything else is pure Python.
"""

import gzip
import json
import os

import numpy as np
import parity
import pytest

from vlmjax.data import bpe, hf_tokenizer
from vlmjax.data.tokenizer import SPECIAL_TOKENS, Tokenizer, WordTokenizer, load_tokenizer

# ------------------------------------------------------------------------------------------
# A hand-made vocabulary: CLIP's layout (256 byte symbols, the same with </w>, one id per
# merge, then the two special tokens), so every id below can be worked out on paper.

MERGES = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>"), ("lo", "w"), ("low", "er</w>"), ("a", "a")]
LO, LOW_END, ER_END, LOW, LOWER_END, AA, BOS, EOS = range(512, 520)
E, S, T_END, A, A_END = 68, 82, 339, 64, 320  # "e", "s", "t</w>", "a", "a</w>": see below


def _symbols(merges) -> list[str]:
    base = list(bpe.byte_chars().values())
    return [*base, *(b + "</w>" for b in base), *("".join(m) for m in merges), bpe.START, bpe.END]


def _hand() -> bpe.BPETokenizer:
    vocab = {s: i for i, s in enumerate(_symbols(MERGES))}
    return bpe.BPETokenizer(vocab, MERGES)


def test_byte_table_is_gpt2s():
    table = bpe.byte_chars()
    chars = list(table.values())
    assert len(set(chars)) == 256 and all(c.isprintable() and not c.isspace() for c in chars)
    # Printable ASCII first: "!" is symbol 0, so "e" (101) is 101 - 33 = 68 and "a" is 64.
    assert chars[:3] == ["!", '"', "#"] and chars.index("e") == E and chars.index("a") == A
    assert chars.index("s") == S and 256 + chars.index("t") == T_END
    # Bytes that do not print take chr(256 + n) in byte order: byte 0 -> U+0100, space (32)
    # -> U+0120 "Ġ", newline -> U+010A "Ċ", DEL (127) -> U+0121, soft hyphen (173) -> U+0143.
    assert (table[0], table[32], table[10], table[127], table[173]) == (
        "\u0100",
        "\u0120",
        "\u010a",
        "\u0121",
        "\u0143",
    )
    assert chars[94] == "¡" and chars[188] == "\u0100"  # 94 ASCII + 12 + 82 Latin-1 first


@pytest.mark.parametrize(
    "text, words",
    [
        ("don't stop", ["don", "'t", "stop"]),
        ("it's 2024!", ["it", "'s", "2", "0", "2", "4", "!"]),
        ("'re're we'll", ["'re", "'re", "we", "'ll"]),
        ("!'s", ["!'", "s"]),  # a contraction only starts a word, as in the regex
        ("hello,world...ok", ["hello", ",", "world", "...", "ok"]),
        ("a\u00a0b\u3000c\n d", ["a", "b", "c", "d"]),  # Unicode whitespace separates
        ("a\x1cb", ["a", "\x1c", "b"]),  # ...but U+001C is not White_Space (str.isspace says so)
        ("x²½", ["x", "²", "½"]),  # numbers (category N*) one character at a time
        ("नमस्ते", ["नमस", "्", "त", "े"]),  # combining marks (M*) are not letters
    ],
)
def test_split_words(text, words):
    assert bpe.split_words(text) == words


def test_normalize_is_nfc_and_per_character_lowercase():
    assert bpe.normalize("Cafe\u0301") == "café" and len(bpe.normalize("Cafe\u0301")) == 4
    # Per character: no word-final sigma (str.lower() would give "οδος").
    assert bpe.normalize("ΟΔΟΣ") == "οδοσ"
    assert bpe.normalize("İ") == "i\u0307"


def test_hand_computed_merges():
    tok = _hand()
    assert isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (BOS, EOS, EOS, 520)
    # lower: l o w e r</w> -> lo w e r</w> (rank 0) -> lo w er</w> (2) -> low er</w> (3)
    #        -> lower</w> (4).  low: l o w</w> -> lo w</w> -> low</w>.
    # lowest: l o w e s t</w> -> lo ... -> low e s t</w>, and no merge applies to the rest.
    ids = tok.encode(["Lower low lowest"], context_length=10)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [[BOS, LOWER_END, LOW_END, LOW, E, S, T_END, EOS, EOS, EOS]])
    # Overlapping pairs merge left to right: a a a</w> -> aa a</w>; a a a a</w> -> aa a a</w>.
    np.testing.assert_array_equal(
        tok.encode(["aaa", "aaaa"], 6),
        [[BOS, AA, A_END, EOS, EOS, EOS], [BOS, AA, A, A_END, EOS, EOS]],
    )
    # é is the bytes C3 A9 -> symbols "Ã" (127) and "©</w>" (256 + 102).
    np.testing.assert_array_equal(tok.encode("é", 4), [[BOS, 127, 358, EOS]])


def test_special_tokens_truncation_and_inputs():
    tok = _hand()
    np.testing.assert_array_equal(
        tok.encode("low<|endoftext|>LOW<|startoftext|>", 8),
        [[BOS, LOW_END, EOS, LOW_END, BOS, EOS, EOS, EOS]],
    )
    long = tok.encode(["low " * 10], context_length=5)
    np.testing.assert_array_equal(long, [[BOS, LOW_END, LOW_END, LOW_END, EOS]])  # eos last
    np.testing.assert_array_equal(tok.encode([""], 3), [[BOS, EOS, EOS]])
    from_bytes = tok.encode(np.array([b"low", b"lower"]), 4)  # as tfds gives text
    np.testing.assert_array_equal(
        from_bytes, [[BOS, LOW_END, EOS, EOS], [BOS, LOWER_END, EOS, EOS]]
    )


def test_decode():
    tok = _hand()
    ids = tok.encode(["Lower, low é lowest"], 16)[0]
    assert tok.decode(ids) == "lower , low é lowest"  # word ends become spaces, as CLIP's
    # Stops at the first eos; bos is skipped.
    assert tok.decode([BOS, LOW_END, EOS, LOWER_END]) == "low"
    assert tok.decode([127]) == "\ufffd"  # half a UTF-8 character
    with pytest.raises(ValueError, match="one row"):
        tok.decode(np.zeros((2, 3), np.int32))


def test_bad_vocabularies_fail_clearly():
    vocab = {s: i for i, s in enumerate(_symbols(MERGES)) if s != bpe.START}
    with pytest.raises(ValueError, match="bos token '<\\|startoftext\\|>' is not in the vocab"):
        bpe.BPETokenizer(vocab, MERGES)


# ------------------------------------------------------------------------------------------
# File formats: each must give the hand-made tokenizer's ids.

TEXTS = ["Lower low lowest", "aaa é"]


def _write_hf_folder(folder, header=True) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {s: i for i, s in enumerate(_symbols(MERGES))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] * header + [f"{a} {b}" for a, b in MERGES]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(folder)


# transformers' CLIP split (tests/convert/reference.py), which a CLIP tokenizer.json carries.
CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _write_tokenizer_json(path, merges_as_pairs: bool, **extra) -> str:
    """The hand-made vocabulary as a CLIP tokenizer.json (built with the tokenizers library,
    as Hugging Face ships CLIP's); `extra` overrides entries of its "model"."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    vocab = {s: i for i, s in enumerate(_symbols(MERGES))}
    tok = Tokenizer(
        models.BPE(
            vocab, list(MERGES), end_of_word_suffix="</w>", continuing_subword_prefix="",
            unk_token=bpe.END,
        )
    )  # fmt: skip
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.RobertaProcessing((bpe.END, EOS), (bpe.START, BOS))
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.add_special_tokens([bpe.START, bpe.END])
    data = json.loads(tok.to_str())
    merges = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
    data["model"]["merges"] = [list(m) if merges_as_pairs else " ".join(m) for m in merges]
    data["model"].update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_hf_vocab_and_merges_folder(tmp_path):
    expected = _hand().encode(TEXTS, 8)
    for header in (True, False):
        tok = bpe.load(_write_hf_folder(tmp_path / f"header_{header}", header))
        np.testing.assert_array_equal(tok.encode(TEXTS, 8), expected)
    # A folder's own pad token wins over CLIPTokenizer's default (<|endoftext|>).
    folder = tmp_path / "header_True"
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    assert load_tokenizer(folder).pad_id == 0
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": {"content": "<|startoftext|>", "lstrip": False}})
    )
    assert bpe.load(folder).pad_id == BOS


def test_tokenizer_json(tmp_path):
    """Pure Python and the tokenizers library (load_tokenizer's way) give the hand ids."""
    hand = _hand()
    expected = hand.encode(TEXTS, 8)
    for pairs in (True, False):
        path = _write_tokenizer_json(tmp_path / f"pairs_{pairs}" / "tokenizer.json", pairs)
        np.testing.assert_array_equal(bpe.load(path).encode(TEXTS, 8), expected)
        for where in (path, os.path.dirname(path)):
            rust = load_tokenizer(where)
            assert isinstance(rust, hf_tokenizer.HFTokenizer)
            assert (rust.bos_id, rust.eos_id, rust.pad_id) == (BOS, EOS, EOS)
            assert rust.vocab_size == hand.vocab_size == 520
            np.testing.assert_array_equal(rust.encode(TEXTS, 8), expected)

    wordpiece = _write_tokenizer_json(tmp_path / "wp" / "tokenizer.json", True, type="WordPiece")
    with pytest.raises(ValueError, match="'WordPiece' is not BPE"):
        bpe.load(wordpiece)
    gpt2 = _write_tokenizer_json(tmp_path / "gpt2" / "tokenizer.json", True, end_of_word_suffix="")
    with pytest.raises(ValueError, match="not CLIP's byte-level BPE"):
        bpe.load(gpt2)


def test_openai_merges_file(tmp_path):
    expected = _hand().encode(TEXTS, 8)
    lines = ["bpe_simple_vocab_16e6.txt#version: 0.2"] + [f"{a} {b}" for a, b in MERGES]
    plain = tmp_path / "bpe_simple_vocab_16e6.txt"
    plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    packed = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    for path in (plain, packed):
        tok = load_tokenizer(path)
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS, EOS, 0)  # OpenAI pads with 0
        lengths = [int(np.argmax(row == EOS)) + 1 for row in expected]  # no eos in TEXTS
        _assert_same_but_padding(tok.encode(TEXTS, 8), expected, lengths, pad=0)


def _assert_same_but_padding(got: np.ndarray, expected: np.ndarray, lengths, pad: int) -> None:
    """Row i of both equal in its first lengths[i] ids (bos ... eos), then `got` holds `pad`."""
    for g, e, n in zip(got, expected, lengths, strict=True):
        np.testing.assert_array_equal(g[:n], e[:n])
        np.testing.assert_array_equal(g[n:], pad)


def test_load_tokenizer_dispatch_and_errors(tmp_path):
    words = WordTokenizer([*SPECIAL_TOKENS, "low"])
    words.save(tmp_path / "words.json")
    assert load_tokenizer(tmp_path / "words.json") == words
    hf = _write_hf_folder(tmp_path / "hf")
    assert isinstance(load_tokenizer(hf), bpe.BPETokenizer)
    with pytest.raises(ValueError, match="not a tokenizer.json.*pass the folder"):
        load_tokenizer(os.path.join(hf, "vocab.json"))

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, nor vocab.json with merges"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="expected a folder, a tokenizer.json"):
        load_tokenizer(tmp_path / "weights.bin")


# ------------------------------------------------------------------------------------------
# Parity with transformers.

CONTEXT_LENGTH = 24
CORPUS = [
    "a photo of a cat sitting on the mat",
    "a photograph of two dogs playing in the park",
    "the quick brown fox jumps over the lazy dog",
    "don't stop believing, it's what we've got",
    "they're here and i'm there; you'd know and we'll see",
    "numbers like 3.14159 and 2024 matter",
    "café naïve résumé ångström",
    "οδός σίσυφος",
    "日本語のテキスト",
    "emoji 🐱 and 🚀",
    "hello, world!!! how's it going?",
    "a red circle above a blue square",
]
PARITY_TEXTS = {
    "case and punctuation": "A Photo of a CAT.",
    "punctuation runs": "Hello, World!!! How's it going?",
    "contractions": "don't I'll we've they're you'd I'm it's DON'T",
    "numbers": "numbers: 3.14159 and 2024, x2 ½ ² ٣ Ⅻ",
    "accents": "café naïve résumé Ångström",
    "decomposed accents (NFC)": "cafe\u0301 decomposed e\u0301",
    "final sigma": "ΟΔΟΣ Σίσυφος",
    "CJK": "日本語のテキスト",
    "emoji": "emoji 🐱🚀 end",
    "repeated whitespace and newlines": "  repeated   spaces\t\ttabs\n\nnewlines  ",
    "unicode whitespace": "\u00a0nbsp\u3000ideographic\u2009thin\x85nel",
    "not whitespace (U+001C)": "a\x1cb",
    "dotted capital I": "İstanbul",
    "quotes and stray apostrophes": "''quoted'' `ticks` \"double\" dogs' 's",
    "special tokens in the text": "<|startoftext|>inline specials<|endoftext|>more",
    "special token after punctuation": "x.<|endoftext|>y",
    "special token in capitals (not special)": "<|ENDOFTEXT|>",
    "empty": "",
    "combining marks": "नमस्ते दुनिया",
    "zero-width space": "a\u200bb zero width",
    "ligature": "ﬁx",
    "over-long (truncated, eos last)": "a photo of a cat sitting on the mat " * 4,
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(reference.py's output dir, its tokens.json as a dict), built once per module."""
    out = str(tmp_path_factory.mktemp("reference_bpe"))
    texts = list(PARITY_TEXTS.values())
    spec = dict(corpus=CORPUS, vocab_size=800, texts=texts, context_length=CONTEXT_LENGTH)
    parity.run_reference("tokenizer", spec, out)
    with open(os.path.join(out, "tokens.json"), encoding="utf-8") as f:
        return out, json.load(f)


def _expected(tokens: dict) -> np.ndarray:
    """transformers' ids [n, L], after checking that all its ways of loading agree."""
    padded = {k: v for k, v in tokens["ids"].items() if "unpadded" not in k}
    first = next(iter(padded.values()))
    for name, ids in padded.items():
        assert ids == first, f"transformers disagrees with itself: {name}"
    return np.asarray(first, np.int32)


def _report_mismatches(got: np.ndarray, expected: np.ndarray) -> str:
    lines = []
    for (name, text), g, e in zip(PARITY_TEXTS.items(), got, expected, strict=True):
        if not np.array_equal(g, e):
            lines.append(f"{name} {text!r}:\n  ours {g.tolist()}\n  HF   {e.tolist()}")
    return "\n".join(lines)


def test_ids_match_transformers(reference):
    out, tokens = reference
    expected = _expected(tokens)
    assert expected.shape == (len(PARITY_TEXTS), CONTEXT_LENGTH)
    saved_json = os.path.join(out, "saved", "tokenizer.json")
    loaders = {  # name -> (tokenizer, the class load_tokenizer must pick)
        "vocab.json + merges.txt": (load_tokenizer(os.path.join(out, "files")), bpe.BPETokenizer),
        "saved folder (tokenizer.json + tokenizer_config.json)": (
            load_tokenizer(os.path.join(out, "saved")),
            hf_tokenizer.HFTokenizer,
        ),
        "tokenizer.json file": (load_tokenizer(saved_json), hf_tokenizer.HFTokenizer),
        "tokenizer.json in pure Python": (bpe.load(saved_json), bpe.BPETokenizer),
    }
    for name, (tok, kind) in loaders.items():
        assert type(tok) is kind, name
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (
            tokens["pad_token_id"],
            tokens["bos_token_id"],
            tokens["eos_token_id"],
        )
        got = tok.encode(list(PARITY_TEXTS.values()), CONTEXT_LENGTH)
        assert np.array_equal(got, expected), f"{name}:\n{_report_mismatches(got, expected)}"

    # The tokenizers library alone (no truncation there): the same ids before padding.
    raw = tokens["ids"]["tokenizers.Tokenizer(tokenizer.json), unpadded"]
    for row, ids in zip(expected, raw, strict=True):
        if len(ids) <= CONTEXT_LENGTH:
            np.testing.assert_array_equal(row[: len(ids)], ids)
    # The over-long text: bos + 22 tokens + eos, no padding, as transformers truncates.
    long = expected[-1]
    assert len(raw[-1]) > CONTEXT_LENGTH and long[-1] == tokens["eos_token_id"]
    np.testing.assert_array_equal(long[:-1], raw[-1][: CONTEXT_LENGTH - 1])


def test_openai_format_matches_transformers_before_padding(reference, tmp_path):
    out, tokens = reference
    expected = _expected(tokens)
    with open(os.path.join(out, "files", "merges.txt"), encoding="utf-8") as f:
        merges = f.read().split("\n")[1:]  # its "#version" header becomes OpenAI's header
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2", *merges]))
    tok = load_tokenizer(path)
    assert tok.pad_id == 0
    got = tok.encode(list(PARITY_TEXTS.values()), CONTEXT_LENGTH)
    raw = tokens["ids"]["tokenizers.Tokenizer(tokenizer.json), unpadded"]  # bos ... eos
    lengths = [min(len(ids), CONTEXT_LENGTH) for ids in raw]
    _assert_same_but_padding(got, expected, lengths, pad=0)


def test_decode_matches_transformers(reference):
    out, tokens = reference
    expected = _expected(tokens)
    decoded = tokens["decoded"]["CLIPTokenizer(tokenizer.json)"]
    tok = load_tokenizer(os.path.join(out, "files"))
    checked = 0
    for (name, text), ids, theirs in zip(PARITY_TEXTS.items(), expected, decoded, strict=True):
        if "<|endoftext|>" in text:
            continue  # ours stops at the first eos; transformers drops it and goes on
        assert tok.decode(ids) == theirs, name
        checked += 1
    assert checked == len(PARITY_TEXTS) - 2
