"""Reference outputs from transformers, for the converter parity tests.

Standalone (no vlmjax import): runs under any Python with torch, transformers and numpy,
normally the parity env of make_parity_env.sh. It builds a small randomly initialised HF
model, saves it with save_pretrained and runs one eval-mode forward pass:

    python reference.py resnet '{"embedding_size": 8, "hidden_sizes": [8, 16],
        "depths": [1, 2], "layer_type": "basic", "num_labels": 5}' OUT

writes OUT/model/{config.json,model.safetensors} and OUT/io.npz with `pixel_values_nchw`
[b, 3, H, W], `pixel_values_nhwc` [b, H, W, 3] and `outputs` (logits [b, classes], or the
pooled features [b, c] with "head": false).

    python reference.py clip '{"projection_dim": 16, "vision_config": {...},
        "text_config": {...}}' OUT --texts 3

does the same for a CLIPModel; io.npz then also has `input_ids` [t, max_position_embeddings]
(random ids, EOS at a different place in each row, pad after it) and the outputs
`image_embeds` [b, E], `text_embeds` [t, E] and `logits_per_image` [b, t]. `siglip` does
the same for a SiglipModel (random ids; logits include logit_bias), `vit` for a
ViTForImageClassification (`outputs`: logits) or, with "class": "ViTModel" in the spec, a
ViTModel (`outputs`: pooler_output, or the class token without a pooler).

    python reference.py load '{"folders": [{"dir": D, "class": "CLIPModel"}, ...]}' -

loads the folders our exporters wrote (D/model) with transformers' from_pretrained, runs
each on D/inputs.npz and writes D/outputs.npz and D/loading_info.json (see run_loaded).

    python reference.py tokenizer '{"corpus": [...], "vocab_size": 600, "texts": [...],
        "context_length": 16}' OUT

trains a CLIP-style byte-level BPE on the corpus with the tokenizers library, writes it as
CLIP ships it (OUT/files/{vocab.json,merges.txt}), loads it with transformers'
CLIPTokenizer, saves that (OUT/saved/, with tokenizer.json) and writes OUT/tokens.json:
the ids of every text from each way of loading, and their decodes.

    python reference.py fuyu '{"config": {FuyuConfig fields}, "canvas": [16, 24],
        "images": [[h, w], ...], "prompts": ["w1 w2", ...], "num_words": 20,
        "max_new_tokens": 6, "dtype": "float32"}' OUT

builds a FuyuForCausalLM (random LayerNorms; saved in bfloat16 with "dtype": "bfloat16"),
lays out random uint8 images of the given sizes and the prompts (words of a toy vocabulary)
with FuyuProcessor, and writes per example i `image_i`, `input_ids_i`, `pixel_values_i`,
`logits_i` [L_i, vocab] and `generated_i` (greedy, up to max_new_tokens). FuyuProcessor
needs Pillow; without it the same layout is built here (`processor` says which) and images
larger than the canvas, which only the processor can resize, are left out.
"""

from __future__ import annotations

import argparse
import copy
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


def randomise_layer_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random scales and biases in every LayerNorm: fresh ones are the identity, under which
    a norm mapped to the wrong place (pre- vs post-encoder) would still match."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)


def build_resnet(spec: dict) -> torch.nn.Module:
    """ResNetForImageClassification, or a bare ResNetModel with "head": false in the spec."""
    from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

    spec = dict(spec)
    head = spec.pop("head", True)
    config = ResNetConfig(**spec)
    return ResNetForImageClassification(config) if head else ResNetModel(config)


def run_resnet(model: torch.nn.Module, pixel_values: torch.Tensor, args) -> dict:
    """[b, 3, H, W] -> {"outputs": logits [b, classes] or pooled features [b, c]}."""
    out = model(pixel_values=pixel_values)
    if hasattr(out, "logits"):
        return {"outputs": out.logits}
    return {"outputs": out.pooler_output.flatten(1)}  # [b, c, 1, 1] -> [b, c]


def build_clip(spec: dict) -> torch.nn.Module:
    """CLIPModel from CLIPConfig fields; its LayerNorms get random scales and biases."""
    from transformers import CLIPConfig, CLIPModel

    model = CLIPModel(CLIPConfig(**spec))
    randomise_layer_norms(model, torch.Generator().manual_seed(123))
    return model


