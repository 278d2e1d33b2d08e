r"""Learning-rate schedules: pure functions of the step.

Every factory checks its arguments once, in Python, and returns ``schedule(step)``: a function
written with ``jnp`` only (no Python branch on the step) that returns a float32 array. It works
under ``jax.jit``, on arrays of steps (handy for plotting), and for giant integer steps such as
``2**31 - 1``, because the arithmetic is done in float32 after the step is converted.

Step convention (optax's): a schedule is evaluated at the update count *before* the update, so the
first update uses ``schedule(0)``, the second ``schedule(1)``, and so on. PyTorch loops that call
``scheduler.step()`` before each epoch's training use index ``e + 1`` in epoch ``e`` (PyTorch's
documentation, "How to adjust learning rate": https://pytorch.org/docs/stable/optim.html); see the
README's migration table.

Compound schedules are joins of simple ones: a later piece sees the step counted from its boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxtricks import _checks

Schedule = Callable[[Any], jax.Array]

DECAY_SHAPES = ("linear", "cosine", "sqrt")
_INT32_MAX = 2**31 - 1


def _float_step(step: Any) -> jax.Array:
    # int32 steps up to 2**31 - 1 convert exactly enough (float32 has 24 mantissa bits: steps
    # below 2**24 are exact, beyond that the relative error is < 6e-8).
    return jnp.asarray(step).astype(jnp.float32)


# --------------------------------------------------------------------------- simple schedules


def constant(value: float) -> Schedule:
    r"""A constant schedule.

    .. math::
        \eta_t = v

    Args:
      value: the value at every step (finite).

    Returns:
      ``schedule(step) -> float32 array`` (the shape of ``step``).

    Example:
      >>> import jaxtricks
      >>> float(jaxtricks.constant(0.5)(10**6))
      0.5
    """
    value = _checks.check_finite("value", value)

    def schedule(step):
        return jnp.full(jnp.shape(step), value, dtype=jnp.float32)

    return schedule


def exponential_decay(
    init_value: float,
    rate: float,
    *,
    transition_begin: int = 0,
    end_value: float | None = None,
) -> Schedule:
    r"""Exponential decay in continuous form, ``lr = lr_init * exp(-k t)``.

    .. math::
        \eta_t = \eta_0 \, e^{-k \max(t - t_0, 0)}, \quad
        \text{clamped so it never passes } \eta_{end}

    PyTorch's ``ExponentialLR(gamma)`` is ``rate = -log(gamma)``; optax's
    ``exponential_decay(init_value, 1, decay_rate)`` is ``rate = -log(decay_rate)``.
    The first update uses step 0 (optax evaluates a schedule at the count before the update).

    Args:
      init_value: :math:`\eta_0`, the value up to ``transition_begin`` (finite).
      rate: :math:`k \ge 0`, the decay per step (0 gives a constant).
      transition_begin: :math:`t_0 \ge 0`, the step at which the decay starts.
      end_value: optional floor (for a positive ``init_value``): the value never goes past it.
        Must lie between 0 and ``init_value``, the range the decay travels.

    Returns:
      ``schedule(step) -> float32 array``.

    Example:
      >>> import math, jaxtricks
      >>> schedule = jaxtricks.exponential_decay(0.1, rate=math.log(2))  # halves every step
      >>> [round(float(schedule(t)), 6) for t in range(4)]
      [0.1, 0.05, 0.025, 0.0125]
      >>> floored = jaxtricks.exponential_decay(0.1, math.log(2), end_value=0.03)
      >>> round(float(floored(3)), 6)
      0.03

    References:
      PyTorch's ``torch.optim.lr_scheduler.ExponentialLR``,
      https://pytorch.org/docs/stable/generated/torch.optim.lr_scheduler.ExponentialLR.html

      Optax's ``optax.exponential_decay``,
      https://optax.readthedocs.io/en/latest/api/optimizer_schedules.html
    """
    init_value = _checks.check_finite("init_value", init_value)
    rate = _checks.check_nonnegative("rate", rate)
    transition_begin = _checks.check_steps("transition_begin", transition_begin, 0)
    if end_value is not None:
        end_value = _checks.check_finite("end_value", end_value)
        if not min(0.0, init_value) <= end_value <= max(0.0, init_value):
            raise ValueError(
                f"end_value must lie between 0 and init_value={init_value!r} (the range the decay "
                f"travels), got {end_value!r}."
            )

    def schedule(step):
        t = jnp.maximum(_float_step(step) - transition_begin, 0.0)
        value = init_value * jnp.exp(-rate * t)
        if end_value is not None:  # a construction-time choice, not a branch on the step
            value = (jnp.maximum if init_value >= 0 else jnp.minimum)(value, end_value)
        return value.astype(jnp.float32)

    return schedule


def polynomial_decay(
    init_value: float,
    decay_steps: int,
    *,
    power: float = 1.0,
    end_value: float = 0.0,
    transition_begin: int = 0,
) -> Schedule:
    r"""Polynomial decay from ``init_value`` to ``end_value`` over ``decay_steps`` steps.

    .. math::
        \eta_t = \eta_{end} + (\eta_0 - \eta_{end})
                 \left(1 - \frac{\min(t', T)}{T}\right)^{p}, \quad t' = \max(t - t_0, 0)

    With ``end_value=0`` this is the "poly" policy ``lr_init * (1 - t / T) ** p``; ``power=1`` is a
    linear decay. The first update uses step 0; the value reaches ``end_value`` at step
    ``transition_begin + decay_steps`` and stays there.

    Args:
      init_value: :math:`\eta_0` (finite).
      decay_steps: :math:`T \ge 1`.
      power: :math:`p > 0`.
      end_value: :math:`\eta_{end}` (finite).
      transition_begin: :math:`t_0 \ge 0`, steps held at ``init_value`` before the decay.

    Returns:
      ``schedule(step) -> float32 array``.

    Example:
      >>> import jaxtricks
      >>> schedule = jaxtricks.polynomial_decay(1.0, 4, power=2.0)
      >>> [float(schedule(t)) for t in range(6)]
      [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]

    References:
      Chen et al., DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous
      Convolution, and Fully Connected CRFs, 2016, https://arxiv.org/abs/1606.00915 (the "poly"
      policy).

      PyTorch's ``torch.optim.lr_scheduler.PolynomialLR``,
      https://pytorch.org/docs/stable/generated/torch.optim.lr_scheduler.PolynomialLR.html
    """
    init_value = _checks.check_finite("init_value", init_value)
    decay_steps = _checks.check_steps("decay_steps", decay_steps, 1)
    power = _checks.check_positive("power", power)
    end_value = _checks.check_finite("end_value", end_value)
    transition_begin = _checks.check_steps("transition_begin", transition_begin, 0)

    def schedule(step):
        t = jnp.clip(_float_step(step) - transition_begin, 0.0, decay_steps)
        # XLA turns "/ T" into "* (1 / T)", so T / T can round to 1 + 1e-7: clip before the power,
        # or a fractional power of -1e-7 is NaN.
        fraction_left = jnp.clip((decay_steps - t) / decay_steps, 0.0, 1.0)
        value = end_value + (init_value - end_value) * fraction_left**power
        return value.astype(jnp.float32)

    return schedule


def linear_warmup(peak_value: float, warmup_steps: int, *, init_value: float = 0.0) -> Schedule:
    r"""Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then constant.

    .. math::
        \eta_t = \eta_{init} + (\eta_{peak} - \eta_{init}) \frac{\min(t, W)}{W}

    The first update uses step 0, i.e. ``init_value`` (0 by default); ``peak_value`` is reached at
    step ``W``. PyTorch's ``LambdaLR(opt, lambda e: min(1.0, e / W))`` is ``linear_warmup(lr, W)``.

    Args:
      peak_value: :math:`\eta_{peak}` (finite).
      warmup_steps: :math:`W \ge 1`.
      init_value: :math:`\eta_{init}` (finite).

    Returns:
      ``schedule(step) -> float32 array``.

    Example:
      >>> import jaxtricks
      >>> schedule = jaxtricks.linear_warmup(1.0, 4)
      >>> [float(schedule(t)) for t in range(6)]
      [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]

    References:
      Goyal et al., Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour, 2017,
      https://arxiv.org/abs/1706.02677
    """
    peak_value = _checks.check_finite("peak_value", peak_value)
    warmup_steps = _checks.check_steps("warmup_steps", warmup_steps, 1)
    init_value = _checks.check_finite("init_value", init_value)

    def schedule(step):
        fraction = jnp.clip(_float_step(step) / warmup_steps, 0.0, 1.0)
        return (init_value + (peak_value - init_value) * fraction).astype(jnp.float32)

    return schedule


def cosine_decay(init_value: float, decay_steps: int, *, end_value: float = 0.0) -> Schedule:
    r"""Half-cosine decay from ``init_value`` to ``end_value`` over ``decay_steps``, then constant.

    .. math::
        \eta_t = \eta_{end} + (\eta_0 - \eta_{end})
                 \frac{1 + \cos(\pi \min(t, T) / T)}{2}

    The first update uses step 0 (``init_value``); ``end_value`` is reached at step ``T``.
    Equals ``optax.cosine_decay_schedule(init_value, T, alpha=end_value / init_value)``.

    Args:
      init_value: :math:`\eta_0` (finite).
      decay_steps: :math:`T \ge 1`.
      end_value: :math:`\eta_{end}` (finite).

    Returns:
      ``schedule(step) -> float32 array``.

    Example:
      >>> import jaxtricks
      >>> schedule = jaxtricks.cosine_decay(1.0, 100, end_value=0.1)
      >>> [round(float(schedule(t)), 6) for t in (0, 50, 100, 200)]
      [1.0, 0.55, 0.1, 0.1]

    References:
      Loshchilov & Hutter, SGDR: Stochastic Gradient Descent with Warm Restarts, 2016,
      https://arxiv.org/abs/1608.03983
    """
    init_value = _checks.check_finite("init_value", init_value)
    decay_steps = _checks.check_steps("decay_steps", decay_steps, 1)
    end_value = _checks.check_finite("end_value", end_value)

    def schedule(step):
        fraction = jnp.clip(_float_step(step) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))
        return (end_value + (init_value - end_value) * cosine).astype(jnp.float32)

    return schedule


def inverse_sqrt(peak_value: float, warmup_steps: int) -> Schedule:
    r"""Linear warmup to ``peak_value``, then decay with the inverse square root of the step.

    .. math::
        \eta_t = \begin{cases}
          \eta_{peak} \, t / W & t < W \\
          \eta_{peak} \sqrt{W / t} & t \ge W
        \end{cases}

    The first update uses step 0 (value 0); the peak is reached at step ``W``.

    Args:
      peak_value: :math:`\eta_{peak}` (finite).
      warmup_steps: :math:`W \ge 1`.

    Returns:
      ``schedule(step) -> float32 array``.

    Example:
      >>> import jaxtricks
      >>> schedule = jaxtricks.inverse_sqrt(1.0, 4)
      >>> [float(schedule(t)) for t in (0, 2, 4, 16, 64)]
      [0.0, 0.5, 1.0, 0.5, 0.25]

    References:
      Vaswani et al., Attention Is All You Need, 2017, https://arxiv.org/abs/1706.03762
    """
    peak_value = _checks.check_finite("peak_value", peak_value)
    warmup_steps = _checks.check_steps("warmup_steps", warmup_steps, 1)

    def schedule(step):
        t = _float_step(step)
        warm = jnp.maximum(t, 0.0) / warmup_steps
        decay = jnp.sqrt(warmup_steps / jnp.maximum(t, warmup_steps))  # both branches finite
        return (peak_value * jnp.where(t < warmup_steps, warm, decay)).astype(jnp.float32)

    return schedule


# --------------------------------------------------------------------------- compound schedules


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    r"""Run ``schedules[i]`` from ``boundaries[i - 1]`` on, seeing the step counted from there.

    .. math::
        \eta_t = s_i(t - b_{i-1}) \quad \text{for } b_{i-1} \le t < b_i,
        \quad b_{-1} = 0,\ b_{n} = \infty

    Same semantics as ``optax.join_schedules``, with the arguments checked. Every piece is
    evaluated at every step (``jnp.where`` picks one), so pieces must return finite values for
    any step, including negative ones; all of this module's schedules do.

    Args:
      schedules: ``n >= 1`` schedules.
      boundaries: ``n - 1`` strictly increasing steps, each in ``1 .. 2**31 - 1``.

    Returns:
      ``schedule(step) -> float32 array``.

    Example:
      >>> import jaxtricks
      >>> schedule = jaxtricks.join_schedules(
      ...     [jaxtricks.linear_warmup(1.0, 2), jaxtricks.polynomial_decay(1.0, 4)], [2])
      >>> [float(schedule(t)) for t in range(8)]
      [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    schedules = list(schedules)
    boundaries = list(boundaries)
    if not schedules:
        raise ValueError(f"schedules must hold at least one schedule, got {schedules!r}.")
    for i, s in enumerate(schedules):
        _checks.check_schedule(f"schedules[{i}]", s)
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"boundaries must hold len(schedules) - 1 = {len(schedules) - 1} steps, "
            f"got {boundaries!r}."
        )
    boundaries = [_checks.check_steps(f"boundaries[{i}]", b, 1) for i, b in enumerate(boundaries)]
    if any(b > _INT32_MAX for b in boundaries):
        raise ValueError(f"boundaries must be <= 2**31 - 1 (int32 steps), got {boundaries!r}.")
    if any(b1 >= b2 for b1, b2 in zip(boundaries, boundaries[1:], strict=False)):
        raise ValueError(f"boundaries must be strictly increasing, got {boundaries!r}.")

    def schedule(step):
        step = jnp.asarray(step)
        value = jnp.asarray(schedules[0](step), dtype=jnp.float32)
        for boundary, piece in zip(boundaries, schedules[1:], strict=True):
            # Integer subtraction: exact for any int32 step (no overflow, boundary >= 1).
            piece_value = jnp.asarray(piece(step - boundary), dtype=jnp.float32)
            value = jnp.where(step < boundary, value, piece_value)
        return value

    return schedule


def warmup_then(warmup_steps: int, schedule: Schedule, *, init_value: float = 0.0) -> Schedule:
    r"""Linear warmup from ``init_value`` to ``schedule(0)``, then ``schedule`` shifted by ``W``.

    .. math::
        \eta_t = \begin{cases}
          \eta_{init} + (s(0) - \eta_{init}) \, t / W & t < W \\
          s(t - W) & t \ge W
        \end{cases}

    A warmup of 10 epochs to 0.1 followed by an exponential decay is
    ``warmup_then(10, exponential_decay(0.1, rate=k))``. ``warmup_steps=0`` means no warmup:
    ``schedule`` itself is returned (as float32). The first update uses step 0, i.e. ``init_value``.

    Args:
      warmup_steps: :math:`W \ge 0`.
      schedule: the schedule :math:`s` that follows the warmup; it sees the step counted from ``W``.
      init_value: :math:`\eta_{init}` (finite).

    Returns:
      ``schedule(step) -> float32 array``.

    Example:
      >>> import math, jaxtricks
      >>> recipe = jaxtricks.warmup_then(2, jaxtricks.exponential_decay(0.1, rate=math.log(2)))
      >>> [round(float(recipe(t)), 6) for t in range(5)]
      [0.0, 0.05, 0.1, 0.05, 0.025]

    References:
      Goyal et al., Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour, 2017,
      https://arxiv.org/abs/1706.02677
    """
    warmup_steps = _checks.check_steps("warmup_steps", warmup_steps, 0)
    after = _checks.check_schedule("schedule", schedule)
    init_value = _checks.check_finite("init_value", init_value)
    if warmup_steps > _INT32_MAX:
        raise ValueError(f"warmup_steps must be <= 2**31 - 1 (int32 steps), got {warmup_steps!r}.")
    if warmup_steps == 0:
        return lambda step: jnp.asarray(after(step), dtype=jnp.float32)

    def joined(step):
        step = jnp.asarray(step)
        peak = jnp.asarray(after(jnp.zeros((), step.dtype)), dtype=jnp.float32)
        fraction = jnp.clip(_float_step(step) / warmup_steps, 0.0, 1.0)
        warm = init_value + (peak - init_value) * fraction
        later = jnp.asarray(after(step - warmup_steps), dtype=jnp.float32)
        return jnp.where(step < warmup_steps, warm, later)

    return joined


def warmup_stable_decay(
    peak_value: float,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    *,
    init_value: float = 0.0,
    end_value: float = 0.0,
    decay_shape: str = "linear",
) -> Schedule:
    r"""Warmup-stable-decay (WSD, "trapezoidal"): linear warmup, constant peak, then a cooldown.

    .. math::
        \eta_t = \begin{cases}
          \eta_{init} + (\eta_{peak} - \eta_{init}) \, t / W & t < W \\
          \eta_{peak} & W \le t < W + S \\
          \eta_{end} + (\eta_{peak} - \eta_{end}) \, f\!\left(\min(t - W - S, D) / D\right)
            & t \ge W + S
        \end{cases}

    with :math:`f(p) = 1 - p` (``"linear"``), :math:`(1 + \cos \pi p) / 2` (``"cosine"``) or
    :math:`1 - \sqrt{p}` (``"sqrt"``, the 1-sqrt cooldown of Hägele et al.). ``warmup_steps=0``
    means no warmup (the first update uses the peak); ``stable_steps=0`` means no plateau. The
    first update uses step 0; ``end_value`` is reached at step ``W + S + D``.

    Args:
      peak_value: :math:`\eta_{peak}` (finite).
      warmup_steps: :math:`W \ge 0`.
      stable_steps: :math:`S \ge 0`.
      decay_steps: :math:`D \ge 1`.
      init_value: :math:`\eta_{init}`, the value at step 0 when there is a warmup (finite).
      end_value: :math:`\eta_{end}` (finite).
      decay_shape: ``"linear"``, ``"cosine"`` or ``"sqrt"``.

    Returns:
      ``schedule(step) -> float32 array``.

    Example:
      >>> import jaxtricks
      >>> schedule = jaxtricks.warmup_stable_decay(1.0, 2, 2, 4)
      >>> [float(schedule(t)) for t in range(10)]
      [0.0, 0.5, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]

    References:
      Hu et al., MiniCPM: Unveiling the Potential of Small Language Models with Scalable Training
      Strategies, 2024, https://arxiv.org/abs/2404.06395

      Hägele et al., Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations,
      2024, https://arxiv.org/abs/2405.18392
    """
    peak_value = _checks.check_finite("peak_value", peak_value)
    warmup_steps = _checks.check_steps("warmup_steps", warmup_steps, 0)
    stable_steps = _checks.check_steps("stable_steps", stable_steps, 0)
    decay_steps = _checks.check_steps("decay_steps", decay_steps, 1)
    init_value = _checks.check_finite("init_value", init_value)
    end_value = _checks.check_finite("end_value", end_value)
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(
            f"decay_shape must be one of {', '.join(DECAY_SHAPES)}, got {decay_shape!r}."
        )

    def cooldown(step):
        p = jnp.clip(_float_step(step) / decay_steps, 0.0, 1.0)  # clip after "/": see above
        if decay_shape == "linear":  # construction-time choice
            remaining = 1.0 - p
        elif decay_shape == "cosine":
            remaining = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        else:
            remaining = 1.0 - jnp.sqrt(p)
        return (end_value + (peak_value - end_value) * remaining).astype(jnp.float32)

    pieces, lengths = [], []
    if warmup_steps > 0:
        pieces.append(linear_warmup(peak_value, warmup_steps, init_value=init_value))
        lengths.append(warmup_steps)
    if stable_steps > 0:
        pieces.append(constant(peak_value))
        lengths.append(stable_steps)
    pieces.append(cooldown)
    boundaries = [sum(lengths[: i + 1]) for i in range(len(lengths))]
    return join_schedules(pieces, boundaries)
