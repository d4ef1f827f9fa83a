r"""A small ViT classifying the kind of the large shape in the embedded `shapes` dataset.

32x32 scenes of one or two shapes; the label is the kind of the large (or only) shape, one
of 6; half of the held-out split shows (kind, colour) pairs never seen in training.

    vlmjax train --config experiments/shapes_vit.py --workdir /tmp/run

Expected (2-core CPU, see the README's table): held-out accuracy >= 0.90, printed at the
end, in under 10 minutes including building the dataset. `:tiny` is a seconds-long variant
for tests.
"""

from vlmjax import defaults, sweep

VARIANTS = ("tiny",)


def get_config(arg=None):
    c = defaults.shapes_classification(total_steps=2500, eval_every=500)

    c.model_name = "vit"
    c.model.width = 128
    c.model.depth = 4
    c.model.mlp_dim = 256
    c.model.num_heads = 4
    # 8x8 patches: 16 tokens. Measured on the 2-core CPU, patch 4 (64 tokens) ran 4x slower
    # (300 vs 1200 img/s) and learned no faster per step (0.885 vs 0.91 after 1000 steps).
    c.model.patch_size = 8
    c.model.pool = "gap"
    c.model.dropout = 0.0
    c.model.dtype = c.get_ref("dtype")  # follows --config.dtype
    c.model.scan = False
    c.model.remat = "none"
    c.model.attention = "xla"

    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip_norm = 1.0

    if arg == "tiny":
        # ~30 s on the 2-core CPU; reaches ~0.4 held-out accuracy (chance: 1/6).
        c.batch_size = 64
        # Test-sized runs read in the trainer: a data worker's start (seconds) outweighs it,
        # whatever data.source a test gives (data.num_workers; vlmjax/data/workers.py).
        c.data.num_workers = 0
        c.eval_batch_size = 128
        c.total_steps = 500
        c.log_every = 50
        c.eval_every = 250
        c.checkpoint_every = 250
        c.data.num_train = 4096
        c.data.num_heldout = 256
        c.model.width = 64
        c.model.depth = 2
        c.model.mlp_dim = 128
        c.model.num_heads = 2
        c.optimizer.learning_rate = 2e-3
        c.optimizer.warmup_steps = 30
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use experiments/shapes_vit.py or :tiny")
    return c


def get_sweep(arg=None):
    """Learning rate x depth, 4 runs in WORKDIR/<key=value,...>; finished runs are skipped:

    vlmjax sweep --config experiments/shapes_vit.py:tiny --workdir /tmp/sweep [--dry_run]
    """
    return sweep.product({"optimizer.learning_rate": [1e-3, 3e-3], "model.depth": [2, 4]})
