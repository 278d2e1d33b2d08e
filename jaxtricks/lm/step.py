"""The training and evaluation steps: one pure per-device function each, thin jit/pmap wrappers.

``train_step(state, batch, rng)`` is written for one device. The gradient mean across devices is a
``jax.lax.pmean`` over :data:`AXIS`; when the step runs under ``jax.jit`` on one device there is no
axis, so the wrapper binds ``axis_name=None`` and the mean is the identity. Nothing else differs
between the single-device and the pmapped step.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtricks.optimizer import optimizer_stats

AXIS = "batch"  # the name of the device axis of the pmapped step


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree: it is donated, replicated and saved)."""

    step: jax.Array  # () int32: number of updates done
    params: Any  # nnx.State of the model's parameters, float32
    opt_state: optax.OptState


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats, computed in float32."""
    # logits: (batch, seq, vocab); targets: (batch, seq)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return losses.mean()


def _mean_over_devices(x, axis_name):
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def accumulate_gradients(
    loss_fn: Any, params: Any, batch: Any, rng: jax.Array, microbatches: int = 1,
    unroll: bool = False,
) -> tuple[jax.Array, Any]:
    """``jax.value_and_grad(loss_fn)(params, batch, rng)``, computed in ``microbatches`` parts.

    Gradient accumulation inside one step: the batch's leading axis is cut into ``microbatches``
    equal parts, ``loss_fn(params, part, jax.random.fold_in(rng, i))`` is differentiated on each
    and the losses and gradients are averaged. For a ``loss_fn`` that is a mean over the batch
    and does not use ``rng``, that is the whole batch's loss and gradient, to float rounding.
    With ``microbatches=1`` it is ``value_and_grad`` itself, on the same ``rng``.

    By default the parts run one after another (a ``jax.lax.scan``), so the activations kept for
    the backward pass are those of one part: XLA's temporary memory falls about in proportion to
    the number of parts. ``unroll=True`` lets XLA run the parts side by side instead, which saves
    no memory but can fill CPU cores that one part leaves idle (``benchmarks/bench_step.py``
    measures whether it pays on a given machine).

    Example (any optax loop can use it)::

      loss, grads = accumulate_gradients(loss_fn, params, batch, key, microbatches=4)
      updates, opt_state = tx.update(grads, opt_state, params)

    Raises:
      ValueError: ``microbatches`` < 1, or a batch leaf whose leading axis it does not divide.
    """
    if microbatches < 1:
        raise ValueError(f"microbatches={microbatches} is out of range; allowed: an integer >= 1.")
    grad_fn = jax.value_and_grad(loss_fn)
    if microbatches == 1:
        return grad_fn(params, batch, rng)
    for x in jax.tree.leaves(batch):
        if x.shape[0] % microbatches:
            raise ValueError(
                f"microbatches={microbatches} must divide the batch; got a batch of "
                f"{x.shape[0]} (per device) along the leading axis."
            )
    parts = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), batch)

    def add_part(total, index_and_part):
        index, part = index_and_part
        loss_and_grads = grad_fn(params, part, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, total, loss_and_grads), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, batch, rng))
    total, _ = jax.lax.scan(add_part, zeros, (jnp.arange(microbatches), parts), unroll=unroll)
    return jax.tree.map(lambda x: x / microbatches, total)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    rest: Any,
    optimizer: optax.GradientTransformation,
    axis_name: str | None,
    microbatches: int = 1,
    unroll_microbatches: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on this device's share of the batch; gradients are averaged over ``axis_name``.

    With ``microbatches > 1`` the loss and gradients are accumulated over that many parts of the
    device's batch (:func:`accumulate_gradients`), each part with its own dropout key.
    """
    # A fresh dropout key per step (and per device, so devices drop different units).
    dropout_rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

    def loss_fn(params, batch, dropout_rng):
        model = nnx.merge(graphdef, params, rest)
        logits = model(batch["inputs"], dropout_rng=dropout_rng)  # (batch, seq, vocab)
        return cross_entropy(logits, batch["targets"])

    loss, grads = accumulate_gradients(loss_fn, state.params, batch, dropout_rng, microbatches,
                                       unroll_microbatches)
    loss, grads = _mean_over_devices((loss, grads), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **optimizer_stats(opt_state)}
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(
    params: Any,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    rest: Any,
    axis_name: str | None,
) -> jax.Array:
    """Mean validation cross-entropy (nats per token) of this batch, averaged over devices."""
    model = nnx.merge(graphdef, params, rest)
    loss = cross_entropy(model(batch["inputs"]), batch["targets"])
    return _mean_over_devices(loss, axis_name)


class Steps(NamedTuple):
    """The compiled train and eval steps and how to move data and state onto the devices."""

    train: Any  # (state, batch, rng) -> (state, metrics)
    eval: Any  # (params, batch) -> loss
    put_state: Any  # host TrainState -> device (replicated for pmap)
    get_state: Any  # device TrainState -> one unreplicated copy
    put_batch: Any  # host batch (global, per process) -> device
    num_devices: int


def make_steps(
    graphdef: nnx.GraphDef,
    rest: Any,
    optimizer: optax.GradientTransformation,
    parallelism: str = "auto",
    *,
    microbatches: int = 1,
    unroll_microbatches: bool = False,
) -> Steps:
    """Wrap the per-device steps in ``jax.jit`` (one device) or ``jax.pmap`` (all local devices).

    ``parallelism``: "single", "pmap", or "auto" (pmap when there is more than one local device).
    ``microbatches`` and ``unroll_microbatches``: gradient accumulation over parts of each
    device's batch (:func:`accumulate_gradients`).
    The state's buffers are donated: the caller must use the returned state, not the old one.
    """
    devices = jax.local_devices()
    use_pmap = parallelism == "pmap" or (parallelism == "auto" and len(devices) > 1)
    axis = AXIS if use_pmap else None
    train = functools.partial(
        train_step, graphdef=graphdef, rest=rest, optimizer=optimizer, axis_name=axis,
        microbatches=microbatches, unroll_microbatches=unroll_microbatches,
    )
    evaluate = functools.partial(eval_step, graphdef=graphdef, rest=rest, axis_name=axis)
    if not use_pmap:
        return Steps(
            train=jax.jit(train, donate_argnums=0),
            eval=jax.jit(evaluate),
            put_state=jax.device_put,
            get_state=lambda s: s,
            put_batch=jax.device_put,
            num_devices=1,
        )
    n = len(devices)
    # pmap takes arrays whose leading axis is split over the devices: say so with a sharding.
    over_devices = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS)
    )

    def put_state(state):
        return jax.device_put(jax.tree.map(lambda x: jnp.stack([x] * n), state), over_devices)

    def put_batch(batch):
        # (global_batch, seq) -> (devices, global_batch / devices, seq)
        return jax.device_put(
            {k: v.reshape(n, -1, *v.shape[1:]) for k, v in batch.items()}, over_devices
        )

    return Steps(
        train=jax.pmap(train, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=0),
        eval=jax.pmap(evaluate, axis_name=AXIS),
        put_state=put_state,
        get_state=lambda s: jax.tree.map(lambda x: x[0], s),
        put_batch=put_batch,
        num_devices=n,
    )


def unreplicate_metrics(metrics: dict[str, Any], steps: Steps) -> dict[str, float]:
    """Host floats from a metrics dict (the first device's copy under pmap: they are all equal)."""
    metrics = jax.device_get(metrics)
    if steps.num_devices > 1:
        metrics = {k: v[0] for k, v in metrics.items()}
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
