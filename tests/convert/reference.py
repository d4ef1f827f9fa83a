"""Reference outputs from transformers, for the converter parity tests.

Standalone (no vlmjax import): runs under any Python with torch, transformers and numpy,
normally the parity env of make_parity_env.sh. It builds a small randomly initialised HF
model, saves it with save_pretrained and runs one eval-mode forward pass:

    python reference.py resnet '{"embedding_size": 8, "hidden_sizes": [8, 16],
        "depths": [1, 2], "layer_type": "basic", "num_labels": 5}' OUT

writes OUT/model/{config.json,model.safetensors} and OUT/io.npz with `pixel_values_nchw`
[b, 3, H, W], `pixel_values_nhwc` [b, H, W, 3] and `outputs` (logits [b, classes], or the
pooled features [b, c] with "head": false).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def randomise_batch_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random affine params and running statistics in every BatchNorm.

    Freshly built ones are the identity (scale 1, bias 0, mean 0, var 1), under which a
    swapped mean/var or scale/bias would still match. Values stay O(1) so activations
    neither vanish nor blow up through the depth.
    """

    def uniform(like: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(like.shape, generator=generator)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(uniform(module.weight, 0.5, 1.5))
                module.bias.copy_(uniform(module.bias, -0.5, 0.5))
                module.running_mean.copy_(uniform(module.running_mean, -0.5, 0.5))
                module.running_var.copy_(uniform(module.running_var, 0.5, 2.0))
                module.num_batches_tracked.fill_(7)


def build_resnet(spec: dict) -> torch.nn.Module:
    """ResNetForImageClassification, or a bare ResNetModel with "head": false in the spec."""
    from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

    spec = dict(spec)
    head = spec.pop("head", True)
    config = ResNetConfig(**spec)
    return ResNetForImageClassification(config) if head else ResNetModel(config)


def run_resnet(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """[b, 3, H, W] -> logits [b, classes] or pooled features [b, c]."""
    out = model(pixel_values=pixel_values)
    if hasattr(out, "logits"):
        return out.logits
    return out.pooler_output.flatten(1)  # [b, c, 1, 1] -> [b, c]


# kind -> (builder from a JSON spec, forward pass on NCHW images)
KINDS = {"resnet": (build_resnet, run_resnet)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("spec", help="JSON object of HF config fields")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()

    build, run = KINDS[args.kind]
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    model = build(json.loads(args.spec))
    randomise_batch_norms(model, generator)
    model.eval()
    model.save_pretrained(os.path.join(args.out, "model"), safe_serialization=True)

    channels = getattr(model.config, "num_channels", 3)
    shape = (args.batch, channels, args.image_size, args.image_size)
    pixel_values = torch.randn(shape, generator=generator)  # [b, c, H, W]
    with torch.no_grad():
        outputs = run(model, pixel_values)
    np.savez(
        os.path.join(args.out, "io.npz"),
        pixel_values_nchw=pixel_values.numpy(),
        pixel_values_nhwc=pixel_values.permute(0, 2, 3, 1).numpy(),
        outputs=outputs.numpy().astype(np.float32),
    )
    print(f"{args.kind}: outputs {tuple(outputs.shape)} -> {args.out}")


if __name__ == "__main__":
    main()
