"""Config: YAML files, dotted overrides and the promised error messages."""

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import jaxtricks
from jaxtricks.lm import config as config_lib
from jaxtricks.lm.config import Config, ConfigError, OptimizerConfig
from tests.test_optimizer import params_and_grads, run

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
        (["optimizer.warmup_steps=2000"], "0 <= warmup_steps < train.steps=900"),
        (["data.seq_len=4096"], "data.seq_len=4096 is out of range; allowed: <= model.max_seq_len"),
        (["model.d_model=190"], "a multiple of model.num_heads=4"),
        (["model.dropout=1.5"], "model.dropout=1.5 is out of range"),
        (["data.tokenizer=wordpiece"],
         "data.tokenizer='wordpiece' is not allowed; choose one of byte, bpe"),
        (["data.bpe_vocab_size=256"],
         "data.bpe_vocab_size=256 is out of range; allowed: 257 to 1,000,000"),
        (["data.bpe_vocab_size=1000001"],
         "data.bpe_vocab_size=1000001 is out of range; allowed: 257 to 1,000,000"),
        (["data.tokenizer=bpe", "model.vocab_size=1000"],
         "model.vocab_size=1000 is out of range; allowed: >= data.bpe_vocab_size=4096"),
        (["model.vocab_size=big"],
         "model.vocab_size='big' is not allowed; allowed: an integer or auto"),
        (["model.attention=flash"],
         "model.attention='flash' is not allowed; choose one of auto, xla, cudnn"),
        (["data.source=text"], "data.path='' is out of range; allowed: a file, folder or glob"),
        (["parallelism=tpu"],
         "parallelism='tpu' is not allowed; choose one of auto, single, pmap, mesh"),
        (["mesh.fsdp=0"], "mesh.fsdp=0 is out of range; allowed: an integer >= 1, or -1"),
        (["mesh.fsdp=-1"], "at most one of them may be -1 (got mesh.data=-1, mesh.fsdp=-1"),
        (["parallelism=pmap", "mesh.tensor=2"],
         "mesh.tensor=2 is out of range; allowed: 1 with parallelism=pmap"),
        (["distributed.num_processes=2"],
         "distributed.coordinator, distributed.num_processes and distributed.process_id are set "
         "together or not at all"),
        (["distributed.coordinator=localhost", "distributed.num_processes=2",
          "distributed.process_id=0"],
         "distributed.coordinator='localhost' is out of range; allowed: host:port of process 0"),
        (["distributed.coordinator=h:1", "distributed.num_processes=2",
          "distributed.process_id=2"],
         "distributed.process_id=2 is out of range; allowed: 0 <= process_id < "
         "distributed.num_processes=2"),
        (["distributed.coordinator=h:1", "distributed.num_processes=2",
          "distributed.process_id=0", "parallelism=pmap"],
         "parallelism='pmap' is out of range; allowed: auto or mesh with several processes"),
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


# --------------------------------------------------------------------------- config -> optimizer


def lr_values(cfg, total, steps):
    schedule = jax.jit(config_lib.schedule_from_config(cfg, total))
    return [float(schedule(jnp.asarray(t, jnp.int32))) for t in steps]


@pytest.mark.parametrize(
    "fields, total, steps, want",
    [
        (dict(schedule="constant", warmup_steps=4), 20, [0, 2, 4, 19, 100], [0, 0.5, 1, 1, 1]),
        (dict(schedule="cosine", warmup_steps=10, end_value=0.1), 110, [0, 5, 10, 60, 110, 500],
         [0, 0.5, 1, 0.55, 0.1, 0.1]),
        (dict(schedule="linear", warmup_steps=0, end_value=0.2), 10, [0, 5, 10, 11],
         [1, 0.6, 0.2, 0.2]),
        (dict(schedule="polynomial", warmup_steps=2, power=2.0), 6, [0, 1, 2, 4, 6],
         [0, 0.5, 1, 0.25, 0]),
        (dict(schedule="exponential", warmup_steps=3, decay_rate=0.1, end_value=0.5), 100,
         [0, 3, 4, 9, 50], [0, 1, math.exp(-0.1), math.exp(-0.6), 0.5]),
        # wsd: decay 20% of 100 steps = 20; warmup 10, so a plateau of 70.
        (dict(schedule="wsd", warmup_steps=10, decay_fraction=0.2, end_value=0.0), 100,
         [0, 5, 10, 79, 80, 90, 100], [0, 0.5, 1, 1, 1, 0.5, 0]),
        (dict(schedule="wsd", warmup_steps=0, decay_fraction=0.5, decay_shape="sqrt"), 8,
         [0, 3, 4, 5, 8], [1, 1, 1, 1 - math.sqrt(0.25), 0]),
        (dict(schedule="wsd", warmup_steps=5, decay_fraction=1.0), 10,  # decay capped at 10 - 5
         [0, 5, 10], [0, 1, 0]),
        (dict(schedule="inverse_sqrt", warmup_steps=4), 100, [0, 2, 4, 16, 64],
         [0, 0.5, 1, 0.5, 0.25]),
    ],
    ids=lambda x: x.get("schedule") if isinstance(x, dict) else None,
)
def test_schedule_from_config(fields, total, steps, want):
    cfg = OptimizerConfig(learning_rate=1.0, **fields)
    np.testing.assert_allclose(lr_values(cfg, total, steps), want, rtol=1e-5, atol=1e-7)


