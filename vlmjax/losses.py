"""Every loss of vlmjax: contrastive image-text losses over the global batch, CLIP (softmax)
and SigLIP (sigmoid); and, at the end, softmax cross-entropy (classifiers) and the
next-token loss (the decoder), each tested against numpy (tests/test_losses.py,
tests/test_token_losses.py).

The contrastive losses take L2-normalised embeddings `zimg`, `ztxt` [B, d] and a learnable
`log_scale`; logits are `exp(log_scale) * zimg @ ztxt.T + bias` [B, B], computed in float32
whatever the input dtype. Positives are on the diagonal.

- `kind="softmax"` (CLIP, Radford et al. 2021): mean of the image->text and text->image
  cross-entropies. A scalar `bias` shifts every logit of a row alike, so it cancels (loss
  unchanged, zero gradient); it is accepted so one model can switch kinds.
- `kind="sigmoid"` (SigLIP, Zhai et al. 2023): sum over all B*B pairs of
  `-log sigmoid(label * logit)`, label +1 on the diagonal and -1 elsewhere, divided by B.

`contrastive_loss_reference` is the plain computation on the full batch (the ground truth).
`contrastive_loss` runs on global arrays sharded over the batch axes of a mesh, inside a
`jax.shard_map` where each of the n devices holds b = B / n rows:

- `impl="all_gather"`: each device gathers the other tower [B, d] and builds its rows of the
  logits [b, B] (the big_vision / open_clip way). Memory O(b x B) per device.
- `impl="chunked"`: the other tower's blocks travel around the device ring (`lax.ppermute`,
  n steps); each step builds one [b, b] block and folds it into an online log-sum-exp
  (softmax) or a running sum of softplus (sigmoid). A `jax.custom_vjp` makes the backward
  pass rotate the blocks again and recompute each [b, b] block instead of saving n of them,
  so memory stays O(b x b + b x d). This is the ring formulation of the SigLIP paper (its
  "chunked" implementation), extended to the softmax loss with an online log-sum-exp.
  On CPU devices the ring is unrolled into straight-line code (see `_ring_unrolled`).
- `impl="tiled"`: the same ring, but each [b, b] block is itself folded in tiles of `tile`
  columns (a `lax.fori_loop` over slices of the block's rows of the other tower), forward
  and in the recomputing backward pass, so no tensor larger than [b, tile] is live: memory
  O(b x tile + b x d) per device (the tiling of Inf-CL, Cheng et al. 2024). A `tile` that
  does not divide b is allowed: the last tile is shorter (b % tile columns); a `tile` >= b
  is one tile per block, i.e. `impl="chunked"`. Both rings apply the logit scale to each
  tile rather than to a scaled copy of the embeddings, which saves [b, d] buffers.

Metrics: `loss`, and for softmax `i2t_accuracy` / `t2i_accuracy`, the fraction of rows whose
largest logit is the positive (in-batch retrieval), in all implementations. The chunked impl
counts a row as correct when its positive logit equals the row maximum, which differs from
argmax only on exact ties.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from vlmjax.mesh import BATCH_AXES

KINDS = ("softmax", "sigmoid")
IMPLS = ("all_gather", "chunked", "tiled")
DEFAULT_TILE = 512  # columns per tile of impl="tiled"


def _check(kind: str, impl: str | None = None) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown contrastive loss kind={kind!r}; valid kinds: {KINDS}")
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"unknown contrastive loss impl={impl!r}; valid impls: {IMPLS}")


def _bias(bias) -> jax.Array:
    return jnp.zeros((), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)


def contrastive_loss_reference(zimg, ztxt, log_scale, bias=None, *, kind: str):
    """Plain single-device loss on the full batch; zimg, ztxt [B, d] -> (loss, metrics)."""
    _check(kind)
    x, y = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
    n = x.shape[0]
    logits = jnp.exp(jnp.asarray(log_scale, jnp.float32)) * x @ y.T + _bias(bias)  # [B, B]
    if kind == "softmax":
        i2t = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1))  # [B]
        t2i = -jnp.diagonal(jax.nn.log_softmax(logits, axis=0))  # [B]
        loss = 0.5 * (i2t.mean() + t2i.mean())
        labels = jnp.arange(n)
        metrics = {
            "loss": loss,
            "i2t_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
            "t2i_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == labels),
        }
        return loss, metrics
    labels = 2.0 * jnp.eye(n) - 1.0  # [B, B] +1 on the diagonal, -1 elsewhere
    loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n
    return loss, {"loss": loss}


def contrastive_loss(
    zimg,
    ztxt,
    log_scale,
    bias=None,
    *,
    kind: str,
    impl: str,
    mesh: Mesh,
    axes: Sequence[str] = BATCH_AXES,
    tile: int = DEFAULT_TILE,
):
    """The loss on global zimg, ztxt [B, d] sharded over `axes` of `mesh`; call inside jit.

    `log_scale` and `bias` are replicated scalars; `tile` (impl="tiled" only) is the number
    of columns of each ring block processed at once. Returns (loss, metrics), replicated.
    """
    _check(kind, impl)
    if impl == "tiled" and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise ValueError(f"loss tile={tile!r} must be a positive int (columns per tile)")
    axes = tuple(axes)
    n = math.prod(mesh.shape[a] for a in axes)
    if zimg.shape != ztxt.shape or zimg.ndim != 2:
        raise ValueError(f"zimg {zimg.shape} and ztxt {ztxt.shape} must both be [B, d]")
    if zimg.shape[0] % n:
        raise ValueError(
            f"batch size {zimg.shape[0]} is not divisible by the {n} devices along axes "
            f"{axes} (mesh shape {dict(mesh.shape)}); use a multiple of {n}"
        )
    options = dict(kind=kind, axes=axes, n=n, global_batch=zimg.shape[0])
    if impl == "all_gather":
        fn = functools.partial(_local_all_gather, **options)
    else:
        tile = tile if impl == "tiled" else None  # None: the whole [b, b] block at once
        fn = functools.partial(_local_chunked, unroll=_ring_unrolled(mesh), tile=tile, **options)
    batch, rep = PartitionSpec(axes), PartitionSpec()
    return jax.shard_map(fn, mesh=mesh, in_specs=(batch, batch, rep, rep), out_specs=(rep, rep))(
        zimg, ztxt, jnp.asarray(log_scale, jnp.float32), _bias(bias)
    )


def _local_all_gather(x, y, log_scale, bias, *, kind, axes, n, global_batch):
    """Per-device body of impl="all_gather"; x, y [b, d] are this device's rows."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    b = x.shape[0]
    scale = jnp.exp(log_scale)
    labels = lax.axis_index(axes) * b + jnp.arange(b)  # [b] global column of each positive
    y_all = lax.all_gather(y, axes, tiled=True)  # [B, d]
    i2t = scale * x @ y_all.T + bias  # [b, B] local images x global texts
    if kind == "sigmoid":
        signs = 2.0 * jax.nn.one_hot(labels, global_batch) - 1.0  # [b, B]
        loss = lax.psum(-jnp.sum(jax.nn.log_sigmoid(signs * i2t)), axes) / global_batch
        return loss, {"loss": loss}
    x_all = lax.all_gather(x, axes, tiled=True)  # [B, d]
    t2i = scale * y @ x_all.T + bias  # [b, B] local texts x global images
    rows = jnp.arange(b)
    xent = jax.nn.logsumexp(i2t, axis=1) - i2t[rows, labels]  # [b]
    xent += jax.nn.logsumexp(t2i, axis=1) - t2i[rows, labels]  # [b]
    loss = lax.psum(jnp.sum(xent), axes) / (2 * global_batch)
    metrics = {
        "loss": loss,
        "i2t_accuracy": lax.psum(jnp.sum(jnp.argmax(i2t, 1) == labels), axes) / global_batch,
        "t2i_accuracy": lax.psum(jnp.sum(jnp.argmax(t2i, 1) == labels), axes) / global_batch,
    }
    return loss, metrics


