"""Multi-process start-up: one `jax.distributed.initialize` call, chosen from the environment.

In order of precedence:
1. explicit: `--coordinator_address/--num_processes/--process_id` flags, or the env vars
   VLMJAX_COORDINATOR_ADDRESS / VLMJAX_NUM_PROCESSES / VLMJAX_PROCESS_ID (launch/local.sh
   and launch/jobset.yaml set these);
2. SLURM: a job step with more than one task (srun); JAX's own SLURM detection then finds
   the coordinator (first node of the step), the process id and the local GPU;
3. Cloud TPU VM pods: more than one worker host; JAX reads the TPU metadata itself;
4. otherwise a single process, and nothing is initialised.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping

import jax

log = logging.getLogger("vlmjax")

ENV_ADDRESS = "VLMJAX_COORDINATOR_ADDRESS"
ENV_NUM = "VLMJAX_NUM_PROCESSES"
ENV_ID = "VLMJAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins the run."""

    kind: str  # "single" | "explicit" | "slurm" | "tpu"
    num_processes: int = 1
    process_id: int = 0
    coordinator_address: str | None = None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def detect(
    env: Mapping[str, str] | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Cluster:
    """Works out the cluster from flags (first) and environment variables; pure."""
    env = os.environ if env is None else env
    address = coordinator_address or env.get(ENV_ADDRESS)
    num = num_processes if num_processes is not None else env.get(ENV_NUM)
    pid = process_id if process_id is not None else env.get(ENV_ID)
    if address or num is not None or pid is not None:
        if not (address and num is not None and pid is not None):
            raise ValueError(
                "multi-process runs need all three of --coordinator_address, --num_processes "
                f"and --process_id (or {ENV_ADDRESS}, {ENV_NUM}, {ENV_ID}); got "
                f"address={address!r}, num_processes={num!r}, process_id={pid!r}"
            )
        num, pid = int(num), int(pid)
        if not 0 <= pid < num:
            raise ValueError(f"process_id={pid} must be in [0, num_processes={num})")
        if ":" not in address:
            raise ValueError(f"coordinator address {address!r} must be host:port")
        return Cluster("explicit", num, pid, address)
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and tasks > 1:
        nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", ""))
        host = first_host(nodes) if nodes else None
        return Cluster("slurm", tasks, int(env["SLURM_PROCID"]), host)
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return Cluster("tpu", len(hosts), int(env.get("TPU_WORKER_ID", "0")), hosts[0])
    return Cluster("single")


def initialize(cluster: Cluster) -> None:
    """Joins the run described by `cluster` (a no-op for a single process).

    Must run before anything touches a JAX backend (device lists, arrays, jit).
    """
    if cluster.kind == "single":
        return
    log.info(
        "joining %s run as process %d of %d (coordinator %s)",
        cluster.kind,
        cluster.process_id,
        cluster.num_processes,
        cluster.coordinator_address or "auto",
    )
    if cluster.kind == "explicit":
        jax.distributed.initialize(
            cluster.coordinator_address, cluster.num_processes, cluster.process_id
        )
    else:  # JAX's cluster detection covers SLURM and TPU VMs, local device ids included.
        jax.distributed.initialize()