def test_schedule_from_config_rejects_a_warmup_as_long_as_the_run():
    with pytest.raises(ValueError, match="warmup_steps.*total_steps=10"):
        config_lib.schedule_from_config(OptimizerConfig(warmup_steps=10), 10)
    with pytest.raises(ValueError, match="total_steps"):
        config_lib.schedule_from_config(OptimizerConfig(), 0)


@pytest.mark.parametrize("decay_all", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_optimizer_from_config_equals_make_optimizer(decay_all):
    cfg = OptimizerConfig(name="adamw", learning_rate=0.01, schedule="cosine", warmup_steps=2,
                          clip_norm=1.0, l1=1e-3, l2=1e-3, weight_decay=0.1, decay_all=decay_all,
                          skip_nonfinite=True, b2=0.95)
    params, grads = params_and_grads()
    p_cfg, _ = run(config_lib.optimizer_from_config(cfg, 50), params, grads)
    manual = jaxtricks.make_optimizer(
        name="adamw", learning_rate=jaxtricks.warmup_then(2, jaxtricks.cosine_decay(0.01, 48)),
        b2=0.95, clip_norm=1.0, l1=1e-3, l2=1e-3, weight_decay=0.1,
        mask=None if decay_all else {"kernel": True, "bias": False}, skip_nonfinite=True)
    p_manual, _ = run(manual, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p_cfg, p_manual)
    # decay_all=False: the bias is not regularized, so its L1 penalty is not counted. The penalty
    # is taken at the params of the last update: after one update, the initial params.
    _, s_one = run(config_lib.optimizer_from_config(cfg, 50), params, grads[:1])
    l1 = float(jaxtricks.optimizer_stats(s_one)["l1_penalty"])
    kernel_l1 = 1e-3 * float(jnp.sum(jnp.abs(params["kernel"])))
    bias_l1 = 1e-3 * float(jnp.sum(jnp.abs(params["bias"])))
    assert l1 == pytest.approx(kernel_l1 + (bias_l1 if decay_all else 0.0), rel=1e-5)


def test_default_config_builds_and_reports():
    cfg = dataclasses.replace(OptimizerConfig(), warmup_steps=5)
    tx = config_lib.optimizer_from_config(cfg, 100)
    params, grads = params_and_grads(n=1)
    _, state = run(tx, params, grads)
    stats = jaxtricks.optimizer_stats(state)
    assert float(stats["learning_rate"]) == 0.0  # warmup from 0: the first update uses step 0
    assert {"grad_norm", "clipped", "skipped", "skipped_step"} <= set(stats)


def test_a_saved_config_with_a_retired_key_still_loads():
    saved = config_lib.to_dict(config_lib.load(None, ["model.num_layers=2", "data.tokenizer=byte"]))
    saved["model"]["attention_blocks"] = 4  # what runs saved before model.attention
    del saved["data"]["tokenizer"]  # ... and before data.tokenizer: they read bytes
    assert config_lib.from_saved(saved) == config_lib.load(
        None, ["model.num_layers=2", "data.tokenizer=byte"])
    with pytest.raises(ConfigError, match="unknown config key 'model.attention_blocks'"):
        config_lib.from_dict(saved)
