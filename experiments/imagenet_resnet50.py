r"""ResNet-50 v1.5 on ImageNet-1k, the standard 90-epoch SGD recipe (Goyal et al., 2017).

    vlmjax train --config experiments/imagenet_resnet50.py --workdir gs://bucket/rn50 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Needs tfds `imagenet2012` prepared in array_record format (nothing is downloaded). Batch
1024, SGD momentum 0.9, lr 0.1 x batch/256 = 0.4 with 5 warmup epochs then cosine, weight
decay 1e-4 (not on BatchNorm or biases), label smoothing 0.1, random-resized-crop + flip at
224, eval on the 0.875 centre crop. Expected: ~76-77% top-1 (published recipe).
`:smoke` trains a tiny ResNet on the embedded shapes data for a few steps (CI runs it).
"""

from vlmjax import defaults

VARIANTS = ("smoke",)
TRAIN_EXAMPLES = 1_281_167


def get_config(arg=None):
    c = defaults.base_config()
    c.task = "classification"
    c.batch_size = 1024
    c.eval_batch_size = 1000  # 50 batches cover the 50,000 validation images exactly
    epoch = TRAIN_EXAMPLES // c.batch_size
    c.total_steps = 90 * epoch
    c.log_every = 100
    c.eval_every = epoch
    c.checkpoint_every = epoch
    c.dtype = "bfloat16"

    c.data.source = "imagenet2012"
    c.data.train_split = "train"
    c.data.image_size = 224
    c.data.augment = "random_resized_crop,flip"
    c.data.eval_crop_fraction = 0.875
    c.data.num_threads = 16
    c.loss.label_smoothing = 0.1
    c.evals.validation = dict(type="classification", split="validation")

    c.model_name = "resnet"
    c.model.num_classes = 1000
    c.model.depth = 50
    c.model.zero_init_last_bn = True
    c.model.dtype = c.get_ref("dtype")

    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.learning_rate = 0.1 * c.batch_size / 256
    c.optimizer.warmup_steps = 5 * epoch
    c.optimizer.schedule = "cosine"
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip_norm = 0.0

    if arg == "smoke":
        defaults.smoke_on_shapes(c)
        c.dtype = "float32"
        c.model.depth = 50
        c.model.width = 8
        c.model.stage_sizes = (1, 1, 1, 1)
        c.optimizer.learning_rate = 0.1 * c.batch_size / 256
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use experiments/imagenet_resnet50.py or :smoke")
    return c
