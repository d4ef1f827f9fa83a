"""Start a run from a Hugging Face folder: `--config.init_from=hf:/path/to/folder`.

The folder is what `save_pretrained` wrote (config.json, model.safetensors; for CLIP and
SigLIP also the tokenizer files, and usually preprocessor_config.json). Two steps:

1. `resolve(config)`, first thing in `train.train`, before the config is validated or any
   task is built: the model the folder holds decides `config.model_name` and
   `config.model.*` (so the task, FLOPs, evaluators and checkpoint shapes all see it), its
   tokenizer becomes `data.tokenizer` (contrastive, captioning; a Fuyu folder also sets
   `data.special_tokens="fuyu"`, so examples are laid out with its |SPEAKER| and |NEWLINE|
   ids as FuyuProcessor does), and its
   preprocessor_config.json fills `data.mean`, `data.std`, `data.interpolation`,
   `data.image_size` and `data.eval_crop_fraction`. A field the run config gives with another
   value is a `ConfigError` naming the field and both values, never a silent reshape. Run
   options the checkpoint does not fix (`dtype`, `attention`, `scan`, `remat`, `dropout`,
   and a classifier's `num_classes`) stay the run's. The resolved config is what the workdir
   records, so `vlmjax eval` and `vlmjax export` need only the workdir.
2. `init_state(config, run, state)`, on a fresh start only (a workdir with a checkpoint
   resumes from it and never reads the weights): the converted arrays replace the fresh
   ones, each put straight onto its `NamedSharding` with `jax.make_array_from_callback`
   (every device receives only its shard; the whole model exists once, as numpy, on the
   host). A classifier whose class count differs from the folder's keeps its fresh head
   (logged). The EMA, if on, restarts at the imported params.

`resolve` reads the folder on every start, resumes included (the tokenizer lives there too),
so the folder must stay where it was.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from vlmjax import config as config_lib

log = logging.getLogger("vlmjax")

PREFIX = "hf:"
# Module fields the run chooses whatever the checkpoint (they change no parameter shape).
RUN_OPTIONS = frozenset({"dtype", "attention", "scan", "remat", "dropout"})
# Our data.* keys and their defaults (runs from scratch: pixels to [-1, 1], bilinear).
DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)
PREPROCESSOR = "preprocessor_config.json"
PROCESSOR = "processor_config.json"
# PIL resampling codes (HF's `resample`) -> data.interpolation.
RESAMPLE = {2: "bilinear", 3: "bicubic"}
# HF tokenizer files copied by `vlmjax export` from a folder the run's tokenizer came from.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
)


def folder_of(init_from: str) -> str | None:
    """The folder of `init_from="hf:PATH"` (user-expanded), or None for another kind."""
    if not init_from.startswith(PREFIX):
        return None
    path = os.path.expanduser(init_from[len(PREFIX) :])
    if not path:
        raise config_lib.ConfigError("init_from='hf:' needs a folder: hf:/path/to/folder")
    return path


def _task_and_name(model) -> tuple[str, str]:
    """(config.task, config.model_name) that build `model`'s class."""
    from vlmjax import tasks

    for task in tasks.TASKS:
        for name, cls in tasks.module(task).MODELS.items():
            if type(model) is cls:
                return task, name
    raise config_lib.ConfigError(f"no task trains a {type(model).__name__}")


def model_fields(model) -> dict[str, Any]:
    """The fields of a converted Flax module that differ from its class defaults (nested
    dicts, e.g. CLIP's `vision` and `text`, whole): what the checkpoint fixes."""
    out = {}
    for f in dataclasses.fields(model):
        if not f.init or f.name in ("parent", "name"):
            continue
        value = getattr(model, f.name)
        if f.default is dataclasses.MISSING or value != f.default or isinstance(value, dict):
            out[f.name] = value
    return out


