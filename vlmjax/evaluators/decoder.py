"""Evaluators of the Fuyu-style decoder (task 'captioning'), over (prompt, target) pairs of
a split, one example per row:

  * `captioning`: teacher-forced `token_accuracy`, `loss` (mean NLL per target token) and
    `perplexity` (exp of it) of the targets given image and prompt;
  * `vqa`: greedy answers (`vlmjax.generate`, KV cache, at most `max_new_tokens`) compared
    with the targets after VQAv2 normalisation (`answers.py`): `exact_match` (+ `_novel` /
    `_seen` where records carry a `novel` flag), and with `baseline_split` set, the exact
    match of always answering that split's most frequent answer (`majority_baseline`).

Keys: `prompt_key` ("" = an empty prompt, e.g. captions), `target_key`; defaults per source:
`shapes` captions ("", "caption") or questions ("question", "answer"), else the records'
"prompt" and "target". Each process scores its own rows; sums are added over processes.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vlmjax import generate as generate_lib
from vlmjax import losses
from vlmjax import mesh as mesh_lib
from vlmjax.data import fuyu_layout as fl
from vlmjax.data import pipeline
from vlmjax.data import text as text_lib
from vlmjax.evaluators import answers, common
from vlmjax.models import fuyu
from vlmjax.tasks import captioning

CAPTIONING_KEYS = {"prompt_key": None, "target_key": None}
VQA_KEYS = {"prompt_key": None, "target_key": None, "max_new_tokens": 8, "baseline_split": ""}
LENGTH_BUCKET = 16  # rows are padded to a multiple of this, so a split compiles few shapes


def _keys(cfg: dict, data: common.Data, shapes_default: tuple[str, str]) -> tuple[str, str]:
    default = shapes_default if data.cfg.source == "shapes" else ("prompt", "target")
    prompt = default[0] if cfg["prompt_key"] is None else cfg["prompt_key"]
    return prompt, cfg["target_key"] or default[1]


def _global_max(value: int) -> int:
    """The largest `value` over all processes, rounded up to LENGTH_BUCKET: every process
    then builds arrays of one shape and runs the same jitted calls."""
    if jax.process_count() > 1:
        value = int(np.max(multihost_utils.process_allgather(np.int32(value))))
    return -(-value // LENGTH_BUCKET) * LENGTH_BUCKET


class _PairEvaluator:
    """Shared set-up: the split's (image, prompt, target) records, batched by process."""

    def __init__(self, cfg: dict, data: common.Data, task, mesh, shapes_default):
        if not isinstance(task.prepared, captioning.Prepared):
            raise ValueError(f"needs the decoder; task {task.name!r} is not 'captioning'")
        self.data, self.task, self.mesh = data, task, mesh
        self.prompt_key, self.target_key = _keys(cfg, data, shapes_default)
        fields = tuple(f for f in (self.prompt_key, self.target_key) if f)
        self.source = common.open_source(data, required=fields)
        captioning.record_texts(self.source[0], fields)  # the fields exist: fail at build
        self.rows = common.rows_per_process(cfg["batch_size"], mesh)
        self.sharding = mesh_lib.batch_sharding(mesh)

    def record_batches(self):
        """(records, mask [rows]) of this process's share of each global batch."""
        count = common.num_examples(self.source, self.data.max_examples)
        for batch in common.batches(count, lambda i: {}, self.rows):
            yield [self.source[int(i)] for i in batch["index"]], batch["mask"]

    def pair(self, record) -> tuple[list[int], list[int], np.ndarray]:
        """(prompt ids, target ids, image) of one record."""
        tok = self.task.prepared.tokenizer
        prompt = text_lib.as_str(record[self.prompt_key]) if self.prompt_key else ""
        target = text_lib.as_str(record[self.target_key])
        image = captioning.record_image(record, self.data.cfg.image_key)
        return captioning.text_ids(tok, prompt), captioning.text_ids(tok, target), image


