"""Hugging Face tokenizer.json files through the Rust `tokenizers` library
(vlmjax.data.hf_tokenizer): models other than CLIP's BPE, with hand-computed ids, and where
the special tokens come from. CLIP's BPE parity with transformers is in test_bpe.py."""

import json
import pickle

import numpy as np
import pytest

from vlmjax.data import hf_tokenizer
from vlmjax.data.tokenizer import Tokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402

WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "photo", "##s", "cat", "##t", "!"]


def _bert(folder, template=True) -> str:
    """A BERT-style WordPiece tokenizer.json: lower-cased, split on whitespace and punctuation,
    `[CLS] $A [SEP]`."""
    vocab = {t: i for i, t in enumerate(WORDPIECE)}
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return str(folder)


def test_wordpiece_ids_by_hand(tmp_path):
    tok = load_tokenizer(_bert(tmp_path / "bert"))
    assert isinstance(tok, hf_tokenizer.HFTokenizer) and isinstance(tok, Tokenizer)
    # bos/eos from the template; no pad_token named anywhere, so rows are padded with eos.
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 3, 3, 10)
    ids = tok.encode(["A photos CATT!", "dog"], context_length=9)
    assert ids.dtype == np.int32
    # photos -> photo ##s; catt -> cat ##t; dog has no pieces -> [UNK].
    np.testing.assert_array_equal(ids, [[2, 4, 5, 6, 7, 8, 9, 3, 3], [2, 1, 3, 3, 3, 3, 3, 3, 3]])
    np.testing.assert_array_equal(tok.encode("a a a a a", 4), [[2, 4, 4, 3]])  # eos stays last
    assert tok.decode(ids[0]) == "a photos catt!"
    # A folder's pad_token wins; bytes are UTF-8 (as tfds gives text).
    (tmp_path / "bert" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    tok = load_tokenizer(tmp_path / "bert" / "tokenizer.json")
    np.testing.assert_array_equal(tok.encode(np.array([b"cat"]), 5), [[2, 7, 3, 0, 0]])
    # Pickles (data workers receive it) as its JSON, to an equal tokenizer.
    again = pickle.loads(pickle.dumps(tok))
    assert again == tok and again.encode("photos", 5).tolist() == [[2, 5, 6, 3, 0]]


def test_unigram_without_bos(tmp_path):
    """T5-style: a Unigram model whose template adds only `</s>`: rows start with the text."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0), ("b", -2.0)]
    pieces += [("▁ab", -1.5), ("c", -3.0), ("▁", -4.0)]
    tok = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    t5 = load_tokenizer(path)
    assert (t5.bos_id, t5.eos_id, t5.pad_id) == (None, 1, 0)
    # "ab" is one piece (-1.5 beats -1 - 2); "abc": ▁ab + c; "b": ▁ + b.
    np.testing.assert_array_equal(t5.encode(["ab abc b"], 8), [[5, 5, 6, 7, 4, 1, 0, 0]])


def test_roles_from_the_folder_and_errors(tmp_path):
    # No template: bos and eos as tokenizer_config.json names them.
    folder = _bert(tmp_path / "plain", template=False)
    with pytest.raises(ValueError, match="no eos token.*tokenizer_config.json"):
        load_tokenizer(folder)
    config = {"bos_token": "[CLS]", "eos_token": {"content": "[SEP]"}, "pad_token": "[PAD]"}
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 0)
    config["pad_token"] = "<nowhere>"
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pad token '<nowhere>' is not in its vocabulary"):
        load_tokenizer(folder)
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(ValueError, match="not a tokenizer.json the tokenizers library reads"):
        load_tokenizer(bad)
