r"""The learning-rate range test: a short run whose learning rate grows exponentially.

Smith's range test as fastai's ``lr_find`` and torch-lr-finder run it: train the configured model,
data and optimizer (clipping, L1/L2, weight decay, skipping as configured) for up to ``num_steps``
updates, update ``i`` using

.. math::
    \eta_i = \eta_{\min} \left(\frac{\eta_{\max}}{\eta_{\min}}\right)^{i / (N - 1)},
    \qquad i = 0, \dots, N - 1

instead of the configured schedule, and record the training loss of every step. The loss is
smoothed by an exponential moving average with bias correction (fastai's, ``beta = 0.98``):

.. math::
    a_i = \beta a_{i-1} + (1 - \beta) \ell_i, \qquad a_{-1} = 0, \qquad
    \bar\ell_i = \frac{a_i}{1 - \beta^{i+1}}

and the run stops as soon as :math:`\bar\ell_i > 4 \min_{j \le i} \bar\ell_j` or
:math:`\bar\ell_i` is not finite (divergence). As in fastai, the loss recorded for step ``i`` is the
loss of that step's batch computed just before update ``i`` (with learning rate :math:`\eta_i`).

Two rules read a learning rate off the smoothed curve, both on fastai's window (the first
``N // 10`` points and the last 5 recorded points are left out: they are dominated by the random
start and by the divergence):

- **steepest**: the learning rate where the smoothed loss falls fastest,
  :math:`\arg\min_i d\bar\ell / d\ln\eta` (central differences, ``np.gradient``);
- **valley** (fastai's default since 2.5): the longest strictly decreasing subsequence of the
  smoothed loss is the valley; the suggestion lies halfway along it. It is the rule
  :func:`range_test` suggests: it is less sensitive than the steepest point to a single noisy drop.

Nothing here reads or writes checkpoints: the test starts from a freshly initialized model and its
parameters are thrown away.

References:
  Smith, Cyclical Learning Rates for Training Neural Networks, 2015,
  https://arxiv.org/abs/1506.01186

  fastai's ``Learner.lr_find`` (fastai/callback/schedule.py) and torch-lr-finder
  (https://github.com/davidtvs/pytorch-lr-finder).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

SMOOTHING = 0.98  # fastai's beta
DIVERGENCE_FACTOR = 4.0  # stop when the smoothed loss exceeds this times the best one
CSV_COLUMNS = ("step", "learning_rate", "loss", "smoothed_loss")
SUGGESTION_RULE = "valley"


class LRFindError(ValueError):
    """A range test that cannot be run or read (bad range, too few points, a malformed CSV)."""


def check_range(min_lr: float, max_lr: float, num_steps: int) -> None:
    """Raise :class:`LRFindError` naming the bad argument unless 0 < min_lr < max_lr, steps >= 2."""
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0
        ):
            raise LRFindError(f"{name}={value!r} is out of range; allowed: a finite number > 0.")
    if not min_lr < max_lr:
        raise LRFindError(
            f"min_lr={min_lr!r} must be smaller than max_lr={max_lr!r} (the test sweeps upwards)."
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise LRFindError(f"steps={num_steps!r} is out of range; allowed: an integer >= 2.")


def exponential_range(min_lr: float, max_lr: float, num_steps: int) -> Callable:
    r"""The range test's schedule: ``min_lr`` at step 0 growing geometrically to ``max_lr``.

    .. math::
        \eta(t) = \eta_{\min} \exp\!\left(\frac{\min(t, N - 1)}{N - 1}
                  \ln\frac{\eta_{\max}}{\eta_{\min}}\right)

    Args:
      min_lr: the learning rate of update 0, > 0.
      max_lr: the learning rate of update ``num_steps - 1`` (and after), > ``min_lr``.
      num_steps: number of updates of the sweep, >= 2.

    Returns:
      ``schedule(step) -> float32 array`` (jnp only: works under jit and on arrays of steps).

    >>> schedule = exponential_range(1e-3, 1.0, num_steps=4)
    >>> [round(float(schedule(t)), 6) for t in range(5)]
    [0.001, 0.01, 0.1, 1.0, 1.0]
    """
    check_range(min_lr, max_lr, num_steps)
    log_ratio = math.log(max_lr / min_lr)
    last = num_steps - 1

    def schedule(step):
        t = jnp.minimum(jnp.asarray(step, jnp.float32), last) / last
        return (min_lr * jnp.exp(log_ratio * t)).astype(jnp.float32)

    return schedule


def sweep_learning_rates(min_lr: float, max_lr: float, num_steps: int) -> np.ndarray:
    """The sweep's learning rates in float64, one per update (what the CSV and the plot show)."""
    check_range(min_lr, max_lr, num_steps)
    return min_lr * (max_lr / min_lr) ** (np.arange(num_steps) / (num_steps - 1))


