"""transformers' side of the run-level tests (init_from=hf:, preprocessing, vlmjax export).

Standalone (no vlmjax import), run under the parity env like reference.py, whose helpers it
reuses:

    python reference_pipeline.py folder '{"clip": {CLIPConfig fields but the text ids},
        "corpus": [...], "vocab_size": 600, "processor": {"shortest_edge": 36,
        "crop": 32, "mean": [...], "std": [...], "resample": 3}}' OUT

writes OUT/model: a random tiny CLIPModel (random LayerNorms) with a byte-level BPE
tokenizer trained on the corpus and a CLIPImageProcessor, all through
`CLIPProcessor.save_pretrained` (config.json, model.safetensors, tokenizer.json,
preprocessor_config.json, ...), as a published CLIP folder is.

    python reference_pipeline.py embed '{"folder": DIR, "images": [png paths],
        "texts": [...]}' OUT

loads DIR with `CLIPModel.from_pretrained` and its processor (image processor and
tokenizer from DIR's own files), runs the images and texts through them and writes
OUT/io.npz: `image_embeds` [n, E], `text_embeds` [t, E], `logits_per_image` [n, t],
`input_ids` [t, L] (padded to the text tower's length).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from reference import randomise_layer_norms, train_clip_bpe


def _image_processor_class():
    # transformers 5 has a torchvision and a PIL backend; the parity env has no torchvision.
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil


def make_folder(spec: dict, out: str) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    files = os.path.join(out, "tokenizer_files")
    train_clip_bpe(spec["corpus"], spec["vocab_size"], files)
    tokenizer = CLIPTokenizer.from_pretrained(files)
    vocab = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    clip = dict(spec["clip"])
    clip["text_config"] = dict(
        clip["text_config"], vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**clip))
    randomise_layer_norms(model, torch.Generator().manual_seed(123))
    model.eval()
    p = spec["processor"]
    image_processor = _image_processor_class()(
        size={"shortest_edge": p["shortest_edge"]},
        crop_size={"height": p["crop"], "width": p["crop"]},
        image_mean=p["mean"],
        image_std=p["std"],
        resample=p["resample"],
    )
    folder = os.path.join(out, "model")
    model.save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    print(f"folder: CLIP with a {vocab}-token BPE -> {folder}")


def embed(spec: dict, out: str) -> None:
    from PIL import Image
    from transformers import CLIPModel, CLIPTokenizer

    folder = spec["folder"]
    model = CLIPModel.from_pretrained(folder).eval()
    image_processor = _image_processor_class().from_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    images = [Image.open(path).convert("RGB") for path in spec["images"]]
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    length = model.config.text_config.max_position_embeddings
    text = tokenizer(spec["texts"], padding="max_length", max_length=length, return_tensors="pt")
    with torch.no_grad():
        got = model(
            pixel_values=pixels, input_ids=text["input_ids"], attention_mask=text["attention_mask"]
        )
    np.savez(
        os.path.join(out, "io.npz"),
        image_embeds=got.image_embeds.numpy().astype(np.float32),
        text_embeds=got.text_embeds.numpy().astype(np.float32),
        logits_per_image=got.logits_per_image.numpy().astype(np.float32),
        input_ids=text["input_ids"].numpy(),
        pixel_values=pixels.numpy(),
    )
    print(f"embed: {len(images)} images, {len(spec['texts'])} texts -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["folder", "embed"])
    parser.add_argument("spec", help="JSON object")
    parser.add_argument("out", help="output directory")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    (make_folder if args.kind == "folder" else embed)(json.loads(args.spec), args.out)


if __name__ == "__main__":
    main()
