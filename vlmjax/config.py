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
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
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
