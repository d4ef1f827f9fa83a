r"""LiT (Zhai et al., 2022) from a Hugging Face CLIP or SigLIP folder: the image tower is
locked, the text tower (and its projection) is tuned to it, on your image-text pairs.

    vlmjax train --config experiments/lit_from_hf.py:/path/to/clip-vit-base-patch16 \
        --workdir /tmp/lit --config.data.source=jsonl:/data/pairs.jsonl \
        --config.data.image_size=224

The folder (`save_pretrained` output: config.json, model.safetensors, tokenizer and
preprocessor files) decides the model (`model_name`, `model.*`), the tokenizer
(`data.tokenizer`) and the preprocessing (`data.mean`, `data.std`, `data.interpolation`,
the resize-and-crop of `data.eval_crop_fraction`); `data.image_size` must be the size its
preprocessor crops to (224 for the OpenAI checkpoints), or the run stops naming both
values. A SigLIP folder also needs `--config.loss.kind=sigmoid`. Without an argument the
folder is ~/models/clip-vit-base-patch16. See vlmjax/init_hf.py.

Locking is `optimizer.frozen` (a regex on parameter paths): the locked tower gets no
updates and no optimizer state. `optimizer.lr_multipliers` would instead slow it down, e.g.
((r"(image_tower|image_proj)/.*", 0.1),). No result measured here: it needs a
pretrained folder and a real dataset.
"""

from vlmjax import defaults

DEFAULT_FOLDER = "~/models/clip-vit-base-patch16"


def get_config(arg=None):
    c = defaults.base_config()
    c.task = "contrastive"
    c.model_name = "clip"  # the folder's fields fill model.* (vlmjax/init_hf.py)
    c.model.dtype = c.get_ref("dtype")
    c.init_from = "hf:" + (arg or DEFAULT_FOLDER)

    c.batch_size = 256
    c.total_steps = 5000
    c.log_every = 50
    c.eval_every = c.checkpoint_every = 1000

    c.data.source = "shapes"  # replace with your pairs: jsonl:FILE, wds:..., a tfds name
    c.data.caption_key = "caption"
    c.data.templates = "shapes"
    c.evals.zeroshot = dict(type="zeroshot", split="heldout", templates="shapes")
    c.evals.retrieval = dict(type="retrieval", split="heldout")

    c.loss.kind = "softmax"  # "sigmoid" for a SigLIP folder
    c.optimizer.frozen = r"(image_tower|image_proj)/.*"  # LiT: the image side is locked
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 500
    c.optimizer.weight_decay = 0.05
    c.optimizer.b2 = 0.98
    return c
