"""Cluster detection from flags and environment variables (fake environments, no processes)."""

import pytest

from vlmjax import distributed


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
    }
    assert distributed.detect(env) == distributed.Cluster("slurm", 8, 5, "gpu003")
    # An allocation with one task (e.g. `salloc` then plain python) is a single process.
    assert (
        distributed.detect({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).kind
        == "single"
    )


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
