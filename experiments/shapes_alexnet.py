r"""An AlexNet-shaped convnet for the 32x32 embedded `shapes` scenes (6 kinds; half of the
held-out split shows (kind, colour) pairs never seen in training): five convolutions with
overlapping 3x3/2 max-pools after the 1st, 2nd and 5th, dropout in the classifier. The
ImageNet layer sizes (11x11/4 first conv, 4096-wide classifier) are scaled to the images.

    vlmjax train --config experiments/shapes_alexnet.py --workdir /tmp/alexnet

Expected (2-core CPU, see BENCHMARKS.md): held-out accuracy >= 0.90 in under 10 minutes.
"""

from vlmjax import defaults


def get_config(arg=None):
    c = defaults.shapes_classification(total_steps=800, eval_every=400)

    c.model_name = "alexnet"
    c.model.channels = (32, 64, 96, 64, 64)
    c.model.kernel_sizes = (5, 3, 3, 3, 3)
    c.model.strides = (1, 1, 1, 1, 1)
    c.model.paddings = (2, 1, 1, 1, 1)  # 32 -> pool 15 -> pool 7 -> pool 3
    c.model.pool_window = 3
    c.model.pool_stride = 2
    c.model.adaptive_pool = 3
    c.model.hidden = 256
    c.model.dropout = 0.5
    c.model.lrn = False
    c.model.dtype = c.get_ref("dtype")

    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.learning_rate = 0.02
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.weight_decay = 5e-4
    c.optimizer.grad_clip_norm = 0.0
    if arg:
        raise ValueError(f"experiments/shapes_alexnet.py has no variant {arg!r}")
    return c
