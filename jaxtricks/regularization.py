r"""L1 / L2 regularization and decoupled weight decay as optax gradient transformations.

``l1_regularization`` and ``l2_regularization`` add the gradient of a penalty to the update, so they
belong *before* the optimizer's scaling (like adding the penalty to the loss). ``weight_decay`` is
decoupled (AdamW-style) decay and belongs *after* the scaling, just before the learning rate.

Each transform records, in its state, what a trainer logs: the step count and, for L1/L2 with
``record_penalty=True``, the value of the penalty at the parameters of the last update, so nothing
has to walk the tree a second time. Recording is off by default because it costs a pass over the
parameters per update and, with donated parameters, a copy of each of them (XLA cannot overwrite a
parameter in place while a reduction that feeds only the state still reads it). Off, ``penalty``
is None.

``mask`` follows optax's convention: ``None`` (every parameter), a pytree of bools with the
structure of the params (or a prefix of it), or a callable ``params -> such a pytree``. The bools
must be static (Python or NumPy bools), as for ``optax.masked``. :func:`decay_mask` is the usual
choice: matrices and embeddings only. Under ``optax.inject_hyperparams``, list a callable mask in
``static_args``: the wrapper takes every callable for a schedule and would call it with the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtricks import _checks

Mask = Any  # None | pytree of bools | Callable[[params], pytree of bools]


class L1RegularizationState(NamedTuple):
    """Step count and last penalty of :func:`l1_regularization`."""

    count: jax.Array  # shape=(), int32: updates done; a strength schedule is evaluated at it
    # shape=(), float32: strength * sum |w| at the params of the last update (None unless recorded)
    penalty: jax.Array | None


class L2RegularizationState(NamedTuple):
    """Step count and last penalty of :func:`l2_regularization`."""

    count: jax.Array  # shape=(), int32: updates done; a strength schedule is evaluated at it
    # shape=(), float32: strength * sum w**2 at the params of the last update (None unless recorded)
    penalty: jax.Array | None


class WeightDecayState(NamedTuple):
    """Step count and last rate of :func:`weight_decay`."""

    count: jax.Array  # shape=(), int32: updates done; a rate schedule is evaluated at it
    rate: jax.Array  # shape=(), float32: the decay rate used by the last update


def decay_mask(params: Any) -> Any:
    """The usual regularization mask: True for leaves with ``ndim >= 2``, False otherwise.

    Matrices, convolution kernels and embeddings are regularized; biases, norm scales and other
    vectors and scalars are not.

    Args:
      params: a pytree of arrays (or of anything with a shape).

    Returns:
      A pytree of Python bools with the structure of ``params``.

    Example:
      >>> import jax.numpy as jnp, jaxtricks
      >>> jaxtricks.decay_mask({"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)})
      {'bias': False, 'kernel': True}

    References:
      Loshchilov & Hutter, Decoupled Weight Decay Regularization, 2017,
      https://arxiv.org/abs/1711.05101
    """
    return jax.tree.map(lambda p: bool(np.ndim(p) >= 2), params)


_INJECT_HINT = (
    " (optax.inject_hyperparams takes a callable for a schedule and calls it with the step: "
    "list 'mask' in static_args.)"
)


def _check_mask_leaves(mask_tree: Any, what: str) -> None:
    for leaf in jax.tree.leaves(mask_tree):
        if not isinstance(leaf, bool | np.bool_):
            raise ValueError(
                f"{what} must hold Python or NumPy bools (static, as for optax.masked), got a "
                f"leaf {leaf!r}." + _INJECT_HINT
            )


def _check_mask(mask: Mask) -> Mask:
    """None, a callable, or a pytree of static bools; not a bare bool.

    A bare bool is refused because it is what a callable mask turns into when
    ``optax.inject_hyperparams`` evaluates it as a schedule (``decay_mask(step)`` is ``False``):
    taking it would silently switch the transform off. ``None`` means every parameter.
    """
    if mask is None or callable(mask):
        return mask
    if isinstance(mask, bool | np.bool_):
        raise ValueError(
            f"mask must be None (every parameter), a callable or a pytree of bools, got the bare "
            f"bool {mask!r}." + _INJECT_HINT
        )
    _check_mask_leaves(mask, "mask")
    return mask


def _full_mask(mask: Mask, params: Any) -> Any:
    """The mask as a pytree of bools with exactly the structure of ``params``."""
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    mask_tree = mask(params) if callable(mask) else mask
    if callable(mask):
        _check_mask_leaves(mask_tree, "mask(params)")
    # A mask may be a prefix of params: one bool then covers a whole subtree.
    return jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask_tree, params)


def _missing_params(name: str) -> ValueError:
    return ValueError(
        f"{name} needs the current parameters: call update(updates, state, params) with params "
        "(got params=None)."
    )


def _penalty_transform(
    name: str,
    strength: Any,
    mask: Mask,
    gradient: Callable[[jax.Array, jax.Array], jax.Array],
    penalty: Callable[[jax.Array], jax.Array],
    state_type: type,
    record_penalty: bool,
) -> optax.GradientTransformation:
    """update += gradient(strength, w) on masked leaves; penalty = strength * sum penalty(w)."""
    if not isinstance(record_penalty, bool | np.bool_):
        raise ValueError(f"record_penalty must be True or False, got {record_penalty!r}.")

    def init_fn(params):
        del params
        penalty0 = jnp.zeros([], jnp.float32) if record_penalty else None
        return state_type(count=jnp.zeros([], jnp.int32), penalty=penalty0)

    def update_fn(updates, state, params=None):
        if params is None:
            raise _missing_params(name)
        s = _checks.value_at(strength, state.count)
        mask_tree = _full_mask(mask, params)

        def add(g, p, m):
            return (g + gradient(s, p).astype(g.dtype)) if m else g

        new_updates = jax.tree.map(add, updates, params, mask_tree)
        if not record_penalty:
            return new_updates, state_type(count=optax.safe_increment(state.count), penalty=None)
        total = sum(
            (
                jnp.sum(penalty(p.astype(jnp.promote_types(p.dtype, jnp.float32))))
                for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask_tree), strict=True)
                if m
            ),
            start=jnp.zeros([], jnp.float32),
        )
        new_state = state_type(
            count=optax.safe_increment(state.count), penalty=(s * total).astype(jnp.float32)
        )
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def l1_regularization(
    strength: Any, *, mask: Mask = None, record_penalty: bool = False
) -> optax.GradientTransformation:
    r"""Add the gradient of the L1 penalty ``strength * sum |w|`` to the update.

    .. math::
        u \leftarrow u + \lambda \, \mathrm{sign}(w), \qquad
        \text{penalty} = \lambda \sum_i |w_i|

    Put it before the optimizer's scaling (it acts like adding the penalty to the loss). With
    ``record_penalty=True`` the penalty at the parameters passed to the last ``update`` is in
    ``state.penalty``. With a schedule as ``strength``, the first update uses ``strength(0)``.

    Args:
      strength: :math:`\lambda \ge 0`, a number or a schedule of the step.
      mask: None (every parameter), a pytree of bools or a callable ``params -> pytree of bools``;
        e.g. :func:`decay_mask`.
      record_penalty: compute the penalty at every update and keep it in ``state.penalty`` (for
        logging; costs a pass over the parameters per update). False: ``state.penalty`` is None.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`L1RegularizationState`; its
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, jaxtricks
      >>> params = {"w": jnp.array([2.0, -3.0])}
      >>> tx = jaxtricks.l1_regularization(0.5, record_penalty=True)
      >>> updates, state = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
      >>> updates["w"].tolist(), float(state.penalty)
      ([0.5, -0.5], 2.5)

    References:
      Tibshirani, Regression Shrinkage and Selection via the Lasso, 1996 (J. R. Stat. Soc. B).
    """
    strength = _checks.check_scalar_or_schedule("strength", strength)
    mask = _check_mask(mask)
    return _penalty_transform(
        "l1_regularization",
        strength,
        mask,
        gradient=lambda s, w: s * jnp.sign(w),
        penalty=jnp.abs,
        state_type=L1RegularizationState,
        record_penalty=record_penalty,
    )


def l2_regularization(
    strength: Any, *, mask: Mask = None, record_penalty: bool = False
) -> optax.GradientTransformation:
    r"""Add the gradient of the L2 penalty ``strength * sum w**2`` to the update.

    .. math::
        u \leftarrow u + 2 \lambda w, \qquad \text{penalty} = \lambda \sum_i w_i^2

    The penalty has no factor 1/2, so PyTorch's
    ``SGD(params, lr, weight_decay=wd)``, which adds ``wd * w`` to the gradient, equals
    ``l2_regularization(wd / 2)`` placed after clipping and before the learning rate. Put it before
    the optimizer's scaling. With ``record_penalty=True`` the penalty at the parameters passed to
    the last ``update`` is in ``state.penalty``. With a schedule as ``strength``, the first update
    uses ``strength(0)``.

    Args:
      strength: :math:`\lambda \ge 0`, a number or a schedule of the step.
      mask: None (every parameter), a pytree of bools or a callable ``params -> pytree of bools``;
        e.g. :func:`decay_mask`.
      record_penalty: compute the penalty at every update and keep it in ``state.penalty`` (for
        logging; costs a pass over the parameters per update). False: ``state.penalty`` is None.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`L2RegularizationState`; its
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, jaxtricks
      >>> params = {"w": jnp.array([2.0, -3.0])}
      >>> tx = jaxtricks.l2_regularization(0.5, record_penalty=True)
      >>> updates, state = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
      >>> updates["w"].tolist(), float(state.penalty)
      ([2.0, -3.0], 6.5)

    References:
      Krogh & Hertz, A Simple Weight Decay Can Improve Generalization, 1991 (NeurIPS).

      PyTorch's ``torch.optim.SGD`` (``weight_decay``),
      https://pytorch.org/docs/stable/generated/torch.optim.SGD.html
    """
    strength = _checks.check_scalar_or_schedule("strength", strength)
    mask = _check_mask(mask)
    return _penalty_transform(
        "l2_regularization",
        strength,
        mask,
        gradient=lambda s, w: 2.0 * s * w,
        penalty=jnp.square,
        state_type=L2RegularizationState,
        record_penalty=record_penalty,
    )


def weight_decay(rate: Any, *, mask: Mask = None) -> optax.GradientTransformation:
    r"""Decoupled (AdamW-style) weight decay: add ``rate * w`` to the already-scaled update.

    .. math::
        u \leftarrow u + \gamma w \quad\Longrightarrow\quad
        w \leftarrow w - \eta \, (\hat u + \gamma w)

    Put it *after* the optimizer's scaling (e.g. ``optax.scale_by_adam``) and before the learning
    rate, which then multiplies it, as ``optax.add_decayed_weights`` does (same numbers). With a
    schedule as ``rate``, the first update uses ``rate(0)``.

    Args:
      rate: :math:`\gamma \ge 0`, a number or a schedule of the step.
      mask: None (every parameter), a pytree of bools or a callable ``params -> pytree of bools``;
        e.g. :func:`decay_mask`.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`WeightDecayState`; its ``update``
      needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, jaxtricks
      >>> params = {"w": jnp.array([[2.0, -4.0]]), "b": jnp.array([1.0])}
      >>> decay = jaxtricks.weight_decay(0.5, mask=jaxtricks.decay_mask)  # not the bias
      >>> tx = optax.chain(optax.scale_by_adam(), decay)
      >>> grads = {"w": jnp.zeros((1, 2)), "b": jnp.zeros(1)}  # Adam's update is 0 here
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["w"].tolist(), updates["b"].tolist()
      ([[1.0, -2.0]], [0.0])

    References:
      Loshchilov & Hutter, Decoupled Weight Decay Regularization, 2017,
      https://arxiv.org/abs/1711.05101
    """
    rate = _checks.check_scalar_or_schedule("rate", rate)
    mask = _check_mask(mask)

    def init_fn(params):
        del params
        return WeightDecayState(count=jnp.zeros([], jnp.int32), rate=jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise _missing_params("weight_decay")
        r = _checks.value_at(rate, state.count)
        mask_tree = _full_mask(mask, params)

        def add(g, p, m):
            return (g + (r * p).astype(g.dtype)) if m else g

        new_updates = jax.tree.map(add, updates, params, mask_tree)
        return new_updates, WeightDecayState(count=optax.safe_increment(state.count), rate=r)

    return optax.GradientTransformation(init_fn, update_fn)
