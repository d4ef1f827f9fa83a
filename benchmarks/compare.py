"""One markdown table from the JSON files of `vlmjax bench train --json` and
`benchmarks/open_clip_step.py --json` (benchmarks/gpu.sh writes them).

Every row gets the same analytic FLOPs per image-text pair (vlmjax/flops.py, CLIP ViT-B/16
at the row's batch), so TFLOP/s and MFU compare the implementations, not their counters.

    python benchmarks/compare.py OUT/jax.json OUT/open_clip_eager.json OUT/open_clip_compiled.json
"""

from __future__ import annotations

import json
import os
import sys

from vlmjax import flops, mfu


def rows_of(path: str) -> list[tuple[str, dict]]:
    """(implementation name, result) for each result in a JSON file; [] if it is missing."""
    if not os.path.exists(path):
        print(f"{path}: missing (that run failed; see its log)", file=sys.stderr)
        return []
    with open(path) as f:
        report = json.load(f)
    if "open_clip" in report:
        name = f"open_clip {report['open_clip']} (torch {report['torch']}"
        return [
            (f"{name}, {'compiled' if r['compiled'] else 'eager'})", r) for r in report["results"]
        ]
    return [(f"vlmjax (jax {report['jax']})", r) for r in report["results"]]


def main(paths: list[str]) -> None:
    headers = ["implementation", "batch", "img/s", "step ms", "TFLOP/s", "MFU", "peak GiB"]
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    kinds = set()
    config = flops.clip_b16_reference()
    for path in paths:
        for name, r in rows_of(path):
            if "error" in r:
                lines.append(f"| {name} | {r['batch']} | failed: {r['error'][:60]} |")
                continue
            kinds.add(r["device_kind"])
            with config.unlocked():
                config.batch_size = r["batch"]
            summary = mfu.train_flops_summary(
                flops.per_example(config),
                r["examples_per_sec"],
                r.get("devices", 1),
                r["device_kind"],
            )
            utilisation = summary.get("train/mfu")
            mem = r.get("peak_memory_bytes")
            cells = [name, r["batch"], f"{r['examples_per_sec']:.0f}", f"{1e3 * r['step_s']:.1f}"]
            cells += [f"{summary['train/tflops_per_device']:.0f}"]
            cells += ["n/a" if utilisation is None else f"{100 * utilisation:.1f}%"]
            cells += ["n/a" if mem is None else f"{mem / 2**30:.1f}"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"CLIP ViT-B/16 training step, random data, on {', '.join(sorted(kinds)) or '?'}")
    print(
        f"({flops.per_example(flops.clip_b16_reference()) / 1e9:.2f} GFLOP per pair at batch 256)"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
