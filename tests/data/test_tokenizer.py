import json

import numpy as np
import pytest

from vlmjax.data.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    WordTokenizer,
    build_for_captions,
    split_words,
)

CAPTIONS = [
    "a small red triangle above a large blue circle",
    "a large green square left of a small red circle",
    "a small blue circle",
    "a large red square below a small green triangle",
]


def tiny() -> WordTokenizer:
    return WordTokenizer([*SPECIAL_TOKENS, "a", "red", "circle", "."])


def test_special_ids_and_protocol():
    tok = tiny()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 8
    assert isinstance(tok, Tokenizer)


def test_split_words_lowercases_and_keeps_punctuation():
    assert split_words("A Red-circle, (left)!") == [
        "a", "red", "-", "circle", ",", "(", "left", ")", "!"
    ]  # fmt: skip
    assert split_words("  two\tspaces\n") == ["two", "spaces"]


def test_exact_ids_for_hand_built_vocabulary():
    ids = tiny().encode(["A red circle.", "red"], context_length=8)
    assert ids.dtype == np.int32 and ids.shape == (2, 8)
    np.testing.assert_array_equal(
        ids,
        [[1, 4, 5, 6, 7, 2, 0, 0], [1, 5, 2, 0, 0, 0, 0, 0]],
    )


def test_unknown_words_map_to_unk():
    tok = tiny()
    ids = tok.encode(["a purple circle"], context_length=6)
    np.testing.assert_array_equal(ids, [[1, 4, 3, 6, 2, 0]])
    assert tok.decode(ids[0]) == "a <unk> circle"


def test_round_trip_on_shapes_captions():
    tok = WordTokenizer.train(CAPTIONS)
    ids = tok.encode(CAPTIONS, context_length=16)
    assert ids.shape == (len(CAPTIONS), 16)
    assert not np.any(ids == tok.unk_id)
    assert [tok.decode(row) for row in ids] == CAPTIONS
    # Punctuation is re-attached and case folded.
    assert tok.decode(tok.encode("A small, red circle.", 12)[0]) == "a small <unk> red circle <unk>"
    tok2 = WordTokenizer.train([*CAPTIONS, "a small, red circle."])
    assert tok2.decode(tok2.encode("A small, red circle.", 12)[0]) == "a small, red circle."


def test_padding_and_eos_position():
    tok = WordTokenizer.train(CAPTIONS)
    ids = tok.encode(["a small blue circle", ""], context_length=10)
    np.testing.assert_array_equal(ids[0, :6] != tok.pad_id, True)
    assert ids[0, 0] == tok.bos_id and ids[0, 5] == tok.eos_id
    np.testing.assert_array_equal(ids[0, 6:], tok.pad_id)
    np.testing.assert_array_equal(ids[1], [tok.bos_id, tok.eos_id] + [tok.pad_id] * 8)
    # The eos position is found via eos_id; it is not the largest id (no argmax pooling).
    np.testing.assert_array_equal(np.argmax(ids == tok.eos_id, axis=1), [5, 1])
    assert tok.eos_id < ids.max()


def test_truncation_keeps_eos_last():
    tok = WordTokenizer.train(CAPTIONS)
    text = CAPTIONS[0]  # 9 words
    full = tok.encode([text], context_length=11)[0]
    assert full[-1] == tok.eos_id
    cut = tok.encode([text], context_length=5)[0]
    np.testing.assert_array_equal(cut, [*full[:4], tok.eos_id])
    assert tok.decode(cut) == "a small red"
    np.testing.assert_array_equal(tok.encode([text], context_length=2), [[1, 2]])
    with pytest.raises(ValueError):
        tok.encode([text], context_length=1)


def test_bytes_input_matches_str():
    tok = WordTokenizer.train(CAPTIONS)
    as_bytes = [c.encode("utf-8") for c in CAPTIONS]
    want = tok.encode(CAPTIONS, 16)
    np.testing.assert_array_equal(tok.encode(as_bytes, 16), want)
    np.testing.assert_array_equal(tok.encode(np.array(as_bytes, dtype=object), 16), want)
    np.testing.assert_array_equal(tok.encode(as_bytes[0], 16), want[:1])  # a single text
    utf8 = WordTokenizer.train(["un café rouge"])
    assert utf8.decode(utf8.encode("Un Café rouge".encode(), 8)[0]) == "un café rouge"


def test_save_load_identical(tmp_path):
    tok = WordTokenizer.train(CAPTIONS + ["a café, (maybe)!"])
    path = tmp_path / "sub" / "vocab.json"
    tok.save(path)
    loaded = WordTokenizer.load(path)
    assert loaded == tok and loaded.tokens == tok.tokens
    texts = [*CAPTIONS, "a café, (maybe)!", "unseen words"]
    np.testing.assert_array_equal(loaded.encode(texts, 12), tok.encode(texts, 12))
    assert json.loads(path.read_text(encoding="utf-8"))["tokens"][:4] == list(SPECIAL_TOKENS)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "other", "tokens": []}))
    with pytest.raises(ValueError):
        WordTokenizer.load(path)
    with pytest.raises(ValueError):
        WordTokenizer(["a", "b"])


def test_training_order_is_deterministic():
    texts = ["b a c", "c b", "c", "d d e"]  # c:3, b:2, d:2, a:1, e:1
    tok = WordTokenizer.train(texts)
    assert tok.tokens == [*SPECIAL_TOKENS, "c", "b", "d", "a", "e"]
    assert WordTokenizer.train(reversed(texts)).tokens == tok.tokens
    assert WordTokenizer.train(texts, min_count=2).tokens == [*SPECIAL_TOKENS, "c", "b", "d"]
    assert WordTokenizer.train(texts, max_vocab_size=6).tokens == [*SPECIAL_TOKENS, "c", "b"]


def test_build_for_captions_caches(tmp_path):
    path = tmp_path / "tok.json"
    first = build_for_captions(CAPTIONS, path)
    assert path.exists() and first == WordTokenizer.train(CAPTIONS)

    def must_not_iterate():
        raise AssertionError("texts iterated although the tokenizer was cached")
        yield

    second = build_for_captions(must_not_iterate(), path)
    assert second == first
    # A cached file wins even over different captions.
    assert build_for_captions(["entirely new words"], path) == first


def test_tokenizer_modules_import_only_the_base():
    """bpe, spm, hf_tokenizer and word_tokenizer import no sibling but tokenizer_base; only
    tokenizer.py (load_tokenizer) knows every kind: no import cycle."""
    import ast
    import os

    import vlmjax.data

    folder = os.path.dirname(vlmjax.data.__file__)
    kinds = ("bpe", "spm", "hf_tokenizer", "word_tokenizer", "tokenizer_base", "tokenizer")
    imported = {}
    for name in kinds:
        with open(os.path.join(folder, f"{name}.py")) as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            module = getattr(node, "module", None) or ""
            if isinstance(node, ast.ImportFrom) and module == "vlmjax.data":
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and module.startswith("vlmjax.data."):
                found.add(module.rsplit(".", 1)[1])
        imported[name] = found & set(kinds)
    assert imported == {
        "bpe": {"tokenizer_base"},
        "spm": {"tokenizer_base"},
        "hf_tokenizer": {"tokenizer_base"},
        "word_tokenizer": {"tokenizer_base"},
        "tokenizer_base": set(),
        "tokenizer": {"bpe", "spm", "hf_tokenizer", "tokenizer_base", "word_tokenizer"},
    }
