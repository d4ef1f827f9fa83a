#!/usr/bin/env bash
# Downloads into .whl/ (ignored through .git/info/exclude) the wheels that benchmarks/gpu.sh
# installs on the GPU machine: open_clip_torch 3.3.0 with ftfy and wcwidth, and what vlmjax
# imports beyond that machine's image (ml_collections, tensorflow-datasets, grain and their
# import-time needs). ~13 MiB. Run once, here, from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python=${PYTHON:-python3}
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
  ml_collections==1.1.0 tensorflow-datasets==4.9.10 grain==0.2.18 array_record==0.8.6 \
  dm-tree==0.1.10 immutabledict==4.3.1 portpicker==1.6.0 toml==0.10.2 termcolor==3.3.0 \
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 simple-parsing==0.1.9 \
  docstring-parser==0.18.0
# promise (imported by tensorflow-datasets) is published as a source archive only.
"$python" -m pip wheel --no-deps -w .whl promise==2.3
ls .whl