def _ring_unrolled(mesh) -> bool:
    """Whether the ring runs as n - 1 unrolled steps instead of a `fori_loop`: on CPU.

    XLA:CPU orders a program's collectives only by when their thunks start, and a while
    loop's thunk returns before its body's collectives have run. So a ring loop's
    collective-permutes can overlap the program's other collectives (the second ring, the
    psums), which share rendezvous keys: devices then pair up the wrong collectives, which
    hangs or aborts the process after XLA's 40 s rendezvous timeout (seen under load, 8
    simulated devices on 2 cores). Straight-line collectives keep program order. CPU
    meshes are small, so unrolling costs little compile time; GPUs and TPUs keep the loop.
    """
    if isinstance(mesh, Mesh):
        return mesh.devices.flat[0].platform == "cpu"
    return jax.default_backend() == "cpu"  # an AbstractMesh names no devices


def _ring_loop(n: int, step, init, unroll: bool):
    """`lax.fori_loop(1, n, step, init)`, or the same steps traced one after another."""
    if not unroll:
        return lax.fori_loop(1, n, step, init)
    # Each barrier makes step i + 1 wait for all of step i, as in the loop: otherwise XLA
    # may compute several [b, b] blocks at once, losing the O(b x b) memory bound.
    carry = lax.optimization_barrier(init)
    for i in range(1, n):
        carry = lax.optimization_barrier(step(i, carry))
    return carry


