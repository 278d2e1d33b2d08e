"""The range test's pieces against closed forms: schedule, smoothing, the two rules, the CSV.

The run itself, on a tiny model, is tested through the command in tests/test_cli.py.
"""

import csv

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from jaxtricks.lm import lr_find, plots


def test_exponential_range_is_geometric_and_clamped():
    schedule = lr_find.exponential_range(1e-7, 10.0, num_steps=100)
    steps = jnp.arange(120)
    values = np.asarray(jax.jit(schedule)(steps), np.float64)
    expected = 1e-7 * (1e8) ** (np.minimum(np.arange(120), 99) / 99)
    np.testing.assert_allclose(values, expected, rtol=2e-5)
    assert values.dtype == np.float64 and schedule(0).dtype == jnp.float32
    np.testing.assert_allclose(float(schedule(2**31 - 1)), 10.0, rtol=1e-6)
    np.testing.assert_allclose(lr_find.sweep_learning_rates(1e-7, 10.0, 100), expected[:100],
                               rtol=1e-12)


@pytest.mark.parametrize("args, match", [
    ((0.0, 1.0, 10), "min_lr"),
    ((1e-3, float("inf"), 10), "max_lr"),
    ((1.0, 1.0, 10), "smaller than max_lr"),
    ((1e-3, 1.0, 1), "steps"),
    ((1e-3, 1.0, 2.5), "steps"),
])
def test_bad_ranges_are_rejected(args, match):
    with pytest.raises(lr_find.LRFindError, match=match):
        lr_find.exponential_range(*args)


def test_smoothing_is_fastai_bias_corrected_ema():
    rng = np.random.default_rng(0)
    losses = rng.uniform(2, 6, size=30)
    beta = 0.98
    expected = [
        sum((1 - beta) * beta ** (i - j) * losses[j] for j in range(i + 1)) / (1 - beta ** (i + 1))
        for i in range(30)
    ]
    np.testing.assert_allclose(lr_find.smooth(losses), expected, rtol=1e-12)
    assert lr_find.smooth([3.0]).tolist() == pytest.approx([3.0], rel=1e-14)  # no pull to 0
    assert np.isnan(lr_find.smooth([3.0, np.nan, 3.0])[1:]).all()


def test_divergence_rule():
    assert lr_find.divergence(4.0, best=1.0) is None
    assert "exceeds 4 x the best" in lr_find.divergence(4.01, best=1.0)
    assert lr_find.divergence(float("nan"), best=1.0) is not None
    assert lr_find.divergence(float("inf"), best=1.0) is not None


def _synthetic_curve(n=100, center=1e-2):
    """A loss that falls like a tanh in log lr, steepest at ``center``, then blows up."""
    lrs = lr_find.sweep_learning_rates(1e-6, 1e2, n)
    x = np.log(lrs / center)
    losses = 5.0 - 2.0 * np.tanh(x) + (lrs / 0.3) ** 2
    return lrs, losses


def test_steepest_is_where_d_loss_d_log_lr_is_most_negative():
    lrs, losses = _synthetic_curve()
    i = lr_find.steepest_index(lrs, losses)
    # the tanh's steepest point is at lr = 1e-2; the grid has 8 decades / 99 steps
    assert abs(np.log10(lrs[i]) - (-2.0)) <= 8 / 99
    slopes = np.gradient(losses, np.log(lrs))
    assert slopes[i] == slopes.min()


def test_valley_is_halfway_along_the_longest_descent():
    flat = [5.0] * 10
    descent = list(np.linspace(4.9, 2.0, 30))  # indices 10..39
    rise = list(np.linspace(2.5, 9.0, 20))
    i = lr_find.valley_index(flat + descent + rise)
    # the longest strictly decreasing subsequence: one 5.0, then the 30 descending points
    start, end = 9, 39  # the earliest-ending longest one starts at the last flat 5.0 before 4.9
    span = end - start
    assert i == start + span // 3 + span // 6
    assert lr_find.valley_index([1.0, 2.0, 3.0]) == 0  # no descent: the first point
    with pytest.raises(lr_find.LRFindError):
        lr_find.valley_index([])


def test_analyze_leaves_out_fastais_window_and_suggests_inside_the_range():
    lrs, losses = _synthetic_curve()
    smoothed = lr_find.smooth(losses)
    stop = int(np.argmax(smoothed > 4 * np.minimum.accumulate(smoothed))) + 1  # where it diverges
    assert 50 < stop < 100
    result = lr_find.analyze(lrs[:stop], losses[:stop], min_lr=1e-6, max_lr=1e2, num_steps=100,
                             stop_reason="diverged")
    window = lr_find.suggestion_window(result.smoothed, 100)
    assert window == slice(10, stop - 5)
    assert lrs[10] <= result.valley_lr <= lrs[stop - 6]
    assert lrs[10] <= result.steepest_lr <= lrs[stop - 6]
    assert result.suggestion == result.valley_lr and result.suggestion_rule == "valley"
    # the smoothed curve lags the raw one: its steepest point is a little later than 1e-2
    assert 1e-2 <= result.steepest_lr <= 1e-1


def test_too_few_points_give_no_suggestion_and_nan_cuts_the_window():
    result = lr_find.analyze([1e-3], [5.0], min_lr=1e-3, max_lr=1.0, num_steps=50)
    assert result.suggestion is None and result.steepest_lr is None
    smoothed = lr_find.smooth([5.0, 4.0, 3.0, np.nan, 2.0])
    assert lr_find.suggestion_window(smoothed, 5) == slice(0, 3)


def test_csv_and_png(tmp_path):
    lrs, losses = _synthetic_curve(60)
    result = lr_find.analyze(lrs[:50], losses[:50], min_lr=1e-6, max_lr=1e2, num_steps=60,
                             stop_reason="diverged")
    path = lr_find.write_csv(result, tmp_path / "points.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(lr_find.CSV_COLUMNS)
    assert [int(r["step"]) for r in rows] == list(range(50))
    for key, column in [("learning_rate", lrs[:50]), ("loss", losses[:50]),
                        ("smoothed_loss", result.smoothed)]:
        np.testing.assert_array_equal([float(r[key]) for r in rows], column)  # exact: repr
    png = plots.plot_lr_find(result, tmp_path / "lr_find.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[:2] >= (300, 400)
