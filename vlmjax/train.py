"""The one training loop. It reads top to bottom as the recipe: mesh, data, model and
optimizer, shardings, init or resume, jitted step, then the loop with logging, evaluation and
checkpoints. It knows nothing about any particular model: the prepared task supplies the
model, the loss, the data and its FLOPs (`vlmjax/tasks/__init__.py`), and `config.evals`
names the evaluators (`vlmjax/evaluators/`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from vlmjax import (
    checkpoint,
    evaluators,
    finite,
    init_hf,
    lock,
    mfu,
    optim,
    profiling,
    tasks,
    writers,
)
from vlmjax import config as config_lib
from vlmjax import mesh as mesh_lib
from vlmjax.data import pipeline, skips, sources

log = logging.getLogger("vlmjax")

FINAL_METRICS = "final_metrics.json"  # {"step": total_steps, "metrics": {...}} when finished


class Preempted(Exception):
    """Training stopped at a step boundary on SIGTERM, with a checkpoint of that step (raised
    after everything is saved; `vlmjax train` exits 143 = 128 + SIGTERM, so a scheduler or
    wrapper can tell a stopped run from a finished one)."""

    def __init__(self, step: int):
        super().__init__(f"preempted after step {step}; rerun the same command to resume")
        self.step = step


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree of (sharded) arrays."""

    step: jax.Array  # int32 []
    params: Any
    opt_state: Any
    model_state: Any  # non-parameter collections, e.g. {"batch_stats": ...}; {} for a ViT
    rng: jax.Array  # uint32 [2]; folded with the step, never split in place
    # optimizer.ema_decay > 0: the moving average of `params` (same tree and shardings) that
    # evaluators and export use (see evaluators/common.py `variables`); None when off.
    ema: Any = None


# --- building blocks (pure functions; the loop below wires them together) -------------------


def state_shardings(
    model: nn.Module, tx: optax.GradientTransformation, init_inputs, mesh, ema: bool = False
):
    """(init_fn, shardings, abstract state) for a TrainState of `model` on `mesh` (with an
    EMA of the params, started at the initial ones, when `ema`).

    Parameter shardings come from the modules' logical axis names; optimizer-state leaves
    that mirror parameters (Adam's moments, momentum) take their parameter's sharding.
    """
    dummy = tuple(jnp.zeros(x.shape, x.dtype) for x in init_inputs)

    def init_variables(rng):
        return model.init({"params": rng, "dropout": rng}, *dummy, train=False)

    def init_fn(rng):
        param_rng, state_rng = jax.random.split(rng)
        variables = dict(nn.meta.unbox(init_variables(param_rng)))
        params = variables.pop("params")
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            model_state=variables,
            rng=state_rng,
            ema=jax.tree.map(jnp.copy, params) if ema else None,
        )

    rng = jax.random.PRNGKey(0)
    boxed = dict(jax.eval_shape(init_variables, rng))
    var_shardings = mesh_lib.logical_shardings(boxed, mesh)
    param_shardings = var_shardings.pop("params")
    abstract = jax.eval_shape(init_fn, rng)
    rep = mesh_lib.replicated(mesh)
    # Frozen params (optimizer.frozen) have no state: optax.MaskedNode stays in its place.
    masked = optax.transforms.MaskedNode
    opt_shardings = optax.tree_map_params(
        tx,
        lambda x, sharding: x if isinstance(x, masked) else sharding,
        abstract.opt_state,
        param_shardings,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding | masked),
    )
    shardings = TrainState(
        step=rep,
        params=param_shardings,
        opt_state=opt_shardings,
        model_state=var_shardings,
        rng=rep,
        ema=param_shardings if ema else None,
    )
    return init_fn, shardings, abstract