def _local_chunked(x, y, log_scale, bias, *, kind, axes, n, global_batch, unroll, tile):
    """Per-device body of impl="chunked" (tile None) and "tiled"; x, y [b, d] are this
    device's rows.

    The positives are written with plain autodiff; only the all-pairs row reductions go
    through the ring (`_ring_rows`, with its own backward pass).
    """
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    scale = jnp.exp(log_scale)
    pos = scale * jnp.sum(x * y, axis=1)  # [b] positive logits (bias added below)
    if kind == "sigmoid":
        # -log sigmoid(-z) = softplus(z) for every pair; the positives instead need
        # -log sigmoid(z) = softplus(z) - z, hence the correction `- (pos + bias)`.
        rowsum, _ = _ring_rows(x, y, scale, bias, "sigmoid", axes, n, unroll, tile)  # [b]
        loss = lax.psum(jnp.sum(rowsum - (pos + bias)), axes) / global_batch
        return loss, {"loss": loss}
    # A scalar bias cancels in the softmax loss, so it is left out of the ring.
    ring = functools.partial(
        _ring_rows, c=0.0, kind="softmax", axes=axes, n=n, unroll=unroll, tile=tile
    )
    i2t = ring(x, y, scale)
    # One ring after the other, forward and (through the barrier's transpose) backward, so
    # that a single [b, b] block (or [b, tile] tile) is alive at a time, as with one ring.
    i2t, t2i_args = lax.optimization_barrier((i2t, (y, x, scale)))
    lse_i2t, (max_i2t, diag_i2t) = i2t  # [b]
    lse_t2i, (max_t2i, diag_t2i) = ring(*t2i_args)  # [b]
    loss = lax.psum(jnp.sum(lse_i2t + lse_t2i - 2.0 * pos), axes) / (2 * global_batch)
    metrics = {
        "loss": loss,
        "i2t_accuracy": lax.psum(jnp.sum(diag_i2t >= max_i2t), axes) / global_batch,
        "t2i_accuracy": lax.psum(jnp.sum(diag_t2i >= max_t2i), axes) / global_batch,
    }
    return loss, metrics


def _shift(tree, axes, n):
    """Every device sends to its predecessor on the flattened ring over `axes`.

    After t shifts, device k holds what device (k + t) % n started with; after n shifts,
    its own again. Collectives over a tuple of axes index devices row-major over them, the
    same order as `axis_index(axes)` and the `PartitionSpec(axes)` batch layout.
    """
    perm = [(k, (k - 1) % n) for k in range(n)]
    return jax.tree.map(lambda v: lax.ppermute(v, axes, perm), tree)


