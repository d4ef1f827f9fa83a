r"""AlexNet on ImageNet-1k as in Krizhevsky et al. (2012): SGD momentum 0.9, batch 128,
lr 0.01, weight decay 5e-4, dropout 0.5 in the 4096-wide classifier, 90 epochs; here with
torchvision's channel counts (64, 192, 384, 256, 256), a step schedule replaced by cosine,
and optional local response normalisation (`--config.model.lrn=True`, as in the paper).

    vlmjax train --config experiments/imagenet_alexnet.py --workdir gs://bucket/alexnet \
        --config.data.data_dir=/path/to/tensorflow_datasets

Needs tfds `imagenet2012` prepared in array_record format. Expected: ~56-57% top-1 (the
torchvision figure). `:smoke` trains a tiny AlexNet on the embedded shapes data for a few
steps (CI runs it).
"""

from vlmjax import defaults

VARIANTS = ("smoke",)
TRAIN_EXAMPLES = 1_281_167


def get_config(arg=None):
    c = defaults.base_config()
    c.task = "classification"
    c.batch_size = 128
    c.eval_batch_size = 500
    epoch = TRAIN_EXAMPLES // c.batch_size
    c.total_steps = 90 * epoch
    c.log_every = 200
    c.eval_every = epoch
    c.checkpoint_every = epoch
    c.dtype = "float32"

    c.data.source = "imagenet2012"
    c.data.train_split = "train"
    c.data.image_size = 224
    c.data.augment = "random_resized_crop,flip"
    c.data.eval_crop_fraction = 0.875
    c.data.num_threads = 16
    c.evals.validation = dict(type="classification", split="validation")

    c.model_name = "alexnet"
    c.model.num_classes = 1000
    c.model.dropout = 0.5
    c.model.lrn = False
    c.model.dtype = c.get_ref("dtype")

    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.learning_rate = 0.01
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "cosine"
    c.optimizer.weight_decay = 5e-4
    c.optimizer.grad_clip_norm = 0.0

    if arg == "smoke":
        # The 224-sized layer stack needs >= 63 px.
        defaults.smoke_on_shapes(c, image_size=64, num_train=512, num_heldout=64)
        c.model.hidden = 64
        c.model.channels = (8, 16, 16, 16, 16)
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use experiments/imagenet_alexnet.py or :smoke")
    return c
