"""Throughput as a fraction of the hardware: achieved TFLOP/s per device and MFU.

The train loop gets a task's analytic FLOPs per example (`vlmjax/flops.py`, computed by the
task) and its measured examples per second; this module turns them into the logged
`train/tflops_per_device` and `train/mfu`. It knows no model.
"""

from __future__ import annotations

# Datasheet dense (no sparsity) bf16 tensor throughput in TFLOP/s, keyed by
# `jax.devices()[0].device_kind`. GPU kinds are the CUDA device names (what nvidia-smi and
# torch.cuda.get_device_name print; the lent H200 reports "NVIDIA H200"). TPU kinds as jax
# reports them: Pallas's chip table maps "TPU v5 lite" to v5e, "TPU v5" to v5p and
# "TPU v6 lite" to v6e; the marketing names are kept as aliases.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H200": 989.0,  # H200 SXM (the lent kind reports this name)
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,  # v5p reports "TPU v5"
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "TPU v6e": 918.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak TFLOP/s of one device of `device_kind`, or None when unknown."""
    return PEAK_BF16_TFLOPS.get(device_kind)


def train_flops_summary(
    flops_per_example: float,
    examples_per_sec: float,
    num_devices: int,
    device_kind: str,
    measured_peak_tflops: float | None = None,
) -> dict[str, float]:
    """Throughput metrics for the train loop's log, e.g. with
    `flops_per_example = task.flops_per_example` once and
    `examples_per_sec = metrics["train/examples_per_sec"]` at each log step:

    {"train/tflops_per_device": achieved TFLOP/s per device,
     "train/mfu": that / the device's datasheet bf16 peak (absent for unknown devices),
     "train/mfu_measured": that / `measured_peak_tflops` (when given)}.
    """
    tflops = flops_per_example * examples_per_sec / num_devices / 1e12
    out = {"train/tflops_per_device": tflops}
    peak = peak_tflops(device_kind)
    if peak:
        out["train/mfu"] = tflops / peak
    if measured_peak_tflops:
        out["train/mfu_measured"] = tflops / measured_peak_tflops
    return out