def _plain(value: Any) -> Any:
    """JSON-ish values compared alike: lists are tuples, ConfigDicts are dicts."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def _nested_default(model, group: str, key: str) -> Any:
    """What a key of CLIP's `vision` / `text` dict means when the dict omits it."""
    from vlmjax.models import clip, convnets, text, vit

    if group == "text":
        cls, base = text.TextTransformer, {}
    elif getattr(model, "image_model", "vit") == "resnet":
        cls, base = convnets.ResNet, {}
    else:
        cls, base = vit.ViT, clip.VISION_DEFAULTS
    if key in base:
        return base[key]
    field = {f.name: f for f in dataclasses.fields(cls)}.get(key)
    return None if field is None else field.default


def merge_model(
    ours: dict,
    folder: dict,
    model,
    problems: list[str],
    where: str = "model",
    options: frozenset[str] = RUN_OPTIONS,
):
    """`folder`'s fields over the run's `ours`; a field `ours` sets to another value than the
    checkpoint's (given, or its default) goes into `problems`, unless it is one of the run's
    `options`. Returns the merged dict."""
    merged = dict(ours)
    for key, value in ours.items():
        if key in options:
            continue
        if key in folder:
            expected = folder[key]
        elif where == "model":
            expected = getattr(model, key, None)
        else:
            expected = _nested_default(model, where.split(".")[-1], key)
        if isinstance(value, dict | ml_collections.ConfigDict) and isinstance(expected, dict):
            nested = f"{where}.{key}"
            merged[key] = merge_model(_plain(value), expected, model, problems, nested, options)
            continue
        if _plain(value) != _plain(expected):
            problems.append(
                f"{where}.{key}={_plain(value)!r} but the folder's model has {expected!r}"
            )
    for key, value in folder.items():
        if key not in merged:
            merged[key] = value
    return merged


def read_preprocessor(path: str) -> dict[str, Any]:
    """data.* settings from the folder's preprocessor_config.json (or the image_processor
    of its processor_config.json; {} without either).

    HF's CLIP/SigLIP/ViT image processors: `image_mean`, `image_std` (pixel units [0, 1]),
    `resample` (2 bilinear, 3 bicubic), `size` ({"shortest_edge": S} or {"height", "width"})
    and `crop_size` (with `do_center_crop`): resize the short side to S, crop C x C ->
    image_size = C, eval_crop_fraction = C / S; `crop_pct` (ConvNext-style) is the fraction.
    """
    file = os.path.join(path, PREPROCESSOR)
    if os.path.isfile(file):
        with open(file) as f:
            pre = json.load(f)
    elif os.path.isfile(os.path.join(path, PROCESSOR)):
        # transformers 5's save_pretrained nests the image processor in processor_config.json.
        file = os.path.join(path, PROCESSOR)
        with open(file) as f:
            pre = json.load(f).get("image_processor") or {}
    else:
        return {}
    out: dict[str, Any] = {}
    if pre.get("do_normalize", True):
        if "image_mean" in pre:
            out["mean"] = tuple(float(v) for v in pre["image_mean"])
        if "image_std" in pre:
            out["std"] = tuple(float(v) for v in pre["image_std"])
    if "resample" in pre:
        if pre["resample"] not in RESAMPLE:
            raise config_lib.ConfigError(
                f"{file}: resample={pre['resample']} (PIL code) is not bilinear (2) or "
                "bicubic (3), the interpolations data.interpolation offers"
            )
        out["interpolation"] = RESAMPLE[pre["resample"]]
    size = pre.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = pre.get("crop_size") if pre.get("do_center_crop", "crop_size" in pre) else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if "shortest_edge" in size:
        short = int(size["shortest_edge"])
        if crop:
            if crop["height"] != crop["width"]:
                raise config_lib.ConfigError(f"{file}: crop_size {crop} is not square")
            out["image_size"] = int(crop["height"])
            out["eval_crop_fraction"] = out["image_size"] / short
        elif "crop_pct" in pre:
            out["image_size"], out["eval_crop_fraction"] = short, float(pre["crop_pct"])
        else:
            out["image_size"], out["eval_crop_fraction"] = short, 1.0
    elif "height" in size:
        if size["height"] != size["width"]:
            raise config_lib.ConfigError(f"{file}: size {size} is not square")
        out["image_size"], out["eval_crop_fraction"] = int(size["height"]), 1.0
        # SigLIP squashes the whole image to the square; we keep the aspect and crop the
        # centre. Square inputs are the same either way.
        log.info("%s resizes to %s without keeping the aspect ratio; vlmjax crops", file, size)
    return out


