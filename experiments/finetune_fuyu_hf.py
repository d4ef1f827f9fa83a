r"""Fine-tune a Hugging Face Fuyu folder (FuyuForCausalLM, e.g. adept/fuyu-8b) for captioning
and VQA on your image-prompt-target records.

    vlmjax train --config experiments/finetune_fuyu_hf.py:/path/to/fuyu-8b \
        --workdir /tmp/fuyu_ft --config.data.source=jsonl:/data/vqa.jsonl

Records are {"image": path, "prompt": ..., "target": ...} (tasks/captioning.py). The folder
decides `model.*` and the tokenizer; init_hf sets data.special_tokens="fuyu", so examples
are laid out as transformers' FuyuProcessor does (|SPEAKER| at patch positions, |NEWLINE|
after each row, <s>, the prompt, <0x04>, then the target and EOS) and the checkpoint's
embedding rows keep their meaning; `vlmjax export` writes a folder FuyuForCausalLM loads,
with the tokenizer files. See vlmjax/init_hf.py.

Images larger than `data.max_image_size` (square) are downscaled to fit, aspect kept
(FuyuProcessor's canvas is 1080 x 1920; at 30-pixel patches a 480 x 480 image is 16 x 16
patches + 16 newlines = 272 tokens). The 9.4B parameters of fuyu-8b need FSDP
(`mesh.fsdp`, the default here: all devices) and bfloat16 compute. Without an argument the
folder is ~/models/fuyu-8b. No result measured here: it needs a pretrained folder.
"""

from vlmjax import defaults

DEFAULT_FOLDER = "~/models/fuyu-8b"


def get_config(arg=None):
    c = defaults.base_config()
    c.task = "captioning"
    c.model_name = "fuyu"  # the folder's fields fill model.*
    c.init_from = "hf:" + (arg or DEFAULT_FOLDER)
    c.dtype = "bfloat16"
    c.model.dtype = c.get_ref("dtype")
    c.model.remat = "full"
    c.mesh.data, c.mesh.fsdp = 1, -1

    c.batch_size = 64  # examples per step, packed into data.pack_rows rows
    c.eval_batch_size = 64
    c.total_steps = 2000
    c.log_every = 20
    c.eval_every = c.checkpoint_every = 500

    c.data.source = "shapes"  # replace with your records: jsonl:FILE
    c.data.tokenizer = "word"  # replaced by the folder's tokenizer
    c.data.augment = ""
    c.data.max_image_size = 480
    c.data.seq_len = 1024
    c.data.pack_rows = 32
    c.evals.caption = dict(type="captioning", split="heldout", prompt_key="", target_key="caption")

    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.b2 = 0.95
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1.0
    return c
