"""Cluster detection from flags and environment variables (fake environments, no processes)."""

import pytest

from vlmjax import distributed, mesh


def test_single_process_by_default():
    assert distributed.detect({}) == distributed.Cluster("single")


def test_explicit_flags_and_env_vars():
    env = {
        "VLMJAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "VLMJAX_NUM_PROCESSES": "4",
        "VLMJAX_PROCESS_ID": "3",
    }
    assert distributed.detect(env) == distributed.Cluster("explicit", 4, 3, "10.0.0.1:1234")
    # Flags win over the environment.
    flags = distributed.detect(env, "h:1", 2, 0)
    assert flags == distributed.Cluster("explicit", 2, 0, "h:1")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"VLMJAX_NUM_PROCESSES": "2"}, "need all three"),
        (
            {
                "VLMJAX_COORDINATOR_ADDRESS": "h:1",
                "VLMJAX_NUM_PROCESSES": "2",
                "VLMJAX_PROCESS_ID": "2",
            },
            r"must be in \[0, num_processes=2\)",
        ),
        (
            {
                "VLMJAX_COORDINATOR_ADDRESS": "host",
                "VLMJAX_NUM_PROCESSES": "2",
                "VLMJAX_PROCESS_ID": "0",
            },
            "host:port",
        ),
    ],
)
def test_incomplete_or_bad_explicit_settings_are_errors(env, message):
    with pytest.raises(ValueError, match=message):
        distributed.detect(env)


def test_slurm_job_step():
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_NODELIST": "gpu[003-004,010]",
        "SLURM_STEP_NUM_NODES": "3",
    }
    # JAX's own choice of port for the job (jax/_src/clusters/slurm_cluster.py).
    port = 4242 % 2**12 + (65535 - 2**12 + 1)
    cluster = distributed.detect(env)
    assert cluster == distributed.Cluster("slurm", 8, 5, f"gpu003:{port}")
    assert "SLURM_STEP_NUM_TASKS=8" in cluster.source and "SLURM_PROCID=5" in cluster.source
    # Without a step (the batch shell of an sbatch job): the job's variables.
    job = {"SLURM_JOB_ID": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    job["SLURM_JOB_NODELIST"] = "n1,n2"
    assert distributed.detect(job) == distributed.Cluster("slurm", 2, 1, f"n1:{1 + 61440}")
    # An allocation with one task (e.g. `salloc` then plain python) is a single process.
    assert (
        distributed.detect({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).kind
        == "single"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"SLURM_STEP_NODELIST": "gpu[003"}, r"cannot parse SLURM_STEP_NODELIST='gpu\[003'"),
        ({"SLURM_STEP_NODELIST": "gpu[a-b]"}, r"SLURM_STEP_NODELIST=.*'a-b' in \[a-b\]"),
        ({"SLURM_STEP_NODELIST": "n1", "SLURM_STEP_NUM_NODES": "2"}, "lists 1 hosts but"),
        ({"SLURM_PROCID": "2"}, r"SLURM_PROCID=2 must be in \[0, SLURM_STEP_NUM_TASKS=2\)"),
        ({"SLURM_STEP_NUM_TASKS": "two"}, "SLURM_STEP_NUM_TASKS='two' is not an integer"),
        ({"SLURM_STEP_NODELIST": None}, "neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST"),
    ],
)
def test_slurm_settings_vlmjax_cannot_use_name_the_variable(change, message):
    env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    env["SLURM_STEP_NODELIST"] = "gpu[001-002]"
    env.update(change)
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        distributed.detect(env)


def test_mesh_that_does_not_fit_the_tasks_names_both():
    env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "3"}
    cluster = distributed.detect({**env, "SLURM_STEP_NODELIST": "n[1-3]"})
    assert distributed.check_mesh(cluster, -1, 2, 1, local_devices=4) == (6, 2, 1)
    with pytest.raises(mesh.MeshError, match=r"mesh.data=8.*needs 8 devices but 12") as error:
        distributed.check_mesh(cluster, 8, 1, 1, local_devices=4)
    assert "3 processes (SLURM_STEP_NUM_TASKS=3" in str(error.value)
    assert "--ntasks-per-node" in str(error.value)


def test_tpu_pod_workers():
    env = {"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1,t-w-2,t-w-3", "TPU_WORKER_ID": "2"}
    assert distributed.detect(env) == distributed.Cluster("tpu", 4, 2, "t-w-0")
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost"}).kind == "single"


@pytest.mark.parametrize(
    "nodelist, first",
    [("node1", "node1"), ("a[07-09]", "a07"), ("b[3,5-6],c1", "b3"), ("x1,x2", "x1")],
)
def test_first_host_of_slurm_node_lists(nodelist, first):
    assert distributed.first_host(nodelist) == first


def test_slurm_node_lists_expand_like_scontrol_show_hostnames():
    expanded = distributed.hosts("gpu[008-010,2],cpu1,a[1-2]-ib")
    assert expanded == ["gpu008", "gpu009", "gpu010", "gpu2", "cpu1", "a1-ib", "a2-ib"]