def _resolve_data(config, path: str, task: str, fixed_size: bool, problems: list[str]) -> None:
    data = config.data
    if task in ("contrastive", "captioning"):
        if data.tokenizer == "word":  # the default: the folder's tokenizer
            data.tokenizer = path
        elif os.path.abspath(os.path.expanduser(data.tokenizer)) != os.path.abspath(path):
            problems.append(
                f"data.tokenizer={data.tokenizer!r} but the folder {path!r} has its own"
            )
    if task == "captioning":
        _resolve_fuyu_tokens(config, path, problems)
        return  # the decoder's layout normalises its patches itself (fuyu_layout.normalise)
    defaults = {
        "mean": DEFAULT_MEAN,
        "std": DEFAULT_STD,
        "interpolation": "bilinear",
        "eval_crop_fraction": 1.0,
    }
    for key, value in read_preprocessor(path).items():
        current = _plain(data.get(key))
        if key == "image_size":
            if current != value and fixed_size:
                problems.append(
                    f"data.image_size={current} but the folder's {PREPROCESSOR} crops to "
                    f"{value} (its position embeddings are for that size)"
                )
            elif current != value:
                log.info("data.image_size=%s (the folder preprocesses to %s)", current, value)
            continue
        if key == "eval_crop_fraction" and current != value and not fixed_size:
            if current != defaults[key]:
                continue  # a ResNet at its own size: the run's crop stands
        if current == _plain(value):
            continue
        if current != _plain(defaults[key]):
            problems.append(f"data.{key}={current!r} but the folder's {PREPROCESSOR} has {value!r}")
            continue
        data[key] = value


def _resolve_fuyu_tokens(config, path: str, problems: list[str]) -> None:
    """A Fuyu folder's embedding rows are its tokenizer's ids, |SPEAKER| and |NEWLINE|
    included: the run lays examples out with them (data.special_tokens="fuyu"), and the
    folder's image_token_id must be its tokenizer's |SPEAKER|."""
    from vlmjax import convert
    from vlmjax.data import tokenizer as tokenizer_lib
    from vlmjax.tasks import captioning

    data = config.data
    data.special_tokens = "fuyu"  # the default ("reserved") would misread the folder's ids
    if os.path.abspath(os.path.expanduser(data.tokenizer)) != os.path.abspath(path):
        return  # already a problem (another tokenizer than the folder's)
    try:
        tok = tokenizer_lib.load_tokenizer(path)
    except (OSError, ValueError) as e:
        problems.append(f"the folder's tokenizer does not load ({e})")
        return
    image = tok.token_id(captioning.FUYU_TOKENS["image"]) if hasattr(tok, "token_id") else None
    expected = convert.read_config(path).get("image_token_id")
    if expected is not None and image != expected:
        problems.append(
            f"the folder's config.json has image_token_id={expected} but its tokenizer's "
            f"{captioning.FUYU_TOKENS['image']!r} is {image}"
        )


