"""`vlmjax eval` on kept checkpoints and `init_from` partial restores."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from vlmjax import checkpoint, cli, tasks, train
from vlmjax import mesh as mesh_lib

SHORT = {"total_steps": 4, "eval_every": 0, "log_every": 2, "checkpoint_every": 2}
SHORT["optimizer.warmup_steps"] = 1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    from vlmjax import config as config_lib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_lib.load(os.path.join(root, "experiments", "shapes_vit.py") + ":tiny")
    config_lib.override(config, "data.data_dir", data_dir)
    for key, value in SHORT.items():
        config_lib.override(config, key, str(value))
    workdir = str(tmp_path_factory.mktemp("restore") / "run")
    return workdir, train.train(config, workdir)


def test_eval_command_reproduces_final_metrics_and_reads_any_kept_step(finished_run, capsys):
    workdir, metrics = finished_run
    assert cli.main(["eval", "--workdir", workdir]) == 0
    assert capsys.readouterr().out.startswith("step 4: eval/heldout/accuracy=")
    with open(os.path.join(workdir, "eval_4.json")) as f:
        assert json.load(f)["metrics"] == pytest.approx(metrics, abs=1e-6)
    # Another kept step, on another mesh than the run's.
    assert cli.main(["eval", "--workdir", workdir, "--step", "2", "--config.mesh.fsdp=4"]) == 0
    assert os.path.exists(os.path.join(workdir, "eval_2.json"))
    assert cli.main(["eval", "--workdir", workdir, "--step", "3"]) == 2
    assert "kept steps: [2, 4]" in capsys.readouterr().err


def _fresh(config):
    mesh = mesh_lib.make_mesh(-1, 1, 1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        run = train.setup(config, tasks.build(config), mesh)
        return run, run.init_fn(jax.random.PRNGKey(config.seed + 1))


def test_init_from_takes_only_the_selected_subtree(finished_run, tiny_config):
    workdir, _ = finished_run
    config = tiny_config({"init_from": workdir, "init_from_params": "encoder/.*"})
    run, fresh = _fresh(config)
    state = train._init_from(config, run, fresh)
    mngr = checkpoint.manager(workdir)
    saved = checkpoint.restore(mngr, checkpoint.abstract(run.abstract, run.shardings))
    mngr.close()
    flat = lambda tree: traverse_util.flatten_dict(jax.device_get(tree), sep="/")  # noqa: E731
    got, want, before = flat(state.params), flat(saved.params), flat(fresh.params)
    for key in got:
        if key.startswith("encoder/"):
            np.testing.assert_array_equal(got[key], want[key])
        else:  # head, patch embedding, position table: the new run's own init
            np.testing.assert_array_equal(got[key], before[key])
    assert int(state.step) == 0  # a new run, not a resume


def test_init_from_mismatch_is_a_clear_error(finished_run, tiny_config):
    workdir, _ = finished_run
    config = tiny_config({"init_from": workdir, "model.width": 32, "model.num_heads": 2})
    run, fresh = _fresh(config)
    with pytest.raises(checkpoint.CheckpointError, match="do not match"):
        train._init_from(config, run, fresh)
    config = tiny_config({"init_from": workdir, "init_from_params": "text_tower/.*"})
    run, fresh = _fresh(config)
    with pytest.raises(checkpoint.CheckpointError, match="matches no parameter"):
        train._init_from(config, run, fresh)
