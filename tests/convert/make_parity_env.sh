#!/usr/bin/env bash
# Build the "parity" environment that produces PyTorch/transformers reference outputs for the
# converter tests (tests/convert/). PyPI's Linux torch is a multi-GB CUDA build, so we install
# the CPU wheel kept on disk, which exists for Python 3.11 only; the main env stays on 3.12.
#
#   VLMJAX_PARITY_PYTHON=$(tests/convert/make_parity_env.sh /tmp/parity)  # stdout: DIR/bin/python
#   export VLMJAX_PARITY_PYTHON
#
# Rerunning on an existing DIR reuses it (pip then has nothing to do).
set -euo pipefail

DIR="${1:?usage: make_parity_env.sh DIR}"
WHEEL="${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
# Pinned: transformers renames weights and config fields between releases (ViT in 5.9, Fuyu
# in 5.16), and the converters are checked against this exact version.
TRANSFORMERS=transformers==5.24.0

if [ ! -f "$WHEEL" ]; then
  echo "make_parity_env.sh: torch CPU wheel not found at $WHEEL (set TORCH_WHEEL)" >&2
  exit 1
fi
PY311=""
for candidate in python3.11 "$(ls -d /root/.pyenv/versions/3.11*/bin/python3.11 2>/dev/null | tail -1)"; do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    PY311="$candidate"; break
  fi
done
if [ -z "$PY311" ]; then
  echo "make_parity_env.sh: no Python 3.11 found (the torch wheel is cp311)" >&2
  exit 1
fi

# Only the python path goes to stdout, so `VAR=$(make_parity_env.sh DIR)` captures it.
"$PY311" -m venv "$DIR" >&2
DIR="$(cd "$DIR" && pwd)"  # absolute, so the printed path works from any directory
# One resolver run, so pip never swaps the CPU wheel for a CUDA torch from PyPI.
"$DIR/bin/python" -m pip install -q --disable-pip-version-check \
  "$WHEEL" "$TRANSFORMERS" "numpy>=2" "safetensors>=0.4" pillow >&2
"$DIR/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' >&2
echo "$DIR/bin/python"
