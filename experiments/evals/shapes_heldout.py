r"""Evaluators only, for `vlmjax eval --evals`: a CLIP run's zero-shot, retrieval and few-shot
numbers on the held-out `shapes` scenes, whatever it was trained or evaluated on.

    vlmjax eval --workdir /tmp/clip --evals experiments/evals/shapes_heldout.py

`:quick` reads the first 64 scenes only.
"""

import ml_collections


def get_config(arg=None):
    limit = {"quick": 64, None: 0}[arg]
    c = ml_collections.ConfigDict()
    common = dict(source="shapes", split="heldout", max_examples=limit)
    c.zeroshot = dict(type="zeroshot", templates="shapes", **common)
    c.retrieval = dict(type="retrieval", caption_key="caption", **common)
    c.fewshot = dict(type="fewshot", train_split="train", shots=(1, 5, 10), **common)
    return c
