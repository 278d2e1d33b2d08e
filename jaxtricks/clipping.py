r"""Gradient clipping and gradient-health transforms.

Each transform keeps the gradient's dtype (bf16 stays bf16; the arithmetic is done in at least
float32) and records in its state what a trainer logs: the pre-clip global norm, whether the step
was clipped, how many steps were skipped for non-finite gradients or as spikes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxtricks import _checks


class ClipByGlobalNormState(NamedTuple):
    """The gradient norm :func:`clip_by_global_norm` saw at the last update."""

    grad_norm: jax.Array  # shape=(), float32: global L2 norm of the incoming gradient (pre-clip)
    clipped: jax.Array  # shape=(), bool: grad_norm > max_norm, so the gradient was scaled down


class ClipByValueState(NamedTuple):
    """Whether :func:`clip_by_value` changed anything at the last update."""

    clipped: jax.Array  # shape=(), bool: some element had |g| > max_abs


class SkipNonfiniteState(NamedTuple):
    """The wrapped state and the skip counters of :func:`skip_nonfinite`."""

    inner_state: Any  # the inner transform's state as of the last applied (finite) update
    total_skipped: jax.Array  # shape=(), int32: steps skipped since init
    consecutive_skipped: jax.Array  # shape=(), int32: steps skipped in a row, up to the last one
    last_skipped: jax.Array  # shape=(), bool: whether the last step was skipped


class ZClipState(NamedTuple):
    """The running statistics of the gradient norm kept by :func:`zclip`, and its last decision."""

    count: jax.Array  # shape=(), int32: updates done (warm-up while count < warmup_steps)
    mean: jax.Array  # shape=(), float32: EMA of the gradient norm (0 until warm-up ends)
    var: jax.Array  # shape=(), float32: EMA of its variance (0 until warm-up ends)
    threshold: jax.Array  # shape=(), float32: norm clipped to (spike) or the spike boundary (inf:
    # none)
    clipped: jax.Array  # shape=(), bool: the last update was scaled down
    norm: jax.Array  # shape=(), float32: global L2 norm of the last incoming gradient (pre-clip)
    warmup_norms: jax.Array  # shape=(warmup_steps,), float32: raw norms of the warm-up updates

    @property
    def std(self) -> jax.Array:
        """Standard deviation of the gradient norm, ``sqrt(var)`` (float32 scalar)."""
        return jnp.sqrt(self.var)


class SkipSpikesState(NamedTuple):
    """The wrapped state, recent norms and losses, and spike counter of :func:`skip_spikes`."""

    inner_state: Any  # the inner transform's state as of the last applied (non-spike) update
    norms: jax.Array  # shape=(window,), float32: ring buffer of the last accepted gradient norms
    losses: jax.Array  # shape=(window,), float32: ring buffer of the last accepted losses (0s
    # when no loss is passed)
    filled: jax.Array  # shape=(), int32: valid entries in the buffers, at most window
    index: jax.Array  # shape=(), int32: slot the next accepted value is written to
    skipped_spikes: jax.Array  # shape=(), int32: steps skipped as spikes since init
    last_skipped: jax.Array  # shape=(), bool: whether the last step was skipped as a spike


def _compute_dtype(dtype: Any) -> Any:
    """At least float32 (bf16 -> f32), keeping float64 when x64 is on."""
    return jnp.promote_types(dtype, jnp.float32)


def global_norm(tree: Any) -> jax.Array:
    r"""The L2 norm of all leaves of ``tree`` taken together, in float32 whatever their dtype.

    .. math::
        \|g\|_2 = \sqrt{\textstyle\sum_{\text{leaves}} \sum_i g_i^2}

    Args:
      tree: a pytree of arrays.

    Returns:
      A float32 scalar (0 for an empty tree).

    Example:
      >>> import jax.numpy as jnp, jaxtricks
      >>> float(jaxtricks.global_norm({"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}))
      5.0
    """
    leaves = jax.tree.leaves(tree)
    squares = [jnp.sum(jnp.square(g.astype(_compute_dtype(g.dtype)))) for g in leaves]
    return jnp.sqrt(sum(squares, start=jnp.zeros([], jnp.float32))).astype(jnp.float32)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    r"""Scale the gradient down when its global L2 norm exceeds ``max_norm``.

    .. math::
        g_i \leftarrow \frac{g_i}{\max\left(1, \|g\|_2 / c\right)}

    the same formula as ``optax.clip_by_global_norm`` (PyTorch's ``clip_grad_norm_`` divides by
    ``norm + 1e-6`` instead of ``norm``, a relative difference below ``1e-6 / c``). A zero gradient
    passes unchanged. ``max_norm=inf`` never clips but still records the norm: that is what
    :func:`jaxtricks.make_optimizer` puts at the front of the chain when clipping is off, so
    ``grad_norm`` is always logged.

    Args:
      max_norm: :math:`c > 0` (``inf`` allowed: record only).

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`ClipByGlobalNormState` (pre-clip
      norm and whether this step was clipped).

    Example:
      >>> import jax.numpy as jnp, jaxtricks
      >>> tx = jaxtricks.clip_by_global_norm(1.0)
      >>> updates, state = tx.update({"g": jnp.array([3.0, 4.0])}, tx.init(None))
      >>> [round(g, 6) for g in updates["g"].tolist()], float(state.grad_norm), bool(state.clipped)
      ([0.6, 0.8], 5.0, True)

    References:
      Pascanu et al., On the difficulty of training Recurrent Neural Networks, 2012,
      https://arxiv.org/abs/1211.5063

      PyTorch's ``torch.nn.utils.clip_grad_norm_``,
      https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_norm_.html
    """
    max_norm = _checks.check_positive_or_inf("max_norm", max_norm, "record only")

    def init_fn(params):
        del params
        return ClipByGlobalNormState(
            grad_norm=jnp.zeros([], jnp.float32), clipped=jnp.zeros([], jnp.bool_)
        )

    def update_fn(updates, state, params=None):
        del state, params
        norm = global_norm(updates)
        # One scalar factor, then a multiply per element: XLA fuses that cheap multiply into
        # each consumer (Adam's two moments), where a divide per element was written out as a
        # temporary the size of the gradient. The two differ by float rounding only.
        factor = 1.0 / jnp.maximum(1.0, norm / max_norm)  # norm 0 -> 1; max_norm inf -> 1

        def clip(g):
            return (g.astype(_compute_dtype(g.dtype)) * factor).astype(g.dtype)

        new_state = ClipByGlobalNormState(grad_norm=norm, clipped=norm > max_norm)
        return jax.tree.map(clip, updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def clip_by_value(max_abs: float) -> optax.GradientTransformation:
    r"""Clip every gradient element to ``[-max_abs, max_abs]``.

    .. math::
        g_i \leftarrow \min(\max(g_i, -c), c)

    As PyTorch's ``torch.nn.utils.clip_grad_value_``.

    Args:
      max_abs: :math:`c > 0` (finite).

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`ClipByValueState`.

    Example:
      >>> import jax.numpy as jnp, jaxtricks
      >>> tx = jaxtricks.clip_by_value(1.0)
      >>> updates, state = tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(None))
      >>> updates.tolist(), bool(state.clipped)
      ([-1.0, 0.5, 1.0], True)

    References:
      Mikolov, Statistical Language Models Based on Neural Networks, 2012 (PhD thesis, Brno).

      PyTorch's ``torch.nn.utils.clip_grad_value_``,
      https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_value_.html
    """
    max_abs = _checks.check_positive("max_abs", max_abs)

    def init_fn(params):
        del params
        return ClipByValueState(clipped=jnp.zeros([], jnp.bool_))

    def update_fn(updates, state, params=None):
        del state, params
        leaves = jax.tree.leaves(updates)
        clipped = jnp.any(jnp.array([jnp.any(jnp.abs(g) > max_abs) for g in leaves] or [False]))

        def clip(g):
            # In the compute dtype and back: an injected max_abs is a float32 array, which would
            # otherwise promote a bf16 gradient to float32.
            compute = g.astype(_compute_dtype(g.dtype))
            return jnp.clip(compute, -max_abs, max_abs).astype(g.dtype)

        new_updates = jax.tree.map(clip, updates)
        return new_updates, ClipByValueState(clipped=clipped)

    return optax.GradientTransformation(init_fn, update_fn)


def _all_finite(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.ones([], jnp.bool_)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))


def _update_unless(skip: jax.Array, inner: Any, updates: Any, inner_state: Any, params: Any,
                   extra_args: dict) -> tuple[Any, Any]:
    """``inner.update(...)``, or zero updates and ``inner_state`` untouched when ``skip``."""

    def apply(_):
        return inner.update(updates, inner_state, params, **extra_args)

    def reject(_):
        new_updates = jax.eval_shape(apply, None)[0]
        zeros = jax.tree.map(lambda u: jnp.zeros(u.shape, u.dtype), new_updates)
        return zeros, inner_state

    # A branch, not jnp.where over every leaf: selecting between the old and new state made XLA
    # copy the parameters and both Adam moments each step. The update is the true branch: the
    # other order inserted copies too.
    return jax.lax.cond(jnp.logical_not(skip), apply, reject, None)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    r"""Skip a step whose gradient holds a NaN or inf: zero update, inner state not advanced.

    .. math::
        (u, s') = \begin{cases}
          \text{inner}(g, s) & \text{every } g_i \text{ finite} \\
          (0, s) & \text{otherwise}
        \end{cases}

    No Python branch: ``jax.lax.cond`` runs the inner transform, or keeps the old inner state with
    a zero update on a skipped step (as ``optax.apply_if_finite`` does), so it works under ``jit``
    and ``pmap``. Schedules inside ``inner`` therefore count applied updates only. Only the
    incoming gradient is checked.

    Args:
      inner: the transformation to protect (e.g. the whole chain).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`SkipNonfiniteState`:
      the inner state, ``total_skipped``, ``consecutive_skipped`` and ``last_skipped``.

    Example:
      >>> import jax.numpy as jnp, optax, jaxtricks
      >>> tx = jaxtricks.skip_nonfinite(optax.sgd(0.1))
      >>> params = jnp.ones(2)
      >>> updates, state = tx.update(jnp.array([1.0, jnp.nan]), tx.init(params), params)
      >>> updates.tolist(), int(state.total_skipped), bool(state.last_skipped)
      ([0.0, 0.0], 1, True)

    References:
      Micikevicius et al., Mixed Precision Training, 2017, https://arxiv.org/abs/1710.03740
      (skipping steps with non-finite gradients).
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonfiniteState(
            inner_state=inner.init(params),
            total_skipped=jnp.zeros([], jnp.int32),
            consecutive_skipped=jnp.zeros([], jnp.int32),
            last_skipped=jnp.zeros([], jnp.bool_),
        )

    def update_fn(updates, state, params=None, **extra_args):
        skip = jnp.logical_not(_all_finite(updates))

        new_updates, kept_inner = _update_unless(skip, inner, updates, state.inner_state, params,
                                                 extra_args)
        new_state = SkipNonfiniteState(
            inner_state=kept_inner,
            total_skipped=jnp.where(
                skip, optax.safe_increment(state.total_skipped), state.total_skipped
            ),
            consecutive_skipped=jnp.where(
                skip, optax.safe_increment(state.consecutive_skipped), jnp.zeros([], jnp.int32)
            ),
            last_skipped=skip,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_ZCLIP_EPS = 1e-6  # guards the z-score's division when the norm's std is 0 (as the reference code)


def zclip(
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    warmup_steps: int = 25,
    max_norm: float | None = None,
) -> optax.GradientTransformation:
    r"""ZClip: clip a gradient whose norm is a z-score outlier of its running EMA statistics.

    During the first ``warmup_steps`` updates the raw global norms are collected (and clipped to
    ``max_norm`` when it is set); then :math:`\mu` and :math:`\sigma^2` start as their mean and
    (population) variance. After warm-up, with raw norm :math:`g`:

    .. math::
        z = \frac{g - \mu}{\sigma + \epsilon}, \qquad
        \tau = \begin{cases}
          \mu + \dfrac{z_{\text{thresh}}\,\sigma}{z / z_{\text{thresh}}} & z > z_{\text{thresh}}
            \text{ (spike)} \\
          \infty & \text{otherwise}
        \end{cases}, \qquad
        g_i \leftarrow g_i \min\!\left(1, \frac{\min(\tau, c)}{\|g\|}\right)

    then the statistics follow the effective norm :math:`x = \tau` on a spike (before the cap
    :math:`c` = ``max_norm``, as in the authors' code), :math:`x = g` otherwise:

    .. math::
        \mu \leftarrow \alpha \mu + (1 - \alpha) x, \qquad
        \sigma^2 \leftarrow \alpha \sigma^2 + (1 - \alpha) (x - \mu)^2

    (the variance uses the updated :math:`\mu`). This is the paper's z-score mode with adaptive
    ("reciprocal") scaling: the further the outlier, the closer to :math:`\mu` it is clipped.
    ``state.threshold`` holds :math:`\min(\tau, c)` on a spike, else the spike boundary
    :math:`\min(\mu + z_{\text{thresh}} \sigma, c)` (``max_norm`` or ``inf`` during warm-up);
    ``state.mean``, ``state.std``, ``state.clipped`` and ``state.norm`` (raw) are there to log.

    Args:
      alpha: EMA decay, ``0 < alpha < 1``.
      z_thresh: z-score above which a norm is a spike, > 0.
      warmup_steps: updates whose norms initialise the statistics, an integer >= 1 (a Python
        number: it is the length of a buffer in the state).
      max_norm: None, or a cap > 0 on the norm at every step (``inf``: no cap).

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`ZClipState`.

    Example:
      >>> import jax.numpy as jnp, jaxtricks
      >>> tx = jaxtricks.zclip(warmup_steps=4)
      >>> state = tx.init(None)
      >>> for norm in [1.0, 2.0, 1.0, 2.0]:  # warm-up: mean 1.5, std 0.5
      ...     _, state = tx.update(jnp.array([norm]), state)
      >>> updates, state = tx.update(jnp.array([5.5]), state)  # z = 8: clipped to 1.5 + 6.25 / 16
      >>> round(float(updates[0]), 4), bool(state.clipped), round(float(state.threshold), 4)
      (1.8906, True, 1.8906)

    References:
      Kumar et al., ZClip: Adaptive Spike Mitigation for LLM Pre-Training, 2025,
      https://arxiv.org/abs/2504.02507
    """
    alpha = _checks.check_finite("alpha", alpha)
    if not _checks.is_traced(alpha) and not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must satisfy 0 < alpha < 1, got {alpha!r}.")
    z_thresh = _checks.check_positive("z_thresh", z_thresh)
    warmup_steps = _checks.check_steps("warmup_steps", warmup_steps, 1)
    cap = math.inf
    if max_norm is not None:
        cap = _checks.check_positive_or_inf("max_norm", max_norm, "no cap")

    def init_fn(params):
        del params
        zero = jnp.zeros([], jnp.float32)
        return ZClipState(
            count=jnp.zeros([], jnp.int32),
            mean=zero,
            var=zero,
            threshold=jnp.asarray(cap, jnp.float32),
            clipped=jnp.zeros([], jnp.bool_),
            norm=zero,
            warmup_norms=jnp.zeros([warmup_steps], jnp.float32),
        )

    def update_fn(updates, state, params=None):
        del params
        norm = global_norm(updates)
        cap32 = jnp.asarray(cap, jnp.float32)

        # Warm-up: record the norm; the last warm-up update initialises the statistics.
        in_warmup = state.count < warmup_steps
        slot = jnp.minimum(state.count, warmup_steps - 1)
        warmup_norms = jnp.where(
            in_warmup, state.warmup_norms.at[slot].set(norm), state.warmup_norms
        )
        warmup_mean = jnp.mean(warmup_norms)
        warmup_var = jnp.mean(jnp.square(warmup_norms - warmup_mean))

        # After warm-up: z-score against the EMA statistics, reciprocal threshold on a spike.
        std = jnp.sqrt(state.var)
        z = (norm - state.mean) / (std + _ZCLIP_EPS)
        spike = jnp.logical_and(jnp.logical_not(in_warmup), z > z_thresh)
        safe_z = jnp.where(spike, z, 1.0)  # only read on a spike, where z > z_thresh > 0
        adaptive = state.mean + z_thresh * std / (safe_z / z_thresh)
        clip_to = jnp.where(
            in_warmup, cap32, jnp.minimum(jnp.where(spike, adaptive, jnp.inf), cap32)
        )
        boundary = jnp.minimum(state.mean + z_thresh * std, cap32)
        threshold = jnp.where(in_warmup | spike, clip_to, boundary)

        effective = jnp.where(spike, adaptive, norm)
        ema_mean = alpha * state.mean + (1.0 - alpha) * effective
        ema_var = alpha * state.var + (1.0 - alpha) * jnp.square(effective - ema_mean)
        ends_warmup = state.count == warmup_steps - 1
        mean = jnp.where(in_warmup, jnp.where(ends_warmup, warmup_mean, state.mean), ema_mean)
        var = jnp.where(in_warmup, jnp.where(ends_warmup, warmup_var, state.var), ema_var)

        clipped = norm > clip_to
        factor = jnp.where(clipped, clip_to / jnp.where(clipped, norm, 1.0), 1.0)

        def clip(g):
            return (g.astype(_compute_dtype(g.dtype)) * factor).astype(g.dtype)

        new_state = ZClipState(
            count=optax.safe_increment(state.count),
            mean=mean.astype(jnp.float32),
            var=var.astype(jnp.float32),
            threshold=threshold.astype(jnp.float32),
            clipped=clipped,
            norm=norm,
            warmup_norms=warmup_norms,
        )
        return jax.tree.map(clip, updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _buffer_stats(buffer: jax.Array, filled: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and population std of the first ``filled`` entries of ``buffer`` (ring order is
    irrelevant)."""
    valid = jnp.arange(buffer.shape[0]) < filled
    n = jnp.maximum(filled, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, buffer, 0.0)) / n
    var = jnp.sum(jnp.where(valid, jnp.square(buffer - mean), 0.0)) / n
    return mean, jnp.sqrt(var)


def skip_spikes(
    inner: optax.GradientTransformation, window: int = 128, threshold: float = 6.0
) -> optax.GradientTransformationExtraArgs:
    r"""Skip a step whose gradient norm (or loss) is far above its recent history.

    With :math:`m, s` the mean and (population) standard deviation of the last ``window`` accepted
    values of the raw global gradient norm :math:`\|g\|` (and, when ``loss=`` is passed to
    ``update``, of the loss :math:`L`):

    .. math::
        \text{spike} = n \ge \lfloor w / 2 \rfloor \wedge
          \left( \|g\| > m_g + k s_g \;\vee\; L > m_L + k s_L \right), \qquad
        (u, s') = \begin{cases} (0, s) & \text{spike} \\ \text{inner}(g, s) & \text{otherwise}
        \end{cases}

    where :math:`n` is the number of values in the buffers and :math:`k` = ``threshold``. A spike's
    values are not added to the buffers, so a run of spikes does not raise the bar; a slow drift
    is absorbed as the window moves. As :func:`skip_nonfinite`, ``jax.lax.cond`` keeps the inner
    state untouched on a skipped step (schedules inside ``inner`` count applied updates only).
    Non-finite values are never added to the buffers; wrap the result in :func:`skip_nonfinite`
    to skip those steps too. Pass ``loss`` at every update or never: the two buffers share one
    fill count. ``loss`` is forwarded to ``inner`` along with any other extra arguments.

    Args:
      inner: the transformation to protect (e.g. the whole chain).
      window: how many recent values are kept, an integer >= 2; spikes are judged once
        ``window // 2`` are in.
      threshold: :math:`k > 0`, in standard deviations above the mean.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params=None,
      *, loss=None, **extra_args)`` gives :class:`SkipSpikesState` (``skipped_spikes`` counts the
      skipped steps, ``last_skipped`` marks the last one).

    Example:
      >>> import jax.numpy as jnp, optax, jaxtricks
      >>> tx = jaxtricks.skip_spikes(optax.sgd(0.1), window=4, threshold=3.0)
      >>> params = jnp.zeros(1)
      >>> state = tx.init(params)
      >>> for g in [1.0, 1.1, 0.9, 1.0]:
      ...     _, state = tx.update(jnp.array([g]), state, params, loss=jnp.array(2.0 + g))
      >>> updates, state = tx.update(jnp.array([1.0]), state, params, loss=jnp.array(30.0))
      >>> updates.tolist(), int(state.skipped_spikes), bool(state.last_skipped)
      ([0.0], 1, True)

    References:
      Chowdhery et al., PaLM: Scaling Language Modeling with Pathways, 2022,
      https://arxiv.org/abs/2204.02311 (skipping batches around loss spikes).

      Molybog et al., A Theory on Adam Instability in Large-Scale Machine Learning, 2023,
      https://arxiv.org/abs/2304.09871
    """
    window = _checks.check_steps("window", window, 2)
    threshold = _checks.check_positive("threshold", threshold)
    inner = optax.with_extra_args_support(inner)
    min_filled = window // 2

    def init_fn(params):
        return SkipSpikesState(
            inner_state=inner.init(params),
            norms=jnp.zeros([window], jnp.float32),
            losses=jnp.zeros([window], jnp.float32),
            filled=jnp.zeros([], jnp.int32),
            index=jnp.zeros([], jnp.int32),
            skipped_spikes=jnp.zeros([], jnp.int32),
            last_skipped=jnp.zeros([], jnp.bool_),
        )

    def update_fn(updates, state, params=None, *, loss=None, **extra_args):
        norm = global_norm(updates)
        norm_mean, norm_std = _buffer_stats(state.norms, state.filled)
        spike = norm > norm_mean + threshold * norm_std
        finite = jnp.isfinite(norm)
        if loss is not None:
            loss = jnp.asarray(loss).astype(jnp.float32)
            if loss.shape != ():
                raise ValueError(f"loss must be a scalar, got shape {loss.shape}.")
            loss_mean, loss_std = _buffer_stats(state.losses, state.filled)
            spike = spike | (loss > loss_mean + threshold * loss_std)
            finite = finite & jnp.isfinite(loss)
            extra_args = {**extra_args, "loss": loss}
        skip = (state.filled >= min_filled) & spike

        new_updates, kept_inner = _update_unless(skip, inner, updates, state.inner_state, params,
                                                 extra_args)

        push = jnp.logical_not(skip) & finite
        norms = jnp.where(push, state.norms.at[state.index].set(norm), state.norms)
        losses = state.losses
        if loss is not None:
            losses = jnp.where(push, state.losses.at[state.index].set(loss), state.losses)
        new_state = SkipSpikesState(
            inner_state=kept_inner,
            norms=norms,
            losses=losses,
            filled=jnp.where(push, jnp.minimum(state.filled + 1, window), state.filled),
            index=jnp.where(push, (state.index + 1) % window, state.index),
            skipped_spikes=jnp.where(
                skip, optax.safe_increment(state.skipped_spikes), state.skipped_spikes
            ),
            last_skipped=skip,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