class Captioning(_PairEvaluator):
    """`run(state)` -> teacher-forced token accuracy and perplexity (see the module doc)."""

    def __init__(self, cfg: dict, data: common.Data, task, mesh):
        super().__init__(cfg, data, task, mesh, ("", "caption"))
        model = task.model

        def sums(variables, batch):
            logits = model.apply(variables, **fuyu.model_inputs(batch))  # [R, T, V]
            mask = batch["loss_mask"] * batch["mask"][:, None].astype(jnp.float32)  # [R, T]
            nll = losses.token_nll(logits, batch["targets"])  # [R, T]
            correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
            return {"nll": (nll * mask).sum(), "correct": (correct * mask).sum(),
                    "tokens": mask.sum()}  # fmt: skip

        self.sums = jax.jit(sums, out_shardings=mesh_lib.replicated(mesh))

    def run(self, state) -> dict[str, float]:
        spec = self.task.prepared.layout
        variables = common.variables(state)
        totals = collections.Counter()
        for records, mask in self.record_batches():
            seqs = [fl.layout(image, p, t, spec) for p, t, image in map(self.pair, records)]
            length = _global_max(max(len(s["tokens"]) for s in seqs))
            rows = [fl.pack([s], length, 1, spec.tokens.pad) for s in seqs]
            host = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
            host["mask"] = mask
            out = self.sums(variables, pipeline.to_global(host, self.sharding))
            totals.update({k: float(v) for k, v in jax.device_get(out).items()})
        tokens = max(totals["tokens"], 1.0)
        loss = totals["nll"] / tokens
        return {"token_accuracy": totals["correct"] / tokens, "loss": loss,
                "perplexity": float(np.exp(loss))}  # fmt: skip


class VQA(_PairEvaluator):
    """`run(state)` -> VQAv2-normalised exact match of greedy answers (module doc)."""

    def __init__(self, cfg: dict, data: common.Data, task, mesh):
        super().__init__(cfg, data, task, mesh, ("question", "answer"))
        self.max_new_tokens = int(cfg["max_new_tokens"])
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        self.baseline_split = cfg["baseline_split"]
        if self.baseline_split:
            common.open_source(data, self.baseline_split, required=(self.target_key,))

    @functools.cached_property
    def majority_answer(self) -> str:
        """The most frequent normalised answer of `baseline_split` (ties: alphabetical)."""
        source = common.open_source(self.data, self.baseline_split)
        counts = collections.Counter(
            answers.normalise_answer(text_lib.as_str(source[i][self.target_key]))
            for i in range(len(source))
        )
        return min(counts, key=lambda a: (-counts[a], a))

    def run(self, state) -> dict[str, float]:
        tok, spec = self.task.prepared.tokenizer, self.task.prepared.layout
        variables = common.variables(state)
        sums = collections.Counter()
        for records, mask in self.record_batches():
            examples, targets = [], []
            for record in records:
                prompt, _, image = self.pair(record)
                examples.append({"image": image, "prompt": prompt})
                targets.append(text_lib.as_str(record[self.target_key]))
            prompts = [fl.layout(e["image"], e["prompt"], None, spec) for e in examples]
            host = fl.prompt_batch(examples, spec, length=_global_max(max(
                len(p["tokens"]) for p in prompts)))  # fmt: skip
            generated = generate_lib.generate(
                self.task.model,
                variables,
                pipeline.to_global(host, self.sharding),
                max_new_tokens=self.max_new_tokens,
                eos_id=spec.tokens.eos,
                pad_id=spec.tokens.pad,
            )
            rows = generate_lib.trim(common.local_rows(generated, self.mesh), spec.tokens.eos)
            for row, target, record, real in zip(rows, targets, records, mask, strict=True):
                if not real:
                    continue
                said = tok.decode([t for t in row if t < tok.vocab_size])
                hit = answers.normalise_answer(said) == answers.normalise_answer(target)
                novel = bool(int(record.get("novel", 0)))
                sums["count"] += 1
                sums["correct"] += hit
                sums["novel_count"] += novel
                sums["novel_correct"] += hit and novel
                if self.baseline_split:
                    sums["baseline"] += answers.normalise_answer(target) == self.majority_answer
        sums = common.sum_over_processes(
            {
                k: float(sums[k])
                for k in ("count", "correct", "novel_count", "novel_correct", "baseline")
            }  # fmt: skip
        )
        count = max(sums["count"], 1.0)
        metrics = {"exact_match": sums["correct"] / count, "count": sums["count"]}
        if sums["novel_count"]:
            metrics["exact_match_novel"] = sums["novel_correct"] / sums["novel_count"]
            seen = sums["count"] - sums["novel_count"]
            if seen:
                metrics["exact_match_seen"] = (sums["correct"] - sums["novel_correct"]) / seen
        if self.baseline_split:
            metrics["majority_baseline"] = sums["baseline"] / count
        return metrics