def _fold_tiles(fn, carry, blk, tile):
    """Folds `carry = fn(carry, cols, start)` over the column tiles cols [w, d] of blk [b, d]
    (w = min(tile, b), start: the tile's first column; tile None: the whole block).

    One tile runs as straight-line code (so impl="chunked" compiles as it always did); more
    run as a `lax.fori_loop` that slices blk in place (no collectives inside it, so no
    XLA:CPU ordering hazard), then the shorter last tile (b % w columns), if any.
    """
    b = blk.shape[0]
    w = b if tile is None else min(tile, b)
    t, r = divmod(b, w)
    if t == 1:
        carry = fn(carry, blk[:w], 0)
    else:

        def body(i, c):
            return fn(c, lax.dynamic_slice_in_dim(blk, i * w, w), i * w)

        carry = lax.fori_loop(0, t, body, carry)
    if r:
        carry = fn(carry, blk[t * w :], t * w)
    return carry


def _logits(a, cols, s, c):
    return s * (a @ cols.T) + c  # [b, w] local rows x one tile of columns


def _ring_forward(a, bmat, s, c, kind, axes, n, unroll, tile):
    """Row reductions over all global columns of z = s * a @ B.T + c, one [b, b] block a
    ring step, each block folded in column tiles of `tile` (None: the whole block at once).

    softmax: (logsumexp_j z_ij, (max_j z_ij, z_ii)); sigmoid: (sum_j softplus(z_ij), ()).
    a, bmat [b, d] (bmat: this device's block of the global [B, d]); s scalar; c scalar or
    [b]. The scale s is applied to the tile, not to `a`, so no scaled copy of a is kept.
    """
    c = jnp.reshape(c, (-1, 1))

    if kind == "sigmoid":

        def fold_sigmoid(acc, cols, start):
            return acc + jnp.sum(jax.nn.softplus(_logits(a, cols, s, c)), axis=1)

        def step(_, carry):
            blk, acc = carry
            blk = _shift(blk, axes, n)
            return blk, _fold_tiles(fold_sigmoid, acc, blk, tile)

        acc = _fold_tiles(fold_sigmoid, jnp.zeros_like(a[:, 0]), bmat, tile)
        _, rowsum = _ring_loop(n, step, (bmat, acc), unroll)
        return rowsum, ()

    def fold_softmax(carry, cols, start):
        # online log-sum-exp: running max m and total of exp(z - m), [b] each
        m, total, diag = carry
        z = _logits(a, cols, s, c)  # [b, w]
        m_new = jnp.maximum(m, jnp.max(z, axis=1))  # [b]
        total = total * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        if diag is not None:  # own block: the positives z_ii of rows start .. start + w
            w = cols.shape[0]
            own = jnp.diagonal(lax.dynamic_slice_in_dim(z, start, w, axis=0))  # [w]
            diag = lax.dynamic_update_slice_in_dim(diag, own, start, axis=0)
        return m_new, total, diag

    def step(_, carry):
        blk, m, total = carry
        blk = _shift(blk, axes, n)
        return blk, *_fold_tiles(fold_softmax, (m, total, None), blk, tile)[:2]

    # zeros_like / full_like of this device's rows: a loop's carry must vary like them. m
    # starts at -inf, so the first tile's exp(m - m_new) is 0 and total is its own sum.
    zero = jnp.zeros_like(a[:, 0])
    init = (jnp.full_like(zero, -jnp.inf), zero, zero)
    m, total, diag = _fold_tiles(fold_softmax, init, bmat, tile)
    _, m, total = _ring_loop(n, step, (bmat, m, total), unroll)
    # The positive z_ii comes from the same matmul as the maxima, so `z_ii >= max` is exact.
    return m + jnp.log(total), (m, diag)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _ring_rows(a, bmat, s, c, kind, axes, n, unroll, tile=None):
    """`_ring_forward` with a backward pass that rotates the blocks again and recomputes
    them tile by tile: O(b x tile) memory (O(b x b) for tile None, the whole block).

    Only the first output (the row reduction) is differentiable; the second is for metrics.
    """
    return _ring_forward(a, bmat, s, c, kind, axes, n, unroll, tile)


