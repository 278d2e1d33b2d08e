"""Config: YAML files, dotted overrides and the promised error messages."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from jaxtricks.lm import config as config_lib
from jaxtricks.lm.config import Config, ConfigError

CONFIGS = Path(__file__).parent.parent / "configs"


def test_default_yaml_is_the_embedded_default():
    # `python train.py` without --config must train exactly what configs/default.yaml says.
    assert config_lib.load(CONFIGS / "default.yaml") == Config()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_comments_every_field(path):
    config_lib.load(path)
    for line in path.read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"uncommented field in {path.name}: {line}"


def test_overrides_parse_yaml_scalars():
    c = config_lib.load(None, ["train.steps=70", "optimizer.clip_norm=null",
                               "optimizer.learning_rate=1e-3", "data.path=a b.txt"])
    assert c.train.steps == 70
    assert c.optimizer.clip_norm is None
    assert c.optimizer.learning_rate == pytest.approx(1e-3)
    assert c.data.path == "a b.txt"


def test_round_trip_through_dict():
    c = config_lib.load(None, ["model.num_layers=2", "parallelism=single"])
    assert config_lib.from_dict(config_lib.to_dict(c)) == c
    assert dataclasses.asdict(c)["model"]["num_layers"] == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stpes=3"], "unknown config key 'train.stpes'. Did you mean 'train.steps'?"),
        (["optimizer.lr=0.1"], "unknown config key 'optimizer.lr'"),
        (["train.steps"], "must look like key.sub=value"),
        (["train.steps=ten"], "train.steps='ten' must be an integer"),
        (["train.steps=0"], "train.steps=0 is out of range; allowed: an integer >= 1"),
        (["optimizer.learning_rate=0"], "optimizer.learning_rate=0.0 is out of range"),
        (["optimizer.learning_rate=-1"], "a finite number > 0"),
        (["optimizer.name=lion"], "optimizer.name='lion' is not allowed; choose one of sgd"),
        (["optimizer.power=0"], "optimizer.power=0.0 is out of range"),
        (["optimizer.clip_norm=0"], "optimizer.clip_norm=0.0 is out of range"),
        (["optimizer.warmup_steps=2000"], "0 <= warmup_steps < train.steps=800"),
        (["data.seq_len=4096"], "data.seq_len=4096 is out of range; allowed: <= model.max_seq_len"),
        (["model.d_model=190"], "a multiple of model.num_heads=4"),
        (["model.dropout=1.5"], "model.dropout=1.5 is out of range"),
        (["model.attention_blocks=0"],
         "model.attention_blocks=0 is out of range; allowed: an integer >= 1"),
        (["data.source=text"], "data.path='' is out of range; allowed: a file, folder or glob"),
        (["parallelism=tpu"], "parallelism='tpu' is not allowed; choose one of auto, single, pmap"),
        (["cpu_devices=0"],
         "cpu_devices=0 is out of range; allowed: an integer >= 1, or null for JAX's default"),
        (["train.log_every=true"], "train.log_every=True must be an integer"),
        (["train.microbatches=0"],
         "train.microbatches=0 is out of range; allowed: an integer >= 1"),
        (["train.microbatches=3"],
         "train.batch_size=16 is out of range; allowed: a multiple of train.microbatches=3"),
    ],
)
def test_errors_name_the_key_the_value_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as e:
        config_lib.load(None, overrides)
    assert message in str(e.value)


def test_unknown_key_in_a_file_is_rejected_with_a_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optimizer": {"weight_decy": 0.1}}))
    with pytest.raises(ConfigError, match="optimizer.weight_decy'. Did you mean 'weight_decay'"):
        config_lib.load(path)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_lib.load(bad)
