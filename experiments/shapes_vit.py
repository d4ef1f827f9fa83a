r"""A small ViT classifying the kind of the large shape in the embedded `shapes` dataset.

    vlmjax train --config experiments/shapes_vit.py --workdir /tmp/run

Expected (2-core CPU, see the README's table): held-out accuracy >= 0.90, printed at the
end, in under 10 minutes including building the dataset. `:tiny` is a seconds-long variant
for tests.
"""

from vlmjax import defaults


def get_config(arg=None):
    c = defaults.base_config()
    c.task = "classification"
    c.batch_size = 128
    c.eval_batch_size = 500
    c.total_steps = 1500
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500

    c.data.name = "shapes"
    c.data.image_size = 32
    c.data.augment = "flip"

    c.model_name = "vit"
    c.model.width = 128
    c.model.depth = 4
    c.model.mlp_dim = 256
    c.model.num_heads = 4
    c.model.patch_size = 4
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
        c.batch_size = 32
        c.eval_batch_size = 64
        c.total_steps = 20
        c.log_every = 5
        c.eval_every = 10
        c.checkpoint_every = 10
        c.data.num_train = 512
        c.data.num_heldout = 128
        c.model.width = 32
        c.model.depth = 2
        c.model.mlp_dim = 64
        c.model.num_heads = 2
        c.optimizer.warmup_steps = 5
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use experiments/shapes_vit.py or :tiny")
    return c
