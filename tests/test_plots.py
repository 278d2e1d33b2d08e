"""The data behind the schedule and report pictures, and that the pictures are written."""

import json
import math

import matplotlib.image
import numpy as np
import pytest

from jaxtricks.lm import config as config_lib
from jaxtricks.lm import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_size=(300, 400)):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(path).shape
    assert height >= min_size[0] and width >= min_size[1]


# --------------------------------------------------------------------------- schedule


def test_schedule_curve_is_warmup_then_cosine_in_closed_form():
    peak, end, warmup, total = 2e-3, 1e-4, 20, 120
    config = config_lib.load(None, [
        f"optimizer.learning_rate={peak}", f"optimizer.end_value={end}",
        f"optimizer.warmup_steps={warmup}", "optimizer.schedule=cosine", f"train.steps={total}"])
    steps, lrs = plots.schedule_curve(config)
    np.testing.assert_array_equal(steps, np.arange(total))
    t = np.arange(total, dtype=np.float64)
    expected = np.where(
        t < warmup, peak * t / warmup,
        end + (peak - end) * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (total - warmup))))
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-9)
    assert lrs[0] == 0.0 and lrs[warmup] == pytest.approx(peak)


def test_schedule_curve_is_wsd_in_closed_form():
    peak, warmup, total, fraction = 1e-3, 10, 100, 0.3
    config = config_lib.load(None, [
        f"optimizer.learning_rate={peak}", f"optimizer.warmup_steps={warmup}",
        "optimizer.schedule=wsd", f"optimizer.decay_fraction={fraction}",
        "optimizer.decay_shape=linear", f"train.steps={total}"])
    _, lrs = plots.schedule_curve(config)
    decay_start = total - round(fraction * total)
    assert plots.schedule_phases(config) == {"warmup_end": warmup, "decay_start": decay_start}
    t = np.arange(total, dtype=np.float64)
    expected = np.select(
        [t < warmup, t < decay_start],
        [peak * t / warmup, peak],
        peak * (1 - (t - decay_start) / (total - decay_start)))
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-9)


PEAK = 3e-3  # the default optimizer.learning_rate; end_value defaults to 0


def _warmup(t, w):
    return PEAK * t / w


# Each schedule over train.steps=80 in closed form (numpy, float64): linear warmup over W steps,
# then the decay over the R = 80 - W steps left, seeing the step counted from W.
@pytest.mark.parametrize("overrides, closed_form", [
    (["optimizer.schedule=constant"],  # W = 50, the default
     lambda t: np.where(t < 50, _warmup(t, 50), PEAK)),
    (["optimizer.schedule=linear", "optimizer.warmup_steps=7"],
     lambda t: np.where(t < 7, _warmup(t, 7), PEAK * (1 - (t - 7) / 73))),
    (["optimizer.schedule=exponential", "optimizer.decay_rate=0.05", "optimizer.end_value=1e-4"],
     lambda t: np.where(t < 50, _warmup(t, 50), np.maximum(PEAK * np.exp(-0.05 * (t - 50)), 1e-4))),
    (["optimizer.schedule=polynomial", "optimizer.power=2", "optimizer.warmup_steps=3"],
     lambda t: np.where(t < 3, _warmup(t, 3), PEAK * (1 - (t - 3) / 77) ** 2)),
    (["optimizer.schedule=inverse_sqrt", "optimizer.warmup_steps=10"],
     lambda t: np.where(t < 10, _warmup(t, 10), PEAK * np.sqrt(10 / np.maximum(t, 10)))),
    # The decay lasts round(0.2 * 80) = 16 steps and ends the run: stable from 4 to 64.
    (["optimizer.schedule=wsd", "optimizer.decay_shape=sqrt", "optimizer.warmup_steps=4"],
     lambda t: np.select([t < 4, t < 64], [_warmup(t, 4), PEAK],
                         PEAK * (1 - np.sqrt(np.clip(t - 64, 0, 16) / 16)))),
])
def test_schedule_curve_is_each_schedule_in_closed_form(overrides, closed_form):
    config = config_lib.load(None, ["train.steps=80", *overrides])
    steps, lrs = plots.schedule_curve(config)
    np.testing.assert_array_equal(steps, np.arange(80))
    np.testing.assert_allclose(lrs, closed_form(np.arange(80, dtype=np.float64)), rtol=1e-5,
                               atol=1e-10)


def test_plot_schedule_writes_a_png(tmp_path):
    config = config_lib.load(None, ["train.steps=300", "optimizer.warmup_steps=30"])
    path = plots.plot_schedule(config, tmp_path / "sub" / "schedule.png")
    assert path == tmp_path / "sub" / "schedule.png"
    assert_png(path)


