r"""A small ResNet (basic blocks, 4 stages of one block, width 16) classifying the kind of the
large shape in the embedded `shapes` dataset (32x32 scenes, 6 kinds; half of the held-out
split shows (kind, colour) pairs never seen in training).

    vlmjax train --config experiments/shapes_resnet.py --workdir /tmp/resnet

Expected (2-core CPU, see BENCHMARKS.md): held-out accuracy >= 0.90 in under 10 minutes.
"""

from vlmjax import defaults


def get_config(arg=None):
    c = defaults.shapes_classification(total_steps=600, eval_every=300)

    c.model_name = "resnet"
    c.model.block = "basic"
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.width = 16
    # 32x32 inputs: a 3x3 stride-1 stem and no max-pool keep the early resolution.
    c.model.stem_kernel = 3
    c.model.stem_stride = 1
    c.model.stem_pool = False
    c.model.zero_init_last_bn = True
    c.model.dtype = c.get_ref("dtype")

    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.learning_rate = 0.1
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.weight_decay = 5e-4
    c.optimizer.grad_clip_norm = 0.0
    if arg:
        raise ValueError(f"experiments/shapes_resnet.py has no variant {arg!r}")
    return c
