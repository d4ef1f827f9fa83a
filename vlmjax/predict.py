"""A decoder run's text for one image and prompt (`vlmjax generate`): the prepared task and
a checkpoint's parameters, on one device."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util

from vlmjax import checkpoint, optim, tasks, train
from vlmjax import generate as generate_lib
from vlmjax import mesh as mesh_lib
from vlmjax.data import fuyu_layout as fl
from vlmjax.data import pipeline
from vlmjax.tasks import captioning


def answer(
    task: tasks.Task,
    variables: Any,
    image: np.ndarray,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> str:
    """The decoder's text for one uint8 image [h, w, 3] (any size) and prompt."""
    tok, spec = task.prepared.tokenizer, task.prepared.layout
    example = {"image": pipeline.as_image(image, None, 1.0),
               "prompt": captioning.text_ids(tok, prompt)}  # fmt: skip
    tokens = generate_lib.generate(
        task.model,
        variables,
        fl.prompt_batch([example], spec),
        max_new_tokens=max_new_tokens,
        eos_id=spec.tokens.eos,
        pad_id=spec.tokens.pad,
        temperature=temperature,
        top_k=top_k,
        rng=jax.random.key(seed),
    )
    row = generate_lib.trim(tokens, eos_id=spec.tokens.eos)[0]
    # The image ids are no words: a model that emits one has nothing to say there.
    return tok.decode([t for t in row if t < tok.vocab_size])


def generate_from_workdir(
    config: ml_collections.ConfigDict,
    workdir: str,
    image: np.ndarray,
    prompt: str,
    *,
    step: int | None = None,
    **options,
) -> str:
    """`answer` with the parameters of the checkpoint at `step` (default: latest) of
    `workdir` and the tokenizer the run kept there; only the parameters are read.
    `options` go to `answer`."""
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        task = tasks.build(config, workdir)
        tx, _ = optim.build(config.optimizer, config.total_steps)
        _, shardings, abstract = train.state_shardings(task.model, tx, task.init_inputs, mesh)
        flat = checkpoint.load_params(workdir, abstract.params, shardings.params, ".*", step)
        variables = {"params": traverse_util.unflatten_dict(flat, sep="/")}
        return answer(task, variables, image, prompt, **options)