# --------------------------------------------------------------------------- report

TRAIN = dict(learning_rate=1e-3, clipped=0.0, skipped=0.0, consecutive_skipped=0.0,
             skipped_step=0.0, tokens_per_s=1000.0)


def _write_run(workdir, clip_norm=0.5):
    lines = [
        {"step": 10, "loss": 5.0, "grad_norm": 0.4, **TRAIN},
        {"step": 20, "loss": 4.0, "grad_norm": 0.9, **TRAIN, "clipped": 1.0},
        # a skipped step: non-finite loss, grad_norm of the last applied update, counters up
        {"step": 23, "loss": math.nan, "grad_norm": 0.9,
         **{**TRAIN, "skipped": 1.0, "consecutive_skipped": 1.0, "skipped_step": 1.0}},
        {"step": 30, "loss": 3.5, "grad_norm": 0.3, **{**TRAIN, "skipped": 1.0}},
        {"step": 30, "val_loss": 3.6, "val_bits_per_byte": 3.6 / math.log(2)},
        {"step": 40, "loss": 3.0, "grad_norm": 0.2, **{**TRAIN, "skipped": 1.0},
         "learning_rate": 5e-4},
        {"step": 40, "val_loss": 3.2, "val_bits_per_byte": 3.2 / math.log(2)},
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = config_lib.to_dict(config_lib.load(None, [f"optimizer.clip_norm={clip_norm}"]))
    (workdir / "config.json").write_text(json.dumps(config))


def test_report_series_from_a_known_metrics_file(tmp_path):
    _write_run(tmp_path)
    s = plots.report_series(tmp_path)
    np.testing.assert_array_equal(s.steps, [10, 20, 23, 30, 40])
    np.testing.assert_array_equal(s.loss, [5.0, 4.0, np.nan, 3.5, 3.0])
    np.testing.assert_array_equal(s.grad_norm, [0.4, 0.9, 0.9, 0.3, 0.2])
    np.testing.assert_array_equal(s.learning_rate, [1e-3] * 4 + [5e-4])
    np.testing.assert_array_equal(s.clipped, [False, True, False, False, False])
    np.testing.assert_array_equal(s.skipped, [False, False, True, False, False])
    np.testing.assert_array_equal(s.val_steps, [30, 40])
    np.testing.assert_array_equal(s.val_loss, [3.6, 3.2])
    assert s.clip_norm == 0.5
    assert s.total_skipped == 1


def test_report_without_clipping_or_config(tmp_path):
    _write_run(tmp_path)
    (tmp_path / "config.json").unlink()
    assert plots.report_series(tmp_path).clip_norm is None
    config = config_lib.to_dict(config_lib.load(None, ["optimizer.clip_norm=null"]))
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert plots.report_series(tmp_path).clip_norm is None
    assert_png(plots.write_report(tmp_path))


def test_write_report_writes_a_png(tmp_path):
    _write_run(tmp_path)
    path = plots.write_report(tmp_path)
    assert path == tmp_path / "report.png"
    assert_png(path, min_size=(600, 600))
    other = plots.write_report(tmp_path, tmp_path / "x" / "other.png")
    assert_png(other, min_size=(600, 600))


def test_report_errors_name_the_file_and_torn_lines_are_skipped(tmp_path, capsys):
    with pytest.raises(plots.ReportError, match="metrics.jsonl does not exist"):
        plots.write_report(tmp_path)
    assert not (tmp_path / "report.png").exists()
    # A torn last line (a run killed mid-append), garbage, and a line without a step: skipped.
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n\x00\x01garbage\n{"loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
        '{"step": 3, "loss":')
    s = plots.report_series(tmp_path)
    assert s.steps.tolist() == [1, 2] and s.loss.tolist() == [2.0, 1.5]
    assert s.bad_lines == (2, 3, 5)
    assert_png(plots.write_report(tmp_path))
    assert [r["step"] for r in plots.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert "skipped 3 line(s) that are not metrics lines (torn or corrupt; line 2, 3, 5)" in (
        capsys.readouterr().err)


def test_report_of_a_run_with_only_an_evaluation(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "val_loss": 5.0}\n')
    s = plots.report_series(tmp_path)
    assert len(s.steps) == 0 and s.val_loss.tolist() == [5.0] and s.total_skipped == 0
    assert_png(plots.write_report(tmp_path))


@pytest.mark.slow
def test_importing_plots_does_not_import_matplotlib(python):
    code = "import sys, jaxtricks.lm.plots, jaxtricks.lm.cli; print('matplotlib' in sys.modules)"
    done = python.run("-c", code, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
