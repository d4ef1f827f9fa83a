"""Gradient accumulation that keeps the full-batch contrastive loss (GradCache: Gao et al.
2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"; open_clip's
`--accum-freq`).

Averaging k contrastive losses over B/k pairs each (plain accumulation) shows every row
k times fewer negatives: another objective. Here the loss is the one over all B pairs, and
only the towers' activations are split into k micro-batches:

  (a) embed each micro-batch without keeping activations (forward only, a `lax.scan`);
  (b) the loss over the B pairs of embeddings and its gradient with respect to them (any
      loss on the embeddings: softmax or sigmoid, all_gather, chunked or tiled);
  (c) re-run each micro-batch's towers, forward and backward, with its rows of that
      gradient as the cotangent, and sum the parameter gradients (a second `lax.scan`).

The loss and gradients equal `jax.value_and_grad` of the full-batch loss up to float32
rounding; peak activation memory follows B/k, at the price of one more forward pass of the
towers. Micro-batch i takes rows i, i+k, ... of the batch, so each device's rows stay on
that device (its local block splits evenly over the k micro-batches).

Two caveats, both about what "the same forward pass" means:
- BatchNorm (a ResNet tower) normalises by each micro-batch's statistics, as plain
  accumulation does, not by the full batch's: the loss equals the k=1 loss only for towers
  without batch statistics (ViT, the text transformer). The running statistics are those of
  pass (a), which updates them once per micro-batch; pass (c) recomputes the same outputs
  (train-mode BatchNorm does not read its running statistics) and its updates are dropped.
- Dropout uses the key `fold_in(rng, i)` for micro-batch i in both passes, so (c) replays
  (a)'s masks; the masks differ from the k=1 step's (other shapes), as in any accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from vlmjax import losses
from vlmjax.mesh import BATCH_AXES

# embed_fn(params, model_state, batch, rng) -> (rows, shared, model_state): `rows` a pytree
# of per-example arrays [b, ...] (the two towers' embeddings), `shared` a pytree of values
# that do not depend on the batch (log scale, bias; None leaves allowed).
EmbedFn = Callable[[Any, Any, Any, jax.Array], tuple[Any, Any, Any]]
# loss_fn(rows, shared) -> (loss, metrics), rows [B, ...] of the whole batch in its order.
LossFn = Callable[[Any, Any], tuple[jax.Array, dict]]


def _mesh(mesh):
    """`mesh`, or where None the mesh of the enclosing `jax.set_mesh` (None outside one)."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        return None if mesh.empty else mesh
    return mesh


def _constrain(x, mesh, spec):
    mesh = _mesh(mesh)
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def split_microbatches(tree, k: int, mesh=None):
    """[B, ...] -> [k, B/k, ...] where micro-batch i takes rows i, i+k, ... (the train
    loop's interleaving), sharded over the batch axes of `mesh` along the second axis."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)  # [k, B/k, ...]
        return _constrain(x, mesh, PartitionSpec(None, BATCH_AXES))

    return jax.tree.map(split, tree)


def merge_microbatches(tree, mesh=None):
    """The inverse of `split_microbatches`: [k, B/k, ...] -> [B, ...] in the batch's order."""

    def merge(x):
        x = x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # [B, ...]
        return _constrain(x, mesh, PartitionSpec(BATCH_AXES))

    return jax.tree.map(merge, tree)


