"""Multi-process start-up: one `jax.distributed.initialize` call, chosen from the environment.

In order of precedence:
1. explicit: `--coordinator_address/--num_processes/--process_id` flags, or the env vars
   VLMJAX_COORDINATOR_ADDRESS / VLMJAX_NUM_PROCESSES / VLMJAX_PROCESS_ID (launch/local.sh
   and launch/jobset.yaml set these);
2. SLURM: a job step with more than one task (srun). The process count is
   SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), the process id SLURM_PROCID, the coordinator the
   first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) on a port derived from
   SLURM_JOB_ID, as JAX's own detection picks it; JAX then gives task SLURM_LOCALID the
   GPU of that number on its node;
3. Cloud TPU VM pods: more than one worker host; JAX reads the TPU metadata itself;
4. otherwise a single process, and nothing is initialised.

If one process dies, JAX's coordination service ends the others once its heartbeats stop,
after VLMJAX_HEARTBEAT_TIMEOUT seconds (default 100, JAX's), rather than leaving them hung
in a collective.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping

import jax

from vlmjax import mesh as mesh_lib

log = logging.getLogger("vlmjax")

ENV_ADDRESS = "VLMJAX_COORDINATOR_ADDRESS"
ENV_NUM = "VLMJAX_NUM_PROCESSES"
ENV_ID = "VLMJAX_PROCESS_ID"
ENV_HEARTBEAT = "VLMJAX_HEARTBEAT_TIMEOUT"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins the run."""

    kind: str  # "single" | "explicit" | "slurm" | "tpu"
    num_processes: int = 1
    process_id: int = 0
    coordinator_address: str | None = None
    # Where the identity came from, for messages: "SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=1, ..."
    source: str = dataclasses.field(default="", compare=False)


# Pick the coordinator port as JAX's own SLURM detection does: one per job id, in the
# ephemeral range, so every task of a job agrees on it without talking first.
def slurm_port(job_id: int) -> int:
    return job_id % 2**12 + (65535 - 2**12 + 1)


_HOSTLIST_ITEM = re.compile(r"([^,\[\]]+)(?:\[([^\[\]]*)\]([^,\[\]]*))?(?:,|$)")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def hosts(nodelist: str, variable: str = "SLURM_STEP_NODELIST") -> list[str]:
    """The hosts of a SLURM node list: "gpu[003-004,9],cpu1" -> [gpu003, gpu004, gpu9, cpu1].

    Covers one bracket per name with zero-padded ranges (what Slurm prints for a job);
    anything else is a ValueError that names `variable`.
    """
    text, names, pos = nodelist.strip(), [], 0
    while pos < len(text):
        match = _HOSTLIST_ITEM.match(text, pos)
        if not match or match.end() == pos:
            raise ValueError(
                f"cannot parse {variable}={nodelist!r} at character {pos}: expected a "
                "comma-separated list like 'node1,gpu[003-005,9]' (see `scontrol show hostnames`)"
            )
        prefix, ranges, suffix = match.groups()
        pos = match.end()
        if ranges is None:
            names.append(prefix)
            continue
        for part in ranges.split(","):
            bounds = _RANGE.fullmatch(part)
            if not bounds:
                raise ValueError(
                    f"cannot parse {variable}={nodelist!r}: {part!r} in [{ranges}] is not a "
                    "number or a range like 003-005"
                )
            low, high = bounds[1], bounds[2] or bounds[1]
            if int(high) < int(low):
                raise ValueError(f"cannot parse {variable}={nodelist!r}: range {part!r} is empty")
            names += [f"{prefix}{i:0{len(low)}d}{suffix}" for i in range(int(low), int(high) + 1)]
    if not names:
        raise ValueError(f"{variable}={nodelist!r} names no host")
    return names


