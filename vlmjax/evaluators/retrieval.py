"""Image-text retrieval recall@K over a captioned set where an image may have several
captions (COCO and Flickr30k have 5).

image->text: an image scores a hit at K if any of its captions is among the K texts most
similar to it. text->image: per caption, a hit if its image is among the K most similar
images. Captions repeat in some sets (two scenes both "a large red circle"): a retrieved
text counts when it is identical to one of the image's captions, and a retrieved image when
it has a caption identical to the query, so duplicates are not scored as misses. With
distinct captions this is the usual recall@K.

Records: tfds/`shapes` records hold one image and a caption field (`caption_key`, a string
or a list of strings, e.g. "captions/text" for coco_captions); a jsonl file may give a
`caption` list per line or repeat an image path on several lines (grouped by path).
Metrics: `i2t_recall@K`, `t2i_recall@K` for K in `recall_at`, `images`, `captions`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlmjax.data import jsonl
from vlmjax.data import text as text_lib
from vlmjax.evaluators import common

KEYS = {"caption_key": None, "recall_at": (1, 5, 10)}
CHUNK = 1024  # query rows scored at once: memory [CHUNK, N] per direction


def recall_at_k(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    caption_image: np.ndarray,
    caption_group: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K both ways; image_embeddings [I, E], text_embeddings [T, E] (unit norm),
    caption_image int [T]: the image of each caption; caption_group int [T]: equal ids for
    identical captions (None: all distinct). Returns {"i2t_recall@K", "t2i_recall@K"}."""
    num_images, num_texts = len(image_embeddings), len(text_embeddings)
    groups = np.arange(num_texts) if caption_group is None else np.asarray(caption_group)
    # has[i, g]: image i has a caption of group g.
    has = np.zeros((num_images, int(groups.max()) + 1), bool)
    has[np.asarray(caption_image), groups] = True
    out = {}
    for name, queries, keys in (
        ("i2t", image_embeddings, text_embeddings),
        ("t2i", text_embeddings, image_embeddings),
    ):
        ranks = []
        for start in range(0, len(queries), CHUNK):
            rows = np.arange(start, min(start + CHUNK, len(queries)))
            scores = queries[rows] @ keys.T  # [q, keys]
            # relevant[q, key]: for i2t, text `key` is one of image q's captions (by group);
            # for t2i, image `key` has a caption of query q's group.
            relevant = has[rows][:, groups] if name == "i2t" else has[:, groups[rows]].T
            best = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)
            ranks.append(np.where(relevant, False, scores >= best).sum(axis=1))
        rank = np.concatenate(ranks)  # irrelevant items scoring at least the best relevant
        for k in ks:
            out[f"{name}_recall@{k}"] = float((rank < k).mean())
    return out


def _texts(value) -> list[str]:
    if isinstance(value, str | bytes) or np.ndim(value) == 0:
        return [text_lib.as_str(value)]
    return [text_lib.as_str(v) for v in value]


class Retrieval:
    """`run(state)` -> recall@K of `data`'s images and captions (see the module doc)."""

    def __init__(self, cfg: dict, data: common.Data, task, mesh):
        if task.embed_images is None or task.tokenize is None:
            raise ValueError(f"needs image and text towers; task {task.name!r} has none")
        self.data, self.task = data, task
        self.caption_key = cfg["caption_key"] or data.cfg.caption_key
        if not self.caption_key:
            raise ValueError("needs captions: set caption_key (e.g. 'captions/text')")
        self.ks = tuple(cfg["recall_at"])
        self.is_jsonl = jsonl.parse(data.cfg.source) is not None
        self.source = common.open_source(data, required=(self.caption_key,))
        if not self.is_jsonl:  # the first record tells whether the field is there
            self._captions_of(self.source[0])
        self._layout = None  # read on the first run (see `layout`)
        self.rows = common.rows_per_process(cfg["batch_size"], mesh)
        self.embed_images = common.make_gather(
            lambda v, b: {"z": task.embed_images(v, b["image"])}, mesh
        )
        self.embed_texts = common.make_gather(
            lambda v, b: {"z": task.embed_texts(v, b["tokens"])}, mesh
        )

    def _captions_of(self, record: dict) -> list[str]:
        texts = [t for t in text_lib.captions_of(record, self.data.cfg, None) if t]
        if not texts:
            raise ValueError(f"a record has no text in '{self.caption_key}'")
        return texts

    def layout(self):
        """(record index of each image [I], caption tokens [T, L], image of each caption [T],
        caption group [T]: equal for identical texts), read once: every process reads all
        captions; images are read by share, each evaluation."""
        if self._layout is None:
            count = common.num_examples(self.source, self.data.max_examples)
            images, texts, owner = [], [], []
            if self.is_jsonl:  # group lines by image path; no image is decoded here
                paths = self.source.field("image")[:count]
                values = self.source.field(self.caption_key)[:count]
                first: dict[str, int] = {}
                for i, (path, value) in enumerate(zip(paths, values, strict=True)):
                    if path not in first:
                        first[path] = len(images)
                        images.append(i)
                    caps = [t for t in _texts(value) if t]
                    texts += caps
                    owner += [first[path]] * len(caps)
            else:
                for i in range(count):
                    caps = self._captions_of(self.source[i])
                    images.append(i)
                    texts += caps
                    owner += [len(images) - 1] * len(caps)
            _, groups = np.unique(np.asarray(texts, dtype=str), return_inverse=True)
            tokens = self.task.tokenize(texts)
            self._layout = (np.asarray(images), tokens, np.asarray(owner), groups.reshape(-1))
        return self._layout

    def run(self, state) -> dict[str, float]:
        variables = common.variables(state)
        records, tokens, owner, groups = self.layout()
        fetch = common.image_fetch(self.data, self.source)
        zimg = self.embed_images(
            variables, common.batches(len(records), lambda i: fetch(int(records[i])), self.rows)
        )["z"]
        ztxt = self.embed_texts(
            variables, common.batches(len(tokens), lambda i: {"tokens": tokens[i]}, self.rows)
        )["z"]
        metrics = recall_at_k(zimg, ztxt, owner, groups, self.ks)
        metrics.update(images=float(len(records)), captions=float(len(tokens)))
        return metrics
