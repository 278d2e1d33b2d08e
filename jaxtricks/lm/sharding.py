"""Where the run's arrays live: the device mesh, the logical axis rules, and several processes.

One table, :data:`LOGICAL_AXIS_RULES`, maps the logical axis names the model gives its parameters
(``vocab``, ``embed``, ``heads``, ``mlp``, ``norm``) and the batch's to the mesh axes
``data x fsdp x tensor`` (MaxText's scheme):

* ``data``: the batch is split, parameters and optimizer state are replicated;
* ``fsdp``: the batch is split too, and every large parameter (and its optimizer state) is split
  along its ``embed`` axis: FSDP / ZeRO-3, XLA gathering each one where it is used;
* ``tensor``: attention heads and the MLP's hidden width are split (Megatron style).

The vocabulary axis is left whole, so that one rules table serves every vocabulary size (an
explicit ``model.vocab_size`` such as the byte tokenizer's 257 divides by no mesh size; ``auto``
pads to a multiple of 64); the embedding is still split along ``d_model`` over ``fsdp``. Biases and
norm scales of width ``d_model`` (``norm``) are replicated. XLA inserts every collective: there is
no hand-written communication.

:func:`start_processes` starts ``jax.distributed`` when the config asks for several processes or a
cluster is detected; :func:`plan` checks the mesh against the devices before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtricks.lm.config import Config, ConfigError, DistributedConfig

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),  # every data-parallel device reads its own rows
    ("vocab", None),  # left whole (see the module's docstring)
    ("embed", "fsdp"),  # FSDP: parameters are split along the residual width
    ("heads", "tensor"),  # tensor parallel: attention heads ...
    ("mlp", "tensor"),  # ... and the MLP's hidden width
    ("norm", None),  # biases and norm scales of width d_model: small, replicated
)
BATCH = PartitionSpec(("data", "fsdp"))  # (batch, seq) arrays: rows over data x fsdp


class Plan(NamedTuple):
    """How the step runs: ``parallelism`` "single", "pmap" or "mesh" (with its shape)."""

    parallelism: str
    mesh_shape: tuple[int, int, int] | None  # (data, fsdp, tensor); None for pmap
    num_devices: int  # the devices the step runs on, all processes together


# --------------------------------------------------------------------------- processes


def detected_cluster() -> str | None:
    """The name of the multi-process environment this process runs in, or None: a Cloud TPU VM
    (GCE or GKE), a SLURM job step, or Open MPI's ``mpirun``. JAX's own detectors, minus those
    that fire on a plain machine (mpi4py merely installed, Kubernetes without a job)."""
    try:
        from jax._src.clusters import cloud_tpu_cluster, ompi_cluster, slurm_cluster
    except ImportError:  # a JAX that moved them: no detection, as on a plain machine
        return None
    for name, cluster in [("Cloud TPU (GCE)", cloud_tpu_cluster.GceTpuCluster),
                          ("Cloud TPU (GKE)", cloud_tpu_cluster.GkeTpuCluster),
                          ("SLURM", slurm_cluster.SlurmCluster),
                          ("Open MPI", ompi_cluster.OmpiCluster)]:
        try:
            if cluster.is_env_present():
                return name
        except Exception:  # e.g. a metadata server that does not answer: not that cluster
            continue
    return None


def start_processes(cfg: DistributedConfig) -> None:
    """``jax.distributed.initialize``: with the configured coordinator, process count and id, or
    from the cluster's environment when :func:`detected_cluster` finds one; otherwise nothing
    (one process). Call it before JAX starts its backends (``training.preflight`` does)."""
    if cfg.coordinator:
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    elif detected_cluster() is not None and not _already_started():
        jax.distributed.initialize()


def _already_started() -> bool:
    from jax._src import distributed

    return distributed.global_state.client is not None


def is_main_process() -> bool:
    """Process 0: the one that prints and writes the logs, the report and ``run.json``."""
    return jax.process_index() == 0


def agree(ok: bool) -> bool:
    """Whether process 0's ``ok`` holds, told to every process (``ok`` of the others is ignored);
    with one process, ``ok`` itself."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


# --------------------------------------------------------------------------- the mesh


def plan(config: Config) -> Plan:
    """The step's layout on this run's devices (:func:`plan_for`). Starts JAX's backends."""
    return plan_for(config, jax.device_count(), jax.local_device_count(), jax.process_count())


