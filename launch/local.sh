#!/usr/bin/env bash
# Run a vlmjax command in one local process.
#
#   launch/local.sh -- vlmjax train --config experiments/shapes_vit.py --workdir /tmp/run
#
# VLMJAX_CPU_DEVICES=N simulates N devices on the CPU (to try mesh shapes without
# accelerators). Multi-process launches arrive with the multi-host work.
set -euo pipefail
if [ "${1:-}" = "--" ]; then shift; fi
if [ $# -eq 0 ]; then
  echo "usage: $0 -- vlmjax <command> [args...]" >&2
  exit 2
fi
if [ -n "${VLMJAX_CPU_DEVICES:-}" ]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${VLMJAX_CPU_DEVICES}"
fi
exec "$@"
