"""The ``jaxtricks`` command on a tiny real run: lr-find, plot-schedule, report, sample, events.

One 6-step training run (module fixture) serves the TensorBoard, report, sample and lr-find tests
(slow: end to end); the command's argument errors and plot-schedule need no run.
"""

import csv
import json
import math
import struct
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from jaxtricks.lm import config as config_lib
from jaxtricks.lm import plots
from jaxtricks.lm.cli import main

TINY = ["data.tokenizer=byte",  # bytes: smaller and quicker than the default BPE
        "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
        "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8",
        "optimizer.warmup_steps=0"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from jaxtricks.lm import training

    workdir = tmp_path_factory.mktemp("run")
    config = config_lib.load(None, TINY + [
        "train.steps=6", "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
        "train.checkpoint_every=100", "train.sample_tokens=0"])
    training.run(config, workdir)
    return workdir


def assert_png(path: Path, min_size=(300, 400)) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(path).shape
    assert height >= min_size[0] and width >= min_size[1]


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


# --------------------------------------------------------------------------- TensorBoard


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: slow but independent of tensorboardX."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_event_records(path: Path) -> list[bytes]:
    """TFRecord framing: uint64 length, uint32 masked crc of it, data, uint32 masked crc of data."""
    blob, records, offset = path.read_bytes(), [], 0
    while offset < len(blob):
        header = blob[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", blob[offset + 8:offset + 12])
        assert length_crc == _masked_crc(header)
        data = blob[offset + 12:offset + 12 + length]
        (data_crc,) = struct.unpack("<I", blob[offset + 12 + length:offset + 16 + length])
        assert data_crc == _masked_crc(data)
        records.append(data)
        offset += 16 + length
    assert offset == len(blob)
    return records


@pytest.mark.slow
def test_tensorboard_scalars_equal_metrics_jsonl(run_dir):
    from tensorboardX.proto import event_pb2

    (events_file,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    scalars = {}
    for record in read_event_records(events_file):
        event = event_pb2.Event()
        event.ParseFromString(record)
        for value in event.summary.value:
            assert (value.tag, event.step) not in scalars
            scalars[value.tag, event.step] = value.simple_value

    expected = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        for key, value in record.items():
            expected[key, step] = value
    assert {"loss", "grad_norm", "learning_rate", "val_loss"} <= {k for k, _ in expected}
    assert {s for k, s in expected if k == "val_loss"} == {3, 6}
    assert scalars.keys() == expected.keys()
    for key, value in expected.items():
        assert scalars[key] == np.float32(value), key  # TensorBoard keeps float32


# --------------------------------------------------------------------------- report


@pytest.mark.slow
def test_report_of_the_run(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert_png(run_dir / "report.png", min_size=(600, 600))
    assert "wrote" in capsys.readouterr().out
    series = plots.report_series(run_dir)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    np.testing.assert_array_equal(series.steps, [r["step"] for r in train])
    np.testing.assert_array_equal(series.grad_norm, [r["grad_norm"] for r in train])
    np.testing.assert_array_equal(series.val_steps, [3, 6])
    assert series.clip_norm == 1.0  # the run's config.json

    out = run_dir / "elsewhere" / "r.png"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert_png(out, min_size=(600, 600))


# --------------------------------------------------------------------------- sample


@pytest.mark.slow
def test_sample_is_reproducible_for_a_seed(run_dir, capsys):
    from jaxtricks.lm import sampling

    args = ["sample", str(run_dir), "--prompt", "The ", "--max-new-tokens", "20", "--top-k", "40"]
    assert main([*args, "--seed", "3"]) == 0
    first = capsys.readouterr()
    traces = dict(sampling.TRACE_COUNTS)
    assert main([*args, "--seed", "3"]) == 0
    second = capsys.readouterr()
    assert dict(sampling.TRACE_COUNTS) == traces  # same shapes: nothing compiled again
    assert first.out == second.out
    assert first.out.startswith("The ")
    assert len(first.out.encode()) > len("The ")
    assert "tokens/s" in first.err and "step 6" in first.err
    assert main([*args, "--seed", "4"]) == 0
    assert capsys.readouterr().out != first.out

    assert main(["sample", str(run_dir), "--temperature", "0", "--max-new-tokens", "5",
                 "--prompt", ""]) == 0  # an empty prompt starts a new document; greedy


@pytest.mark.slow
@pytest.mark.parametrize("args, needles", [
    (["--temperature", "-1"], ["--temperature", ">= 0"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    (["--top-k", "0"], ["--top-k", ">= 1"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--prompt", "x" * 33], ["33 tokens", "max_seq_len=32"]),
])
def test_sample_errors(run_dir, capsys, args, needles):
    assert_user_error(main(["sample", str(run_dir), *args]), capsys.readouterr().err, *needles)


def test_sample_without_checkpoint(tmp_path, capsys):
    assert_user_error(main(["sample", str(tmp_path / "missing")]), capsys.readouterr().err,
                      "does not exist")
    assert_user_error(main(["sample", str(tmp_path)]), capsys.readouterr().err, "no checkpoint")


# --------------------------------------------------------------------------- lr-find


@pytest.mark.slow
def test_lr_find_diverges_suggests_and_leaves_checkpoints_alone(run_dir, capsys):
    checkpoints_before = snapshot(run_dir / "checkpoints")
    assert checkpoints_before  # the run saved one
    others_before = {p.name for p in run_dir.iterdir()}
    steps = 40
    code = main(["lr-find", "--workdir", str(run_dir), "--steps", str(steps),
                 "--min-lr", "1e-4", "--max-lr", "1e4", *TINY])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "stopped at step" in out and "suggested learning rate (valley rule)" in out
    assert "steepest descent" in out

    assert snapshot(run_dir / "checkpoints") == checkpoints_before
    assert {p.name for p in run_dir.iterdir()} == others_before | {"lr_find"}
    out_dir = run_dir / "lr_find"
    assert sorted(p.name for p in out_dir.iterdir()) == ["lr_find.csv", "lr_find.png"]
    assert_png(out_dir / "lr_find.png")

    with (out_dir / "lr_find.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "learning_rate", "loss", "smoothed_loss"]
    n = len(rows)
    assert 5 < n < steps  # stopped on divergence, before the last step
    assert [int(r["step"]) for r in rows] == list(range(n))
    lrs = np.array([float(r["learning_rate"]) for r in rows])
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], (1e8) ** (1 / (steps - 1)), rtol=1e-9)
    assert lrs[0] == 1e-4
    smoothed = np.array([float(r["smoothed_loss"]) for r in rows])
    best = np.minimum.accumulate(smoothed)
    assert smoothed[-1] > 4 * best[-1] or not math.isfinite(smoothed[-1])  # why it stopped
    assert np.all(smoothed[:-1] <= 4 * best[:-1])  # ... and not earlier
    assert abs(float(rows[0]["loss"]) - math.log(257)) < 0.3  # an untrained byte model

    suggested = float(out.split("suggested learning rate (valley rule): ")[1].split()[0])
    assert lrs[0] <= suggested <= lrs[-1]


# --------------------------------------------------------------------------- plot-schedule


def test_plot_schedule_command(tmp_path, capsys):
    out = tmp_path / "s.png"
    code = main(["plot-schedule", "--out", str(out), "train.steps=50",
                 "optimizer.schedule=wsd", "optimizer.warmup_steps=5"])
    assert code == 0
    assert_png(out)
    assert "schedule=wsd over 50 steps" in capsys.readouterr().out


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, needles", [
    (["lr-find", "--min-lr", "-1"], ["--min-lr", "> 0"]),
    (["lr-find", "--min-lr", "1", "--max-lr", "0.5"], ["smaller than max_lr"]),
    (["lr-find", "--steps", "1"], ["--steps", ">= 2"]),
    (["lr-find", "model.nm_layers=2"], ["unknown config key 'model.nm_layers'", "num_layers"]),
    (["lr-find", "optimizer.learning_rate=-1"], ["optimizer.learning_rate"]),
    (["lr-find", "--config", "no/such.yaml"], ["does not exist"]),
    (["lr-find", "data.source=text", "data.path=/no/such/corpus.txt"], ["data.path"]),
    (["lr-find", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["plot-schedule", "optimizer.warmup_steps=2000"], ["optimizer.warmup_steps"]),
    (["plot-schedule", "notanoverride"], ["notanoverride"]),
    (["report", "/no/such/run"], ["does not exist"]),
    (["frobnicate"], ["invalid choice"]),
    ([], ["COMMAND"]),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were: not into the repo
    assert_user_error(main(argv), capsys.readouterr().err, *needles)
    assert list(tmp_path.iterdir()) == []


def test_report_without_metrics(tmp_path, capsys):
    assert_user_error(main(["report", str(tmp_path)]), capsys.readouterr().err, "metrics.jsonl")


@pytest.mark.slow
def test_python_dash_m_and_help(python):
    done = python.run("-m", "jaxtricks", "report", "/no/such/run", timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert_user_error(done.returncode, done.stderr, "does not exist")
    done = python.run("-m", "jaxtricks", "--help", timeout=60)
    assert done.returncode == 0
    for command in ("lr-find", "plot-schedule", "report", "sample"):
        assert command in done.stdout


@pytest.mark.parametrize("entry", ["jaxtricks", "train.py"])
def test_missing_train_extra_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch, entry):
    """Without the trainer's packages, both entry points name the extra to install, exit 2 and
    write nothing (a package is made missing by adding an import name that does not exist)."""
    import jaxtricks.lm
    import train

    monkeypatch.setattr(jaxtricks.lm, "TRAIN_MODULES",
                        (*jaxtricks.lm.TRAIN_MODULES, "jaxtricks_no_such_package"))
    workdir = tmp_path / "run"
    if entry == "jaxtricks":
        status = main(["plot-schedule", "--out", str(tmp_path / "s.png")])
    else:
        status = train.main(["--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "jaxtricks_no_such_package missing" in err and "pip install 'jaxtricks[train]'" in err
    assert "flax" not in err  # only what is missing is named
    assert not workdir.exists() and not (tmp_path / "s.png").exists()
