r"""Evaluators only, for `vlmjax eval --evals`: the standard CLIP benchmarks on tfds datasets
prepared in array_record format (nothing is downloaded).

    vlmjax eval --workdir /ckpt/clip_b16 --evals experiments/evals/imagenet_coco.py \
        --config.evals.imagenet.data_dir=/data/tensorflow_datasets

  imagenet   zero-shot top-1/top-5 on `imagenet2012` validation (50k), CLIP's curated class
             names (the WordNet-id labels map to them) and the 80 OpenAI templates;
  cifar10, cifar100  zero-shot on the test splits, with OpenAI's 18 CIFAR templates;
  coco       image<->text recall@1/5/10 on `coco_captions` test (the 5k Karpathy test images,
             5 captions each);
  fewshot    10- and 25-shot linear probes of ImageNet from its train split.

`:zeroshot` keeps the zero-shot ones only.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.imagenet = dict(
        type="zeroshot", source="imagenet2012", split="validation", class_names="imagenet1k",
        templates="openai_imagenet", crop_fraction=1.0,
    )  # fmt: skip
    for name in ("cifar10", "cifar100"):
        c[name] = dict(
            type="zeroshot", source=name, split="test", class_names=name,
            templates="openai_cifar",
        )  # fmt: skip
    if arg == "zeroshot":
        return c
    if arg:
        raise ValueError(f"unknown variant {arg!r}; use imagenet_coco.py or :zeroshot")
    c.coco = dict(
        type="retrieval", source="coco_captions", split="test", caption_key="captions/text"
    )
    c.fewshot = dict(
        type="fewshot", source="imagenet2012", split="validation", train_split="train",
        shots=(10, 25),
    )  # fmt: skip
    return c
