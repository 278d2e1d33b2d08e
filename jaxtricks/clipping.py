r"""Gradient clipping and gradient-health transforms.

Each transform keeps the gradient's dtype (bf16 stays bf16; the arithmetic is done in at least
float32) and records in its state what a trainer logs: the pre-clip global norm, whether the step
was clipped, how many steps were skipped for non-finite gradients.
"""

from __future__ import annotations

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

        def apply(_):
            return inner.update(updates, state.inner_state, params, **extra_args)

        def reject(_):
            new_updates = jax.eval_shape(apply, None)[0]
            zeros = jax.tree.map(lambda u: jnp.zeros(u.shape, u.dtype), new_updates)
            return zeros, state.inner_state

        # A branch, not jnp.where over every leaf: selecting between the old and new state made
        # XLA copy the parameters and both Adam moments each step.
        # The update is the true branch: the other order inserted copies too.
        new_updates, kept_inner = jax.lax.cond(jnp.logical_not(skip), apply, reject, None)
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
