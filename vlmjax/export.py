"""`vlmjax export --workdir W [--step S] --out DIR`: a run's checkpoint as a folder that
transformers loads with `from_pretrained`.

The run's recorded config (WORKDIR/config.json; after `init_from=hf:` it holds the folder's
model) rebuilds its task; the checkpoint is restored (on one process's devices, whatever
mesh it was saved on) and its evaluated params, the EMA when `optimizer.ema_decay` is set
(`evaluators.common.variables`), go to `convert.to_hf`, which writes config.json and
model.safetensors or raises naming what the transformers class cannot express. Beside
them:

  * tokenizer files: copied from the folder (or file) `data.tokenizer` names, e.g. the HF
    folder a run started from. A vocabulary the run trained itself ("word",
    "sentencepiece:N") has no transformers form here: the export says so and writes none.
  * preprocessor_config.json (image tasks): a CLIPImageProcessor doing what the run's
    evaluation does: resize the short side to image_size / data.eval_crop_fraction with
    data.interpolation, centre-crop image_size, (x / 255 - data.mean) / data.std. For the
    decoder laid out as FuyuProcessor does (data.special_tokens="fuyu"), a
    FuyuImageProcessor with the run's canvas (data.max_image_size) and patch size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vlmjax import checkpoint, convert, init_hf, tasks
from vlmjax import mesh as mesh_lib
from vlmjax.data import fuyu_layout as fl
from vlmjax.data import sources

log = logging.getLogger("vlmjax")

# data.interpolation -> PIL resampling code, as HF image processors store it.
RESAMPLE = {name: code for code, name in init_hf.RESAMPLE.items()}
TRAINED_TOKENIZERS = ("word", "sentencepiece:")


def preprocessor_config(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """The CLIPImageProcessor settings equal to the run's evaluation preprocessing."""
    size = int(data.image_size)
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        # The same short side as image_ops.resize_center_crop computes.
        "size": {"shortest_edge": round(size / data.get("eval_crop_fraction", 1.0))},
        "resample": RESAMPLE[data.get("interpolation", "bilinear")],
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(v) for v in data.get("mean", init_hf.DEFAULT_MEAN)],
        "image_std": [float(v) for v in data.get("std", init_hf.DEFAULT_STD)],
    }


def fuyu_preprocessor_config(spec) -> dict[str, Any]:
    """The FuyuImageProcessor settings equal to the run's layout `spec` (fuyu_layout's
    LayoutSpec): images downscaled to fit the canvas (FuyuProcessor's 1080 x 1920 where the
    run keeps every size), padded with raw 1s, x / 255 normalised to [-1, 1]."""
    height, width = spec.canvas or fl.HF_CANVAS
    return {
        "image_processor_type": "FuyuImageProcessor",
        "processor_class": "FuyuProcessor",
        "do_resize": True,
        "size": {"height": int(height), "width": int(width)},
        "resample": RESAMPLE["bilinear"],
        "do_pad": True,
        "padding_value": float(spec.pad_value),
        "padding_mode": "constant",
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": 0.5,
        "image_std": 0.5,
        "patch_size": {"height": spec.patch_size, "width": spec.patch_size},
    }


def copy_tokenizer(spec: str, out_dir: str) -> list[str]:
    """Copies the HF tokenizer files of `spec` (a folder or one file) into `out_dir`;
    returns their names. Raises ValueError for a tokenizer the run trained itself."""
    if spec == "word" or spec.startswith("sentencepiece:"):
        raise ValueError(
            f"data.tokenizer={spec!r} is a vocabulary this run trained (kept in its workdir), "
            "which has no transformers tokenizer form: no tokenizer files are exported"
        )
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        shutil.copy(path, os.path.join(out_dir, os.path.basename(path)))
        return [os.path.basename(path)]
    copied = []
    for name in init_hf.TOKENIZER_FILES:
        if os.path.isfile(os.path.join(path, name)):
            shutil.copy(os.path.join(path, name), os.path.join(out_dir, name))
            copied.append(name)
    if not copied:
        raise ValueError(f"data.tokenizer={spec!r} holds none of {init_hf.TOKENIZER_FILES}")
    return copied


def _host(tree: Any) -> Any:
    """Arrays of this process's devices -> numpy (the whole array: one process)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def export(
    config: ml_collections.ConfigDict, workdir: str, out_dir: str, step: int | None = None
) -> tuple[int, list[str]]:
    """Writes the checkpoint at `step` (default: the latest) of `workdir` to `out_dir` (see
    the module doc). Returns (step, notes): what was written and what was not."""
    from vlmjax import train  # the loop's shardings and state; train imports nothing of ours
    from vlmjax.evaluators import common

    if jax.process_count() > 1:
        raise ValueError("vlmjax export runs as one process (it gathers the model on the host)")
    train.check_config(config)
    mesh = mesh_lib.make_mesh(-1, 1, 1)  # any mesh reads any checkpoint; one host's devices
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        sources.prepare(config.data)
        task = tasks.build(config, workdir)
        run = train.setup(config, task, mesh)
        mngr = checkpoint.manager(workdir, max_to_keep=None)
        try:
            target = checkpoint.abstract(run.abstract, run.shardings)
            state = checkpoint.restore(mngr, target, step=step)
        finally:
            mngr.close()
        variables = _host(common.variables(state))
    hf_config = None
    if config.task == "captioning":
        # FuyuConfig's image_token_id is the run's image placeholder (the tokenizer's
        # |SPEAKER| under data.special_tokens="fuyu", the reserved id otherwise).
        hf_config = {"image_token_id": int(task.prepared.layout.tokens.image)}
    convert.to_hf(task.model, variables, out_dir, hf_config=hf_config)
    notes = ["config.json", "model.safetensors"]
    if getattr(state, "ema", None) is not None:
        notes.append(f"(the EMA of the params, optimizer.ema_decay={config.optimizer.ema_decay})")
    if config.task in ("contrastive", "captioning"):
        try:
            notes += copy_tokenizer(config.data.tokenizer, out_dir)
        except ValueError as e:
            notes.append(f"no tokenizer: {e}")
            log.warning("%s", e)
    preprocessor = None
    if config.task in ("contrastive", "classification"):
        preprocessor = preprocessor_config(config.data)
    elif task.prepared.settings.special_tokens == "fuyu":
        preprocessor = fuyu_preprocessor_config(task.prepared.layout)
        if task.prepared.layout.canvas is None:
            notes.append(
                "(data.max_image_size=0: FuyuProcessor downscales images larger than its "
                "1080 x 1920 canvas, which the run kept at their size)"
            )
    else:
        notes.append(
            "(data.special_tokens='reserved': FuyuProcessor cannot lay out inputs for this "
            "tokenizer, which has no |SPEAKER| / |NEWLINE|; build them with "
            "vlmjax.data.fuyu_layout; no preprocessor_config.json)"
        )
    if preprocessor is not None:
        with open(os.path.join(out_dir, init_hf.PREPROCESSOR), "w") as f:
            json.dump(preprocessor, f, indent=2)
            f.write("\n")
        notes.append(init_hf.PREPROCESSOR)
    return int(state.step), notes
