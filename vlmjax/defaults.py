"""The keys every run has, with their defaults. Experiment files start from `base_config()`
and override a few fields; the config is locked after loading, so only these keys (and the
ones an experiment adds) exist.
"""

import ml_collections

from vlmjax import optim


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.seed = 0
    c.batch_size = 128  # global, over all processes and devices
    c.eval_batch_size = 256  # the evaluators' default batch (any size: padded and masked)
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = 500  # the evaluators' default schedule; 0: only at the end
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.dtype = "float32"  # compute dtype; params stay float32
    # Where metrics go (vlmjax/writers.py): "jsonl" (always), "tensorboard", "wandb" (the
    # optional extra vlmjax[wandb], set up by `wandb` below). Every log step also records
    # train/data_wait_fraction: the share of step time spent waiting for input.
    c.writers = "jsonl,tensorboard"
    c.wandb = ml_collections.ConfigDict(
        dict(project="vlmjax", entity="", name="", mode="")  # name "": the workdir's name;
    )  # mode "": WANDB_MODE or online; "offline" needs no network (`wandb sync` later)
    # "A:B": a jax.profiler trace of steps A..B-1 in WORKDIR/profile/ (TensorBoard's profile
    # plugin, Perfetto); "": none (vlmjax/profiling.py).
    c.profile_steps = ""

    # Start a new run from another run's parameters: a workdir, its checkpoints/ or one
    # checkpoints/<step>; only params whose path fullmatches init_from_params are taken,
    # the rest keep their fresh initialisation. Ignored when the workdir has a checkpoint.
    # "hf:FOLDER": a Hugging Face save_pretrained folder (CLIP, SigLIP, ViT, ResNet),
    # which also sets model_name, model.*, data.tokenizer and the preprocessing (init_hf.py).
    c.init_from = ""
    c.init_from_params = ".*"
    c.init_from_step = -1  # -1: the latest

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    c.data = ml_collections.ConfigDict()
    # "shapes" (embedded), "jsonl:PATH", a prepared tfds name, WebDataset tar shards
    # ("wds:/d/{00000..00127}.tar" or any *.tar pattern), parquet ("/d/*.parquet"), CSV/TSV
    # ("/d/train.csv"), or several of those joined by "::" and mixed (vlmjax/data/sources.py).
    c.data.source = "shapes"
    c.data.source_weights = ""  # "1::3": the mixing weights of "::"-joined sources
    # Tar: "" takes the caption from {key}.txt, a name takes that key of {key}.json.
    c.data.json_caption_key = ""
    c.data.parquet_image_key = "jpg"  # image bytes (or HF's {"bytes", "path"} struct)
    c.data.parquet_caption_key = "caption"
    c.data.csv_img_key = "filepath"  # open_clip's --csv-img-key (paths relative to the file)
    c.data.csv_caption_key = "title"  # open_clip's --csv-caption-key
    c.data.csv_separator = "\t"  # open_clip's --csv-separator
    # Where tar / jsonl / CSV record indexes are cached: "" beside each file, or (folder not
    # writable) ~/.cache/vlmjax/index; a folder name puts them all there.
    c.data.index_dir = ""
    # Bad records (corrupt image, missing/empty/non-UTF-8 caption, bad jsonl line) are replaced
    # and counted as data/skipped; the run stops when they pass this fraction of its examples.
    c.data.max_skip_fraction = 0.01
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.train_split = "train"
    c.data.image_size = 32
    c.data.image_key = "image"
    c.data.label_key = "label"
    # Comma-separated: random_resized_crop (first), flip, shift, channel_shuffle.
    c.data.augment = ""
    c.data.eval_crop_fraction = 1.0  # eval: resize the short side to size/fraction, crop centre
    # Pixels x in [0, 1] go to (x - mean) / std per channel on the device (HF's image_mean /
    # image_std); 0.5, 0.5 is [-1, 1]. Resizing: "bilinear" or "bicubic" (PIL), long side
    # rounded down as torchvision/HF do. init_from=hf: fills these from preprocessor_config.
    c.data.mean = (0.5, 0.5, 0.5)
    c.data.std = (0.5, 0.5, 0.5)
    c.data.interpolation = "bilinear"
    c.data.num_threads = 2
    c.data.prefetch = 4  # batches read ahead
    # Processes that decode and augment (vlmjax/data/workers.py): -1 = auto: 0 for `shapes`
    # (pre-rendered arrays, cheaper than a worker's start), else min(cores - 1, 16).
    c.data.num_workers = -1
    c.data.num_train = 20000  # shapes only: examples rendered per split
    c.data.num_heldout = 2000
    # Image-text tasks (see vlmjax/data/text.py): the text field ("" = captions from the
    # label through `templates`), the tokenizer ("word" or a path), and the prompt set.
    c.data.caption_key = "caption"
    c.data.tokenizer = "word"
    c.data.templates = "photo"

    # Named evaluators, each with its type, data and schedule (see vlmjax/evaluators/):
    # c.evals.heldout = dict(type="classification", split="heldout").
    c.evals = ml_collections.ConfigDict()

    c.loss = ml_collections.ConfigDict()
    c.loss.label_smoothing = 0.0  # classification
    c.loss.kind = "softmax"  # contrastive: "softmax" (CLIP) | "sigmoid" (SigLIP)
    # contrastive: "all_gather" | "chunked" (ring, O(b^2) memory) | "tiled" (ring in tiles of
    # `tile` columns, O(b * tile) memory); grad_accum_steps keeps the full-batch loss.
    c.loss.impl = "all_gather"
    c.loss.tile = 512

    c.optimizer = optim.default_config()
    c.optimizer.grad_accum_steps = 1  # micro-batches per step (scanned inside the jitted step)

    c.model_name = "vit"
    c.model = ml_collections.ConfigDict()
    return c


