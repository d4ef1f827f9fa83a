"""Experiment configs: load `path.py[:arg]`, apply `--config.a.b=value` overrides, check keys.

An experiment file defines `get_config(arg=None) -> ml_collections.ConfigDict`. The returned
config is locked, so a mistyped key is an error rather than a silently ignored setting; every
error names the nearest valid keys.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import os
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config file, key or value the user must fix."""


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf keys of `config` (nested ConfigDicts are walked)."""
    keys = []
    for name, value in config.items():
        key = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, key + "."))
        else:
            keys.append(key)
    return keys


def suggest(key: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:
        # A wrong parent ("optim.lr") still has a recognisable last component.
        last = key.rsplit(".", 1)[-1]
        close = [v for v in valid if v.rsplit(".", 1)[-1] == last][:3]
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    return "valid keys: " + ", ".join(sorted(valid))


def load_module(spec: str) -> tuple[ModuleType, str, str]:
    """(module, path, arg) for an experiment `path/to/file.py[:arg]` (the file is executed)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (expected path/to/file.py[:arg])")
    module_spec = importlib.util.spec_from_file_location(
        "vlmjax_experiment_" + os.path.splitext(os.path.basename(path))[0], path
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, path, arg


def load(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:arg]` by calling its `get_config(arg)`; returns it locked."""
    module, path, arg = load_module(spec)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(arg=None) function")
    takes_arg = bool(inspect.signature(module.get_config).parameters)
    if arg and not takes_arg:
        raise ConfigError(f"{path}:get_config() takes no argument, but ':{arg}' was given")
    config = module.get_config(arg or None) if takes_arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}:get_config must return an ml_collections.ConfigDict")
    config.lock()
    return config


def _parse_value(text: str, current: Any) -> Any:
    """Parses a command-line string into the type of the value it replaces."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected a boolean (true/false), got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"cannot parse {text!r} as {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, tuple) and not isinstance(value, tuple):
        return (value,)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"expected {type(current).__name__}, got {text!r}")
    return value


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets dotted `key` of `config` from the command-line string `text`, in place."""
    node = config
    parts = key.split(".")
    if _is_new_evaluator_key(config, parts):
        # An evaluator's keys are checked by its type (vlmjax/evaluators), not by the file
        # that listed only some of them: --config.evals.zeroshot.max_examples=64 adds one.
        with config.unlocked():
            config.evals[parts[1]][parts[2]] = _parse_value(text, None)
        return
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key '{key}': {suggest(key, flat_keys(config))}")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        # A whole group may be replaced by a dict literal, e.g. --config.evals="{'inet': {...}}".
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, dict):
            raise ConfigError(
                f"'{key}' is a group; set one of its keys ('{key}.<name>'), or replace it "
                "whole with a dict literal"
            )
        with config.unlocked():
            node[parts[-1]] = ml_collections.ConfigDict(value)
        return
    try:
        value = _parse_value(text, current)
    except ConfigError as e:
        raise ConfigError(f"--config.{key}: {e}") from None
    with config.unlocked():
        node[parts[-1]] = value


def _is_new_evaluator_key(config: ml_collections.ConfigDict, parts: list[str]) -> bool:
    """evals.NAME.KEY where evaluator NAME exists and has no KEY yet."""
    return (
        len(parts) == 3
        and parts[0] == "evals"
        and "evals" in config
        and parts[1] in config.evals
        and isinstance(config.evals[parts[1]], ml_collections.ConfigDict)
        and parts[2] not in config.evals[parts[1]]
    )


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates `--config.a.b=value` (or `--config.a.b value`) from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
                value = argv[i + 1]
                i += 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load_with_overrides(
    spec: str, overrides: Iterable[tuple[str, str]] = ()
) -> ml_collections.ConfigDict:
    """`load(spec)` then each override in order; the result is locked."""
    config = load(spec)
    for key, value in overrides:
        override(config, key, value)
    return config


def load_workdir(workdir: str) -> ml_collections.ConfigDict:
    """The config a run recorded in WORKDIR/config.json, locked."""
    import json

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist: is {workdir!r} a vlmjax workdir?")
    try:
        with open(path) as f:
            values = json.load(f)
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} holds a {type(values).__name__}, not a config object")
    config = ml_collections.ConfigDict(values)
    try:
        validate(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    config.lock()
    return config


def module_kwargs(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checks config `values` against the dataclass fields of module `cls`.

    Returns a plain dict for `cls(**kwargs)`; an unknown key is a ConfigError naming the
    nearest field, so `--config.model.widht=4` fails before any compilation.
    """
    fields = {
        f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")
    }
    kwargs = dict(values)
    for key in kwargs:
        if key not in fields:
            raise ConfigError(
                f"unknown key '{where}.{key}' for {cls.__name__}: " + suggest(key, sorted(fields))
            )
    return kwargs


def replace_evals(config: ml_collections.ConfigDict, spec: str) -> None:
    """Replaces `config.evals` (in place) with the evaluators of an eval-only file
    `path.py[:arg]`, whose `get_config(arg)` returns a ConfigDict of evaluators (or a config
    with an `evals` field)."""
    module, path, arg = load_module(spec)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(arg=None) function")
    takes_arg = bool(inspect.signature(module.get_config).parameters)
    evals = module.get_config(arg or None) if takes_arg else module.get_config()
    if isinstance(evals, ml_collections.ConfigDict) and "evals" in evals:
        evals = evals.evals
    if not isinstance(evals, ml_collections.ConfigDict | dict) or not evals:
        raise ConfigError(f"{path}:get_config must return a non-empty ConfigDict of evaluators")
    with config.unlocked():
        config.evals = ml_collections.ConfigDict(dict(evals))


# --- validation: ranges, choices and types, before anything is built ---------------------------

DTYPES = ("float32", "bfloat16", "float16")

# key: (kind, low, high, low inclusive, high inclusive); checked when the config has the key.
RANGES: dict[str, tuple[type, float | None, float | None, bool, bool]] = {
    "total_steps": (int, 1, None, True, False),
    "batch_size": (int, 1, None, True, False),
    "eval_batch_size": (int, 1, None, True, False),
    "log_every": (int, 1, None, True, False),
    "eval_every": (int, 0, None, True, False),
    "checkpoint_every": (int, 0, None, True, False),
    "keep_checkpoints": (int, 1, None, True, False),
    "data.image_size": (int, 1, None, True, False),
    "data.num_threads": (int, 1, None, True, False),
    "data.prefetch": (int, 0, None, True, False),
    "data.num_workers": (int, -1, None, True, False),  # -1: auto (data/workers.py)
    "data.num_train": (int, 1, None, True, False),
    "data.num_heldout": (int, 1, None, True, False),
    "data.eval_crop_fraction": (float, 0, 1, False, True),
    "data.max_skip_fraction": (float, 0, 1, True, True),
    "optimizer.learning_rate": (float, 0, None, True, False),
    "optimizer.warmup_steps": (int, 0, None, True, False),
    "optimizer.end_learning_rate_factor": (float, 0, None, True, False),
    "optimizer.weight_decay": (float, 0, None, True, False),
    "optimizer.b1": (float, 0, 1, True, False),
    "optimizer.b2": (float, 0, 1, True, False),
    "optimizer.eps": (float, 0, None, False, False),
    "optimizer.momentum": (float, 0, 1, True, True),
    "optimizer.grad_clip_norm": (float, 0, None, True, False),  # 0 or None: off
    "optimizer.grad_accum_steps": (int, 1, None, True, False),
    "optimizer.ema_decay": (float, 0, 1, True, False),
    "loss.label_smoothing": (float, 0, 1, True, False),
}


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict | dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _range_problem(key: str, value: Any, spec) -> str | None:
    kind, low, high, low_in, high_in = spec
    if value is None and key == "optimizer.grad_clip_norm":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{key}={value!r} must be {'an integer' if kind is int else 'a number'}"
    if kind is int and not isinstance(value, int):
        return f"{key}={value!r} must be an integer"
    if value != value or value in (float("inf"), float("-inf")):
        return f"{key}={value!r} must be finite"
    if low is not None and (value < low or (value == low and not low_in)):
        return f"{key}={value!r} must be {'>=' if low_in else '>'} {low}"
    if high is not None and (value > high or (value == high and not high_in)):
        return f"{key}={value!r} must be {'<=' if high_in else '<'} {high}"
    return None


def _choice_problem(key: str, value: Any, choices: Iterable[str]) -> str | None:
    choices = list(choices)
    if value in choices:
        return None
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "one of: " + ", ".join(choices)
    return f"{key}={value!r} is not valid; {hint}"


def _file_source_problem(data: Any) -> str | None:
    """For tar / parquet / CSV sources and "::" mixtures: "" when fine (patterns match
    files, one weight per source, a one-character separator), the problem, or None when
    `data.source` is no such source."""
    from vlmjax.data import file_index, mixture

    source = data["source"]
    parts = mixture.split(source)
    kinds = ("wds:", "parquet:", "csv:", "jsonl:")
    endings = (".tar", ".parquet", ".csv", ".tsv", ".jsonl")
    if len(parts) == 1 and not (source.startswith(kinds) or source.endswith(endings)):
        return None
    problems = []
    for part in parts:
        pattern = part
        for prefix in kinds:
            pattern = pattern.removeprefix(prefix)
        try:
            file_index.expand(pattern)
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
    if len(parts) > 1 or data.get("source_weights"):
        try:
            mixture.weights(data.get("source_weights", ""), len(parts))
        except ValueError as e:
            problems.append(str(e))
    if len(str(data.get("csv_separator", "\t"))) != 1:
        problems.append(f"data.csv_separator={data.get('csv_separator')!r} must be one character")
    return "; ".join(problems)


def _source_problem(data: Any) -> str | None:
    """A `data.source` that is neither the embedded set, a jsonl file, nor a tfds dataset
    prepared under data_dir but close to one of those: a typo, named as such."""
    source = data.get("source")
    if not isinstance(source, str) or not source:
        return f"data.source={source!r} must be 'shapes', 'jsonl:PATH' or a tfds name"
    if source == "shapes" or source.startswith("jsonl:") or source.endswith(".jsonl"):
        return None
    if (problem := _file_source_problem(data)) is not None:
        return problem or None  # "": a file source whose files exist
    name = source.removeprefix("tfds:").split("/")[0].split(":")[0]
    data_dir = data.get("data_dir") or os.environ.get(
        "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")
    )
    prepared = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []
    if name in prepared:
        return None
    close = difflib.get_close_matches(name, ["shapes", *prepared], n=1, cutoff=0.7)
    if close:
        return (
            f"data.source={source!r} is not prepared under {data_dir}; did you mean '{close[0]}'?"
        )
    return None  # perhaps a real tfds dataset not prepared yet: the data layer says how


def _preprocessing_problems(data: Any) -> list[str]:
    """data.mean / data.std: 3 numbers (std > 0); data.interpolation: a known filter."""
    problems = []
    for key in ("mean", "std"):
        value = data.get(key, (0.5, 0.5, 0.5))
        if (
            not isinstance(value, list | tuple)
            or len(value) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            problems.append(
                f"data.{key}={value!r} must be 3 numbers (R, G, B), e.g. (0.5, 0.5, 0.5)"
            )
        elif key == "std" and min(value) <= 0:
            problems.append(f"data.std={value!r} must be > 0 in every channel")
    if problem := _choice_problem(
        "data.interpolation", data.get("interpolation", "bilinear"), ("bilinear", "bicubic")
    ):
        problems.append(problem)
    return problems


def _monitoring_problems(config: ml_collections.ConfigDict) -> list[str]:
    """writers: known sinks, jsonl among them; profile_steps: "" or "A:B"; wandb.mode."""
    from vlmjax import profiling, writers

    problems = []
    for key, parse in (("writers", writers.parse_sinks), ("profile_steps", profiling.parse_steps)):
        present, value = _lookup(config, key)
        if not present:
            continue
        if not isinstance(value, str):
            problems.append(f"{key}={value!r} must be a string")
            continue
        try:
            parse(value)
        except ValueError as e:
            problems.append(str(e))
    present, mode = _lookup(config, "wandb.mode")
    modes = ("", "online", "offline", "disabled")
    if present and (problem := _choice_problem("wandb.mode", mode, modes)):
        problems.append(problem)
    return problems


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError listing every key out of range, of the wrong type or not one of
    its choices (with did-you-mean), so a bad value fails before anything is built rather
    than as a traceback (or a NaN loss) later. Keys the config lacks are not checked."""
    from vlmjax import optim

    problems = []
    for key, spec in RANGES.items():
        present, value = _lookup(config, key)
        if present and (problem := _range_problem(key, value, spec)):
            problems.append(problem)
    present_total, total = _lookup(config, "total_steps")
    present_warm, warmup = _lookup(config, "optimizer.warmup_steps")
    if (
        present_total
        and present_warm
        and isinstance(total, int)
        and isinstance(warmup, int)
        and warmup > total
    ):
        problems.append(
            f"optimizer.warmup_steps={warmup} is longer than the run (total_steps={total})"
        )
    for axis in ("data", "fsdp", "tensor"):
        present, value = _lookup(config, f"mesh.{axis}")
        if present and (
            not isinstance(value, int) or isinstance(value, bool) or value == 0 or value < -1
        ):
            problems.append(f"mesh.{axis}={value!r} must be -1 (all remaining devices) or >= 1")
    choices = {
        "dtype": DTYPES,
        "model.dtype": DTYPES,
        "optimizer.name": optim.OPTIMIZERS,
        "optimizer.schedule": optim.SCHEDULES,
    }
    for key, options in choices.items():
        present, value = _lookup(config, key)
        if present and (problem := _choice_problem(key, value, options)):
            problems.append(problem)
    present, data = _lookup(config, "data")
    if present and isinstance(data, ml_collections.ConfigDict | dict):
        if problem := _source_problem(data):
            problems.append(problem)
        problems += _preprocessing_problems(data)
    problems += _monitoring_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))