def _ring_rows_fwd(a, bmat, s, c, kind, axes, n, unroll, tile):
    out, aux = _ring_forward(a, bmat, s, c, kind, axes, n, unroll, tile)
    return (out, aux), (a, bmat, s, c, out)


def _ring_rows_bwd(kind, axes, n, unroll, tile, res, cotangents):
    a, bmat, s, c, out = res
    g = cotangents[0]  # [b]; the metric outputs carry no gradient
    c_col = jnp.reshape(c, (-1, 1))

    def tile_grads(carry, cols, start):
        da, dc, dblk = carry
        z = _logits(a, cols, s, c_col)  # [b, w] recomputed, never stored
        # d softplus(z) = sigmoid(z); d logsumexp_j(z_ij) = exp(z_ij - lse_i).
        p = jax.nn.sigmoid(z) if kind == "sigmoid" else jnp.exp(z - out[:, None])
        dz = g[:, None] * p  # [b, w]
        w = cols.shape[0]
        # dz.T @ a [w, d]: this tile's rows of the travelling block gradient, added in place
        dcols = lax.dynamic_slice_in_dim(dblk, start, w) + s * (dz.T @ a)
        dblk = lax.dynamic_update_slice_in_dim(dblk, dcols, start, axis=0)
        # da accumulates the unscaled dz @ B, so that ds = sum(a * da) / s needs no [b, b]
        return da + dz @ cols, dc + jnp.sum(dz, axis=1), dblk

    def step(_, carry):
        blk, dblk, da, dc = carry
        blk, dblk = _shift((blk, dblk), axes, n)  # the block's gradient travels with it
        da, dc, dblk = _fold_tiles(tile_grads, (da, dc, dblk), blk, tile)
        return blk, dblk, da, dc

    zeros = jnp.zeros_like(a)
    da, dc, dblk = _fold_tiles(tile_grads, (zeros, zeros[:, 0], zeros), bmat, tile)
    _, dblk, da, dc = _ring_loop(n, step, (bmat, dblk, da, dc), unroll)
    dbmat = _shift(dblk, axes, n)  # n-th shift: each block's gradient is back home
    # dz_ij / ds = (a @ B.T)_ij, so ds = sum_ij dz_ij (a_i . B_j) = sum_i a_i . da_i.
    # s and c (a replicated scalar, the sigmoid bias, or a constant) get gradients summed
    # over every row of every device, returned invariant like the replicated inputs.
    ds = lax.psum(jnp.sum(a * da), axes)
    dc = lax.psum(jnp.sum(dc), axes) if jnp.ndim(c) == 0 else dc
    dc = jnp.asarray(dc, jnp.result_type(c)).reshape(jnp.shape(c))
    return s * da, dbmat, jnp.asarray(ds, jnp.result_type(s)).reshape(jnp.shape(s)), dc


_ring_rows.defvjp(_ring_rows_fwd, _ring_rows_bwd)


# --- classification and next-token prediction ------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in float32: logits [b, C], labels int [b] -> [b].

    `smoothing` mixes the one-hot target with the uniform distribution (Szegedy et al.
    2016): target = (1 - smoothing) * one_hot + smoothing / C."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position negative log-likelihood [b, L] float32 of `targets` [b, L] (int) under
    `logits` [b, L, V]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def next_token_loss(
    *, logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean NLL over the positions where `loss_mask` [b, L] is set (e.g. a decoder's target
    text): logits [b, L, V], targets [b, L] are the next tokens, already shifted (the
    decoder's layout shifts them within each packed segment).

    Returns (loss, {"loss", "accuracy", "tokens"}); an all-zero mask gives loss 0, not NaN.
    """
    mask = loss_mask.astype(jnp.float32)
    count = mask.sum()
    denominator = jnp.maximum(count, 1.0)
    loss = (token_nll(logits, targets) * mask).sum() / denominator
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    accuracy = (correct * mask).sum() / denominator
    return loss, {"loss": loss, "accuracy": accuracy, "tokens": count}