def plan_for(config: Config, num_devices: int, local_devices: int, processes: int) -> Plan:
    """The step's layout on ``num_devices`` devices (``local_devices`` of them in this process,
    ``processes`` processes); ConfigError (naming the key, the value and what is allowed) for a
    mesh that does not match the devices, or a batch, head count, MLP width or model width it
    does not divide."""
    n, local = num_devices, local_devices
    parallelism = config.parallelism
    if parallelism == "auto":  # a mesh asked for is checked against the devices, even one
        asked = any(size not in (-1, 1) for size in dataclasses.astuple(config.mesh))
        parallelism = "mesh" if n > 1 or asked else "single"
    if processes > 1 and parallelism != "mesh":
        raise ConfigError(
            f"parallelism={config.parallelism!r} runs within one process, but this run has "
            f"{processes}; allowed: auto or mesh."
        )
    tc, m = config.train, config.model
    if parallelism == "pmap":
        shape, split = None, local
    elif parallelism == "single":
        shape, split = (1, 1, 1), 1
    else:
        shape = mesh_shape(config, n, f"{processes} process(es) x {local}")
        split = shape[0] * shape[1]
    if tc.batch_size % (split * tc.microbatches):
        parts = f" times train.microbatches={tc.microbatches}" if tc.microbatches > 1 else ""
        over = ("the devices" if shape is None
                else f"mesh.data x mesh.fsdp = {shape[0]} x {shape[1]}")
        raise ConfigError(
            f"train.batch_size={tc.batch_size} must be divisible by {over} ({split}){parts}; "
            f"use a multiple of {split * tc.microbatches}."
        )
    if shape is not None:
        _, fsdp, tensor = shape
        for key, value, axis, by, why in [
            ("model.num_heads", m.num_heads, "mesh.tensor", tensor, "a device holds whole heads"),
            ("model.d_ff", m.d_ff, "mesh.tensor", tensor, "each device holds part of the MLP"),
            ("model.d_model", m.d_model, "mesh.fsdp", fsdp, "parameters are split along it"),
        ]:
            if value % by:
                raise ConfigError(f"{key}={value} must be a multiple of {axis}={by} ({why}).")
    return Plan(parallelism, shape, local if shape is None else math.prod(shape))


def mesh_shape(config: Config, num_devices: int, devices_are: str = "") -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` of ``config.mesh`` on ``num_devices`` devices, its -1 resolved
    (``devices_are``: how the error message details the devices)."""
    sizes = {"mesh.data": config.mesh.data, "mesh.fsdp": config.mesh.fsdp,
             "mesh.tensor": config.mesh.tensor}
    given = ", ".join(f"{k}={v}" for k, v in sizes.items())
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if num_devices % known:
            raise ConfigError(
                f"{given}: the sizes set ({known} devices) must divide the {num_devices} devices "
                "of this run, so that -1 can take the rest."
            )
        sizes = {k: num_devices // known if v == -1 else v for k, v in sizes.items()}
    elif known != num_devices:
        raise ConfigError(
            f"{given}: their product ({known}) must equal the devices of this run "
            f"({num_devices}{': ' + devices_are if devices_are else ''}); "
            "set one of them to -1 to take the devices left."
        )
    return sizes["mesh.data"], sizes["mesh.fsdp"], sizes["mesh.tensor"]


def make_mesh(shape: tuple[int, int, int], devices: Any = None) -> jax.sharding.Mesh:
    """A ``data x fsdp x tensor`` mesh with automatic axes (the shardings of ``jax.jit``'s
    arguments decide, XLA propagates the rest), over ``devices`` (default: all of them, laid out
    by ``jax.make_mesh`` so that each process holds neighbouring devices)."""
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices is None:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


# --------------------------------------------------------------------------- shardings


def param_shardings(params: Any, mesh: jax.sharding.Mesh) -> Any:
    """``NamedSharding`` of each parameter: its logical axis names through the rules."""
    with nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        specs = nnx.get_partition_spec(params)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def state_shardings(state: Any, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh) -> Any:
    """Shardings of a ``TrainState`` (concrete or abstract): the parameters' own, the optimizer
    state's leaves that mirror a parameter take that parameter's, the rest (counters, scalars)
    are replicated."""
    params = param_shardings(state.params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, state.opt_state, params,
        transform_non_params=lambda _: replicated,
    )
    return type(state)(replicated, params, opt_state)


def constrain(x: jax.Array, *logical: str | None) -> jax.Array:
    """``x`` held as its logical axes say (``jax.lax.with_sharding_constraint``) when it is traced
    under a mesh of :data:`MESH_AXES` (the steps of :func:`jaxtricks.lm.step.make_steps` are);
    unchanged otherwise.

    The model marks its activations ``("batch", None, None)``: rows split over ``data x fsdp``,
    the rest whole. Without it XLA may follow the FSDP-split parameters into the activations
    and split them along the model width instead of the batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):  # e.g. jax.pmap's own mesh
        return x
    rules = dict(LOGICAL_AXIS_RULES)
    return jax.lax.with_sharding_constraint(
        x, PartitionSpec(*(None if name is None else rules[name] for name in logical)))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH)


def process_rows(sharding: NamedSharding, global_rows: int) -> slice:
    """The rows of a ``(global_rows, ...)`` batch that this process's devices hold under
    ``sharding``: one block, as ``jax.make_mesh`` keeps a process's devices together."""
    held = {index[0].indices(global_rows)[:2]
            for index in sharding.addressable_devices_indices_map((global_rows,)).values()}
    block = slice(min(start for start, _ in held), max(stop for _, stop in held))
    if sum(stop - start for start, stop in held) != block.stop - block.start:
        raise ValueError(f"this process's devices hold rows {sorted(held)}, not one block")
    return block


def state_bytes(state: Any) -> tuple[int, int]:
    """``(total, per_device)``: the bytes of the state's arrays (each counted once, however it is
    replicated), and what one device holds of them (its shard of each; the shards are even)."""
    total = per_device = 0
    for leaf in jax.tree.leaves(state):
        itemsize = np.dtype(leaf.dtype).itemsize
        total += math.prod(leaf.shape) * itemsize
        per_device += math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
    return total, per_device