def _microbatches(batch: dict[str, jax.Array], k: int, mesh) -> dict[str, jax.Array]:
    """[B, ...] -> [k, B/k, ...] where micro-batch i takes rows i, i+k, ...

    That interleaving keeps each device's rows on that device (every local block of
    B/devices rows splits evenly over the k micro-batches), so no data moves.
    """
    sharding = NamedSharding(mesh, PartitionSpec(None, mesh_lib.BATCH_AXES))

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(split, batch)


def make_train_step(
    loss_fn: Callable,
    tx,
    schedule,
    accum_steps: int,
    mesh,
    batch_grad_fn: Callable | None = None,
    ema_decay: float = 0.0,
) -> Callable:
    """train_step(state, batch) -> (state, metrics); `ema_decay` > 0 also steps the EMA.

    With `accum_steps` > 1 the batch runs as that many micro-batches: `batch_grad_fn` (a
    task's `grad_fn`: the whole batch's objective, e.g. a contrastive loss over every pair)
    when given, else `loss_fn`'s gradients averaged over the micro-batches."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        if batch_grad_fn is not None and accum_steps > 1:
            _, metrics, grads, model_state = batch_grad_fn(
                state.params, state.model_state, batch, rng, accum_steps
            )
        elif accum_steps == 1:
            (_, (metrics, model_state)), grads = grad_fn(
                state.params, state.model_state, batch, rng
            )
        else:

            def body(carry, xs):
                grads_sum, model_state = carry
                i, micro = xs
                (_, (metrics, model_state)), grads = grad_fn(
                    state.params, model_state, micro, jax.random.fold_in(rng, i)
                )
                return (jax.tree.map(jnp.add, grads_sum, grads), model_state), metrics

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, model_state), metrics = jax.lax.scan(
                body,
                (zeros, state.model_state),
                (jnp.arange(accum_steps), _microbatches(batch, accum_steps, mesh)),
            )
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            metrics = jax.tree.map(jnp.mean, metrics)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {f"train/{k}": v for k, v in metrics.items()}
        metrics["train/grad_norm"] = optax.tree.norm(grads)
        metrics["train/param_norm"] = optax.tree.norm(params)
        metrics["train/learning_rate"] = schedule(state.step)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
        )
        if ema_decay:
            new_state = new_state.replace(ema=optim.ema_update(state.ema, params, ema_decay))
        return new_state, metrics

    return train_step


@dataclasses.dataclass(frozen=True)
class Setup:
    """The jitted pieces of a run on one mesh."""

    model: nn.Module
    init_fn: Callable  # rng -> TrainState (sharded)
    train_step: Callable  # (state, batch) -> (state, metrics)
    shardings: Any  # TrainState of NamedShardings
    abstract: Any  # TrainState of ShapeDtypeStructs
    batch_sharding: Any


def setup(config: ml_collections.ConfigDict, task: tasks.Task, mesh) -> Setup:
    """Optimizer, shardings and jitted functions for the prepared `task` on `mesh`.

    Call (and run the returned functions) inside `jax.set_mesh(mesh)` and
    `nn.logical_axis_rules(mesh_lib.RULES)`, where the models' logical constraints resolve.
    """
    model = task.model
    tx, schedule = optim.build(config.optimizer, config.total_steps)
    ema_decay = config.optimizer.get("ema_decay", 0.0)
    init_fn, shardings, abstract = state_shardings(
        model, tx, task.init_inputs, mesh, ema=bool(ema_decay)
    )
    batch_sharding = mesh_lib.batch_sharding(mesh)
    rep = mesh_lib.replicated(mesh)
    step_fn = make_train_step(
        task.loss_fn,
        tx,
        schedule,
        config.optimizer.grad_accum_steps,
        mesh,
        task.grad_fn,
        ema_decay,
    )
    return Setup(
        model=model,
        init_fn=jax.jit(init_fn, out_shardings=shardings),
        # The state is donated: its buffers are reused for the new state.
        train_step=jax.jit(
            step_fn,
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, rep),
            donate_argnums=0,
        ),
        shardings=shardings,
        abstract=abstract,
        batch_sharding=batch_sharding,
    )


def _init_from(config: ml_collections.ConfigDict, run: Setup, state: TrainState) -> TrainState:
    """`state` with the parameters selected by `config.init_from_params` taken from
    `config.init_from` (onto this run's shardings); optimizer state stays fresh. An
    `hf:FOLDER` is a Hugging Face folder (vlmjax/init_hf.py)."""
    from flax import traverse_util

    if init_hf.folder_of(config.init_from) is not None:
        return init_hf.init_state(config, run, state)

    step = None if config.init_from_step < 0 else config.init_from_step
    loaded = checkpoint.load_params(
        config.init_from, run.abstract.params, run.shardings.params, config.init_from_params, step
    )
    params = traverse_util.flatten_dict(state.params, sep="/")
    params.update(loaded)
    log.info("init_from %s: %d of %d parameter arrays", config.init_from, len(loaded), len(params))
    state = state.replace(params=traverse_util.unflatten_dict(params, sep="/"))
    return init_hf.restart_ema(state)


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> tuple[int, dict[str, float]]:
    """Evaluates the checkpoint at `step` (default: latest) of `workdir` on the current
    devices, whatever mesh it was saved on. Returns (step, metrics)."""
    check_config(config)
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        sources.prepare(config.data)
        # The tokenizer the run kept in its workdir; no training data needed to rebuild it.
        task = tasks.build(config, workdir)
        evals = evaluators.build(config, task, mesh)
        if not evals:
            raise config_lib.ConfigError(
                "config.evals is empty: give evaluators, e.g. --config.evals=\"{'heldout': "
                "{'type': 'classification', 'split': 'heldout'}}\" or --evals FILE.py"
            )
        run = setup(config, task, mesh)
        mngr = checkpoint.manager(workdir, max_to_keep=None)
        try:
            target = checkpoint.abstract(run.abstract, run.shardings)
            state = checkpoint.restore(mngr, target, step=step)
        finally:
            mngr.close()
        return int(state.step), evaluators.run(evals, state)


class Preemption:
    """SIGTERM (a scheduler's preemption notice) -> stop at a step boundary with a checkpoint.

    Multi-process runs ask JAX's preemption sync point, so every process stops at the same
    step (jax.distributed installs its own SIGTERM handler); a single process catches
    SIGTERM itself, only while training, and puts the previous handler back afterwards.
    """

    def __enter__(self) -> Preemption:
        self.requested, self._previous = False, None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    path = os.path.join(workdir, "config.json")
    new = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            old = new  # the new config is the record from now on
            log.warning("%s is unreadable (%s); the new config is recorded", path, e)
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            log.warning("config differs from %s in %s; the new one is recorded", path, changed)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # a kill mid-write leaves the old file, not half a new one


def check_config(config: ml_collections.ConfigDict) -> None:
    """Errors for settings no run can use, before anything is built (see
    `config.validate`: ranges, choices, types)."""
    config_lib.validate(config)
    accum = config.optimizer.grad_accum_steps
    if config.batch_size % accum:
        raise config_lib.ConfigError(
            f"optimizer.grad_accum_steps={accum} must divide batch_size={config.batch_size}"
        )


@contextlib.contextmanager
def _hold_workdir(workdir: str):
    """WORKDIR/LOCK for the run (see lock.py): taken by process 0; every process fails
    together, naming the holder, if it is held."""
    held, error = None, ""
    if jax.process_index() == 0:
        try:
            held = lock.WorkdirLock(workdir)
            held.acquire()
        except lock.WorkdirLocked as e:
            held, error = None, str(e)
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(not error))
        if not ok and not error:
            error = f"process 0 could not take the lock of workdir {workdir} (see its log)"
    if error:
        raise lock.WorkdirLocked(error)
    try:
        yield
    finally:
        if held is not None:
            held.release()


# --- the loop --------------------------------------------------------------------------------


def train(
    config: ml_collections.ConfigDict, workdir: str, stop_at: int | None = None
) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir`; returns the final evaluation metrics.

    `stop_at` ends this invocation after that step, with a checkpoint, as a job with a time
    limit would; running again resumes exactly there. A SIGTERM stops at the next step
    boundary with a checkpoint and raises `Preempted`. The workdir is locked for the run
    (`lock.py`); a state whose loss went inf/NaN is never saved (`finite.guard_finite`); on any
    exception the save in flight is finished and everything is closed before it propagates.
    """
    init_hf.resolve(config)  # init_from=hf:FOLDER decides the model and preprocessing
    check_config(config)
    is_main = jax.process_index() == 0

    # Mesh: every batch is split over (data, fsdp); the rules table shards parameters.
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    mesh_lib.batch_size_per_process(config.batch_size, mesh)
    local_rows = config.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
    if local_rows % config.optimizer.grad_accum_steps:
        raise config_lib.ConfigError(
            f"each batch shard has {local_rows} rows, not divisible by "
            f"optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}"
        )
    log.info(
        "mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count()
    )

    # One live run per workdir, taken before anything is written there.
    with _hold_workdir(workdir), jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        # Data first (built once, a no-op later): the task is prepared from it (a
        # vocabulary, trained on the first start and kept in the workdir for later ones).
        sources.prepare(config.data)
        os.makedirs(workdir, exist_ok=True)
        task = tasks.build(config, workdir)
        # Every evaluator is checked (its data opened) before anything trains.
        evals = evaluators.build(config, task, mesh)
        # Optimizer, shardings and the jitted init and train step, checked for finiteness.
        run = setup(config, task, mesh)
        train_step = finite.guard_finite(run, config.optimizer.skip_nonfinite)

        # Init, or resume from the newest checkpoint that verifies (damaged ones are moved
        # aside to checkpoints/<step>.corrupt with a warning).
        if is_main:
            _write_config(config, workdir)
        mngr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints)
        writer = progress = train_iter = profiler = None
        in_flight = None  # the step of the last save started (async: may still be writing)
        try:
            examples = 0  # position in the global input stream
            skipped = 0  # bad records replaced so far (data/skipped; vlmjax/data/skips.py)
            restored = None
            if mngr.latest_step() is not None:
                target = checkpoint.abstract(run.abstract, run.shardings)
                restored = checkpoint.restore_latest(mngr, target)
                if restored is None:
                    raise checkpoint.CheckpointError(
                        f"every checkpoint in {mngr.directory} is damaged (moved aside to "
                        "<step>.corrupt); rerun the same command to start afresh"
                    )
            if restored is not None:
                state, data = restored
                examples = data["examples"]
                skipped = data.get("skipped", 0)
                log.info("resumed from step %d in %s", int(state.step), workdir)
            else:
                state = run.init_fn(jax.random.PRNGKey(config.seed))
                if config.init_from:
                    state = _init_from(config, run, state)
            rep = mesh_lib.replicated(mesh)
            health = jax.device_put({"first_nonfinite": np.int32(0), "skipped": np.int32(0)}, rep)

            # Data: this process's rows of each global batch, from the resume position on.
            train_iter = iter(
                task.train_dataset(jax.process_index(), jax.process_count(), examples)
            )
            skip_counter = skips.SkipCounter(config.data.max_skip_fraction, skipped)
            num_params = sum(np.prod(x.shape) for x in jax.tree.leaves(run.abstract.params))
            log.info("%s: %.2fM parameters", type(run.model).__name__, num_params / 1e6)
            # Analytic training FLOPs, for train/tflops_per_device and train/mfu (None: unknown).
            flops_per_example = task.flops_per_example

            first = int(state.step)
            # Records an interrupted invocation wrote after `first` are dropped: each step once.
            writer = writers.MetricWriter(
                workdir, enabled=is_main, resume_step=first, sinks=config.writers,
                wandb_config=config.wandb.to_dict(), run_config=config,
            )  # fmt: skip
            progress = writers.Progress(config.total_steps, first, enabled=is_main)
            eval_metrics: dict[str, float] = {}
            last_time, last_step = time.time(), first
            last = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
            preempted = False
            data_wait = profiling.DataWait()  # train/data_wait_fraction (profiling.py)
            profiler = profiling.Profiler(config.profile_steps, workdir)
            with Preemption() as preemption:
                for step in range(first + 1, last + 1):
                    profiler.before_step(step)
                    # Counts bad records; the wait for the batch is train/data_wait_fraction.
                    host_batch = skip_counter.pop(data_wait.next(train_iter))
                    batch = pipeline.to_global(host_batch, run.batch_sharding)
                    state, metrics, health = train_step(state, batch, health)
                    profiler.after_step(step, state)
                    examples += config.batch_size

                    if step % config.log_every == 0 or step == config.total_steps:
                        metrics, host_health = jax.device_get((metrics, health))
                        finite.check_finite(host_health, mngr, step)
                        metrics["data/skipped"] = skip_counter.total()
                        skip_counter.check(metrics["data/skipped"], examples)
                        try:  # a failed async save surfaces here, not at the next save
                            mngr.check_for_errors()
                        except Exception as e:
                            raise checkpoint.save_failed(mngr, in_flight, e) from e
                        if config.optimizer.skip_nonfinite:
                            metrics["train/skipped_steps"] = int(host_health["skipped"])
                        now = time.time()
                        metrics["train/examples_per_sec"] = (
                            (step - last_step) * config.batch_size / max(now - last_time, 1e-9)
                        )
                        last_time, last_step = now, step
                        metrics["train/data_wait_fraction"] = data_wait.fraction()
                        if flops_per_example:
                            metrics.update(
                                mfu.train_flops_summary(
                                    flops_per_example,
                                    metrics["train/examples_per_sec"],
                                    jax.device_count(),
                                    jax.devices()[0].device_kind,
                                )
                            )
                        writer.write(step, metrics)
                        progress.update(step, metrics)
                    else:
                        progress.update(step)

                    due = evaluators.run(evals, state, step, config.total_steps)
                    if due:
                        eval_metrics.update(due)
                        writer.write(step, due)
                        progress.update(step, due)
                        last_time = time.time()  # keep eval time out of the throughput figure
                        data_wait.restart()

                    preempted = preemption.reached(step)
                    if (
                        (config.checkpoint_every and step % config.checkpoint_every == 0)
                        or step == last
                        or preempted
                    ):
                        # Never save a non-finite state: retention would then delete the
                        # good steps (issue 12). One host read per checkpoint.
                        finite.check_finite(jax.device_get(health), mngr, step)
                        position = {"examples": examples, "skipped": skip_counter.total()}
                        checkpoint.save_checked(mngr, step, state, position, in_flight)
                        in_flight = step
                    if preempted:
                        log.warning(
                            "preempted: stopped after step %d with a checkpoint; rerun the "
                            "same command to resume",
                            step,
                        )
                        break

            train_iter.close()  # stops data.num_workers processes now, not at exit
            profiler.close()
            if not eval_metrics and not preempted:
                # E.g. resumed a finished run: evaluate the state so the caller gets numbers.
                eval_metrics = evaluators.run(evals, state)
            try:
                mngr.wait_until_finished()
            except Exception as e:
                raise checkpoint.save_failed(mngr, in_flight, e) from e
        except BaseException:
            closables = (progress, writer, train_iter, profiler)
            checkpoint.close_after_error(mngr, in_flight, *closables)
            raise
        mngr.close()
        progress.close()
        writer.close()
    if is_main and int(state.step) == config.total_steps:
        # The mark of a finished run (sweeps skip such workdirs), written last.
        with open(os.path.join(workdir, FINAL_METRICS), "w") as f:
            json.dump({"step": config.total_steps, "metrics": eval_metrics}, f, indent=2)
    if preempted:
        raise Preempted(int(state.step))
    return eval_metrics
