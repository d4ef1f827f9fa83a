#!/usr/bin/env bash
# Run a vlmjax command as N cooperating local processes (multi-host on one machine).
#
#   launch/local.sh 2 -- vlmjax train --config experiments/shapes_vit.py --workdir /tmp/run
#
# Process i gets VLMJAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT, VLMJAX_NUM_PROCESSES=N and
# VLMJAX_PROCESS_ID=i; its output goes to stdout prefixed by "[i]". If one process fails,
# the others are stopped and the exit code is the first failure's.
#
# Environment: PORT (default: a free one), VLMJAX_CPU_DEVICES=K simulates K CPU devices per
# process (to try meshes without accelerators), CUDA_VISIBLE_DEVICES is split one GPU per
# process when VLMJAX_GPU_PER_PROCESS=1.
set -euo pipefail

usage() { echo "usage: $0 [N] -- vlmjax <command> [args...]" >&2; exit 2; }
N=1
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then N=$1; shift; fi
[[ "${1:-}" == "--" ]] && shift
[[ $# -gt 0 && $N -ge 1 ]] || usage

if [[ -n "${VLMJAX_CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${VLMJAX_CPU_DEVICES}"
fi
if [[ $N -eq 1 ]]; then exec "$@"; fi

PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
IFS=',' read -r -a GPUS <<< "${CUDA_VISIBLE_DEVICES:-}"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < N; i++)); do
  (
    export VLMJAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT VLMJAX_NUM_PROCESSES=$N VLMJAX_PROCESS_ID=$i
    if [[ "${VLMJAX_GPU_PER_PROCESS:-0}" == 1 && ${#GPUS[@]} -ge $N ]]; then
      export CUDA_VISIBLE_DEVICES=${GPUS[$i]}
    fi
    "$@" 2>&1 | sed -u "s/^/[$i] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=($!)
done

status=0
remaining=$N
while ((remaining > 0)); do
  if wait -n "${pids[@]}"; then :; else
    code=$?
    if ((status == 0)); then status=$code; cleanup; fi
  fi
  remaining=$((remaining - 1))
done
exit $status
