"""Evaluators over real sources on the mesh: 8 devices give the numbers 1 device gives, with
batch sizes that divide neither; zero-shot on a labelled jsonl set with classes.txt and on a
tfds set whose labels are WordNet ids; every bad evaluator config fails before training."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import experiment
from etils import epath
from PIL import Image

from vlmjax import config as config_lib
from vlmjax import evaluators, tasks, train
from vlmjax import mesh as mesh_lib
from vlmjax.data import shapes

ONE = dict(devices=1)


def _mesh(shape):
    if shape == ONE:
        return mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return mesh_lib.make_mesh(*shape)


def _evaluate(config, shape, params=None):
    """(metrics of every evaluator of `config`, host params) on the mesh `shape`, from
    fresh parameters (or `params`, e.g. the 1-device ones)."""
    mesh = _mesh(shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        task = tasks.build(config)
        run = train.setup(config, task, mesh)
        state = run.init_fn(jax.random.PRNGKey(0))
        if params is not None:
            state = state.replace(params=jax.device_put(params, run.shardings.params))
        evals = evaluators.build(config, task, mesh)
        return evaluators.run(evals, state), jax.device_get(state.params)


def _assert_same(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


CLIP_EVALS = (
    "{'zs': {'type': 'zeroshot', 'split': 'heldout', 'templates': 'shapes', 'batch_size': 13,"
    " 'max_examples': 50}, 'ret': {'type': 'retrieval', 'split': 'heldout', 'batch_size': 13,"
    " 'max_examples': 50}, 'few': {'type': 'fewshot', 'split': 'heldout', 'batch_size': 13,"
    " 'max_examples': 50, 'shots': (1, 3)}}"
)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1)])
def test_clip_evaluators_on_8_devices_equal_1(data_dir, shape):
    config = experiment("shapes_clip.py:tiny", data_dir, {"evals": CLIP_EVALS})
    expected, params = _evaluate(config, ONE)
    got, _ = _evaluate(config, shape, params)
    _assert_same(got, expected)
    assert expected["eval/zs/count"] == expected["eval/few/count"] == 50
    assert expected["eval/ret/images"] == 50


def test_classification_and_decoder_evaluators_on_8_devices_equal_1(data_dir):
    evals = (
        "{'h': {'type': 'classification', 'split': 'heldout', 'batch_size': 13,"
        " 'max_examples': 30}}"
    )
    config = experiment("shapes_vit.py:tiny", data_dir, {"evals": evals})
    expected, params = _evaluate(config, ONE)
    got, _ = _evaluate(config, (8, 1, 1), params)
    _assert_same(got, expected)
    assert expected["eval/h/count"] == 30

    evals = (
        "{'vqa': {'type': 'vqa', 'split': 'heldout', 'batch_size': 13, 'max_examples': 20,"
        " 'max_new_tokens': 2, 'baseline_split': 'train'}, 'cap': {'type': 'captioning',"
        " 'split': 'heldout', 'batch_size': 13, 'max_examples': 20}}"
    )
    config = experiment("shapes_decoder.py:tiny", data_dir, {"evals": evals})
    expected, params = _evaluate(config, ONE)
    got, _ = _evaluate(config, (4, 2, 1), params)
    _assert_same(got, expected)
    assert expected["eval/vqa/count"] == 20 and expected["eval/cap/perplexity"] > 1.0


def _reference_zeroshot(task, variables, images, labels, names, templates):
    """Zero-shot accuracy computed directly: one jit per tower, unsharded, numpy scoring."""
    zimg = np.asarray(jax.jit(task.embed_images)(variables, images))
    prompts = task.tokenize([t.format(n) for n in names for t in templates])
    ztxt = np.asarray(jax.jit(task.embed_texts)(variables, prompts))
    mean = ztxt.reshape(len(names), len(templates), -1).copy()
    mean /= np.linalg.norm(mean, axis=-1, keepdims=True)
    classifier = mean.mean(1)
    classifier /= np.linalg.norm(classifier, axis=-1, keepdims=True)
    return float((np.argmax(zimg @ classifier.T, axis=1) == labels).mean())


def test_zeroshot_on_a_labelled_jsonl_set_with_classes_txt(data_dir, tmp_path):
    folder = tmp_path / "set"
    os.makedirs(folder / "img")
    images, labels = [], []
    with open(folder / "val.jsonl", "w") as f:
        for i in range(21):
            ex = shapes.split_example("heldout", i, 32)
            Image.fromarray(ex["image"]).save(folder / "img" / f"{i}.png")
            images.append(ex["image"])
            labels.append(int(ex["label"]))
            f.write(json.dumps({"image": f"img/{i}.png", "label": labels[-1]}) + "\n")
    (folder / "classes.txt").write_text("\n".join(shapes.KINDS) + "\n")
    evals = (
        f"{{'mine': {{'type': 'zeroshot', 'source': 'jsonl:{folder}/val.jsonl', "
        f"'class_names': '{folder}/classes.txt', 'templates': 'a {{}}|the {{}}', "
        "'batch_size': 8}}"
    )
    config = experiment("shapes_clip.py:tiny", data_dir, {"evals": evals})
    metrics, params = _evaluate(config, (8, 1, 1))
    assert metrics["eval/mine/count"] == 21
    task = tasks.build(config)
    expected = _reference_zeroshot(
        task, {"params": params}, np.stack(images), np.array(labels), shapes.KINDS,
        ("a {}", "the {}"),
    )  # fmt: skip
    assert metrics["eval/mine/accuracy"] == pytest.approx(expected, abs=1e-6)
    # A class list shorter than the labels is refused before anything runs.
    (folder / "short.txt").write_text("circle\nsquare\n")
    bad = evals.replace("classes.txt", "short.txt")
    with pytest.raises(config_lib.ConfigError, match=r"evals.mine \(zeroshot\): labels go up to"):
        evaluators.build(experiment("shapes_clip.py:tiny", data_dir, {"evals": bad}), task,
                         _mesh((8, 1, 1)))  # fmt: skip


class WnidShapes(tfds.core.GeneratorBasedBuilder):
    """Two shapes kinds labelled by WordNet ids, as tfds imagenet2012 labels its classes."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=["n01440764", "n01443537"]),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for i in range(12):
            ex = shapes.split_example("heldout", i, 32)
            yield i, {"image": ex["image"], "label": i % 2}


