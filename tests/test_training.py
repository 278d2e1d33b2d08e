"""The training loop: its helpers against hand-made inputs, one tiny run through
``training.run``, bad input refused before anything is compiled, and (slow) train.py end to end:
resume after SIGTERM, SIGINT and kill -9, with microbatches and on 2 devices; non-finite steps."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CompileLog

import train
from jaxtricks.lm import config as config_lib
from jaxtricks.lm import data as data_lib
from jaxtricks.lm import step as step_lib
from jaxtricks.lm import training

TINY = ["data.tokenizer=byte",  # bytes: smaller and quicker than the default BPE
        "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
        "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8", "train.log_every=1",
        "train.eval_every=100", "train.checkpoint_every=25", "train.sample_tokens=0",
        "optimizer.warmup_steps=0"]
# 6 N + 12 L T d of TINY (PaLM's estimate): N = L (4 d^2 + 2 d f) + V d, L=1, d=32, f=64, and
# V=320 (model.vocab_size=auto: the byte tokenizer's 257 rounded up to a multiple of 64).
TINY_FLOPS_PER_TOKEN = 6 * (1 * (4 * 32 * 32 + 2 * 32 * 64) + 320 * 32) + 12 * 1 * 32 * 32
STEPS = 150  # of the end-to-end runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _args(workdir, data_dir, *overrides, steps=STEPS):
    return ["--workdir", str(workdir), *TINY, f"data.data_dir={data_dir}",
            f"train.steps={steps}", *overrides]


def _config(data_dir, *overrides, steps=STEPS):
    return config_lib.load(None, _args("unused", data_dir, *overrides, steps=steps)[2:])


def _metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir):
    return {m["step"]: m["loss"] for m in _metrics(workdir) if "loss" in m}


def _checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir())


def _params(workdir):
    from flax import nnx

    _, model, step = training.load_model(workdir)
    return step, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


# --------------------------------------------------------------------------- the loop's helpers


def test_is_due_on_multiples_and_the_last_step():
    assert [s for s in range(1, 11) if training.is_due(s, 4, last_step=10)] == [4, 8, 10]
    assert [s for s in range(1, 4) if training.is_due(s, 100, last_step=3)] == [3]


def test_throughput_from_a_known_clock():
    now = [100.0]
    throughput = training.Throughput(
        10, tokens_per_step=256, flops_per_token=1e6, peak_flops=4e9, clock=lambda: now[0])
    assert throughput.measure(11) == {}  # the first step of a (resumed) run: compilation
    now[0] = 103.0
    throughput.restart(11)
    now[0] = 103.5
    # 3 steps of 256 tokens in 0.5 s; 1e6 FLOPs per token; a 4e9 FLOP/s peak.
    assert throughput.measure(14) == {"tokens_per_s": 1536.0, "flops_per_s": 1.536e9,
                                      "mfu": 1.536e9 / 4e9}
    unknown_peak = training.Throughput(0, tokens_per_step=1, flops_per_token=2.0, peak_flops=None,
                                       clock=lambda: now[0])
    now[0] = 104.5
    assert unknown_peak.measure(3) == {"tokens_per_s": 3.0, "flops_per_s": 6.0}  # no mfu on CPU


class _Rows:
    def __init__(self):
        self.rows = []

    def write(self, step, values):
        self.rows.append((step, values))

    def close(self):
        pass


def test_train_log_writes_every_nth_every_skipped_and_the_last_step(capsys):
    now = [0.0]
    rows = _Rows()
    throughput = training.Throughput(0, tokens_per_step=10, flops_per_token=1.0,
                                     peak_flops=None, clock=lambda: now[0])
    log = training.TrainLog(rows, training.Progress(10, 0), every=4, last_step=10,
                            throughput=throughput)
    for step in range(1, 11):
        now[0] = float(step**2)  # step s ends at time s^2: every window has its own rate
        log.record(step, {"loss": 1.0 / step, "learning_rate": 0.1,
                          "skipped_step": float(step == 6)})
    log.close()
    assert [step for step, _ in rows.rows] == [4, 6, 8, 10]
    assert rows.rows[1][1]["skipped_step"] == 1.0
    # The clock starts when step 1 ends and restarts at every 4th step (not at skipped ones):
    # windows 1-4, 4-6, 4-8 and 8-10, 10 tokens a step.
    expected = [10 * 3 / (16 - 1), 10 * 2 / (36 - 16), 10 * 4 / (64 - 16), 10 * 2 / (100 - 64)]
    assert [values["tokens_per_s"] for _, values in rows.rows] == pytest.approx(expected)
    assert "flops_per_s" in rows.rows[0][1] and "mfu" not in rows.rows[0][1]  # no known peak
    lines = capsys.readouterr().out.splitlines()  # not a terminal: one plain line per row
    assert lines == [f"step {s}/10: loss {1 / s:.3f}, lr 1.00e-01, tok_s {rate:,.0f}"
                     for s, rate in zip((4, 6, 8, 10), expected, strict=True)]


def test_nonfinite_guard_stops_after_max_in_a_row(tmp_path):
    guard = training.NonFiniteGuard(3, tmp_path)
    for step, skipped in [(1, 0), (2, 1), (3, 1), (4, 0), (5, 1), (6, 1)]:
        guard.check(step, {"loss": float(step) if not skipped else math.nan,
                           "skipped_step": float(skipped)})
    with pytest.raises(training.TrainingStopped) as stopped:
        guard.check(7, {"loss": math.nan, "skipped_step": 1.0})
    assert str(stopped.value).startswith(
        "stopped at step 7: 3 steps in a row had non-finite gradients (last finite loss 4.0 at "
        "step 4)")
    assert str(tmp_path) in str(stopped.value)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stop_request_turns_a_signal_into_a_flag_and_restores_the_handler(sig):
    before = signal.getsignal(sig)
    with training.StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert stop.requested and stop.signal_name == sig.name
    assert signal.getsignal(sig) is before


def test_metrics_log_drops_the_rows_after_the_resume_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 11)))
    log = training.MetricsLog(tmp_path, resume_step=6)
    log.write(7, {"loss": 0.5})
    log.close()
    assert _metrics(tmp_path) == [{"step": s, "loss": 1.0 / s} for s in range(1, 7)] + [
        {"step": 7, "loss": 0.5}]


def test_check_resumable_refuses_shape_and_optimizer_structure_changes(data_dir):
    saved = config_lib.to_dict(_config(data_dir, "train.batch_size=16"))
    assert training.check_resumable(saved, _config(data_dir)) == ["train.batch_size: 16 -> 8"]
    with pytest.raises(training.CheckpointError,
                       match="model.d_model=32 but the config says 64"):
        training.check_resumable(saved, _config(data_dir, "model.d_model=64"))
    with pytest.raises(training.CheckpointError,
                       match="optimizer.weight_decay=0.0 but the config says 0.1, which changes"):
        training.check_resumable(saved, _config(data_dir, "optimizer.weight_decay=0.1"))
    # A value of a trick that is on may change: the state's structure is the same.
    on = config_lib.to_dict(_config(data_dir, "optimizer.weight_decay=0.1"))
    assert training.check_resumable(on, _config(data_dir, "optimizer.weight_decay=0.2")) == [
        "optimizer.weight_decay: 0.1 -> 0.2"]


# --------------------------------------------------------------------------- one tiny run


KNOWN_PEAK = 2.5e12  # FLOP/s per device, patched in: on a CPU jax knows no peak


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """6 steps through training.run: a log row every step, evaluations after steps 3 and 6,
    checkpoints after 2, 4 and 6 of which the last 2 are kept; every compile recorded."""
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    config = _config(data_dir, "train.eval_every=3", "train.eval_batches=1",
                     "train.checkpoint_every=2", "train.keep_checkpoints=2", steps=6)
    with pytest.MonkeyPatch.context() as patch, CompileLog() as compiles:
        patch.setattr(training, "peak_flops", lambda device: KNOWN_PEAK)
        latest = training.run(config, workdir)
    return workdir, latest, compiles


def test_the_run_logs_every_step_and_evaluates(tiny_run):
    workdir, latest, _ = tiny_run
    rows = _metrics(workdir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "learning_rate", "grad_norm", "clipped", "skipped_step"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert abs(train_rows[0]["loss"] - math.log(257)) < 0.3  # an untrained byte model
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert r["val_bits_per_byte"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-12)
    # What run returns: the last step's metrics and the last evaluation.
    assert latest == {**{k: v for k, v in train_rows[-1].items()
                         if k not in ("tokens_per_s", "flops_per_s", "mfu")}, **evals[-1]}
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 6
    assert (workdir / "report.png").read_bytes().startswith(b"\x89PNG")


def test_flops_per_s_and_mfu_follow_from_tokens_per_s(tiny_run):
    workdir, _, _ = tiny_run
    train_rows = [r for r in _metrics(workdir) if "loss" in r]
    assert "tokens_per_s" not in train_rows[0]  # step 1 is mostly compilation
    timed = train_rows[1:]
    for r in timed:
        assert r["tokens_per_s"] > 0
        assert r["flops_per_s"] == pytest.approx(r["tokens_per_s"] * TINY_FLOPS_PER_TOKEN,
                                                 rel=1e-12)
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / KNOWN_PEAK, rel=1e-12)  # 1 device


def test_checkpoints_are_pruned_to_keep_checkpoints(tiny_run):
    workdir, _, _ = tiny_run
    assert _checkpoint_steps(workdir) == [4, 6]  # saved after 2, 4 and 6; keep_checkpoints=2


def test_the_step_compiles_once_over_the_run(tiny_run):
    _, _, compiles = tiny_run
    assert compiles.count("train_step") == 1, compiles.names
    assert compiles.count("eval_step") == 1, compiles.names


# --------------------------------------------------------------------------- refused early


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.source=text", "data.path=/no/such/file.txt"], "does not exist"),
        (["data.source=tfds", "data.name=no_such_dataset_xyz"], "data.name='no_such_dataset_xyz'"),
        (["train.stpes=3"], "Did you mean 'train.steps'?"),
        (["train.batch_size=eight"], "train.batch_size='eight' must be an integer"),
        (["optimizer.learning_rate=0"], "optimizer.learning_rate=0.0 is out of range"),
        (["optimizer.warmup_steps=500"], f"0 <= warmup_steps < train.steps={STEPS}"),
        (["optimizer.power=0"], "optimizer.power=0.0 is out of range"),
        (["optimizer.clip_norm=-1"], "optimizer.clip_norm=-1.0 is out of range"),
        (["data.seq_len=64"], "data.seq_len=64 is out of range; allowed: <= model.max_seq_len=32"),
    ],
)
def test_bad_input_exits_2_before_compiling_or_writing(
    tmp_path, data_dir, capsys, overrides, message
):
    workdir = tmp_path / "run"
    jax.clear_caches()  # so that anything compiled on the way would be compiled (and logged)
    with CompileLog() as compiles:
        assert train.main(_args(workdir, data_dir, *overrides)) == 2
    assert compiles.names == []
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not workdir.exists()


def _refused_by_run(config, workdir, error=config_lib.ConfigError):
    jax.clear_caches()
    with CompileLog() as compiles, pytest.raises(error) as refused:
        training.run(config, workdir)
    assert compiles.names == []
    return str(refused.value)


def test_empty_or_one_paragraph_data_and_unwritable_workdir_are_refused_early(tmp_path, data_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    config = _config(data_dir, "data.source=text", f"data.path={empty}")
    assert "names only empty files" in _refused_by_run(config, tmp_path / "a", data_lib.DataError)
    assert not (tmp_path / "a").exists()
    one = tmp_path / "one.txt"
    one.write_text("one paragraph\nover two lines\n")
    config = _config(data_dir, "data.source=text", f"data.path={one}")
    assert "has 1 paragraph(s); at least 2" in _refused_by_run(config, tmp_path / "a",
                                                               data_lib.DataError)
    assert not (tmp_path / "a").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "is not writable" in _refused_by_run(_config(data_dir), blocker / "run")
    assert blocker.read_text() == "x"


def test_a_mesh_that_does_not_match_the_devices_is_refused_before_any_write(tmp_path, data_dir):
    # tests/test_sharding.py checks every rule of the plan; here, that run applies it in time.
    workdir = tmp_path / "run"
    message = _refused_by_run(_config(data_dir, "mesh.fsdp=2"), workdir)
    assert ("mesh.data=-1, mesh.fsdp=2, mesh.tensor=1: the sizes set (2 devices) must divide the "
            "1 devices of this run") in message
    assert not workdir.exists()


def test_cudnn_attention_on_a_cpu_is_refused_before_any_write(tmp_path, data_dir):
    workdir = tmp_path / "run"
    assert ("model.attention='cudnn' needs a GPU and model.dtype=bfloat16 (this run: backend cpu, "
            "dtype float32); allowed here: auto or xla.") in _refused_by_run(
        _config(data_dir, "model.attention=cudnn"), workdir)
    assert not workdir.exists()


def test_cpu_devices_once_jax_has_started_is_refused_before_any_write(tmp_path, data_dir):
    have = len(jax.devices("cpu"))  # this process's backend has started, with JAX's default
    workdir = tmp_path / "run"
    message = _refused_by_run(_config(data_dir, f"cpu_devices={have + 1}"), workdir)
    assert (f"cpu_devices={have + 1} cannot be applied: JAX's CPU backend has already started "
            f"in this process with {have} device(s)") in message
    assert not workdir.exists()
    # The count it already has is no change: accepted.
    training.preflight(_config(data_dir, f"cpu_devices={have}"), tmp_path)
    assert len(jax.devices("cpu")) == have


# --------------------------------------------------------------------------- end to end (slow)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run: the trajectory every interrupted run must follow."""
    workdir = tmp_path_factory.mktemp("reference")
    assert train.main(_args(workdir, data_dir)) == 0
    return workdir