def smooth(losses, beta: float = SMOOTHING) -> np.ndarray:
    r"""Exponential moving average with bias correction (fastai's ``AvgSmoothLoss``).

    .. math::
        a_i = \beta a_{i-1} + (1 - \beta) \ell_i,\quad a_{-1} = 0,\quad
        \bar\ell_i = a_i / (1 - \beta^{i+1})

    A non-finite loss makes every later smoothed value non-finite.

    >>> smooth([2.0, 2.0, 2.0]).round(12).tolist()  # no pull towards the initial 0
    [2.0, 2.0, 2.0]
    """
    losses = np.asarray(losses, np.float64)
    out = np.empty_like(losses)
    average = 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1.0 - beta) * loss
        out[i] = average / (1.0 - beta ** (i + 1))
    return out


def steepest_index(learning_rates, smoothed) -> int:
    r"""Index of the most negative slope :math:`d\bar\ell / d\ln\eta` (central differences).

    >>> lrs = np.geomspace(1e-4, 1.0, 5)
    >>> steepest_index(lrs, [5.0, 4.9, 4.0, 2.0, 1.9])
    2
    """
    learning_rates = np.asarray(learning_rates, np.float64)
    smoothed = np.asarray(smoothed, np.float64)
    if len(smoothed) < 2:
        return 0
    return int(np.argmin(np.gradient(smoothed, np.log(learning_rates))))


def valley_index(smoothed) -> int:
    """Index halfway along the longest strictly decreasing subsequence (fastai's valley rule).

    The valley runs from the first to the last element of the longest subsequence ``i_1 < ... <
    i_k`` with ``smoothed[i_1] > ... > smoothed[i_k]`` (the earliest-ending one when several are
    equally long, and in it the latest possible predecessors, so that a plateau before the descent
    is left out); the suggestion is fastai's point ``start + span // 3 + span // 6`` of it, about
    halfway. (fastai takes ``start = end - k``, which counts the valley as contiguous.)

    >>> valley_index([5.0, 5.0, 5.0, 4.0, 4.5, 3.0, 2.0, 1.0, 0.5, 6.0])  # 5.0, 4.5, 3.0, ..., 0.5
    5
    """
    smoothed = np.asarray(smoothed, np.float64)
    n = len(smoothed)
    if n == 0:
        raise LRFindError("no loss values to read a valley from.")
    length = np.ones(n, dtype=np.int64)  # longest decreasing subsequence ending at i
    previous = np.full(n, -1, dtype=np.int64)  # the element before i in that subsequence
    for i in range(1, n):
        higher = np.flatnonzero(smoothed[:i] > smoothed[i])
        if len(higher):
            # Of the longest, the latest: a plateau before the descent is not part of the valley.
            best = higher[len(higher) - 1 - np.argmax(length[higher][::-1])]
            length[i], previous[i] = length[best] + 1, best
    end = int(np.argmax(length))
    start = end
    while previous[start] >= 0:
        start = int(previous[start])
    span = end - start
    return start + int(span / 3) + int(span / 6)


def suggestion_window(smoothed, num_steps: int) -> slice:
    """fastai's window of points the rules look at: from ``num_steps // 10`` to 5 before the end,
    cut at the first non-finite value; widened to every finite point when that leaves < 3."""
    smoothed = np.asarray(smoothed, np.float64)
    finite = np.isfinite(smoothed)
    n_finite = int(np.argmin(finite)) if not finite.all() else len(smoothed)
    start, stop = num_steps // 10, min(len(smoothed) - 5, n_finite)
    if stop - start < 3:
        start, stop = 0, n_finite
    return slice(start, stop)


@dataclasses.dataclass(frozen=True)
class RangeTestResult:
    """The points of a range test and the learning rates the rules read off them."""

    steps: np.ndarray  # (n,) int: update index i (0-based), n <= num_steps
    learning_rates: np.ndarray  # (n,) float64: the lr of update i
    losses: np.ndarray  # (n,) float64: the training loss of step i (before update i)
    smoothed: np.ndarray  # (n,) float64: smooth(losses)
    min_lr: float
    max_lr: float
    num_steps: int  # the sweep's planned length
    stop_reason: str | None  # why it stopped before num_steps (None: it ran them all)
    steepest_lr: float | None  # None: fewer than 2 usable points
    valley_lr: float | None

    @property
    def suggestion(self) -> float | None:
        """The suggested learning rate: the valley rule's (see the module docstring)."""
        return self.valley_lr

    @property
    def suggestion_rule(self) -> str:
        return SUGGESTION_RULE


