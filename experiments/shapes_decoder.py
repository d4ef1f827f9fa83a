r"""A Fuyu-style decoder that captions and answers questions about `shapes` scenes.

32x32 scenes of one or two coloured shapes. Each training example is, by its own rng, a
caption (empty prompt; 30%) or the scene's question with its answer ("what colour is the
circle?" -> "red"). The 8x8-pixel patches (4 x 4 per image, plus a newline token per row)
are projected straight into a small decoder (width 128, depth 4), followed by the text; the
loss is next-token prediction on the target text. 64 examples per step are packed, two to a
row, into 34 rows of 64 tokens. Evaluation on the held-out split, where half the scenes
show (kind, colour) pairs never seen in training:

  eval/vqa/exact_match         the greedy answer equals the held-out answer after VQAv2
                               normalisation (+ _novel, _seen), against
  eval/vqa/majority_baseline   always answering the most frequent train answer;
  eval/caption/token_accuracy, eval/caption/perplexity   teacher-forced, on the captions.

    vlmjax train --config experiments/shapes_decoder.py --workdir /tmp/decoder
    vlmjax generate --workdir /tmp/decoder --image picture.png --prompt "what colour is the circle?"

Measured (BENCHMARKS.md; 2-core CPU, no other jobs): 9 min 13 s including building the
data; vqa_accuracy 0.68 (novel pairs 0.57, seen 0.79) against 0.0875 for always giving the
most frequent train answer ("one"), 0.33 for the most frequent answer of each question
type; caption token accuracy 0.84, perplexity 1.65. Colour, size and count questions are
mostly right; shape kinds are the hard part (0.44-0.48). `:tiny` (300 steps, about a
minute) is the tests' variant: > 0.4 VQA accuracy.
"""

from vlmjax import defaults

VARIANTS = ("tiny",)


def get_config(arg=None):
    c = defaults.base_config()
    c.task = "captioning"
    c.batch_size = 64  # examples per step (packed into data.pack_rows rows)
    c.eval_batch_size = 500
    c.total_steps = 2500
    c.log_every = 50
    c.eval_every = c.checkpoint_every = 1250

    c.data.source = "shapes"
    c.data.image_size = 32
    c.data.tokenizer = "word"  # over captions, questions and answers
    c.data.augment = ""  # (no flips: questions say "left of"; no colour shuffles)
    # Examples are 26-35 tokens (20 of them image), so two fit a row of 64; the spare rows
    # cover batches with many long ones (first-fit decreasing needs 32 rows almost always).
    c.data.seq_len = 64
    c.data.pack_rows = 34
    c.data.caption_fraction = 0.3
    c.data.max_image_size = 0  # 0: keep sizes (jsonl data: e.g. 64 caps images at 64x64)
    c.data.special_tokens = "reserved"  # image ids after the word vocabulary (no Fuyu tokenizer)
    # Answers are at most 2 words, then EOS.
    c.evals.vqa = dict(type="vqa", split="heldout", max_new_tokens=4, baseline_split="train")
    c.evals.caption = dict(type="captioning", split="heldout", prompt_key="", target_key="caption")

    c.model_name = "fuyu"
    c.model = dict(
        variant=None, width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=8,
        activation="relu2", qk_norm=True, rotary_fraction=0.5, rope_theta=10000.0,
    )  # fmt: skip
    c.model.dtype = c.get_ref("dtype")
    # The word vocabulary (44 ids) + image + newline, with room to spare: given here, the
    # model builds without reading the data (and the data pipeline checks it is enough).
    c.model.vocab_size = 64

    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.b2 = 0.98
    c.optimizer.weight_decay = 0.05
    c.optimizer.grad_clip_norm = 1.0

    if arg == "tiny":
        c.batch_size = 32
        c.eval_batch_size = 64
        # Test-sized runs read in the trainer: a data worker's start (seconds) outweighs it,
        # whatever data.source a test gives (data.num_workers; vlmjax/data/workers.py).
        c.data.num_workers = 0
        c.total_steps = 300
        c.log_every = 50
        c.eval_every = c.checkpoint_every = 300
        c.data.num_train = 4096
        c.data.num_heldout = 256
        c.data.pack_rows = 24  # divisible by the tests' 8 devices
        c.model.width = 64
        c.model.depth = 2
        c.model.mlp_dim = 256
        c.optimizer.learning_rate = 2e-3
        c.optimizer.warmup_steps = 30
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use experiments/shapes_decoder.py or :tiny")
    return c
