"""The training and evaluation steps: one pure function each, jitted over a mesh (or pmapped).

``train_step(state, batch, rng)`` is written for the whole batch. Under ``jax.jit`` over a device
mesh (:func:`make_steps`, parallelism "mesh" or "single") the state and the batch carry shardings
and XLA inserts every collective, so ``axis_name=None``. Under ``jax.pmap`` each device sees its
share of the batch and the gradient mean across devices is a ``jax.lax.pmean`` over :data:`AXIS`.
Nothing else differs between the three.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtricks.optimizer import optimizer_stats

AXIS = "batch"  # the name of the device axis of the pmapped step


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree: it is donated, replicated and saved)."""

    step: jax.Array  # () int32: number of updates done
    params: Any  # nnx.State of the model's parameters, float32
    opt_state: optax.OptState


def cross_entropy(logits: jax.Array, targets: jax.Array, vocab_limit: int | None = None
                  ) -> jax.Array:
    """Mean next-token cross-entropy in nats, computed in float32; the logits of ids from
    ``vocab_limit`` on (the embedding's padding rows) are left out of the softmax."""
    return token_losses(logits, targets, vocab_limit).mean()


def token_losses(logits: jax.Array, targets: jax.Array, vocab_limit: int | None = None
                 ) -> jax.Array:
    """Each position's cross-entropy in nats (float32), ``(batch, seq)``; see
    :func:`cross_entropy`."""
    logits = logits.astype(jnp.float32)  # (batch, seq, vocab)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def _mean_over_devices(x, axis_name):
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def accumulate_gradients(
    loss_fn: Any, params: Any, batch: Any, rng: jax.Array, microbatches: int = 1,
    unroll: bool = False,
) -> tuple[jax.Array, Any]:
    """``jax.value_and_grad(loss_fn)(params, batch, rng)``, computed in ``microbatches`` parts.

    Gradient accumulation inside one step: the batch's leading axis is dealt into
    ``microbatches`` equal parts (part ``i`` holds rows ``i, i + k, i + 2k, ...``, so a batch split
    over devices in blocks of rows keeps each device's rows on it),
    ``loss_fn(params, part, jax.random.fold_in(rng, i))`` is differentiated on each and the losses
    and gradients are averaged. For a ``loss_fn`` that is a mean over the batch
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
    # (batch, ...) -> (microbatches, batch / microbatches, ...), row r in part r % microbatches
    parts = jax.tree.map(
        lambda x: x.reshape(-1, microbatches, *x.shape[1:]).swapaxes(0, 1), batch)

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
    vocab_limit: int | None = None,
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
        return cross_entropy(logits, batch["targets"], vocab_limit)

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
    vocab_limit: int | None = None,
) -> jax.Array:
    """Mean validation cross-entropy (nats per token) of this batch, averaged over devices."""
    model = nnx.merge(graphdef, params, rest)
    loss = cross_entropy(model(batch["inputs"]), batch["targets"], vocab_limit)
    return _mean_over_devices(loss, axis_name)


class Steps(NamedTuple):
    """The compiled train and eval steps and how to move data and state onto the devices."""

    train: Any  # (state, batch, rng) -> (state, metrics)
    eval: Any  # (params, batch) -> loss
    init_state: Any  # (() -> TrainState) -> the state, made on the devices (sharded or replicated)
    put_state: Any  # host TrainState -> device (one process only)
    get_state: Any  # device TrainState -> one copy (the pmapped state's first; the mesh's as is)
    put_batch: Any  # host global batch -> device (each process hands over its own rows)
    state_target: Any  # abstract TrainState -> ShapeDtypeStructs with shardings (for restoring)
    num_devices: int  # all processes together
    parallelism: str  # "single", "pmap" or "mesh"
    mesh: jax.sharding.Mesh | None  # None for pmap


def make_steps(
    graphdef: nnx.GraphDef,
    rest: Any,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    parallelism: str = "auto",
    *,
    mesh_shape: tuple[int, int, int] | None = None,
    microbatches: int = 1,
    unroll_microbatches: bool = False,
    vocab_limit: int | None = None,
) -> Steps:
    """The train and eval steps, jitted over a device mesh (or pmapped), the state donated.

    ``parallelism``: "mesh" jits the step over a ``data x fsdp x tensor`` mesh of all devices
    (``mesh_shape``; default: all on ``data``), with the state's shardings from
    :mod:`jaxtricks.lm.sharding`; "single" is the same on a one-device mesh; "pmap" wraps the same
    step in ``jax.pmap`` over this process's devices (the state replicated); "auto" is "mesh" with
    more than one device, else "single". ``state`` (concrete or abstract) gives the state's
    structure. ``microbatches`` and ``unroll_microbatches``: gradient accumulation over parts of
    each step's batch (:func:`accumulate_gradients`). ``vocab_limit``: the tokenizer's size, when
    the embedding has padding rows (their logits are masked out of the loss).
    The state's buffers are donated: the caller must use the returned state, not the old one.
    """
    from jaxtricks.lm import sharding as sharding_lib

    if parallelism == "auto":
        parallelism = "mesh" if jax.device_count() > 1 else "single"
    if parallelism == "pmap":
        return _pmap_steps(*_bind(graphdef, rest, optimizer, AXIS, microbatches,
                                  unroll_microbatches, vocab_limit))
    if parallelism == "single":
        mesh = sharding_lib.make_mesh((1, 1, 1), jax.local_devices()[:1])
    else:
        mesh = sharding_lib.make_mesh(mesh_shape or (jax.device_count(), 1, 1))
    state_sharding = sharding_lib.state_shardings(state, optimizer, mesh)
    batch = sharding_lib.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    train, evaluate = _bind(graphdef, rest, optimizer, None, microbatches, unroll_microbatches,
                            vocab_limit)
    rows: dict[int, slice] = {}  # this process's rows, per global batch size

    def put_batch(global_batch):
        size = next(iter(global_batch.values())).shape[0]
        if size not in rows:
            rows[size] = sharding_lib.process_rows(batch, size)
        return {k: jax.make_array_from_process_local_data(batch, v[rows[size]], v.shape)
                for k, v in global_batch.items()}

    def state_target(abstract):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, state_sharding)

    return Steps(
        train=_OnMesh(mesh, jax.jit(train, in_shardings=(state_sharding, batch, replicated),
                                     out_shardings=(state_sharding, replicated),
                                     donate_argnums=0)),
        eval=_OnMesh(mesh, jax.jit(evaluate, in_shardings=(state_sharding.params, batch),
                                    out_shardings=replicated)),
        init_state=lambda create: jax.jit(create, out_shardings=state_sharding)(),
        put_state=functools.partial(jax.device_put, device=state_sharding),
        get_state=lambda s: s,
        put_batch=put_batch,
        state_target=state_target,
        num_devices=mesh.size,
        parallelism=parallelism,
        mesh=mesh,
    )


class _OnMesh:
    """A jitted function traced, lowered and called with ``mesh`` set: the model's sharding
    constraints of its activations (:func:`jaxtricks.lm.sharding.constrain`) refer to it."""

    def __init__(self, mesh: jax.sharding.Mesh, jitted: Any):
        self.mesh, self.jitted = mesh, jitted

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)

    def __getattr__(self, name: str) -> Any:  # e.g. _cache_size
        return getattr(self.jitted, name)


def _bind(graphdef, rest, optimizer, axis_name, microbatches, unroll_microbatches,
          vocab_limit) -> tuple[Any, Any]:
    """:func:`train_step` and :func:`eval_step` with all but their arrays bound."""
    model = dict(graphdef=graphdef, rest=rest, axis_name=axis_name, vocab_limit=vocab_limit)
    train = functools.partial(train_step, optimizer=optimizer, microbatches=microbatches,
                              unroll_microbatches=unroll_microbatches, **model)
    return train, functools.partial(eval_step, **model)


def _pmap_steps(train, evaluate) -> Steps:
    """The same step under ``jax.pmap`` over this process's devices, the state replicated."""
    devices = jax.local_devices()
    n = len(devices)
    # pmap takes arrays whose leading axis is split over the devices: say so with a sharding.
    over_devices = NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))

    def put_state(state):
        return jax.device_put(jax.tree.map(lambda x: jnp.stack([x] * n), state), over_devices)

    def put_batch(batch):
        # (global_batch, seq) -> (devices, global_batch / devices, seq)
        return jax.device_put(
            {k: v.reshape(n, -1, *v.shape[1:]) for k, v in batch.items()}, over_devices
        )

    first = jax.sharding.SingleDeviceSharding(devices[0])
    return Steps(
        train=jax.pmap(train, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=0),
        eval=jax.pmap(evaluate, axis_name=AXIS),
        init_state=lambda create: put_state(create()),
        put_state=put_state,
        get_state=lambda s: jax.tree.map(lambda x: x[0], s),
        put_batch=put_batch,
        state_target=lambda abstract: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=first), abstract),
        num_devices=n,
        parallelism="pmap",
        mesh=None,
    )


def unreplicate_metrics(metrics: dict[str, Any], steps: Steps) -> dict[str, float]:
    """Host floats from a metrics dict (the first device's copy under pmap: they are all equal)."""
    metrics = jax.device_get(metrics)
    if steps.parallelism == "pmap":
        metrics = {k: v[0] for k, v in metrics.items()}
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
