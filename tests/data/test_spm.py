"""SentencePiece tokenizers: ids equal the sentencepiece library's, laid out like every
vlmjax tokenizer; models with and without BOS/PAD; loading from files and folders; models
trained on the captions through `data.tokenizer = "sentencepiece:N"`."""

import io
import os

import ml_collections
import numpy as np
import pytest
import sentencepiece

from vlmjax import defaults
from vlmjax.data import spm, text
from vlmjax.data import tokenizer as tokenizer_lib

CORPUS = [
    "a small red circle left of a large blue square",
    "a large green triangle above a small yellow star",
    "two purple hexagons, one small and one large",
    "Ünïcödé café, naïve façade; 東京 and emoji 🙂",
    "numbers 12 345 and symbols #$%&!?",
] * 20
TEXTS = [
    "a red circle",
    "A Large BLUE square, left of a star!",
    "café 東京 🙂",
    "",
    "   leading and  double   spaces ",
    "unseen words: zebra xylophone",
    "a " * 40,
]


def _model(model_type="unigram", **ids) -> bytes:
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=out,
        vocab_size=400,
        model_type=model_type,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        num_threads=1,
        minloglevel=2,
        **ids,
    )
    return out.getvalue()


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_ids_equal_sentencepiece_with_bos_eos_and_padding(model_type):
    """Trainer defaults: unk 0, bos 1, eos 2 and no pad piece, so rows pad with eos."""
    model = _model(model_type)
    ref = sentencepiece.SentencePieceProcessor(model_proto=model)
    tok = spm.SentencePieceTokenizer(model)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert tok.vocab_size == ref.get_piece_size() and isinstance(tok, tokenizer_lib.Tokenizer)
    length = 16
    out = tok.encode(TEXTS, length)
    assert out.shape == (len(TEXTS), length) and out.dtype == np.int32
    for row, t in zip(out, TEXTS, strict=True):
        ids = ref.encode(t)
        assert len(ids) > 0 or t == ""
        kept = ids[: length - 2]
        expected = [1, *kept, 2] + [2] * (length - 2 - len(kept))
        assert row.tolist() == expected, t
    assert tok.encode(TEXTS[2].encode("utf-8"), length).tolist() == out[2:3].tolist()
    # Byte fallback spells characters the training text never had; decode inverts encode.
    assert tok.decode(tok.encode("zebra ✓", 32)[0]) == "zebra ✓"
    assert tok.decode(out[0]) == "a red circle"


def test_t5_style_model_without_bos_has_rows_starting_with_text():
    model = _model(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    ref = sentencepiece.SentencePieceProcessor(model_proto=model)
    tok = spm.SentencePieceTokenizer(model, name="t5.model")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 1, 0)
    ids = ref.encode("a small red circle")
    row = tok.encode("a small red circle", len(ids) + 3)[0]
    assert row.tolist() == [*ids, 1, 0, 0]
    short = tok.encode("a small red circle", 4)[0]  # truncated: eos stays last
    assert short.tolist() == [*ids[:3], 1]
    assert tok.decode(row) == "a small red circle"
    with pytest.raises(ValueError, match=r"context_length must be >= 1 \(eos\)"):
        tok.encode("a", 0)


def test_load_from_file_and_folders(tmp_path):
    model = _model()
    path = tmp_path / "my.model"
    path.write_bytes(model)
    for folder_name, file_name in [("siglip", "spiece.model"), ("gemma", "tokenizer.model")]:
        folder = tmp_path / folder_name
        folder.mkdir()
        (folder / file_name).write_bytes(model)
        (folder / "tokenizer_config.json").write_text("{}")
        loaded = tokenizer_lib.load_tokenizer(folder)
        assert isinstance(loaded, spm.SentencePieceTokenizer) and loaded.name.endswith(file_name)
    tok = tokenizer_lib.load_tokenizer(path)
    assert tok == spm.SentencePieceTokenizer(model) and tok.name == str(path)
    np.testing.assert_array_equal(tok.encode(TEXTS, 12), loaded.encode(TEXTS, 12))


def test_bad_models_are_refused_clearly(tmp_path):
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00not a model at all")
    with pytest.raises(ValueError, match="corrupt.model: not a SentencePiece model"):
        tokenizer_lib.load_tokenizer(corrupt)
    with pytest.raises(ValueError, match="defines no EOS piece"):
        spm.SentencePieceTokenizer(_model(eos_id=-1), name="no_eos.model")


def test_trained_on_captions_and_cached_beside_shapes(data_dir):
    cfg = defaults.base_config().data
    cfg.source, cfg.data_dir, cfg.caption_key = "shapes", data_dir, "caption"
    cfg.image_size, cfg.num_train, cfg.num_heldout = 32, 4096, 256
    cfg.tokenizer = "sentencepiece:64"
    tok = text.prepare_tokenizer(cfg)
    assert isinstance(tok, spm.SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert 16 < tok.vocab_size <= 64
    saved = os.path.join(
        os.path.dirname(text._trained_tokenizer_path(cfg)),
        "sentencepiece64_tokenizer_caption.model",
    )
    assert os.path.isfile(saved) and spm.SentencePieceTokenizer.load(saved) == tok
    # A caption of the data encodes without unknown pieces and decodes back.
    caption = next(text._train_captions(cfg))
    row = tok.encode(caption, 64)[0]
    assert tok.unk_id not in row.tolist() and tok.decode(row) == caption
    # A second run reads the saved model: the same one, not a retrained one.
    assert text.prepare_tokenizer(cfg) == tok

    bad = ml_collections.ConfigDict(cfg.to_dict())
    for spec in ("sentencepiece:", "sentencepiece:abc", "sentencepiece:4"):
        bad.tokenizer = spec
        with pytest.raises(ValueError, match="write sentencepiece:N"):
            text.prepare_tokenizer(bad)
