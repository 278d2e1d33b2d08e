"""train.py end to end: a run, resume after SIGTERM and SIGKILL, non-finite steps, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from jaxtricks.lm import config as config_lib
from jaxtricks.lm import data as data_lib
from jaxtricks.lm import step as step_lib
from jaxtricks.lm import training

ROOT = Path(__file__).parent.parent
TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
        "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "train.log_every=1",
        "train.eval_every=100", "train.checkpoint_every=25", "train.sample_tokens=0",
        "optimizer.warmup_steps=0"]
STEPS = 400


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _args(workdir, data_dir, *overrides, steps=STEPS):
    return ["--workdir", str(workdir), *TINY, f"data.data_dir={data_dir}",
            f"train.steps={steps}", *overrides]


def _metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir):
    return {m["step"]: m["loss"] for m in _metrics(workdir) if "loss" in m}


def _params(workdir):
    _, model, step = training.load_model(workdir)
    from flax import nnx

    return step, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run: the trajectory every interrupted run must follow."""
    workdir = tmp_path_factory.mktemp("reference")
    assert train.main(_args(workdir, data_dir)) == 0
    return workdir


def test_a_run_logs_evaluates_checkpoints_and_samples(tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    rc = train.main(_args(workdir, data_dir, "train.eval_every=10", "train.sample_tokens=20",
                          steps=20))
    out = capsys.readouterr().out
    assert rc == 0
    rows = _metrics(workdir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 21))
    for key in ("loss", "learning_rate", "grad_norm", "clipped", "skipped_step"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert "tokens_per_s" in train_rows[-1]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[-1]["val_bits_per_byte"] == pytest.approx(evals[-1]["val_loss"] / np.log(2))
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20"]
    assert "sample:\nThe " in out
    assert (workdir / "report.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 20


def _assert_same_run(workdir, reference):
    rows = [m["step"] for m in _metrics(workdir) if "loss" in m]
    assert rows == list(range(1, STEPS + 1)), "a step was logged twice or skipped"
    assert _losses(workdir) == _losses(reference)  # bit for bit, step for step
    step, params = _params(workdir)
    ref_step, ref_params = _params(reference)
    assert step == ref_step == STEPS
    for a, b in zip(params, ref_params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_the_resumed_run_equals_the_uninterrupted_one(
    tmp_path, data_dir, reference, monkeypatch, capsys
):
    # The data iterator sends SIGTERM to this very process while step 37 is drawn: the real
    # signal path, at a step we choose.
    real_iterator = data_lib.train_iterator

    def iterator_that_gets_preempted(*args, **kwargs):
        it = real_iterator(*args, **kwargs)
        original_next = type(it).__next__

        class Preempted(type(it)):
            count = 0

            def __next__(self):
                Preempted.count += 1
                if Preempted.count == 37:
                    os.kill(os.getpid(), signal.SIGTERM)
                return original_next(self)

        it.__class__ = Preempted
        return it

    workdir = tmp_path / "run"
    monkeypatch.setattr(data_lib, "train_iterator", iterator_that_gets_preempted)
    assert train.main(_args(workdir, data_dir)) == 0
    out = capsys.readouterr().out
    assert "received SIGTERM: saved a checkpoint at step 37" in out
    assert (workdir / "checkpoints" / "37").is_dir()
    monkeypatch.setattr(data_lib, "train_iterator", real_iterator)
    assert train.main(_args(workdir, data_dir)) == 0
    assert "resumed from" in capsys.readouterr().out
    _assert_same_run(workdir, reference)


@pytest.mark.slow
def test_kill_9_at_a_random_moment_resumes_from_the_last_complete_checkpoint(
    tmp_path, data_dir, reference
):
    workdir = tmp_path / "run"
    kill_after = random.Random().randint(30, 300)  # a random step, a random moment within it
    proc = subprocess.Popen([sys.executable, "train.py", *_args(workdir, data_dir)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= kill_after:
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill ({kill_after})"
    assert train.main(_args(workdir, data_dir)) == 0
    _assert_same_run(workdir, reference)


def test_an_unreadable_checkpoint_is_skipped_for_the_previous_one(tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    assert train.main(_args(workdir, data_dir, steps=50)) == 0
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [25, 50]
    # Checkpoint 50 truncated after the fact (a disk problem), and a half-written one that Orbax
    # never committed: neither may be picked.
    for f in (workdir / "checkpoints" / "50" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    (workdir / "checkpoints" / "75.orbax-checkpoint-tmp-1").mkdir()
    capsys.readouterr()
    assert train.main(_args(workdir, data_dir, steps=60)) == 0
    captured = capsys.readouterr()
    assert "unreadable" in captured.err
    assert "resumed from" in captured.out and "at step 25" in captured.out
    assert "resuming with a changed config: train.steps: 50 -> 60" in captured.out
    steps_logged = [m["step"] for m in _metrics(workdir) if "loss" in m]
    assert steps_logged == list(range(1, 61))


def _poison(monkeypatch, bad_steps):
    """The batches of ``bad_steps`` get all-255 targets, whose loss (and gradient) is NaN."""
    real_iterator = data_lib.train_iterator

    def poisoned_iterator(*args, **kwargs):
        it = real_iterator(*args, **kwargs)
        drawn = [0]

        class Poisoned(type(it)):
            def __next__(self):
                batch = super().__next__()
                drawn[0] += 1
                if drawn[0] in bad_steps:
                    batch = {**batch, "targets": np.full_like(batch["targets"], 255)}
                return batch

        it.__class__ = Poisoned
        return it

    real_loss = step_lib.cross_entropy

    def loss_that_explodes(logits, targets):
        return real_loss(logits, targets) * jnp.where(jnp.all(targets == 255), jnp.nan, 1.0)

    monkeypatch.setattr(data_lib, "train_iterator", poisoned_iterator)
    monkeypatch.setattr(step_lib, "cross_entropy", loss_that_explodes)


def test_a_nonfinite_step_is_skipped_and_the_run_goes_on(tmp_path, data_dir, monkeypatch):
    _poison(monkeypatch, bad_steps={5, 6})
    workdir = tmp_path / "run"
    assert train.main(_args(workdir, data_dir, steps=10)) == 0
    rows = {m["step"]: m for m in _metrics(workdir) if "loss" in m}
    assert [s for s, m in rows.items() if m["skipped_step"]] == [5, 6]
    assert rows[6]["skipped"] == 2 and rows[10]["skipped"] == 2
    assert np.isnan(rows[5]["loss"]) and np.isfinite(rows[7]["loss"])
    # A skipped step leaves the optimizer state, the schedule's count included, as it was: the
    # logged rate is the last applied one, and step 7 makes the 5th update, with schedule(4).
    config = config_lib.load(None, _args(workdir, data_dir, steps=10)[2:])
    schedule = config_lib.schedule_from_config(config.optimizer, 10)
    assert rows[5]["learning_rate"] == rows[6]["learning_rate"] == rows[4]["learning_rate"]
    assert rows[4]["learning_rate"] == pytest.approx(float(schedule(3)), rel=1e-6)
    assert rows[7]["learning_rate"] == pytest.approx(float(schedule(4)), rel=1e-6)


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path, data_dir, monkeypatch, capsys):
    _poison(monkeypatch, bad_steps=set(range(30, 100)))
    workdir = tmp_path / "run"
    assert train.main(_args(workdir, data_dir, "train.max_consecutive_skips=4", steps=60)) == 1
    err = capsys.readouterr().err
    assert "stopped at step 33: 4 steps in a row had non-finite gradients" in err
    assert "last finite loss" in err and "at step 29" in err
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [25]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.source=text", "data.path=/no/such/file.txt"], "does not exist"),
        (["data.source=tfds", "data.name=no_such_dataset_xyz"], "data.name='no_such_dataset_xyz'"),
        (["train.stpes=3"], "Did you mean 'train.steps'?"),
        (["train.batch_size=eight"], "train.batch_size='eight' must be an integer"),
        (["optimizer.learning_rate=0"], "optimizer.learning_rate=0.0 is out of range"),
        (["optimizer.warmup_steps=500"], "0 <= warmup_steps < train.steps=400"),
        (["optimizer.power=0"], "optimizer.power=0.0 is out of range"),
        (["optimizer.clip_norm=-1"], "optimizer.clip_norm=-1.0 is out of range"),
        (["data.seq_len=64"], "data.seq_len=64 is out of range; allowed: <= model.max_seq_len=32"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    tmp_path, data_dir, capsys, overrides, message
):
    workdir = tmp_path / "run"
    assert train.main(_args(workdir, data_dir, *overrides)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not workdir.exists()


def test_empty_data_file_and_unwritable_workdir(tmp_path, data_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert train.main(_args(tmp_path / "a", data_dir, "data.source=text",
                            f"data.path={empty}")) == 2
    assert "names only empty files" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert train.main(_args(blocker / "run", data_dir)) == 2
    assert "is not writable" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_a_foreign_or_mismatched_checkpoint_is_refused_and_kept(tmp_path, data_dir, capsys):
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints" / "7").mkdir(parents=True)
    (foreign / "checkpoints" / "7" / "weights.bin").write_bytes(b"\x00garbage")
    assert train.main(_args(foreign, data_dir)) == 2
    assert "is not a jaxtricks checkpoint" in capsys.readouterr().err
    assert (foreign / "checkpoints" / "7" / "weights.bin").read_bytes() == b"\x00garbage"
    assert not (foreign / "metrics.jsonl").exists()

    run = tmp_path / "run"
    assert train.main(_args(run, data_dir, steps=25)) == 0
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train.main(_args(run, data_dir, "model.d_model=64", steps=30)) == 2
    err = capsys.readouterr().err
    assert "model.d_model=32 but the config says 64" in err
    assert train.main(_args(run, data_dir, "optimizer.l2=1e-4", steps=30)) == 2
    err = capsys.readouterr().err
    assert "optimizer.l2=0.0 but the config says 0.0001, which changes the optimizer state" in err
    assert (run / "metrics.jsonl").read_text() == before


def test_batch_must_divide_over_the_devices(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setattr(jax, "local_devices", lambda: [jax.devices()[0]] * 8)
    assert train.main(_args(tmp_path / "run", data_dir, "train.batch_size=12")) == 2
    assert "train.batch_size=12 must be divisible by the number of devices (8)" in (
        capsys.readouterr().err
    )


def test_batch_must_divide_over_the_devices_and_microbatches(tmp_path, data_dir, monkeypatch,
                                                            capsys):
    monkeypatch.setattr(jax, "local_devices", lambda: [jax.devices()[0]] * 8)
    workdir = tmp_path / "run"
    assert train.main(_args(workdir, data_dir, "train.batch_size=24",
                            "train.microbatches=2")) == 2
    assert ("train.batch_size=24 must be divisible by the number of devices (8) times "
            "train.microbatches=2; use a multiple of 16") in capsys.readouterr().err
    assert not workdir.exists()


def test_microbatches_train_the_same_run(tmp_path, data_dir, capsys):
    # Gradient accumulation over 2 or 4 parts, scanned or unrolled: the whole batch's losses.
    whole = tmp_path / "whole"
    assert train.main(_args(whole, data_dir, steps=10)) == 0
    for parts in ("train.microbatches=2", "train.microbatches=4",
                  "train.microbatches=4 train.unroll_microbatches=true"):
        workdir = tmp_path / parts.replace(" ", "_")
        assert train.main(_args(workdir, data_dir, *parts.split(), steps=10)) == 0
        losses = _losses(workdir)
        assert list(losses) == list(range(1, 11))
        np.testing.assert_allclose(list(losses.values()), list(_losses(whole).values()),
                                   rtol=1e-4)
    assert json.loads((workdir / "config.json").read_text())["train"]["microbatches"] == 4
    capsys.readouterr()


def test_cpu_devices_splits_the_cpu_and_pmaps_the_same_run(tmp_path, data_dir, capsys):
    # JAX takes the device count when it starts, so the split run is a process of its own.
    split, single = tmp_path / "split", tmp_path / "single"
    out = subprocess.run(
        [sys.executable, "train.py", *_args(split, data_dir, "cpu_devices=2", steps=20)],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 x cpu (pmap)" in out.stdout
    assert train.main(_args(single, data_dir, steps=20)) == 0
    assert "1 x cpu (jit)" in capsys.readouterr().out
    # Each device's loss is the mean over its half of the batch; their mean is the whole's.
    split_losses, single_losses = _losses(split), _losses(single)
    assert list(split_losses) == list(range(1, 21))
    np.testing.assert_allclose(list(split_losses.values()), list(single_losses.values()),
                               rtol=1e-4)
    # Its checkpoint (one unreplicated copy) resumes on one device.
    assert train.main(_args(split, data_dir, steps=25)) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [m["step"] for m in _metrics(split) if "loss" in m] == list(range(1, 26))


def test_cpu_devices_once_jax_has_started_is_refused_before_any_write(tmp_path, data_dir, capsys):
    have = len(jax.devices("cpu"))  # this process's backend has started, with JAX's default
    workdir = tmp_path / "run"
    assert train.main(_args(workdir, data_dir, f"cpu_devices={have + 1}")) == 2
    err = capsys.readouterr().err
    assert (f"cpu_devices={have + 1} cannot be applied: JAX's CPU backend has already started "
            f"in this process with {have} device(s)") in err
    assert not workdir.exists()
    # The count it already has is no change: accepted.
    config = config_lib.load(None, [*TINY, f"cpu_devices={have}"])
    training.preflight(config, tmp_path)
    assert len(jax.devices("cpu")) == have
