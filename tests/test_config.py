import os

import pytest

from vlmjax import cli
from vlmjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT = os.path.join(ROOT, "experiments", "shapes_vit.py")


def test_load_locks_and_overrides_parse_types():
    config = config_lib.load(VIT)
    config_lib.override(config, "batch_size", "64")
    config_lib.override(config, "optimizer.learning_rate", "3e-4")
    config_lib.override(config, "model.scan", "true")
    config_lib.override(config, "model.pool", "cls")
    config_lib.override(config, "optimizer.weight_decay", "0")  # int text into a float key
    assert config.batch_size == 64
    assert config.optimizer.learning_rate == pytest.approx(3e-4)
    assert config.model.scan is True
    assert config.model.pool == "cls"
    assert isinstance(config.optimizer.weight_decay, float)
    with pytest.raises(AttributeError):
        config.new_key = 1  # locked


def test_dtype_override_reaches_the_model():
    config = config_lib.load_with_overrides(VIT, [("dtype", "bfloat16")])
    assert config.model.dtype == "bfloat16"


def test_unknown_key_names_nearest():
    config = config_lib.load(VIT)
    with pytest.raises(config_lib.ConfigError, match="did you mean 'optimizer.learning_rate'"):
        config_lib.override(config, "optimizer.learning_rat", "1")
    with pytest.raises(config_lib.ConfigError, match="'batch_size'"):
        config_lib.override(config, "batchsize", "1")


def test_bad_values_are_errors():
    config = config_lib.load(VIT)
    with pytest.raises(config_lib.ConfigError, match="cannot parse .many. as int"):
        config_lib.override(config, "batch_size", "many")
    with pytest.raises(config_lib.ConfigError, match="boolean"):
        config_lib.override(config, "model.scan", "maybe")
    with pytest.raises(config_lib.ConfigError, match="is a group"):
        config_lib.override(config, "model", "1")


def test_split_overrides_both_forms():
    rest, overrides = config_lib.split_overrides(
        ["train", "--config.a.b=1", "--workdir", "w", "--config.c", "x y"]
    )
    assert rest == ["train", "--workdir", "w"]
    assert overrides == [("a.b", "1"), ("c", "x y")]


def test_config_file_errors(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load(str(tmp_path / "missing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("X = 1\n")
    with pytest.raises(config_lib.ConfigError, match="get_config"):
        config_lib.load(str(bad))


def test_module_kwargs_rejects_unknown_model_field():
    from vlmjax.models.vit import ViT

    with pytest.raises(config_lib.ConfigError, match="did you mean 'width'"):
        config_lib.module_kwargs(ViT, {"widht": 4}, "model")
    assert config_lib.module_kwargs(ViT, {"width": 4}, "model") == {"width": 4}


def test_cli_reports_bad_key(capsys, tmp_path):
    code = cli.main(
        ["train", "--config", VIT, "--workdir", str(tmp_path), "--config.modle.width=8"]
    )
    assert code == 2
    assert "did you mean 'model.width'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.warmup_steps=5000", r"warmup_steps=5000 is longer than the run"),
        ("dtype=float17", r"dtype='float17' is not valid; did you mean 'float16'"),
        ("data.source=shapez", r"data.source='shapez' is not prepared .*did you mean 'shapes'"),
        ("data.image_size=0", r"data.image_size=0 must be >= 1"),
        ("keep_checkpoints=0", r"keep_checkpoints=0 must be >= 1"),
        ("optimizer.learning_rate=-0.001", r"learning_rate=-0.001 must be >= 0"),
        ("optimizer.name=adam", r"did you mean 'adamw'"),
        ("mesh.fsdp=0", r"mesh.fsdp=0 must be -1"),
    ],
)
def test_out_of_range_and_misspelt_values_are_refused(override, message, tmp_path):
    key, value = override.split("=")
    config = config_lib.load_with_overrides(VIT, [(key, value), ("data.data_dir", str(tmp_path))])
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


def test_cli_refuses_bad_values_in_one_line(capsys, tmp_path):
    argv = ["train", "--config", VIT, "--workdir", str(tmp_path / "w")]
    argv += ["--config.keep_checkpoints=0", "--config.dtype=float17"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "keep_checkpoints=0" in err[0] and "'float16'" in err[0]
    assert not os.path.exists(tmp_path / "w")  # refused before anything was made


def test_workdir_config_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"batch_size": 64,')
    with pytest.raises(config_lib.ConfigError, match=f"{path} is not valid JSON"):
        config_lib.load_workdir(str(tmp_path))
    path.write_text('{"batch_size": "64", "optimizer": {"learning_rate": -1}}')
    with pytest.raises(config_lib.ConfigError, match=f"{path}: batch_size='64' must be an int"):
        config_lib.load_workdir(str(tmp_path))
    path.write_text("[1, 2]")
    with pytest.raises(config_lib.ConfigError, match="holds a list"):
        config_lib.load_workdir(str(tmp_path))
