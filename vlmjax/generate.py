"""Text generation with the Fuyu decoder: prefill with a KV cache, then one token per step.

    from vlmjax.data import fuyu_layout
    batch = fuyu_layout.prompt_batch(
        [{"image": uint8_hw3, "prompt": ids}, ...], spec
    )  # left-padded prompts of any image sizes
    tokens = generate(model, variables, batch, max_new_tokens=32, eos_id=spec.tokens.eos)
    texts = [tokenizer.decode(t) for t in trim(tokens, eos_id=spec.tokens.eos)]

`generate` is jitted as a whole (prefill + a `lax.while_loop` of decode steps, stopping
early once every row has produced `eos_id`). It compiles once per prompt length,
`max_new_tokens`, `top_k` and greedy-or-sampling, not per temperature: bucket prompt
lengths with `prompt_batch(..., length=...)` to bound the compilations. To run it sharded,
call it inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(vlmjax.mesh.RULES)` with
sharded variables; the model's logical constraints place the activations and the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax import mesh as mesh_lib
from vlmjax.models import fuyu


def sample_logits(
    logits: jax.Array, rng: jax.Array, temperature: float | jax.Array = 0.0, top_k: int = 0
) -> jax.Array:
    """Next tokens [b] int32 from logits [b, vocab]: argmax when `temperature` is the
    number 0, else a sample from softmax(logits / temperature), restricted to the `top_k`
    largest (0: all). `temperature` may be a traced scalar; `top_k` is static."""
    if isinstance(temperature, int | float) and temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [b, 1] the k-th largest
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("model", "max_new_tokens", "greedy", "top_k", "eos_id", "pad_id"),
)
def _generate(
    model, variables, batch, rng, temperature, *, max_new_tokens, greedy, top_k, eos_id, pad_id
):
    b, prompt_len = batch["tokens"].shape
    patch_dim = batch["patches"].shape[-1]
    cache = fuyu.init_cache(model, b, prompt_len + max_new_tokens)
    # The temperature is traced (changing it does not recompile); greedy or not is static.
    temperature = 0.0 if greedy else temperature
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)

    # Prefill: the whole prompt at once, keeping the last position's logits.
    logits, cache = model.apply(
        variables, **fuyu.model_inputs(batch), cache=cache, last_only=True
    )  # [b, 1, vocab]
    first = sample(logits[:, -1], jax.random.fold_in(rng, 0))  # [b]
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    stop = -1 if eos_id is None else eos_id  # token ids are >= 0: -1 never stops
    done = first == stop
    # The token generated at step s sits at position prompt_length + s of its example.
    next_position = batch["positions"][:, -1] + 1  # [b]

    def keep_going(state):
        step, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_fn(state):
        step, token, cache, out, done = state
        inputs = dict(
            tokens=token[:, None],  # [b, 1]
            patches=jnp.zeros((b, 1, patch_dim), batch["patches"].dtype),
            image_mask=jnp.zeros((b, 1), bool),
            segment_ids=jnp.ones((b, 1), jnp.int32),
            positions=(next_position + step - 1)[:, None],
        )
        logits, cache = model.apply(variables, **inputs, cache=cache, last_only=True)
        new = sample(logits[:, -1], jax.random.fold_in(rng, step))
        new = jnp.where(done, pad_id, new)
        out = out.at[:, step].set(new)
        return step + 1, new, cache, out, done | (new == stop)

    state = (jnp.int32(1), first, cache, out, done)
    return jax.lax.while_loop(keep_going, step_fn, state)[3]


def generate(
    model: fuyu.FuyuDecoder,
    variables,
    batch: dict,
    *,
    max_new_tokens: int,
    eos_id: int | None = 2,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Generated tokens int32 [B, max_new_tokens] for the left-padded prompts in `batch`.

    batch: tokens, patches, image_mask, segment_ids, positions [B, P] as from
    `fuyu_layout.prompt_batch` (padding on the left with segment 0). Greedy when
    `temperature` is 0 (the default); else sampling with `rng` (default key 0) from the
    `top_k` most likely tokens (0: all). A row ends with its first `eos_id` (kept in the
    output); the positions after it hold `pad_id`. `variables` may hold `nn.Partitioned`
    boxes; they are unboxed here.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    missing = [k for k in fuyu.INPUT_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; build it with fuyu_layout.prompt_batch")
    rng = jax.random.key(0) if rng is None else rng
    return _generate(
        model,
        mesh_lib.strip_boxes(variables),
        {k: jnp.asarray(batch[k]) for k in fuyu.INPUT_KEYS},
        rng,
        jnp.float32(temperature),
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0,
        top_k=int(top_k),
        eos_id=eos_id,
        pad_id=pad_id,
    )


def trim(tokens, eos_id: int | None = 2) -> list[list[int]]:
    """Rows of `generate`'s output as lists, cut before the first `eos_id`."""
    rows = []
    for row in np.asarray(tokens).tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        rows.append(row)
    return rows