def smoke_on_shapes(
    c: ml_collections.ConfigDict,
    image_size: int = 32,
    num_train: int = 4096,
    num_heldout: int = 256,
) -> None:
    """Turns a full-size recipe into a 3-step run on the embedded data, in place: what CI
    runs for recipes whose dataset (e.g. ImageNet) is not on the machine. Its evaluators
    keep their types and read the first 64 held-out `shapes` examples instead."""
    c.batch_size, c.eval_batch_size = 16, 32
    c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 3, 1, 3, 3
    c.data.source = "shapes"
    c.data.train_split = "train"
    c.data.image_size = image_size
    c.data.num_train, c.data.num_heldout = num_train, num_heldout
    c.data.eval_crop_fraction = 1.0
    c.data.num_threads = 2
    if c.task == "classification":
        c.model.num_classes = 6
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, 1)
    shapes_keys = ("type", "every", "templates", "shots", "train_split", "max_new_tokens")
    evals = {
        name: {k: v for k, v in ev.items() if k in shapes_keys}
        for name, ev in c.evals.to_dict().items()
    }
    for ev in evals.values():
        ev.update(split="heldout", max_examples=64, every=0)
        if ev["type"] == "zeroshot":
            ev["templates"] = "shapes"
        if ev["type"] == "fewshot":
            ev["shots"] = (1, 2)
    c.evals = ml_collections.ConfigDict(evals)


def shapes_classification(total_steps: int, eval_every: int) -> ml_collections.ConfigDict:
    """`base_config()` set up for classifying the kind of the large shape in 32x32 `shapes`
    scenes, batch 128, evaluating (and checkpointing) every `eval_every` steps."""
    c = base_config()
    c.task = "classification"
    c.batch_size = 128
    c.eval_batch_size = 500
    c.total_steps = total_steps
    c.log_every = 50
    c.eval_every = c.checkpoint_every = eval_every
    c.data.source = "shapes"
    c.data.image_size = 32
    c.evals.heldout = dict(type="classification", split="heldout")
    # The label is the shape's kind; shuffling RGB makes the classifier colour-blind, so the
    # (kind, colour) pairs held out of `train` are no harder than the seen ones.
    c.data.augment = "flip,channel_shuffle"
    return c