def _assert_same_run(workdir, reference, steps=STEPS):
    rows = [m["step"] for m in _metrics(workdir) if "loss" in m]
    assert rows == list(range(1, steps + 1)), "a step was logged twice or skipped"
    assert _losses(workdir) == _losses(reference)  # bit for bit, step for step
    step, params = _params(workdir)
    ref_step, ref_params = _params(reference)
    assert step == ref_step == steps
    for a, b in zip(params, ref_params, strict=True):
        np.testing.assert_array_equal(a, b)


def _as_if_stopped_after(workdir, step, copy):
    """A copy of a finished run's workdir as it was right after checkpoint ``step``: the later
    checkpoints and metrics rows removed, so that whatever follows comes from a resumed run."""
    shutil.copytree(workdir, copy)
    assert step in _checkpoint_steps(copy)
    for later in (copy / "checkpoints").iterdir():
        if int(later.name) > step:
            shutil.rmtree(later)
    rows = [line for line in (copy / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= step]
    (copy / "metrics.jsonl").write_text("".join(line + "\n" for line in rows))
    return copy


@pytest.mark.slow
def test_a_run_logs_evaluates_checkpoints_and_samples(tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    rc = train.main(_args(workdir, data_dir, "train.eval_every=10", "train.sample_tokens=20",
                          steps=20))
    out = capsys.readouterr().out
    assert rc == 0
    train_rows = [r for r in _metrics(workdir) if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 21))
    assert [r["step"] for r in _metrics(workdir) if "val_loss" in r] == [10, 20]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5  # it learns
    assert _checkpoint_steps(workdir) == [20]
    assert "sample:\nThe " in out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_saves_and_the_resumed_run_equals_the_uninterrupted_one(
    tmp_path, data_dir, reference, monkeypatch, capsys, sig
):
    # The data iterator sends the signal to this very process while step 37 is drawn: the real
    # signal path, at a step we choose.
    real_iterator = data_lib.train_iterator

    def iterator_that_gets_interrupted(*args, **kwargs):
        it = real_iterator(*args, **kwargs)
        drawn = [0]

        class Interrupted(type(it)):
            def __next__(self):
                drawn[0] += 1
                if drawn[0] == 37:
                    os.kill(os.getpid(), sig)
                return super().__next__()

        it.__class__ = Interrupted
        return it

    workdir = tmp_path / "run"
    monkeypatch.setattr(data_lib, "train_iterator", iterator_that_gets_interrupted)
    assert train.main(_args(workdir, data_dir)) == 0
    out = capsys.readouterr().out
    assert f"received {sig.name}: saved a checkpoint at step 37" in out
    assert "sample:" not in out
    assert _checkpoint_steps(workdir) == [25, 37]
    monkeypatch.setattr(data_lib, "train_iterator", real_iterator)
    assert train.main(_args(workdir, data_dir)) == 0
    assert "resumed from" in capsys.readouterr().out
    _assert_same_run(workdir, reference)


@pytest.mark.slow
def test_kill_9_at_a_random_moment_resumes_from_the_last_complete_checkpoint(
    tmp_path, data_dir, reference, python
):
    seed = int(os.environ.get("JAXTRICKS_TEST_SEED", random.SystemRandom().randrange(2**31)))
    kill_after = random.Random(seed).randint(30, STEPS - 10)  # a step, and a moment within it
    print(f"kill -9 after {kill_after} logged steps (seed {seed}: JAXTRICKS_TEST_SEED={seed} "
          "reruns this test with it)")
    workdir = tmp_path / "run"
    proc = python.start("train.py", *_args(workdir, data_dir), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= kill_after:
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (seed {seed})"
    assert train.main(_args(workdir, data_dir)) == 0
    _assert_same_run(workdir, reference)


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_skipped_for_the_previous_one(tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    assert train.main(_args(workdir, data_dir, steps=50)) == 0
    assert _checkpoint_steps(workdir) == [25, 50]
    # Checkpoint 50 truncated after the fact (a disk problem), and a half-written one that Orbax
    # never committed: neither may be picked.
    for f in (workdir / "checkpoints" / "50" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    (workdir / "checkpoints" / "75.orbax-checkpoint-tmp-1").mkdir()
    capsys.readouterr()
    assert train.main(_args(workdir, data_dir, "train.eval_every=20", steps=50)) == 0
    captured = capsys.readouterr()
    assert "unreadable" in captured.err
    assert "resumed from" in captured.out and "at step 25" in captured.out
    assert "resuming with a changed config: train.eval_every: 100 -> 20" in captured.out
    steps_logged = [m["step"] for m in _metrics(workdir) if "loss" in m]
    assert steps_logged == list(range(1, 51))
    assert [m["step"] for m in _metrics(workdir) if "val_loss" in m] == [40, 50]


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

    def loss_that_explodes(logits, targets, vocab_limit=None):
        return real_loss(logits, targets, vocab_limit) * jnp.where(jnp.all(targets == 255),
                                                                   jnp.nan, 1.0)

    monkeypatch.setattr(data_lib, "train_iterator", poisoned_iterator)
    monkeypatch.setattr(step_lib, "cross_entropy", loss_that_explodes)


@pytest.mark.slow
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
    # The schedule in closed form: no warmup, cosine from 3e-3 (the default peak) to 0 over the
    # 10 updates, update i (from 0) using lr(i).
    def lr(i):
        return 3e-3 * 0.5 * (1 + math.cos(math.pi * i / 10))

    assert rows[5]["learning_rate"] == rows[6]["learning_rate"] == rows[4]["learning_rate"]
    assert rows[4]["learning_rate"] == pytest.approx(lr(3), rel=1e-6)
    assert rows[7]["learning_rate"] == pytest.approx(lr(4), rel=1e-6)
    assert rows[8]["learning_rate"] == pytest.approx(lr(5), rel=1e-6)


@pytest.mark.slow
def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path, data_dir, monkeypatch, capsys):
    _poison(monkeypatch, bad_steps=set(range(6, 100)))
    workdir = tmp_path / "run"
    assert train.main(_args(workdir, data_dir, "train.max_consecutive_skips=4",
                            "train.checkpoint_every=5", steps=10)) == 1
    err = capsys.readouterr().err
    assert "stopped at step 9: 4 steps in a row had non-finite gradients" in err
    assert "last finite loss" in err and "at step 5" in err
    assert _checkpoint_steps(workdir) == [5]  # none after the non-finite steps began


@pytest.mark.slow
def test_a_foreign_or_mismatched_checkpoint_is_refused_before_compiling(
    tmp_path, data_dir, capsys
):
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints" / "7").mkdir(parents=True)
    (foreign / "checkpoints" / "7" / "weights.bin").write_bytes(b"\x00garbage")
    assert "is not a jaxtricks checkpoint" in _refused_by_run(
        _config(data_dir), foreign, training.CheckpointError)
    assert (foreign / "checkpoints" / "7" / "weights.bin").read_bytes() == b"\x00garbage"
    assert not (foreign / "metrics.jsonl").exists()

    run = tmp_path / "run"
    assert train.main(_args(run, data_dir, steps=25)) == 0
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert "model.d_model=32 but the config says 64" in _refused_by_run(
        _config(data_dir, "model.d_model=64", steps=30), run, training.CheckpointError)
    assert ("optimizer.l2=0.0 but the config says 0.0001, which changes the optimizer state"
            in _refused_by_run(_config(data_dir, "optimizer.l2=1e-4", steps=30), run,
                               training.CheckpointError))
    assert train.main(_args(run, data_dir, "optimizer.l2=1e-4", steps=30)) == 2
    assert "which changes the optimizer state" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_microbatches_train_the_same_run_and_resume_exactly(tmp_path, data_dir):
    # Gradient accumulation over 2 or 4 parts, scanned or unrolled: the whole batch's losses.
    whole = tmp_path / "whole"
    assert train.main(_args(whole, data_dir, steps=10)) == 0
    runs = {}
    for parts in ("train.microbatches=2", "train.microbatches=4",
                  "train.microbatches=4 train.unroll_microbatches=true"):
        workdir = tmp_path / parts.replace(" ", "_")
        assert train.main(_args(workdir, data_dir, *parts.split(), "train.checkpoint_every=4",
                                steps=10)) == 0
        losses = _losses(workdir)
        assert list(losses) == list(range(1, 11))
        np.testing.assert_allclose(list(losses.values()), list(_losses(whole).values()),
                                   rtol=1e-4)
        runs[parts] = workdir
    assert json.loads((workdir / "config.json").read_text())["train"]["microbatches"] == 4
    # Stopped after step 4 and resumed, the 2-part run follows itself bit for bit.
    uninterrupted = runs["train.microbatches=2"]
    resumed = _as_if_stopped_after(uninterrupted, 4, tmp_path / "resumed")
    assert train.main(_args(resumed, data_dir, "train.microbatches=2",
                            "train.checkpoint_every=4", steps=10)) == 0
    _assert_same_run(resumed, uninterrupted, steps=10)


@pytest.mark.slow
def test_cpu_devices_splits_the_cpu_into_a_mesh_for_the_same_run_that_resumes_exactly(
    tmp_path, data_dir, capsys, python
):
    # JAX takes the device count when it starts, so the split run is a process of its own.
    split, single = tmp_path / "split", tmp_path / "single"
    two_devices = ["cpu_devices=2", "train.checkpoint_every=10"]
    done = python.run("train.py", *_args(split, data_dir, *two_devices, steps=20))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 x cpu, mesh data 2 x fsdp 1 x tensor 1" in done.stdout
    assert train.main(_args(single, data_dir, steps=20)) == 0
    assert "1 x cpu, single" in capsys.readouterr().out
    # Each device takes half of the batch's rows; the loss is the whole batch's.
    split_losses, single_losses = _losses(split), _losses(single)
    assert list(split_losses) == list(range(1, 21))
    np.testing.assert_allclose(list(split_losses.values()), list(single_losses.values()),
                               rtol=1e-4)
    # Stopped after step 10 and resumed on 2 devices, the run follows itself bit for bit.
    resumed = _as_if_stopped_after(split, 10, tmp_path / "resumed")
    done = python.run("train.py", *_args(resumed, data_dir, *two_devices, steps=20))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout and "at step 10" in done.stdout
    _assert_same_run(resumed, split, steps=20)
    # Its checkpoint (sharded over 2 devices) resumes on one device.
    assert train.main(_args(split, data_dir, steps=25)) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [m["step"] for m in _metrics(split) if "loss" in m] == list(range(1, 26))