def resolve(config: ml_collections.ConfigDict) -> None:
    """Fills the run config from the `hf:` folder of `config.init_from`, in place (see the
    module doc); does nothing for another `init_from`. Raises ConfigError on a field that
    contradicts the folder, naming the field and both values."""
    path = folder_of(config.get("init_from", ""))
    if path is None:
        return
    from vlmjax import convert

    try:
        model, _ = convert.from_hf(path)
    except (FileNotFoundError, NotImplementedError, KeyError, ValueError) as e:
        raise config_lib.ConfigError(f"init_from={config.init_from!r}: {e}") from None
    task, name = _task_and_name(model)
    problems = []
    if config.task != task:
        problems.append(f"task={config.task!r} but the folder holds a {name} model (task={task!r})")
    if config.model_name != name:
        problems.append(f"model_name={config.model_name!r} but the folder holds a {name!r} model")
    folder, options = model_fields(model), RUN_OPTIONS
    if task == "classification":
        folder.pop("num_classes", None)  # the run's head: fresh when the count differs
        options = RUN_OPTIONS | {"num_classes"}
    merged = merge_model(config.model.to_dict(), folder, model, problems, options=options)
    fixed_size = not (name == "resnet" or getattr(model, "image_model", "vit") == "resnet")
    with config.unlocked():
        if not problems:
            config.model = ml_collections.ConfigDict(merged)
        _resolve_data(config, path, task, fixed_size, problems)
    if problems:
        raise config_lib.ConfigError(
            f"init_from={config.init_from!r}: the run config contradicts the folder (remove "
            "these settings or make them match): " + "; ".join(problems)
        )
    log.info("init_from %s: %s model, %s", path, name, json.dumps(_plain(merged), default=str))


def _put(array: np.ndarray, like: jax.ShapeDtypeStruct, sharding) -> jax.Array:
    """A host array onto `sharding`: each device gets only its own slice."""
    array = np.asarray(array, like.dtype)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def init_state(config: ml_collections.ConfigDict, run, state):
    """`state` with the folder's params (and BatchNorm statistics) in place of the fresh
    ones, on `run.shardings`; optimizer state stays fresh. A classifier head of another
    class count stays fresh; any other missing, extra or reshaped tensor is an error."""
    from vlmjax import convert

    path = folder_of(config.init_from)
    _, variables = convert.from_hf(path)
    abstract = {"params": run.abstract.params, **run.abstract.model_state}
    shardings = {"params": run.shardings.params, **run.shardings.model_state}
    ours = traverse_util.flatten_dict(abstract, sep="/")
    where = traverse_util.flatten_dict(shardings, sep="/")
    loaded = traverse_util.flatten_dict(variables, sep="/")
    head = [k for k in ours if k.startswith("params/head/")]
    if config.task == "classification" and any(
        k not in loaded or np.shape(loaded[k]) != ours[k].shape for k in head
    ):
        found = [np.shape(v)[-1] for k, v in loaded.items() if k == "params/head/bias"]
        log.info(
            "init_from %s: a fresh classifier head (%d classes; the folder's has %s)",
            path,
            ours["params/head/bias"].shape[-1],
            found[0] if found else "none",
        )
        loaded = {k: v for k, v in loaded.items() if not k.startswith("params/head/")}
        ours_filled = {k: v for k, v in ours.items() if not k.startswith("params/head/")}
    else:
        ours_filled = ours
    missing = sorted(ours_filled.keys() - loaded.keys())
    extra = sorted(loaded.keys() - ours_filled.keys())
    wrong = [
        f"{k}: folder {np.shape(loaded[k])}, model {ours[k].shape}"
        for k in sorted(loaded.keys() & ours.keys())
        if tuple(np.shape(loaded[k])) != tuple(ours[k].shape)
    ]
    if missing or extra or wrong:
        raise config_lib.ConfigError(
            f"init_from={config.init_from!r} does not fit this run's model (model.*.scan "
            f"must be off to import): not in the folder {missing[:8]}; not in the model "
            f"{extra[:8]}; shapes {wrong[:8]}"
        )
    flat = traverse_util.flatten_dict({"params": state.params, **state.model_state}, sep="/")
    for key, value in loaded.items():
        flat[key] = _put(value, ours[key], where[key])
    new = traverse_util.unflatten_dict(flat, sep="/")
    params = new.pop("params")
    log.info("init_from %s: %d of %d arrays imported", path, len(loaded), len(ours))
    return restart_ema(state.replace(params=params, model_state=new))


def restart_ema(state):
    """The EMA (if on) restarted at the current params (new buffers, same shardings)."""
    if state.ema is None:
        return state
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)
    return state.replace(ema=copy(state.params))
