#!/usr/bin/env bash
# The GPU benchmark (benchmarks/README.md gives the exact `run` call): vlmjax's CLIP ViT-B/16
# train step against open_clip 3.3.0's (eager and torch.compile) at batch 256 and 512, then
# one comparison table. One call of under 8 minutes on an H100; each run has its own time
# limit, and every result is written as soon as it exists, so a slow run loses only itself.
#
# Writes into $OUT (else /tmp/vlmjax_bench): gpu.txt, jax.json/.log, open_clip_eager.json/.log,
# open_clip_compiled.json/.log, table.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/vlmjax_bench}
mkdir -p "$out"

# Packages the GPU machine lacks travel as wheels in .whl/ (benchmarks/fetch_wheels.sh).
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX preallocates 75% of the GPU by default; batch 512 needs more (each run is its own process).
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"

# OpenAI's BPE merges ship inside open_clip: the same tokenizer for both sides, no download.
bpe=$(python3 -c "import open_clip, os; print(os.path.join(os.path.dirname(open_clip.__file__), 'bpe_simple_vocab_16e6.txt.gz'))")

timeout 260 python3 -m vlmjax.cli bench train --config experiments/clip_vit_b16.py:bench \
  --batch_size 256 512 --steps 20 --measure_peak --json "$out/jax.json" \
  --config.data.tokenizer="$bpe" 2>&1 | tee "$out/jax.log"
timeout 45 python3 benchmarks/open_clip_step.py --batch_size 256 512 \
  --json "$out/open_clip_eager.json" 2>&1 | tee "$out/open_clip_eager.log"
timeout 150 python3 benchmarks/open_clip_step.py --compile --batch_size 256 512 \
  --json "$out/open_clip_compiled.json" 2>&1 | tee "$out/open_clip_compiled.log"

python3 benchmarks/compare.py "$out/jax.json" "$out/open_clip_eager.json" \
  "$out/open_clip_compiled.json" | tee "$out/table.md"