def accumulated_value_and_grad(
    embed_fn: EmbedFn,
    loss_fn: LossFn,
    params: Any,
    model_state: Any,
    batch: Any,
    rng: jax.Array,
    k: int,
    mesh=None,
) -> tuple[jax.Array, dict, Any, Any]:
    """(loss, metrics, grads, model_state) of `loss_fn(*embed_fn(params, ...)[:2])` on the
    whole `batch`, with the towers run on k micro-batches (module doc). Call inside jit.

    `batch` is a pytree of [B, ...] arrays sharded over the batch axes of `mesh` (None: the
    mesh of the enclosing `jax.set_mesh`, if any). k=1 is plain `jax.value_and_grad`.
    """
    if k < 1:
        raise ValueError(f"k={k} micro-batches: must be >= 1")
    if k == 1:

        def full(p):
            rows, shared, state = embed_fn(p, model_state, batch, rng)
            loss, metrics = loss_fn(rows, shared)
            return loss, (metrics, state)

        (loss, (metrics, state)), grads = jax.value_and_grad(full, has_aux=True)(params)
        return loss, metrics, grads, state

    micro = split_microbatches(batch, k, mesh)
    steps = jnp.arange(k)

    # (a) embeddings of every micro-batch, no activations kept
    def embed_step(state, xs):
        i, mb = xs
        rows, shared, state = embed_fn(params, state, mb, jax.random.fold_in(rng, i))
        return state, (rows, shared)

    state, (rows, shared) = jax.lax.scan(embed_step, model_state, (steps, micro))
    rows = merge_microbatches(rows, mesh)  # [B, ...]
    shared = jax.tree.map(lambda v: v[0], shared)  # the same in every micro-batch

    # (b) the full-batch loss and its gradient with respect to the embeddings
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (loss, metrics), (drows, dshared) = grad_fn(rows, shared)
    drows = split_microbatches(drows, k, mesh)  # [k, B/k, ...]
    # `shared` is computed in every micro-batch; each carries 1/k of its gradient.
    dshared = jax.tree.map(lambda g: g / k, dshared)

    # (c) each micro-batch's towers again, backward from its rows of the gradient
    def grad_step(grads, xs):
        i, mb, dr = xs

        def embed(p):
            rows, shared, _ = embed_fn(p, model_state, mb, jax.random.fold_in(rng, i))
            return rows, shared

        _, vjp = jax.vjp(embed, params)
        (g,) = vjp((dr, dshared))
        return jax.tree.map(jnp.add, grads, g), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(grad_step, zeros, (steps, micro, drows))
    return loss, metrics, grads, state


def two_tower_fns(
    model,
    *,
    kind: str,
    impl: str,
    mesh=None,
    tile: int = losses.DEFAULT_TILE,
    inputs: Callable[[Any], tuple] = lambda batch: (batch["image"], batch["tokens"]),
) -> tuple[EmbedFn, LossFn]:
    """(embed_fn, loss_fn) for `accumulated_value_and_grad` of a linen model whose
    `apply(variables, *inputs(batch), train=True)` returns dict(zimg [b, E], ztxt [b, E],
    log_scale [], bias [] or None) (`models/clip.py`), with `losses.contrastive_loss`.

    Metrics: the loss's, plus `temperature` (and `bias` where the model has one), as the
    contrastive task reports them. Non-parameter collections (BatchNorm statistics) are
    mutable in `model_state`. `mesh` None: the mesh of the enclosing `jax.set_mesh`, read
    when the loss is traced (so the functions can be built before the mesh).
    """

    def embed_fn(params, model_state, batch, rng):
        out, state = model.apply(
            {"params": params, **model_state},
            *inputs(batch),
            train=True,
            rngs={"dropout": rng},
            mutable=list(model_state),
        )
        shared = {"log_scale": out["log_scale"], "bias": out["bias"]}
        return {"zimg": out["zimg"], "ztxt": out["ztxt"]}, shared, dict(state)

    def loss_fn(rows, shared):
        loss, metrics = losses.contrastive_loss(
            rows["zimg"],
            rows["ztxt"],
            shared["log_scale"],
            shared["bias"],
            kind=kind,
            impl=impl,
            mesh=_mesh(mesh),
            tile=tile,
        )
        metrics = {**metrics, "temperature": jnp.exp(-shared["log_scale"])}
        if shared["bias"] is not None:
            metrics["bias"] = shared["bias"]
        return loss, metrics

    return embed_fn, loss_fn