def first_host(nodelist: str, variable: str = "SLURM_STEP_NODELIST") -> str:
    """First host of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
    return hosts(nodelist, variable)[0]


def _slurm_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None


def _slurm(env: Mapping[str, str]) -> Cluster | None:
    """The job step's cluster (srun started more than one task), else None."""
    tasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env or tasks_var not in env:
        return None
    tasks = _slurm_int(env, tasks_var)
    if tasks <= 1:  # e.g. `salloc` then plain python, or `srun -n1`: one process
        return None
    process_id = _slurm_int(env, "SLURM_PROCID")
    if not 0 <= process_id < tasks:
        raise ValueError(f"SLURM_PROCID={process_id} must be in [0, {tasks_var}={tasks})")
    nodes_var = "SLURM_STEP_NODELIST" if "SLURM_STEP_NODELIST" in env else "SLURM_JOB_NODELIST"
    if nodes_var not in env:
        raise ValueError(
            f"{tasks_var}={tasks} but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is "
            "set: start the processes with srun, or pass --coordinator_address"
        )
    names = hosts(env[nodes_var], nodes_var)
    num_nodes = env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES"))
    if num_nodes is not None and num_nodes.isdigit() and int(num_nodes) != len(names):
        raise ValueError(
            f"{nodes_var}={env[nodes_var]!r} lists {len(names)} hosts but "
            f"SLURM_STEP_NUM_NODES/SLURM_NNODES={num_nodes}"
        )
    port = slurm_port(_slurm_int(env, "SLURM_JOB_ID"))
    source = (
        f"{tasks_var}={tasks}, SLURM_PROCID={process_id}, {nodes_var}={env[nodes_var]}, "
        f"SLURM_JOB_ID={env['SLURM_JOB_ID']}"
    )
    return Cluster("slurm", tasks, process_id, f"{names[0]}:{port}", source)


def detect(
    env: Mapping[str, str] | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Cluster:
    """Works out the cluster from flags (first) and environment variables; pure.

    Settings it cannot use (a SLURM node list it cannot parse, a process id out of range)
    are a ValueError naming the flag or variable, before anything starts.
    """
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
        flags = "--coordinator_address" if coordinator_address else ENV_ADDRESS
        flags += ", --num_processes" if num_processes is not None else f", {ENV_NUM}"
        return Cluster("explicit", num, pid, address, flags)
    if slurm := _slurm(env):
        return slurm
    hosts_ = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts_) > 1:
        worker = int(env.get("TPU_WORKER_ID", "0"))
        return Cluster("tpu", len(hosts_), worker, hosts_[0], "TPU_WORKER_HOSTNAMES")
    return Cluster("single")


def check_mesh(
    cluster: Cluster, data: int, fsdp: int, tensor: int, local_devices: int
) -> tuple[int, int, int]:
    """The mesh shape for `cluster` x `local_devices` each; a MeshError naming both the
    config keys and where the process count came from when they do not fit."""
    total = cluster.num_processes * local_devices
    try:
        return mesh_lib.mesh_shape(data, fsdp, tensor, total)
    except mesh_lib.MeshError as e:
        hint = ""
        if cluster.kind == "slurm":
            hint = " (srun's tasks: sbatch --nodes x --ntasks-per-node)"
        raise mesh_lib.MeshError(
            f"{e}. Devices: {cluster.num_processes} processes ({cluster.source or 'one process'})"
            f"{hint} x {local_devices} local devices each = {total}"
        ) from None


def initialize(cluster: Cluster) -> None:
    """Joins the run described by `cluster` (a no-op for a single process).

    Must run before anything touches a JAX backend (device lists, arrays, jit).
    """
    if cluster.kind == "single":
        return
    log.info(
        "joining %s run as process %d of %d (coordinator %s; from %s)",
        cluster.kind,
        cluster.process_id,
        cluster.num_processes,
        cluster.coordinator_address or "auto",
        cluster.source or "the environment",
    )
    # A process that dies is noticed by the coordination service when its heartbeats stop;
    # it then ends every other process (instead of leaving them hung in a collective).
    timeouts = {"heartbeat_timeout_seconds": heartbeat_timeout()}
    if cluster.kind in ("explicit", "slurm"):
        # Under SLURM, JAX still picks the local GPU (local_device_ids) from SLURM_LOCALID.
        jax.distributed.initialize(
            cluster.coordinator_address, cluster.num_processes, cluster.process_id, **timeouts
        )
    else:  # JAX's cluster detection covers TPU VMs, local device ids included.
        jax.distributed.initialize(**timeouts)


def heartbeat_timeout(env: Mapping[str, str] = os.environ) -> int:
    """Seconds without a heartbeat after which a process counts as dead:
    VLMJAX_HEARTBEAT_TIMEOUT, default JAX's 100."""
    text = env.get(ENV_HEARTBEAT, "100")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{ENV_HEARTBEAT}={text!r} must be a whole number of seconds >= 1")
    return value