def clip_input_ids(config, batch: int, generator: torch.Generator) -> torch.Tensor:
    """[t, max_position_embeddings] ids: random tokens, one EOS, then pad_token_id.

    The EOS position differs per row. With a legacy eos_token_id=2, transformers pools at the
    argmax of the ids, so the end token is then the largest id (vocab_size - 1); otherwise it
    is eos_token_id, with larger ids among the random tokens, so that pooling at the argmax,
    or at the last non-pad token when pad = EOS, would pick another position.
    """
    text = config.text_config
    length = text.max_position_embeddings
    legacy = text.eos_token_id == 2
    end = text.vocab_size - 1 if legacy else text.eos_token_id
    ids = torch.randint(3, end if legacy else text.vocab_size, (batch, length), generator=generator)
    ids[ids == end] = end + 1  # only the planted end token has its id (not legacy: end < max)
    for row in range(batch):
        position = (length - 1) - (row * 5) % length  # the last position, then earlier ones
        ids[row, position] = end
        ids[row, position + 1 :] = text.pad_token_id
    return ids


def run_clip(model: torch.nn.Module, pixel_values: torch.Tensor, args) -> dict:
    generator = torch.Generator().manual_seed(args.seed + 2)
    input_ids = clip_input_ids(model.config, args.texts, generator)
    out = model(pixel_values=pixel_values, input_ids=input_ids)
    return {
        "input_ids": input_ids,
        "image_embeds": out.image_embeds,
        "text_embeds": out.text_embeds,
        "logits_per_image": out.logits_per_image,
    }


def build_siglip(spec: dict) -> torch.nn.Module:
    """SiglipModel from SiglipConfig fields; its LayerNorms get random scales and biases."""
    from transformers import SiglipConfig, SiglipModel

    model = SiglipModel(SiglipConfig(**spec))
    generator = torch.Generator().manual_seed(123)
    randomise_layer_norms(model, generator)
    with torch.no_grad():  # HF initialises the bias to 0, under which a dropped bias matches
        model.logit_scale.fill_(2.0 + float(torch.rand((), generator=generator)))
        model.logit_bias.fill_(-3.0 + float(torch.rand((), generator=generator)))
    return model


def run_siglip(model: torch.nn.Module, pixel_values: torch.Tensor, args) -> dict:
    """Random ids [t, max_position_embeddings] (SigLIP pools the last position); the
    embeddings and logits_per_image = exp(logit_scale) * cos + logit_bias."""
    text = model.config.text_config
    generator = torch.Generator().manual_seed(args.seed + 2)
    shape = (args.texts, text.max_position_embeddings)
    input_ids = torch.randint(0, text.vocab_size, shape, generator=generator)
    return siglip_outputs(model, pixel_values, input_ids)


def siglip_outputs(model, pixel_values, input_ids) -> dict:
    out = model(pixel_values=pixel_values, input_ids=input_ids)
    return {
        "input_ids": input_ids,
        "image_embeds": out.image_embeds,
        "text_embeds": out.text_embeds,
        "logits_per_image": out.logits_per_image,
    }


