"""Class names and prompt templates for zero-shot classification.

`class_names` resolves an evaluator's `class_names` key:

  * a list of names, in label order;
  * a shipped set: "imagenet1k" (the 1000 names curated for CLIP's prompts by Radford et al.,
    keyed by WordNet id), "cifar10", "cifar100";
  * a path to a text file, one name per line in label order (`classes.txt`);
  * "" (the default): the source's own names: `shapes` kinds, or a tfds ClassLabel's names.
    ClassLabel names that are WordNet ids (`n01440764`, as tfds `imagenet2012` has) are
    mapped to the curated ImageNet names, since prompts need words.

Named template sets for `templates`: "openai_imagenet" (CLIP's 80 ImageNet templates),
"openai_cifar" (its 18 CIFAR templates), and the sets of `vlmjax/data/text.py`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence

NAMES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "names")
SETS = {"imagenet1k": "imagenet1k.tsv", "cifar10": "cifar10.txt", "cifar100": "cifar100.txt"}
TEMPLATE_SETS = {
    "openai_imagenet": "templates_openai_imagenet.txt",
    "openai_cifar": "templates_openai_cifar.txt",
}
WORDNET_ID = re.compile(r"n\d{8}")


def _lines(path: str) -> list[str]:
    """Non-empty lines of a text file, '#' comment lines left out."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]


@functools.cache
def wordnet_names() -> dict[str, str]:
    """WordNet id -> curated ImageNet-1k class name (1000 entries)."""
    rows = [line.split("\t") for line in _lines(os.path.join(NAMES_DIR, SETS["imagenet1k"]))]
    return {wnid: name for wnid, name in rows}


def shipped(name: str) -> list[str]:
    """The class names of a shipped set, in label order."""
    if name == "imagenet1k":
        return list(wordnet_names().values())
    return [n.replace("_", " ") for n in _lines(os.path.join(NAMES_DIR, SETS[name]))]


def template_set(name: str) -> tuple[str, ...] | None:
    """The templates of a shipped set, each with one "{}", or None for another name."""
    if name not in TEMPLATE_SETS:
        return None
    return tuple(_lines(os.path.join(NAMES_DIR, TEMPLATE_SETS[name])))


def from_labels(label_names: Sequence[str]) -> list[str]:
    """A dataset's label names as prompt words: WordNet ids become ImageNet names,
    underscores become spaces."""
    if label_names and all(WORDNET_ID.fullmatch(n) for n in label_names):
        table = wordnet_names()
        unknown = [n for n in label_names if n not in table]
        if unknown:
            raise ValueError(
                f"labels {unknown[:3]} are WordNet ids outside ImageNet-1k; give class_names"
            )
        return [table[n] for n in label_names]
    return [n.replace("_", " ") for n in label_names]


def class_names(spec: str | Sequence[str] | None, source_names: Sequence[str] | None) -> list[str]:
    """Resolves `spec` (see the module doc); `source_names` are the dataset's own label
    names (None when it has none). Raises ValueError saying what to give."""
    if spec is None or spec == "":
        if source_names is None:
            raise ValueError(
                "the source has no class names: set class_names to a list, a classes.txt "
                f"path or one of {sorted(SETS)}"
            )
        return from_labels(list(source_names))
    if not isinstance(spec, str):
        return [str(n) for n in spec]
    if spec in SETS:
        return shipped(spec)
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        names = _lines(path)
        if not names:
            raise ValueError(f"class_names file {path} holds no names")
        return names
    raise ValueError(
        f"class_names={spec!r} is neither a shipped set ({sorted(SETS)}) nor a file; give a "
        "list, or a classes.txt with one name per line in label order"
    )