def test_wordnet_id_labels_map_to_curated_names(data_dir, tmp_path):
    tfds_dir = str(tmp_path / "tfds")
    WnidShapes(data_dir=tfds_dir).download_and_prepare(file_format="array_record")
    evals = (
        f"{{'inet': {{'type': 'zeroshot', 'source': 'wnid_shapes', 'data_dir': '{tfds_dir}', "
        "'split': 'validation', 'templates': 'openai_imagenet', 'batch_size': 5}}"
    )
    config = experiment("shapes_clip.py:tiny", data_dir, {"evals": evals})
    mesh = _mesh((8, 1, 1))
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.RULES):
        task = tasks.build(config)
        (scheduled,) = evaluators.build(config, task, mesh)
    assert scheduled.evaluator.names == ["tench", "goldfish"]
    assert len(scheduled.evaluator.templates) == 80
    assert scheduled.evaluator.prompt_tokens.shape[0] == 160
    metrics, _ = _evaluate(config, (8, 1, 1))
    assert metrics["eval/inet/count"] == 12


@pytest.mark.parametrize(
    "evals, message",
    [
        ("{'x': {'type': 'zero_shot', 'split': 'heldout'}}", r"evals.x.type='zero_shot'"),
        ("{'x': {'type': 'zeroshot', 'split': 'heldout', 'shots': 3}}",
         r"unknown key 'evals.x.shots' for a zeroshot"),
        ("{'x': {'type': 'retrieval'}}", r"evals.x.split is required"),
        ("{'x': {'type': 'zeroshot', 'split': 'validation'}}", r"evals.x \(zeroshot\):.*split"),
        ("{'x': {'type': 'zeroshot', 'split': 'heldout', 'class_names': ['a', 'b']}}",
         r"evals.x \(zeroshot\): the source's 'label' has 6 classes but class_names has 2"),
        ("{'x': {'type': 'retrieval', 'split': 'heldout', 'caption_key': 'title'}}",
         r"evals.x \(retrieval\):.*'title'"),
        ("{'x': {'type': 'vqa', 'split': 'heldout'}}", r"evals.x \(vqa\): needs the decoder"),
        ("{'x': {'type': 'classification', 'split': 'heldout'}}",
         r"evals.x \(classification\): needs a classifier"),
    ],
)  # fmt: skip
def test_bad_evaluator_configs_fail_before_training(data_dir, tmp_path, evals, message):
    config = experiment("shapes_clip.py:tiny", data_dir, {"evals": evals})
    with pytest.raises(config_lib.ConfigError, match=message):
        train.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
