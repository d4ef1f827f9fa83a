"""`vlmjax bench data`: input-pipeline throughput (host batches, no device transfer).

    vlmjax bench data --config X.py[:arg] [--num_workers 0 2] [--batches 100]
    vlmjax bench data --wds DIR [--make_shards 8] [--num_workers 0 1 2] [--batches 30]

The second form reads WebDataset shards as CLIP ViT-B/16 trains on LAION-style data
(experiments/clip_vit_b16.py: 224-pixel random-resized crop, 77-token captions) through the
contrastive task's own pipeline. `--make_shards N` first writes N shards of 256x256 JPEGs
(`shapes` scenes with their captions, img2dataset's layout: `{key}.jpg`, `{key}.txt`,
`{key}.json`) into DIR, and a byte-level BPE `tokenizer.json` trained on the captions with
the `tokenizers` library (CLIP's split and `</w>` suffix), unless `--tokenizer` names one;
later runs reuse them. It reports img/s, img/s per decoding process, the speed-up over one
worker, and the index's bytes per record (on disk and in this process's memory).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

import ml_collections

from vlmjax import config as config_lib
from vlmjax import tasks
from vlmjax.bench.common import markdown_table
from vlmjax.data import shapes, sources, webdataset, workers

WDS_IMAGE_SIZE = 256  # the shards' JPEGs, as img2dataset's --image_size 256 writes them
CLIP_SPLIT = (  # transformers' CLIP pre-tokenizer split (vlmjax/data/bpe.py, step 3)
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def bench_data(
    config: ml_collections.ConfigDict, batches: int = 100, warmup: int = 2
) -> dict[str, Any]:
    """Examples per second of the task's `train_dataset(0, 1)` (host batches only, no device
    transfer), over `batches` batches after `warmup`, with `config.data.num_workers` worker
    processes (-1: the automatic count). Measure many: the first `data.prefetch` batches
    may already sit in grain's read-ahead buffer, and with workers `warmup` should cover
    each worker's first batch.

    Returns examples_per_sec, workers (resolved), per_worker (img/s per decoding process:
    the trainer's own with 0 workers), cores (available to this process), per_core,
    start_s (building the pipeline and its first batch: worker start-up), shapes."""
    sources.prepare(config.data)
    num_workers = workers.resolve(config.data.num_workers, config.data.source)
    start = time.perf_counter()
    it = iter(tasks.build(config).train_dataset(0, 1, 0))
    next(it)
    start_s = time.perf_counter() - start
    try:
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
        seconds = time.perf_counter() - start
    finally:
        it.close()
    cores = workers.available_cores()
    rate = batches * config.batch_size / seconds
    return dict(
        examples_per_sec=rate,
        workers=num_workers,
        per_worker=rate / max(1, num_workers),
        cores=cores,
        per_core=rate / cores,
        start_s=start_s,
        shapes={k: tuple(v.shape) for k, v in batch.items()},
    )


def data_table(config: ml_collections.ConfigDict, results: Sequence[dict[str, Any]]) -> str:
    """The markdown table of `bench_data` results (one row per worker count)."""
    headers = ["task", "batch", "data.num_workers", "img/s", "img/s per worker", "cores"]
    headers += ["img/s per core", "start s", "data.num_threads"]
    rows = []
    for r in results:
        row = [config.task, config.batch_size, r["workers"], f"{r['examples_per_sec']:.0f}"]
        row += [f"{r['per_worker']:.0f}", r["cores"], f"{r['per_core']:.0f}"]
        rows.append(row + [f"{r['start_s']:.1f}", config.data.num_threads])
    return markdown_table(headers, rows)


def bench_workers(
    config: ml_collections.ConfigDict,
    num_workers: Sequence[int],
    batches: int,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """`bench_data` at each worker count (the config's own when `num_workers` is empty);
    prints the table and the speed-up from 1 worker to 2 when both ran."""
    results = []
    for n in num_workers or [config.data.num_workers]:
        config_lib.override(config, "data.num_workers", str(n))
        # Each worker's first batch is start-up, not throughput.
        results.append(bench_data(config, batches, warmup=max(warmup, 2 * n)))
    print(data_table(config, results))
    by = {r["workers"]: r["examples_per_sec"] for r in results}
    if 1 in by and 2 in by:
        print(f"workers 1 -> 2: {by[2] / by[1]:.2f}x")
    return results


# --- WebDataset shards -------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    folder: str, num_shards: int, per_shard: int, image_size: int = WDS_IMAGE_SIZE
) -> str:
    """Writes `num_shards` tar shards of `per_shard` samples each into `folder` in
    img2dataset's layout (`{key}.jpg` at JPEG quality 95, `{key}.txt`, `{key}.json`), from
    `shapes` train scenes rendered at `image_size`; shards already there are kept. Returns
    the brace pattern of the shards."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for shard in range(num_shards):
        path = os.path.join(folder, f"{shard:05d}.tar")
        if os.path.exists(path):
            continue
        tmp = f"{path}.tmp.{os.getpid()}"
        with tarfile.open(tmp, "w") as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"  # img2dataset's keys: shard, then position
                example = shapes.split_example("train", shard * per_shard + i, image_size)
                buf = io.BytesIO()
                Image.fromarray(example["image"]).save(buf, "JPEG", quality=95)
                _add(tar, f"{key}.jpg", buf.getvalue())
                _add(tar, f"{key}.txt", example["caption"].encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
        os.replace(tmp, path)  # a reader never sees half a shard
    return os.path.join(folder, "{" + f"{0:05d}..{num_shards - 1:05d}" + "}.tar")


def shard_captions(paths: Sequence[str]) -> list[str]:
    """The `.txt` members of the tar files `paths`, in order (no image is decoded)."""
    captions = []
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    captions.append(tar.extractfile(member).read().decode("utf-8", "replace"))
    return captions


def train_clip_tokenizer(captions: Sequence[str], path: str, vocab_size: int = 1000) -> str:
    """A CLIP-style byte-level BPE (NFC, lower case, CLIP's split, `</w>` word ends,
    `<|startoftext|>` ... `<|endoftext|>`) trained on `captions`, saved as `path`."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    start, end = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        special_tokens=[start, end],
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer)
    ids = (tok.token_to_id(end), tok.token_to_id(start))
    tok.post_processor = processors.RobertaProcessing((end, ids[0]), (start, ids[1]))
    tok.save(path)
    return path


def index_bytes_per_record(pattern: str) -> tuple[int, float]:
    """(bytes per record of a tar source's index on disk, bytes per record it holds in this
    process's memory once open), for the shards of `pattern` (indexes already built)."""
    tracemalloc.start()
    try:
        source = webdataset.TarSource(pattern)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return webdataset.RECORD.itemsize, held / len(source)


def wds_config(
    pattern: str, tokenizer: str, batch_size: int, num_threads: int
) -> ml_collections.ConfigDict:
    """experiments/clip_vit_b16.py reading the tar shards of `pattern` with `tokenizer`."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = config_lib.load(os.path.join(root, "experiments", "clip_vit_b16.py"))
    overrides = {
        "data.source": f"{webdataset.PREFIX}{pattern}",
        "data.tokenizer": tokenizer,
        "batch_size": str(batch_size),
        "data.num_threads": str(num_threads),
    }
    for key, value in overrides.items():
        config_lib.override(config, key, value)
    # The text tower's vocabulary and special ids follow the tokenizer (CLIP's are OpenAI's).
    text_cfg = {k: v for k, v in config.model.text.to_dict().items()}
    for key in ("vocab_size", "eos_id", "pad_id"):
        text_cfg.pop(key, None)
    with config.unlocked():
        config.model.text = ml_collections.ConfigDict(text_cfg)
    return config


def bench_wds(
    folder: str,
    *,
    make_shards: int = 0,
    per_shard: int = 256,
    tokenizer: str = "",
    num_workers: Sequence[int] = (0, 1, 2),
    batch_size: int = 64,
    num_threads: int = 1,
    batches: int = 30,
) -> dict[str, Any]:
    """The WebDataset benchmark of the module doc on the shards in `folder` (written first
    when `make_shards` > 0). Returns {"results": bench_data's per worker count,
    "index_bytes_on_disk", "index_bytes_in_memory" (per record), "pattern" (the shards as a
    comma list)}."""
    if make_shards:
        write_shards(folder, make_shards, per_shard)
    shards = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {folder}; write some with --make_shards N")
    pattern = ",".join(shards)  # a comma list (file_index.expand)
    if not tokenizer:
        tokenizer = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(tokenizer):
            train_clip_tokenizer(shard_captions(shards), tokenizer)
    config = wds_config(pattern, tokenizer, batch_size, num_threads)
    print(
        f"{len(shards)} WebDataset shards in {folder}, CLIP ViT-B/16's input: "
        f"{config.data.image_size}px {config.data.augment}, {tokenizer}\n"
    )
    results = bench_workers(config, num_workers, batches)
    on_disk, in_memory = index_bytes_per_record(pattern)
    print(f"index: {on_disk} bytes per record on disk, {in_memory:.2f} in memory per process")
    return dict(
        results=results,
        index_bytes_on_disk=on_disk,
        index_bytes_in_memory=in_memory,
        pattern=pattern,
    )
