r"""Fine-tune a Hugging Face ViT classifier (ViTForImageClassification or ViTModel folder)
on the embedded `shapes` classes, with layer-wise learning-rate decay and an EMA of the
weights: the usual recipe for adapting a pretrained ViT (BEiT, DeiT III, big_vision).

    vlmjax train --config experiments/finetune_vit_hf.py:/path/to/vit-base-patch16-224 \
        --workdir /tmp/vit_ft

The folder decides `model_name` and `model.*` and its preprocessor_config.json the
normalisation and resizing (vlmjax/init_hf.py); the head is new, as `shapes` has 6
classes and the checkpoint another count (said in the log). `data.image_size` must be
the size the checkpoint was trained at (224 here, the shapes are rendered at that size).
Without an argument the folder is ~/models/vit-base-patch16-224.

Layer-wise decay: block i of D gets lr x DECAY ** (D - i), the patch and position
embeddings DECAY ** (D + 1), the head and final norm the full rate (`optimizer.lr_multipliers`,
regexes on parameter paths, the first match wins). The EMA (`optimizer.ema_decay`) is what
the evaluators score and `vlmjax export` writes. No result measured here: it needs a
pretrained folder.
"""

from vlmjax import defaults

DEFAULT_FOLDER = "~/models/vit-base-patch16-224"
DEPTH, DECAY = 12, 0.75  # ViT-B's blocks; the rate's decay per block down from the top


def layer_decay(depth: int, decay: float) -> tuple[tuple[str, float], ...]:
    """((regex, factor), ...) for optimizer.lr_multipliers: lower blocks learn slower."""
    blocks = tuple((rf"encoder/layer_{i}/.*", decay ** (depth - i)) for i in range(depth))
    return (*blocks, (r"(embedding|pos_embedding)/.*|cls", decay ** (depth + 1)))


def get_config(arg=None):
    c = defaults.shapes_classification(total_steps=2000, eval_every=500)
    c.init_from = "hf:" + (arg or DEFAULT_FOLDER)
    c.model_name = "vit"  # the folder's fields fill model.*
    c.model.num_classes = 6  # shapes' kinds: a fresh head
    c.batch_size = 64
    c.eval_batch_size = 128
    c.data.image_size = 224
    c.data.num_train, c.data.num_heldout = 4096, 512
    c.data.augment = "flip"
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.05
    c.optimizer.lr_multipliers = layer_decay(DEPTH, DECAY)
    c.optimizer.ema_decay = 0.999
    return c
