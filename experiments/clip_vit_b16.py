r"""CLIP ViT-B/16 (Radford et al., 2021) at scale, with open_clip's LAION recipe: batch 32768,
AdamW (lr 5e-4, beta2 0.98, eps 1e-6, weight decay 0.2 on matrices only), 10k warmup steps
then cosine, 32 epochs, bfloat16 compute with float32 parameters, the softmax loss over the
all-gathered global batch.

    vlmjax train --config experiments/clip_vit_b16.py --workdir /ckpt/clip_b16 \
        --config.data.data_dir=/data/tensorflow_datasets \
        --config.data.tokenizer=/models/clip-vit-base-patch16

Needs image-text data: img2dataset's WebDataset shards, parquet or a CSV
(`--config.data.source='/data/laion/{00000..41455}.tar'`, see README "Train CLIP on your
img2dataset output"), or a tfds dataset prepared in array_record format (`data.source`,
default "laion400m" with an `image` and a `caption` feature; set `data.caption_key` for
another field name, e.g. "captions/text" for coco_captions), the CLIP BPE tokenizer files
(a Hugging Face CLIP folder, its tokenizer.json, or OpenAI's bpe_simple_vocab_16e6.txt.gz),
and, for the evaluations,
tfds `imagenet2012` (zero-shot with CLIP's curated class names, which its WordNet-id labels
map to, and the 80 OpenAI templates) and `coco_captions` (retrieval on the 5000 test images
of the Karpathy split, 5 captions each). Expected: ~67-68% ImageNet zero-shot after 32
epochs of LAION-400M (open_clip's reported ViT-B/16 figure).

Variants: `:smoke` trains a tiny CLIP on the embedded `shapes` data for 3 steps (CI runs
it); `:bench` is the model at batch 256 for `vlmjax bench train`.
"""

from vlmjax import defaults

VARIANTS = ("smoke", "bench")
TRAIN_PAIRS = 400_000_000  # LAION-400M, as open_clip's recipe counts it


def get_config(arg=None):
    c = defaults.base_config()
    c.task = "contrastive"
    c.batch_size = 32768
    c.eval_batch_size = 4096
    c.total_steps = 32 * TRAIN_PAIRS // c.batch_size
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2000
    c.dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every device: 150M params + AdamW

    c.data.source = "laion400m"
    c.data.train_split = "train"
    c.data.caption_key = "caption"
    c.data.image_size = 224
    c.data.augment = "random_resized_crop"  # no flip: captions say "left"/"right"
    c.data.eval_crop_fraction = 1.0  # CLIP's eval: resize the short side, centre crop
    c.data.num_threads = 32
    c.data.tokenizer = "~/clip-vit-base-patch16"  # a HF CLIP folder (or BPE vocab file)
    c.evals.imagenet = dict(
        type="zeroshot", source="imagenet2012", split="validation", class_names="imagenet1k",
        templates="openai_imagenet",
    )  # fmt: skip
    c.evals.coco = dict(
        type="retrieval", source="coco_captions", split="test", caption_key="captions/text"
    )

    c.loss.kind = "softmax"
    c.loss.impl = "all_gather"

    c.model_name = "clip"
    c.model.embed_dim = 512
    c.model.init_temperature = 0.07
    c.model.sigmoid_bias = None  # a float (SigLIP: -10) for loss.kind="sigmoid"
    c.model.max_scale = 100.0
    c.model.dtype = c.get_ref("dtype")
    c.model.image_model = "vit"  # or "resnet" (model.vision then holds ResNet fields)
    # scan / remat / attention are listed so the command line can switch them
    # (--config.model.vision.remat=dots); "cudnn" attention is for GPUs.
    speed = dict(scan=False, remat="none", attention="xla")
    c.model.vision = dict(variant="B/16", pool="cls", pre_norm=True, activation="gelu", **speed)
    c.model.text = dict(
        vocab_size=49408, eos_id=49407, pad_id=0, context_length=77,
        width=512, depth=12, num_heads=8, mlp_dim=2048, activation="gelu", **speed,
    )  # fmt: skip

    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 5e-4
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.98, 1e-6
    c.optimizer.weight_decay = 0.2
    c.optimizer.warmup_steps = 10_000
    c.optimizer.schedule = "cosine"
    c.optimizer.grad_clip_norm = 0.0

    if arg == "smoke":
        defaults.smoke_on_shapes(c)
        c.mesh.data, c.mesh.fsdp = -1, 1
        c.dtype = "float32"
        c.data.augment = ""
        c.data.tokenizer = "word"
        c.data.templates = "shapes"
        c.model.embed_dim = 16
        c.model.vision = dict(
            variant=None, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8,
            pool="cls", pre_norm=True, activation="gelu",
        )  # fmt: skip
        c.model.text = dict(context_length=16, width=32, depth=2, num_heads=2, mlp_dim=64)
    elif arg == "bench":
        # open_clip's ViT-B-16 benchmark point: one device, batch 256, random data.
        c.batch_size = 256
        c.mesh.data, c.mesh.fsdp = -1, 1
        c.total_steps = 1000
        c.optimizer.warmup_steps = 100
    elif arg:
        raise ValueError(
            f"unknown variant {arg!r}; use experiments/clip_vit_b16.py, :smoke or :bench"
        )
    return c
