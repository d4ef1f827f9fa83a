#!/usr/bin/env bash
# Run a vlmjax command on every host of a Cloud TPU VM slice (a pod slice has several).
#
#   launch/tpu_pod.sh [--dry_run] [--no_sync] TPU_NAME ZONE -- vlmjax train \
#       --config experiments/shapes_vit.py --workdir /shared/runs/vit
#
# 1. sync (skipped with --no_sync): packs this checkout (tracked and untracked files that
#    git does not ignore, uncommitted edits included), copies it to ~/vlmjax on every worker
#    and installs it there, with jax[tpu], into ~/vlmjax/.venv (created on first use with
#    $VLMJAX_TPU_PYTHON, default python3.12: vlmjax needs Python 3.12, which older TPU VM
#    images lack; install one or point VLMJAX_TPU_PYTHON at it).
# 2. runs the command in ~/vlmjax with that venv on all workers at once (--worker=all).
#    Each host starts one process; JAX reads the slice's hosts from the TPU metadata (see
#    vlmjax/distributed.py), so the command is the same on every host.
#
# The workdir must be storage all hosts share (every host writes its shards of each
# checkpoint; see launch/README.md on gs://). Rerunning the command resumes from the latest.
# gcloud uses its configured project; set CLOUDSDK_CORE_PROJECT to pick another.
# The command ends when this ssh session does: run this script under tmux or nohup for
# long runs. --dry_run prints the commands instead of running them.
set -euo pipefail

usage() {  # the comment above; to stderr unless asked for
  local text
  text=$(sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//')
  if [[ "${1:-2}" == 0 ]]; then echo "$text"; else echo "$text" >&2; fi
  exit "${1:-2}"
}

quote() {  # shell-quotes each argument, leaving plain words bare: a 'b c' 'it'\''s'
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

DRY_RUN=0
SYNC=1
while [[ $# -gt 0 && "$1" == -* && "$1" != "--" ]]; do
  case "$1" in
    --dry_run) DRY_RUN=1 ;;
    --no_sync) SYNC=0 ;;
    -h | --help) usage 0 ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 3 && "$3" == "--" ]] || usage
TPU_NAME=$1 ZONE=$2
shift 3
[[ $# -gt 0 ]] || usage

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${VLMJAX_TPU_PYTHON:-python3.12}
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --worker=all)

run() {  # prints the command on --dry_run, else runs it
  if ((DRY_RUN)); then quote "$@"; else "$@"; fi
}

if ((SYNC)); then
  TARBALL=${TMPDIR:-/tmp}/vlmjax-$TPU_NAME.tgz
  if ((DRY_RUN)); then
    echo "# pack $REPO (git ls-files --cached --others --exclude-standard) into $TARBALL"
  else
    trap 'rm -f "$TARBALL"' EXIT
    # Files that exist: `ls-files --cached` also lists tracked files deleted in the checkout.
    git -C "$REPO" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do [[ -e "$REPO/$f" ]] && printf '%s\0' "$f"; done |
      tar -C "$REPO" --null -T - -czf "$TARBALL"
  fi
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU_NAME:vlmjax.tgz" "${WHERE[@]}"
  # Replace everything but the venv, so files deleted here disappear there too.
  setup="mkdir -p ~/vlmjax && find ~/vlmjax -mindepth 1 -maxdepth 1 ! -name .venv"
  setup+=" -exec rm -rf {} + && tar -xzf ~/vlmjax.tgz -C ~/vlmjax && cd ~/vlmjax"
  setup+=" && { [ -x .venv/bin/python ] || $PYTHON -m venv .venv; }"
  setup+=" && .venv/bin/pip install -q -e . 'jax[tpu]'"
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command="$setup"
fi

run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" \
  --command="cd ~/vlmjax && . .venv/bin/activate && $(quote "$@")"
