"""open_clip's ViT-B-16 training step on random data: the baseline that
`vlmjax bench train --config experiments/clip_vit_b16.py:bench` is compared with
(benchmarks/gpu.sh). Needs torch, open_clip_torch 3.3.0 and a CUDA GPU (`--device cpu` only
checks that the script runs).

One step as open_clip's trainer takes it with `--precision amp_bf16`: forward of both towers
under bfloat16 autocast (float32 parameters), `ClipLoss`, backward, fused AdamW (betas 0.9,
0.98, eps 1e-6, weight decay 0.2, open_clip's LAION recipe). `--compile` wraps the model in
`torch.compile` as the trainer's `--torchcompile` does. Images [B, 3, 224, 224] float32 and
tokens [B, 77] int64 are made once on the GPU, as the JAX benchmark's synthetic batch is.

    python benchmarks/open_clip_step.py --batch_size 256 512 [--compile] [--steps 20] \
        [--json out.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import open_clip
import torch


def bench(
    batch_size: int, steps: int, warmup: int, compile_model: bool, device: torch.device
) -> dict:
    """Times `steps` training steps after `warmup` (which include torch.compile's compile)."""
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    model = open_clip.create_model("ViT-B-16", pretrained=None, output_dict=True, device=device)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, fused=True
    )
    loss_fn = open_clip.ClipLoss()
    step_model = torch.compile(model, dynamic=False) if compile_model else model
    images = torch.randn(batch_size, 3, 224, 224, device=device)
    tokens = torch.randint(0, 49408, (batch_size, 77), device=device)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(**step_model(images, tokens))
        loss.backward()
        optimizer.step()
        return loss

    def wait() -> None:  # kernels run asynchronously: stop the clock when they are done
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    wait()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    wait()
    step_s = (time.perf_counter() - start) / steps
    return dict(
        batch=batch_size,
        compiled=compile_model,
        steps=steps,
        warmup_s=warmup_s,
        step_s=step_s,
        examples_per_sec=batch_size / step_s,
        peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        loss=loss.detach().item(),
        device_kind=torch.cuda.get_device_name() if cuda else device.type,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    # As open_clip's trainer (open_clip_train/main.py) sets them.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    report = dict(torch=torch.__version__, open_clip=open_clip.__version__, results=[])
    for batch_size in args.batch_size:
        torch._dynamo.reset()
        try:
            r = bench(batch_size, args.steps, args.warmup, args.compile, torch.device(args.device))
        except torch.OutOfMemoryError as e:
            r = dict(batch=batch_size, compiled=args.compile, error=str(e).splitlines()[0])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        report["results"].append(r)
        print(json.dumps(r), flush=True)
        if args.json:  # after each batch size, so a time limit keeps what finished
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