def build_vit(spec: dict) -> torch.nn.Module:
    """ViTForImageClassification, or with "class": "ViTModel" a bare ViTModel (with
    "pooler": false, without its pooler); LayerNorms randomised."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    spec = dict(spec)
    cls = spec.pop("class", "ViTForImageClassification")
    pooler = spec.pop("pooler", True)
    config = ViTConfig(**spec)
    if cls == "ViTModel":
        model = ViTModel(config, add_pooling_layer=pooler)
    else:
        model = ViTForImageClassification(config)
    randomise_layer_norms(model, torch.Generator().manual_seed(123))
    return model


def run_vit(model: torch.nn.Module, pixel_values: torch.Tensor, args) -> dict:
    """{"outputs": logits [b, classes], or a ViTModel's pooler_output [b, d] (its class
    token after the final norm without a pooler), "cls_hidden": that class token}."""
    out = model(pixel_values=pixel_values)
    if hasattr(out, "logits"):
        return {"outputs": out.logits}
    hidden = out.last_hidden_state[:, 0]
    pooled = out.pooler_output if out.pooler_output is not None else hidden
    return {"outputs": pooled, "cls_hidden": hidden}


# kind -> (builder from a JSON spec, forward pass on NCHW images -> named outputs)
KINDS = {
    "resnet": (build_resnet, run_resnet),
    "clip": (build_clip, run_clip),
    "siglip": (build_siglip, run_siglip),
    "vit": (build_vit, run_vit),
}


def run_loaded(spec: dict) -> None:
    """Loads each exported folder with transformers and runs it on the folder's inputs.

    spec: {"folders": [{"dir": D, "class": "CLIPModel"}, ...]}. D/model is the folder
    `from_pretrained` reads, D/inputs.npz holds `pixel_values_nchw` and/or `input_ids`
    (Fuyu: `input_ids` [1, L] and `pixel_values` [patches, p*p*3]). Writes
    D/outputs.npz and D/loading_info.json (missing / unexpected / mismatched keys).
    """
    import transformers

    for entry in spec["folders"]:
        folder = entry["dir"]
        cls = getattr(transformers, entry["class"])
        model, info = cls.from_pretrained(os.path.join(folder, "model"), output_loading_info=True)
        model.eval()
        inputs = dict(np.load(os.path.join(folder, "inputs.npz")))
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        with torch.no_grad():
            if entry["class"] in ("CLIPModel", "SiglipModel"):
                out = model(
                    pixel_values=tensors["pixel_values_nchw"], input_ids=tensors["input_ids"]
                )
                outputs = {
                    "image_embeds": out.image_embeds,
                    "text_embeds": out.text_embeds,
                    "logits_per_image": out.logits_per_image,
                }
            elif entry["class"] == "FuyuForCausalLM":
                out = model(input_ids=tensors["input_ids"], pixel_values=tensors["pixel_values"])
                outputs = {"logits": out.logits}
            else:
                out = model(pixel_values=tensors["pixel_values_nchw"])
                if hasattr(out, "logits"):
                    outputs = {"logits": out.logits}
                else:
                    outputs = {"pooler_output": out.pooler_output.flatten(1)}
        arrays = {k: v.numpy().astype(np.float32) for k, v in outputs.items()}
        np.savez(os.path.join(folder, "outputs.npz"), **arrays)
        loading = {k: sorted(map(str, v)) for k, v in info.items()}
        with open(os.path.join(folder, "loading_info.json"), "w") as f:
            json.dump(loading, f)
    if "fuyu_processor" in spec:  # {"folder", "images", "prompts", "out"}
        exported_fuyu_processor(**spec["fuyu_processor"])
    print(f"load: {len(spec['folders'])} folders")


# The pre-tokenizer split of transformers' CLIPTokenizer (training must split words the same).
CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def train_clip_bpe(corpus: list[str], vocab_size: int, folder: str) -> None:
    """A byte-level BPE trained on `corpus`, written as CLIP ships its files.

    vocab.json in OpenAI's order (the 256 byte symbols, the same with `</w>`, one id per
    merge, then <|startoftext|> and <|endoftext|>), so the ids also follow from merges.txt
    alone, as OpenAI's bpe_simple_vocab format needs.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges]

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    symbols = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(symbols)) == len(symbols), "merge results repeat a symbol"
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({s: i for i, s in enumerate(symbols)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def run_tokenizer(spec: dict, out: str) -> None:
    """Writes OUT/tokens.json: {"ids": {loader: [[...]]}, "decoded": {loader: [...]}}."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    files, saved = os.path.join(out, "files"), os.path.join(out, "saved")
    train_clip_bpe(spec["corpus"], spec["vocab_size"], files)
    texts, length = spec["texts"], spec["context_length"]
    kwargs = dict(padding="max_length", truncation=True, max_length=length)

    loaded = {
        "CLIPTokenizer(vocab.json, merges.txt)": CLIPTokenizer.from_pretrained(files),
        "CLIPTokenizerFast(vocab.json, merges.txt)": CLIPTokenizerFast.from_pretrained(files),
    }
    loaded["CLIPTokenizer(vocab.json, merges.txt)"].save_pretrained(saved)
    for name in ("vocab.json", "merges.txt"):  # (5.24 writes neither) so tokenizer.json is read
        if os.path.exists(os.path.join(saved, name)):
            os.remove(os.path.join(saved, name))
    loaded["CLIPTokenizer(tokenizer.json)"] = CLIPTokenizer.from_pretrained(saved)
    ids, decoded = {}, {}
    for name, tok in loaded.items():
        ids[name] = tok(texts, **kwargs)["input_ids"]
        decoded[name] = [tok.decode(row, skip_special_tokens=True) for row in ids[name]]
    # The tokenizers library alone, from the saved tokenizer.json: no padding or truncation
    # set there, so compare its ids before padding.
    raw = Tokenizer.from_file(os.path.join(saved, "tokenizer.json"))
    ids["tokenizers.Tokenizer(tokenizer.json), unpadded"] = [e.ids for e in raw.encode_batch(texts)]
    special = {
        "pad_token_id": loaded["CLIPTokenizer(tokenizer.json)"].pad_token_id,
        "bos_token_id": loaded["CLIPTokenizer(tokenizer.json)"].bos_token_id,
        "eos_token_id": loaded["CLIPTokenizer(tokenizer.json)"].eos_token_id,
    }
    with open(os.path.join(out, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump(dict(ids=ids, decoded=decoded, **special), f, ensure_ascii=False)
    print(f"tokenizer: {len(texts)} texts x {len(ids)} loaders -> {out}")


# The toy vocabulary of the Fuyu reference: ids 0-6 are the special tokens, then words.
FUYU_SPECIAL = ["<unk>", "<s>", "</s>", "<0x04>", "|SPEAKER|", "|NEWLINE|", "\u2581"]


def fuyu_tokenizer(num_words: int):
    """A word-level stand-in for Fuyu's SentencePiece tokenizer ("w0".."w{n-1}" are words).

    It reproduces what FuyuProcessor relies on: "\u2581" before the first word or
    placeholder (the processor drops the first id of the image placeholders), |SPEAKER| and
    |NEWLINE| in the vocabulary, and <s>, <0x04> as special tokens.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = FUYU_SPECIAL + [f"\u2581w{i}" for i in range(num_words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    pattern = Regex("\\|SPEAKER\\||\\|NEWLINE\\||\u2581[^\u2581|]*")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern, behavior="isolated")
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>", "<0x04>")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def fuyu_image_processor(**settings):
    """transformers' FuyuImageProcessorPil (the PIL backend: the default one needs
    torchvision) with `settings`, e.g. a preprocessor_config.json's fields."""
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    class ImageProcessor(FuyuImageProcessorPil):
        # transformers 5.24: FuyuProcessor hands this backend torch tensors, which its numpy
        # patchify_image cannot transpose; the same reshapes on a numpy copy.
        def patchify_image(self, image, patch_size=None):
            return torch.from_numpy(super().patchify_image(np.asarray(image), patch_size))

    return ImageProcessor(**settings)


def fuyu_processor_inputs(images, prompts, canvas, patch_size, num_words):
    """FuyuProcessor (PIL image backend) on the images and prompts: (input_ids [b, L]
    left-padded, attention_mask [b, L], pixel_values [patches of all images, p*p*3])."""
    from transformers import FuyuProcessor

    size = {"height": canvas[0], "width": canvas[1]}
    patch = {"height": patch_size, "width": patch_size}
    processor = FuyuProcessor(
        image_processor=fuyu_image_processor(size=size, patch_size=patch),
        tokenizer=fuyu_tokenizer(num_words),
    )
    out = processor(images=images, text=prompts, return_legacy_image_output=False)
    return out["input_ids"], out["attention_mask"], out["pixel_values"]


def exported_fuyu_processor(folder: str, images: list[str], prompts: list[str], out: str):
    """FuyuProcessor from an exported folder's tokenizer files and preprocessor_config.json
    on PNG files and prompts -> OUT/processor.npz (input_ids_i, pixel_values_i unpadded)."""
    from PIL import Image
    from transformers import AutoTokenizer, FuyuProcessor

    with open(os.path.join(folder, "preprocessor_config.json")) as f:
        settings = json.load(f)
    assert settings.pop("image_processor_type") == "FuyuImageProcessor", settings
    assert settings.pop("processor_class") == "FuyuProcessor", settings
    processor = FuyuProcessor(
        image_processor=fuyu_image_processor(**settings),
        tokenizer=AutoTokenizer.from_pretrained(folder),
    )
    arrays = {}
    for i, (path, prompt) in enumerate(zip(images, prompts, strict=True)):
        image = np.asarray(Image.open(path).convert("RGB"))
        got = processor(images=[image], text=[prompt], return_legacy_image_output=False)
        arrays[f"input_ids_{i}"] = got["input_ids"][0].numpy()
        arrays[f"pixel_values_{i}"] = got["pixel_values"].numpy()
    np.savez(os.path.join(out, "processor.npz"), **arrays)


def fuyu_manual_inputs(images, prompts, canvas, patch_size):
    """What FuyuProcessor makes of images within the canvas, without PIL (which the
    processor needs): pad with raw 1s, normalise, patchify by unfold, place the tokens."""
    rows_ids, patches = [], []
    for image, prompt in zip(images, prompts, strict=True):
        h, w = image.shape[:2]
        assert h <= canvas[0] and w <= canvas[1], "resizing needs PIL"
        x = torch.from_numpy(image).permute(2, 0, 1).double()  # [3, h, w]
        x = torch.nn.functional.pad(x, (0, canvas[1] - w, 0, canvas[0] - h), value=1.0)
        x = ((x * (1 / 255)).float() - 0.5) / 0.5
        ph, pw = -(-h // patch_size) * patch_size, -(-w // patch_size) * patch_size
        x = x[None, :, :ph, :pw]
        x = x.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)
        x = x.contiguous().view(1, 3, -1, patch_size, patch_size).permute(0, 2, 3, 4, 1)
        patches.append(x.reshape(-1, 3 * patch_size * patch_size))
        rows, cols = ph // patch_size, pw // patch_size
        words = [len(FUYU_SPECIAL) + int(word[1:]) for word in prompt.split()]  # "w7" -> 14
        ids = ([4] * cols + [5]) * rows + [1] + words + [3]  # |SPEAKER| |NEWLINE| <s> <0x04>
        rows_ids.append(ids)
    length = max(map(len, rows_ids))
    input_ids = torch.tensor([[0] * (length - len(r)) + r for r in rows_ids])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows_ids])
    return input_ids, attention_mask, torch.cat(patches)


def run_fuyu(spec: dict, out: str, seed: int) -> None:
    """A small random FuyuForCausalLM, its inputs from FuyuProcessor (or without PIL, the
    same layout built here), per-example logits and greedy generations -> OUT."""
    from transformers import FuyuConfig, FuyuForCausalLM

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    model = FuyuForCausalLM(FuyuConfig(**spec["config"]))
    randomise_layer_norms(model, generator)
    saved = model
    if spec.get("dtype", "float32") == "bfloat16":
        # Saved as BF16; the reference runs on the same (rounded) weights in float32. A copy
        # is cast, not the model: .to() would also round the rotary inv_freq buffer.
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(torch.bfloat16).to(torch.float32))
        saved = copy.deepcopy(model).to(torch.bfloat16)
    saved.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    # The folder's tokenizer too, as a Fuyu folder has it (init_from=hf: reads it).
    fuyu_tokenizer(spec["num_words"]).save_pretrained(os.path.join(out, "model"))
    model.eval()

    canvas, patch_size = spec["canvas"], model.config.patch_size
    rng = np.random.default_rng(seed + 2)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in spec["images"]]
    prompts = spec["prompts"]
    try:
        import PIL  # noqa: F401

        processor = "transformers"
        input_ids, attention_mask, pixel_values = fuyu_processor_inputs(
            images, prompts, canvas, patch_size, spec["num_words"]
        )
    except ImportError:
        processor = "manual"
        keep = [
            i for i, x in enumerate(images) if x.shape[0] <= canvas[0] and x.shape[1] <= canvas[1]
        ]
        images, prompts = [images[i] for i in keep], [prompts[i] for i in keep]
        input_ids, attention_mask, pixel_values = fuyu_manual_inputs(
            images, prompts, canvas, patch_size
        )

    arrays = {}
    start = 0
    for i, image in enumerate(images):
        ids = input_ids[i][attention_mask[i].bool()][None]  # [1, L_i] without the padding
        n = int((ids == model.config.image_token_id).sum())
        patches = pixel_values[start : start + n]  # [n, p*p*3]
        start += n
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=patches).logits[0]
            generated = model.generate(
                input_ids=ids,
                pixel_values=patches,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=spec["max_new_tokens"],
                do_sample=False,
                eos_token_id=model.config.text_config.eos_token_id,
                pad_token_id=0,
            )[0, ids.shape[1] :]
        arrays.update(
            {
                f"image_{i}": image,
                f"input_ids_{i}": ids[0].numpy(),
                f"pixel_values_{i}": patches.numpy(),
                f"logits_{i}": logits.numpy().astype(np.float32),
                f"generated_{i}": generated.numpy(),
            }
        )
    np.savez(
        os.path.join(out, "io.npz"),
        processor=np.array(processor),
        prompts=np.array(prompts),
        **arrays,
    )
    print(f"fuyu: {len(images)} examples ({processor} processor) -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted([*KINDS, "tokenizer", "fuyu", "load"]))
    parser.add_argument("spec", help="JSON object of HF config fields")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--texts", type=int, default=3, help="clip: rows of input_ids")
    args = parser.parse_args()

    if args.kind == "tokenizer":
        run_tokenizer(json.loads(args.spec), args.out)
        return
    if args.kind == "fuyu":
        run_fuyu(json.loads(args.spec), args.out, args.seed)
        return
    if args.kind == "load":
        run_loaded(json.loads(args.spec))
        return

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
        outputs = {k: v.numpy() for k, v in run(model, pixel_values, args).items()}
    outputs = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in outputs.items()}
    np.savez(
        os.path.join(args.out, "io.npz"),
        pixel_values_nchw=pixel_values.numpy(),
        pixel_values_nhwc=pixel_values.permute(0, 2, 3, 1).numpy(),
        **outputs,
    )
    shapes = {k: tuple(v.shape) for k, v in outputs.items()}
    print(f"{args.kind}: outputs {shapes} -> {args.out}")


if __name__ == "__main__":
    main()
