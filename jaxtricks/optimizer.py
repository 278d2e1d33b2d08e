r"""Config -> one ``optax.chain``; the order of the tricks is documented here, in one place.

The chain built by :func:`make_optimizer`, in order:

1. ``clip_by_global_norm(clip_norm)``: always present; with ``clip_norm=None`` it is
   ``clip_by_global_norm(inf)``, which never clips but records the pre-clip norm, so
   ``optimizer_stats(...)["grad_norm"]`` is always there. Clipping acts on the raw gradient, as
   PyTorch's ``clip_grad_norm_`` before ``optimizer.step()``.
2. ``l1_regularization(l1)``: adds ``l1 * sign(w)`` (gradient of the penalty, before the scaling).
3. ``l2_regularization(l2)``: adds ``2 * l2 * w`` (PyTorch's ``SGD(weight_decay=wd)`` is
   ``l2 = wd / 2``).
4. The optimizer's scaling: sgd: none; momentum: ``optax.trace(momentum)`` (PyTorch's SGD momentum);
   adam / adamw: ``optax.scale_by_adam(b1, b2, eps)``.
5. ``weight_decay(weight_decay)``: decoupled (AdamW-style) decay, multiplied by the learning rate.
6. ``scale_by_learning_rate(learning_rate)``: multiplies by ``-lr`` and records the lr it used.

The whole chain is wrapped in ``skip_nonfinite`` when asked. A trick set to 0 or None is left out
of the chain (except the norm recorder of step 1); a trick given as an array (as
``optax.inject_hyperparams`` gives every number) stays in, since its value may change later.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxtricks import _checks, clipping, regularization

OPTIMIZER_NAMES = ("sgd", "momentum", "adam", "adamw")


class LearningRateState(NamedTuple):
    """Step count and the learning rate of the last update of :func:`scale_by_learning_rate`."""

    count: jax.Array  # shape=(), int32: updates done; the schedule is evaluated at it
    learning_rate: jax.Array  # shape=(), float32: lr of the last update (before any: lr at step 0)


def scale_by_learning_rate(learning_rate: Any) -> optax.GradientTransformation:
    r"""Multiply the update by ``-learning_rate`` and record the rate in the state.

    .. math::
        u \leftarrow -\eta_t \, u, \qquad t = \text{updates done so far}

    Optax's step convention: the first update uses ``learning_rate(0)``. The rate used by the last
    update is ``state.learning_rate`` (before the first update it holds ``learning_rate(0)``, the
    rate the first update will use), so a trainer logs it without evaluating the schedule again.

    Args:
      learning_rate: a number >= 0 or a schedule ``step -> value`` (0 is allowed, as in PyTorch's
        optimizers: a warmup injected by ``optax.inject_hyperparams`` starts there).

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`LearningRateState`.

    Example:
      >>> import jax.numpy as jnp, jaxtricks
      >>> tx = jaxtricks.scale_by_learning_rate(jaxtricks.linear_warmup(1.0, 4))
      >>> state = tx.init(None)
      >>> for _ in range(3):
      ...     updates, state = tx.update(jnp.array([2.0]), state)
      >>> updates.tolist(), float(state.learning_rate), int(state.count)
      ([-1.0], 0.5, 3)
    """
    learning_rate = _checks.check_scalar_or_schedule("learning_rate", learning_rate)

    def init_fn(params):
        del params
        count = jnp.zeros([], jnp.int32)
        return LearningRateState(count=count, learning_rate=_checks.value_at(learning_rate, count))

    def update_fn(updates, state, params=None):
        del params
        lr = _checks.value_at(learning_rate, state.count)
        new_updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
        return new_updates, LearningRateState(
            count=optax.safe_increment(state.count), learning_rate=lr
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _is_off(value: Any) -> bool:
    """0 or None switches a trick off; a schedule or an array (e.g. a hyperparameter injected by
    ``optax.inject_hyperparams``, which may change later) keeps it in the chain."""
    return value is None or (isinstance(value, numbers.Real) and value == 0)


def make_optimizer(
    *,
    name: str = "adamw",
    learning_rate: Any = 1e-3,
    momentum: float = 0.9,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = None,
    l1: Any = 0.0,
    l2: Any = 0.0,
    weight_decay: Any = 0.0,
    mask: Any = None,
    skip_nonfinite: bool = False,
    record_penalties: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""One ``optax.chain`` with every trick, in the order documented in this module.

    .. math::
        u = -\eta_t \left( S\!\left(\mathrm{clip}(g) + \lambda_1 \mathrm{sign}(w)
            + 2 \lambda_2 w\right) + \gamma w \right)

    where :math:`S` is the optimizer's scaling (identity for sgd, momentum trace, Adam). The first
    update uses ``learning_rate(0)`` (optax's convention). ``name="adamw"`` with
    ``weight_decay=0`` is exactly Adam; ``weight_decay`` applies with every name (with sgd it is
    the same as ``l2 = weight_decay / 2``).

    Under ``optax.inject_hyperparams`` every number arrives as an array, so l1, l2 and
    weight_decay stay in the chain even at 0 (they can be switched on later by setting
    ``state.hyperparams``, and ``update`` needs ``params``); list ``name`` and a callable ``mask``
    in ``static_args``, or the wrapper takes the mask for a schedule. With bf16 parameters pass
    ``hyperparam_dtype=jnp.float32``: by default the wrapper stores the hyperparameters in the
    parameters' dtype, where ``b2=0.999`` rounds to 1 (refused). The updates keep the gradients'
    dtype either way.

    Args:
      name: one of ``sgd``, ``momentum``, ``adam``, ``adamw``.
      learning_rate: a number >= 0 or a schedule (e.g. from :func:`jaxtricks.linear_warmup`).
      momentum: ``0 <= momentum < 1``, used by ``name="momentum"``.
      b1: Adam's first-moment decay, ``0 <= b1 < 1``.
      b2: Adam's second-moment decay, ``0 <= b2 < 1``.
      eps: Adam's epsilon, > 0.
      clip_norm: maximum global gradient norm, or None for no clipping (the norm is still
        recorded).
      l1: strength of ``l1 * sum |w|`` (number or schedule; 0 or None: off).
      l2: strength of ``l2 * sum w**2`` (number or schedule; 0 or None: off).
      weight_decay: decoupled decay rate (number or schedule; 0 or None: off).
      mask: which parameters l1 / l2 / weight_decay act on: None (all), a pytree of bools or a
        callable such as :func:`jaxtricks.decay_mask`.
      skip_nonfinite: wrap the chain in :func:`jaxtricks.skip_nonfinite`.
      record_penalties: keep the L1 / L2 penalties in the state at every update (for
        :func:`optimizer_stats`; a pass over the parameters per update, see
        :func:`jaxtricks.l1_regularization`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; read its logs with :func:`optimizer_stats`.
      Its ``update`` needs ``params`` when l1, l2 or weight_decay is on.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxtricks
      >>> tx = jaxtricks.make_optimizer(name="sgd", learning_rate=0.1, clip_norm=1.0)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([3.0, 4.0]), state, params)
      >>> [round(u, 6) for u in updates.tolist()]  # clipped to norm 1, times -0.1
      [-0.06, -0.08]
      >>> stats = jaxtricks.optimizer_stats(state)
      >>> round(float(stats["learning_rate"]), 6), float(stats["grad_norm"]), stats["clipped"]
      (0.1, 5.0, Array(1., dtype=float32))

    References:
      Kingma & Ba, Adam: A Method for Stochastic Optimization, 2014,
      https://arxiv.org/abs/1412.6980

      Loshchilov & Hutter, Decoupled Weight Decay Regularization, 2017,
      https://arxiv.org/abs/1711.05101
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"name must be one of {', '.join(OPTIMIZER_NAMES)}, got {name!r}.")
    learning_rate = _checks.check_scalar_or_schedule("learning_rate", learning_rate)
    momentum = _checks.check_unit_interval("momentum", momentum)
    b1 = _checks.check_unit_interval("b1", b1)
    b2 = _checks.check_unit_interval("b2", b2)
    eps = _checks.check_positive("eps", eps)
    if clip_norm is not None:
        clip_norm = _checks.check_positive_or_inf("clip_norm", clip_norm, "record only")
    tricks = {"l1": l1, "l2": l2, "weight_decay": weight_decay}
    for key, value in tricks.items():
        if value is not None:
            _checks.check_scalar_or_schedule(key, value)

    parts = [clipping.clip_by_global_norm(math.inf if clip_norm is None else clip_norm)]
    if not _is_off(l1):
        parts.append(
            regularization.l1_regularization(l1, mask=mask, record_penalty=record_penalties)
        )
    if not _is_off(l2):
        parts.append(
            regularization.l2_regularization(l2, mask=mask, record_penalty=record_penalties)
        )
    if name == "momentum":
        parts.append(optax.trace(decay=momentum))
    elif name in ("adam", "adamw"):
        parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if not _is_off(weight_decay):
        parts.append(regularization.weight_decay(weight_decay, mask=mask))
    parts.append(scale_by_learning_rate(learning_rate))

    chain = optax.chain(*parts)
    return _keep_dtypes(clipping.skip_nonfinite(chain) if skip_nonfinite else chain)


def _keep_dtypes(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``inner`` with each update cast back to its gradient's dtype.

    With Python-number hyperparameters the chain keeps bf16 by itself (weak types); under
    ``optax.inject_hyperparams(..., hyperparam_dtype=jnp.float32)`` the float32 arrays promote
    Adam's and momentum's arithmetic, and the updates would come out float32. The state is inner's.
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_state = inner.update(updates, state, params, **extra_args)
        new_updates = jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates, updates)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


# --------------------------------------------------------------------------- logging


def _find_states(tree: Any, state_type: type) -> list[Any]:
    """Every ``state_type`` node in ``tree``, in flattening (i.e. chain) order."""
    found = []

    def is_leaf(node):
        if isinstance(node, state_type):
            found.append(node)
        return False  # keep descending: states may nest (skip_nonfinite wraps the chain)

    jax.tree_util.tree_flatten(tree, is_leaf=is_leaf)
    return found


def optimizer_stats(opt_state: Any) -> dict[str, jax.Array]:
    """What a trainer logs, read from the optimizer state (no recomputation; works under jit).

    The state tree is searched for jaxtricks' state types wherever they sit (inside
    ``optax.chain``, ``optax.masked``, :func:`jaxtricks.skip_nonfinite`, a Flax ``TrainState``);
    when a type occurs more than once the first one in chain order is used.

    - ``learning_rate`` (float32): the rate of the last update (from :class:`LearningRateState`;
      present when the chain has :func:`scale_by_learning_rate`, as :func:`make_optimizer`'s has);
    - ``grad_norm`` (float32): the pre-clip global gradient norm of the last update, and
      ``clipped`` (float32, 1.0 when that update was clipped, else 0.0) (from
      :class:`ClipByGlobalNormState`; :func:`make_optimizer`'s chain always has one);
    - ``skipped`` (int32): steps skipped for non-finite gradients since init,
      ``consecutive_skipped`` (int32): skipped in a row up to the last step, and ``skipped_step``
      (float32, 1.0 when the last step was skipped) (from :class:`SkipNonfiniteState`; always
      present: all 0 when the chain has no :func:`jaxtricks.skip_nonfinite`, which never skips);
    - ``l1_penalty`` / ``l2_penalty`` (float32): the penalties at the parameters of the last update
      (present when those tricks are in the chain with ``record_penalty=True``);
    - ``zclip_mean``, ``zclip_std``, ``zclip_threshold`` (float32): the running statistics and the
      threshold of :func:`jaxtricks.zclip` (from :class:`jaxtricks.ZClipState`, when present); it
      also sets ``grad_norm`` (its raw norm) and ``clipped`` (its decision), replacing those of a
      :class:`ClipByGlobalNormState` in the same tree, which may sit after zclip and see the
      clipped gradient;
    - ``skipped_spikes`` (int32): steps skipped by :func:`jaxtricks.skip_spikes` since init (when
      present).

    On a skipped step the inner states are kept, so ``learning_rate``, ``grad_norm``, ``clipped``
    and the penalties describe the last *applied* update.

    Args:
      opt_state: an optimizer state, or any pytree holding one.

    Returns:
      A dict of jnp scalars.

    Example:
      >>> import jax.numpy as jnp, jaxtricks
      >>> tx = jaxtricks.make_optimizer(
      ...     learning_rate=0.01, l2=0.5, skip_nonfinite=True, record_penalties=True)
      >>> params = jnp.array([1.0, 2.0])
      >>> _, state = tx.update(jnp.zeros(2), tx.init(params), params)
      >>> stats = jaxtricks.optimizer_stats(state)
      >>> float(stats["l2_penalty"]), round(float(stats["learning_rate"]), 6), int(stats["skipped"])
      (2.5, 0.01, 0)
    """
    stats: dict[str, jax.Array] = {}

    def first(state_type):
        found = _find_states(opt_state, state_type)
        return found[0] if found else None

    if (lr := first(LearningRateState)) is not None:
        stats["learning_rate"] = lr.learning_rate
    if (clip := first(clipping.ClipByGlobalNormState)) is not None:
        stats["grad_norm"] = clip.grad_norm
        stats["clipped"] = clip.clipped.astype(jnp.float32)
    if (zc := first(clipping.ZClipState)) is not None:
        stats["grad_norm"] = zc.norm
        stats["clipped"] = zc.clipped.astype(jnp.float32)
        stats["zclip_mean"] = zc.mean
        stats["zclip_std"] = zc.std
        stats["zclip_threshold"] = zc.threshold
    if (spikes := first(clipping.SkipSpikesState)) is not None:
        stats["skipped_spikes"] = spikes.skipped_spikes
    if (skip := first(clipping.SkipNonfiniteState)) is not None:
        stats["skipped"] = skip.total_skipped
        stats["consecutive_skipped"] = skip.consecutive_skipped
        stats["skipped_step"] = skip.last_skipped.astype(jnp.float32)
    else:  # nothing skips steps: the counters are truly 0, and the keys stay the same per run
        stats["skipped"] = jnp.zeros([], jnp.int32)
        stats["consecutive_skipped"] = jnp.zeros([], jnp.int32)
        stats["skipped_step"] = jnp.zeros([], jnp.float32)
    if (l1 := first(regularization.L1RegularizationState)) is not None and l1.penalty is not None:
        stats["l1_penalty"] = l1.penalty
    if (l2 := first(regularization.L2RegularizationState)) is not None and l2.penalty is not None:
        stats["l2_penalty"] = l2.penalty
    return stats
