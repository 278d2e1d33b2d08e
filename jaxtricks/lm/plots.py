"""Pictures around a training run: the range test, the learning-rate schedule, the run report.

All the matplotlib code of jaxtricks is here. It draws on ``matplotlib.figure.Figure`` with the Agg
canvas (no pyplot, so no GUI backend and no global state) and matplotlib is imported inside the
functions that draw, so ``import jaxtricks.lm.plots`` stays light. Each picture has a function that
returns the data behind it (:func:`schedule_curve`, :func:`report_series`), which tests check.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

DPI = 110


class ReportError(ValueError):
    """A run directory whose metrics cannot be read."""


def _figure(nrows: int, figsize: tuple[float, float], sharex: bool = False):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
    return fig, axes


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------- range test


def plot_lr_find(result, path: str | Path) -> Path:
    """The range test: loss (raw and smoothed) against the learning rate on a log axis, with the
    suggestion and the steepest point marked. ``result`` is a
    :class:`jaxtricks.lm.lr_find.RangeTestResult`."""
    fig, (ax,) = _figure(1, (8, 4.8))
    lrs, raw, smoothed = result.learning_rates, result.losses, result.smoothed
    ax.plot(lrs, raw, color="0.7", linewidth=0.8, label="training loss")
    ax.plot(lrs, smoothed, color="C0", linewidth=2, label="smoothed (EMA, beta 0.98)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (nats per token)")
    # Keep the interesting part in view: a diverged loss can be orders of magnitude larger.
    finite_smoothed = smoothed[np.isfinite(smoothed)]
    finite_raw = raw[np.isfinite(raw)]
    if len(finite_smoothed):
        best = float(finite_smoothed.min())
        top = max(float(finite_smoothed[0]), 4 * best)
        bottom = min(best, float(finite_raw.min())) if len(finite_raw) else best
        if len(finite_raw):
            top = min(top, float(finite_raw.max()))
        span = max(top - bottom, 1e-3)
        ax.set_ylim(bottom - 0.05 * span, top + 0.05 * span)
    ax.set_xlim(result.min_lr, result.max_lr)

    def mark(lr, color, marker, label):
        i = int(np.argmin(np.abs(np.log(lrs) - math.log(lr))))
        ax.axvline(lr, color=color, linestyle="--", linewidth=1)
        ax.plot([lr], [smoothed[i]], marker, color=color, markersize=9, label=label)

    if result.steepest_lr is not None:
        mark(result.steepest_lr, "C2", "^", f"steepest descent: {result.steepest_lr:.2e}")
    if result.suggestion is not None:
        mark(result.suggestion, "C3", "o",
             f"suggestion ({result.suggestion_rule} rule): {result.suggestion:.2e}")
    if result.stop_reason is not None:  # drawn at the top edge when the loss is out of view
        top = ax.get_ylim()[1]
        y = min(smoothed[-1], top) if np.isfinite(smoothed[-1]) else top
        ax.plot([lrs[-1]], [y], "kx", markersize=9, clip_on=False, label="stopped: diverged")
    ax.legend(loc="upper left")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"learning-rate range test: {len(lrs)} of {result.num_steps} steps, "
                 f"lr {result.min_lr:.0e} to {result.max_lr:.0e}")
    return _save(fig, path)


# --------------------------------------------------------------------------- schedule


def schedule_curve(config) -> tuple[np.ndarray, np.ndarray]:
    """The configured learning rate at every update: ``(steps, lrs)`` for ``steps = 0 ..
    train.steps - 1``, from :func:`jaxtricks.lm.config.schedule_from_config`, evaluated in one
    vectorised call. Builds no model."""
    import jax
    import jax.numpy as jnp

    from jaxtricks.lm.config import schedule_from_config

    schedule = schedule_from_config(config.optimizer, config.train.steps)
    steps = np.arange(config.train.steps)
    lrs = jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32))
    return steps, np.asarray(lrs, np.float64)


def schedule_phases(config) -> dict[str, int]:
    """The steps where the schedule changes phase: ``warmup_end`` and, for ``wsd``,
    ``decay_start`` (the same arithmetic as :func:`jaxtricks.lm.config.schedule_from_config`)."""
    oc, total = config.optimizer, config.train.steps
    phases = {"warmup_end": oc.warmup_steps}
    if oc.schedule == "wsd":
        decay = min(total - oc.warmup_steps, max(1, round(oc.decay_fraction * total)))
        phases["decay_start"] = total - decay
    return phases


def plot_schedule(config, path: str | Path) -> Path:
    """The learning rate over the whole configured run (:func:`schedule_curve`) as a PNG."""
    steps, lrs = schedule_curve(config)
    oc = config.optimizer
    fig, (ax,) = _figure(1, (8, 4))
    ax.plot(steps, lrs, color="C0", linewidth=2)
    phases = schedule_phases(config)
    if phases["warmup_end"] > 0:
        ax.axvline(phases["warmup_end"], color="C1", linestyle="--", linewidth=1,
                   label=f"end of warmup (step {phases['warmup_end']})")
    if "decay_start" in phases:
        ax.axvline(phases["decay_start"], color="C3", linestyle="--", linewidth=1,
                   label=f"decay starts (step {phases['decay_start']})")
    if len(phases) > 1 or phases["warmup_end"] > 0:
        ax.legend(loc="lower center")
    ax.set_xlabel("step (update index; update i uses lr(i))")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_xlim(0, max(1, len(steps) - 1))
    ax.set_ylim(0, 1.08 * max(float(lrs.max()), 1e-12))
    ax.grid(True, alpha=0.3)
    extra = {"exponential": f", decay_rate {oc.decay_rate:g}",
             "polynomial": f", power {oc.power:g}",
             "wsd": f", decay: {oc.decay_fraction:g} of the run, {oc.decay_shape}"}
    ax.set_title(f"optimizer.schedule={oc.schedule}{extra.get(oc.schedule, '')}\n"
                 f"peak {oc.learning_rate:.2e}, warmup {oc.warmup_steps} steps, "
                 f"end value {oc.end_value:.2e}, train.steps={len(steps)}", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- run report


@dataclasses.dataclass(frozen=True)
class ReportSeries:
    """What the report draws, read from ``metrics.jsonl`` (train lines have ``loss``, evaluation
    lines ``val_loss``) and ``config.json``."""

    steps: np.ndarray  # (n,) int: the logged training steps
    loss: np.ndarray  # (n,) float: training loss (NaN where the line has none)
    learning_rate: np.ndarray  # (n,) float
    grad_norm: np.ndarray  # (n,) float: global norm before clipping
    clipped: np.ndarray  # (n,) bool: the logged step was clipped
    skipped: np.ndarray  # (n,) bool: the logged step was skipped (non-finite gradients)
    val_steps: np.ndarray  # (m,) int
    val_loss: np.ndarray  # (m,) float
    clip_norm: float | None  # optimizer.clip_norm of config.json (None: off or unknown)
    total_skipped: int  # the run's count of skipped steps at its last logged step
    bad_lines: tuple[int, ...] = ()  # numbers of the lines skipped as torn or corrupt


def parse_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The JSON objects of a ``metrics.jsonl`` in file order, and the numbers of the lines that
    are not metrics lines (torn by a run killed mid-write, or garbage), which are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path} does not exist; give the workdir of a run made by train.py.")
    records, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        record = metrics_record(line)
        if record is None:
            bad.append(number)
        else:
            records.append(record)
    return records, bad


def metrics_record(line: str) -> dict[str, Any] | None:
    """One ``metrics.jsonl`` line as its JSON object; None for a line that is not a metrics line
    (torn by a write cut short, or garbage): not JSON, or without an integer ``step``."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def skipped_message(path: str | Path, bad: list[int]) -> str:
    """One line that says how many lines of ``path`` were skipped, and which."""
    shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    return (f"{path}: skipped {len(bad)} line(s) that are not metrics lines (torn or corrupt; "
            f"line {shown})")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl``, in file order; lines that are not metrics lines
    are skipped with a warning on stderr."""
    records, bad = parse_metrics(path)
    if bad:
        print(f"warning: {skipped_message(path, bad)}", file=sys.stderr)
    return records


def report_series(workdir: str | Path) -> ReportSeries:
    """The series of :class:`ReportSeries` from ``workdir/metrics.jsonl`` and
    ``workdir/config.json`` (the clip threshold; absent file or ``clip_norm: null``: None)."""
    workdir = Path(workdir)
    records, bad = parse_metrics(workdir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]

    def column(key, dtype=np.float64, rows=train):
        return np.array([r.get(key, np.nan) for r in rows], dtype=dtype)

    clip_norm = None
    config_path = workdir / "config.json"
    if config_path.is_file():
        try:
            clip_norm = json.loads(config_path.read_text()).get("optimizer", {}).get("clip_norm")
        except (json.JSONDecodeError, AttributeError):
            clip_norm = None
    return ReportSeries(
        steps=column("step", np.int64),
        loss=column("loss"),
        learning_rate=column("learning_rate"),
        grad_norm=column("grad_norm"),
        clipped=column("clipped") > 0,
        skipped=column("skipped_step") > 0,
        val_steps=column("step", np.int64, val),
        val_loss=column("val_loss", rows=val),
        clip_norm=None if clip_norm is None else float(clip_norm),
        total_skipped=int(train[-1].get("skipped", 0)) if train else 0,
        bad_lines=tuple(bad),
    )


def plot_report(series: ReportSeries, path: str | Path, title: str = "") -> Path:
    """Three panels over the step: train and validation loss; learning rate; gradient norm before
    clipping with the clip threshold, clipped steps and skipped steps marked."""
    fig, (ax_loss, ax_lr, ax_grad) = _figure(3, (9, 9), sharex=True)
    s = series
    ax_loss.plot(s.steps, s.loss, color="C0", linewidth=1, label="train loss")
    if len(s.val_steps):
        ax_loss.plot(s.val_steps, s.val_loss, "o-", color="C1", markersize=4,
                     label="validation loss")
    ax_loss.set_ylabel("loss (nats per token)")
    ax_loss.legend(loc="upper right")

    # A skipped step logs the learning rate and gradient norm of the last applied update: leave
    # those stale values out of the curves (the step is marked instead).
    applied = ~s.skipped
    ax_lr.plot(s.steps[applied], s.learning_rate[applied], color="C2", linewidth=1.5)
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.set_ylim(bottom=0)

    ax_grad.plot(s.steps[applied], s.grad_norm[applied], color="C4", linewidth=1,
                 label="gradient norm (pre-clip)")
    if s.clip_norm is not None:
        ax_grad.axhline(s.clip_norm, color="k", linestyle="--", linewidth=1,
                        label=f"clip threshold {s.clip_norm:g}")
    if s.clipped.any():
        ax_grad.plot(s.steps[s.clipped], s.grad_norm[s.clipped], "o", color="C1", markersize=3,
                     label=f"clipped: {int(s.clipped.sum())} of {len(s.steps)} logged steps")
    if s.skipped.any():
        for ax in (ax_loss, ax_lr, ax_grad):
            for step in s.steps[s.skipped]:
                ax.axvline(step, color="C3", alpha=0.5, linewidth=1)
        ax_grad.plot([], [], color="C3", alpha=0.5,
                     label=f"skipped (non-finite gradients): {int(s.skipped.sum())}")
    finite = s.grad_norm[applied & np.isfinite(s.grad_norm) & (s.grad_norm > 0)]
    if len(finite) and finite.max() / finite.min() > 20:
        ax_grad.set_yscale("log")
    ax_grad.set_ylabel("global gradient norm")
    ax_grad.set_xlabel("step")
    from matplotlib.ticker import MaxNLocator

    ax_grad.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_grad.legend(loc="upper right")
    for ax in (ax_loss, ax_lr, ax_grad):
        ax.grid(True, alpha=0.3)
    last_val = f", last val_loss {s.val_loss[-1]:.4f}" if len(s.val_loss) else ""
    fig.suptitle(f"{title}{' - ' if title else ''}{len(s.steps)} logged steps{last_val}")
    return _save(fig, path)


def write_report(workdir: str | Path, path: str | Path | None = None) -> Path:
    """Draw the report of the run in ``workdir`` into ``path`` (default ``workdir/report.png``)
    and return the file's path. Raises :class:`ReportError` when ``workdir/metrics.jsonl`` is
    missing; its torn or corrupt lines are skipped (``ReportSeries.bad_lines``)."""
    workdir = Path(workdir)
    series = report_series(workdir)
    return plot_report(series, workdir / "report.png" if path is None else path,
                       title=str(workdir.absolute().name))