def analyze(
    learning_rates, losses, *, min_lr: float, max_lr: float, num_steps: int,
    stop_reason: str | None = None,
) -> RangeTestResult:
    """Smooth the losses of a (possibly stopped) sweep and apply both rules."""
    learning_rates = np.asarray(learning_rates, np.float64)
    losses = np.asarray(losses, np.float64)
    smoothed = smooth(losses)
    window = suggestion_window(smoothed, num_steps)
    lrs, sm = learning_rates[window], smoothed[window]
    steepest = valley = None
    if len(sm) >= 2:
        steepest = float(lrs[steepest_index(lrs, sm)])
        valley = float(lrs[valley_index(sm)])
    return RangeTestResult(
        steps=np.arange(len(losses)), learning_rates=learning_rates, losses=losses,
        smoothed=smoothed, min_lr=float(min_lr), max_lr=float(max_lr), num_steps=num_steps,
        stop_reason=stop_reason, steepest_lr=steepest, valley_lr=valley,
    )


def divergence(smoothed_loss: float, best: float) -> str | None:
    """Why the sweep must stop at this smoothed loss (None: go on)."""
    if not math.isfinite(smoothed_loss):
        return f"the smoothed loss is {smoothed_loss}"
    if smoothed_loss > DIVERGENCE_FACTOR * best:
        return (f"the smoothed loss {smoothed_loss:.4g} exceeds {DIVERGENCE_FACTOR:g} x the best "
                f"{best:.4g}")
    return None


def range_test(
    config,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    progress: Callable[[int, float, float, float], None] | None = None,
) -> RangeTestResult:
    """Run the range test for ``config`` (a :class:`jaxtricks.lm.config.Config`).

    The model, data, batch size, seed, parallelism and every optimizer setting come from
    ``config``; only the learning rate is replaced by :func:`exponential_range` (no warmup, no
    decay). ``progress(step, lr, loss, smoothed)`` is called after every step.

    The caller runs ``jaxtricks.lm.training.preflight(config, out_dir)`` first
    (``jaxtricks lr-find`` does): it rejects, before anything is compiled, a batch that the
    devices cannot split.

    Raises:
      LRFindError: a bad range. DataError: data that cannot be read.
    """
    check_range(min_lr, max_lr, num_steps)
    import jax

    from jaxtricks.lm import data as data_lib
    from jaxtricks.lm.sharding import plan
    from jaxtricks.lm.step import unreplicate_metrics
    from jaxtricks.lm.training import build_steps

    data_lib.check_data(config.data)
    tc = config.train
    tokenizer = data_lib.tokenizer_for(config.data)
    start, steps = build_steps(config, plan(config), vocab_limit=tokenizer.vocab_size,
                               learning_rate=exponential_range(min_lr, max_lr, num_steps))
    state = steps.init_state(start.create)
    batches = data_lib.train_iterator(config.data, batch_size=tc.batch_size, seed=tc.seed,
                                      tokenizer=tokenizer)
    rng = jax.random.key(tc.seed)

    learning_rates = sweep_learning_rates(min_lr, max_lr, num_steps)
    losses: list[float] = []
    average, best, stop_reason = 0.0, math.inf, None
    for i in range(num_steps):
        state, metrics = steps.train(state, steps.put_batch(next(batches)), rng)
        loss = unreplicate_metrics(metrics, steps)["loss"]  # waits for the step: we stop on it
        losses.append(loss)
        average = SMOOTHING * average + (1.0 - SMOOTHING) * loss
        smoothed = average / (1.0 - SMOOTHING ** (i + 1))
        if progress is not None:
            progress(i, float(learning_rates[i]), loss, smoothed)
        best = min(best, smoothed) if math.isfinite(smoothed) else best
        if (reason := divergence(smoothed, best)) is not None and i < num_steps - 1:
            stop_reason = f"stopped at step {i} (lr {learning_rates[i]:.3g}): {reason}"
            break
    return analyze(learning_rates[: len(losses)], losses, min_lr=min_lr, max_lr=max_lr,
                   num_steps=num_steps, stop_reason=stop_reason)


def write_csv(result: RangeTestResult, path: str | Path) -> Path:
    """The raw points as CSV: ``step,learning_rate,loss,smoothed_loss`` (floats in repr form)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in zip(result.steps, result.learning_rates, result.losses, result.smoothed,
                       strict=True):
            writer.writerow([int(row[0]), *(repr(float(x)) for x in row[1:])])
    return path
