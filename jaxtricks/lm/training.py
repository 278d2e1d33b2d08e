"""The training loop: config -> (data, model, optimizer) -> step -> metrics and checkpoints.

Read :func:`run` (the input checks and the workdir's lock) and :func:`train` from top to bottom:
they are the whole of training. What the loop does besides
stepping has a helper each, called at its own frequency: :class:`TrainLog` (every
``train.log_every`` steps), :func:`evaluate_and_log` (every ``train.eval_every``),
``Checkpoints.save`` (every ``train.checkpoint_every``, at the end and on SIGTERM / SIGINT),
:class:`NonFiniteGuard` (every step).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtricks.lm import config as config_lib
from jaxtricks.lm import sharding as sharding_lib
from jaxtricks.lm import tokenizer as tokenizer_lib
from jaxtricks.lm.checkpoint import CheckpointError, Checkpoints
from jaxtricks.lm.config import optimizer_from_config
from jaxtricks.lm.cpu import use_cpu_devices
from jaxtricks.lm.model import Transformer, count_params, flops_per_token
from jaxtricks.lm.plots import metrics_record
from jaxtricks.lm.sharding import Plan, is_main_process
from jaxtricks.lm.step import Steps, TrainState, make_steps, unreplicate_metrics
from jaxtricks.lm.workdir import RunLock, WorkdirLocked, stop_on_write_error

# Dense bf16 peak FLOP/s per chip, for MFU. Matched as a substring of jax's device_kind.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 125e12,
    "V100": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


def peak_flops(device: jax.Device) -> float | None:
    """The chip's dense bf16 peak FLOP/s, or None when unknown (e.g. on CPU)."""
    for name, peak in PEAK_FLOPS.items():
        if name in device.device_kind:
            return peak
    return None


# Changing any of these changes the shape of the parameters.
SHAPE_KEYS = ("vocab_size", "num_layers", "d_model", "num_heads", "d_ff", "max_seq_len", "position")
# The optimizer settings that decide the optimizer state's structure (a value may change, not
# whether the trick is on).
OPTIMIZER_STATE_KEYS = {"name": str, "skip_nonfinite": bool, "l1": bool, "l2": bool,
                        "weight_decay": bool}


def check_resumable(saved: dict, config: config_lib.Config) -> list[str]:
    """Refuse a config that changes the model's shape; return the harmless changes to report."""
    current = config_lib.to_dict(config)
    for key in SHAPE_KEYS:
        old, new = saved.get("model", {}).get(key), current["model"][key]
        if old != new:
            raise CheckpointError(
                f"the checkpoint was made with model.{key}={old!r} but the config says {new!r}; "
                "a run can only resume with the same model shape (use another --workdir to start "
                "a new run)."
            )
    old = saved.get("data", {}).get("tokenizer", "byte")  # runs saved before data.tokenizer: byte
    if old != config.data.tokenizer:
        raise CheckpointError(
            f"the checkpoint was made with data.tokenizer={old!r} but the config says "
            f"{config.data.tokenizer!r}; a run resumes with the tokenizer it was trained with "
            "(use another --workdir to start a new run)."
        )
    for key, structural in OPTIMIZER_STATE_KEYS.items():
        old, new = saved.get("optimizer", {}).get(key), current["optimizer"][key]
        if structural(old) != structural(new):
            raise CheckpointError(
                f"the checkpoint was made with optimizer.{key}={old!r} but the config says "
                f"{new!r}, which changes the optimizer state (an optimizer, or a trick switched "
                "on or off); resume with the same, or use another --workdir."
            )
    changes = []
    for section, values in current.items():
        old_values = saved.get(section, {})
        if not isinstance(values, dict):
            values, old_values = {"": values}, {"": old_values}
        for key, value in values.items():
            if old_values.get(key, value) != value:
                name = f"{section}.{key}" if key else section
                changes.append(f"{name}: {old_values[key]!r} -> {value!r}")
    return changes


class Init(NamedTuple):
    """A model, split for the step, with its optimizer and step-0 train state (both abstract:
    shapes and dtypes, with ``abstract=True``), and ``create``, which makes that state."""

    model: Transformer
    graphdef: nnx.GraphDef
    rest: Any  # nnx.State of what is not a parameter (merged back unchanged)
    optimizer: optax.GradientTransformation
    state: TrainState
    create: Any  # () -> the step-0 TrainState (Steps.init_state jits it onto the devices)


def init(config: config_lib.Config, *, learning_rate: Any = None, abstract: bool = False) -> Init:
    """The model, the optimizer (``learning_rate`` replaces the schedule) and the step-0 state;
    with ``abstract``, their shapes only (nothing is allocated: the trainer makes the state on
    the devices, sharded, with ``create``)."""
    optimizer = optimizer_from_config(config.optimizer, config.train.steps,
                                      learning_rate=learning_rate)

    def new_model() -> Transformer:
        return Transformer(config.model, rngs=nnx.Rngs(config.train.seed))

    def create() -> TrainState:
        params = nnx.state(new_model(), nnx.Param)
        return TrainState(jnp.int32(0), params, optimizer.init(params))

    model = nnx.eval_shape(new_model) if abstract else new_model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = (jax.eval_shape(create) if abstract
             else TrainState(jnp.int32(0), params, optimizer.init(params)))
    return Init(model, graphdef, rest, optimizer, state, create)


def build_steps(config: config_lib.Config, plan: Plan, *, learning_rate: Any = None,
                vocab_limit: int | None = None) -> tuple[Init, Steps]:
    """:func:`init` (abstract) and the steps over ``plan``'s devices: what a run and the
    learning-rate range test compile. ``vocab_limit``: the tokenizer's size (the embedding's
    padding rows are masked out of the loss)."""
    start = init(config, learning_rate=learning_rate, abstract=True)
    steps = make_steps(start.graphdef, start.rest, start.optimizer, start.state, plan.parallelism,
                       mesh_shape=plan.mesh_shape, microbatches=config.train.microbatches,
                       unroll_microbatches=config.train.unroll_microbatches,
                       vocab_limit=vocab_limit)
    return start, steps


def run_tokenizer(config: config_lib.Config, workdir: Path) -> Any:
    """The run's tokenizer: the BPE saved in the workdir when there is one (a resumed run keeps
    the tokenizer it was trained with, whatever became of the data), else the data's
    (:func:`jaxtricks.lm.data.tokenizer_for`: a BPE is trained once, beside the prepared data)."""
    from jaxtricks.lm import data as data_lib

    saved = workdir / tokenizer_lib.FILE_NAME
    if config.data.tokenizer == "bpe" and saved.exists():
        return tokenizer_lib.load(saved)
    return data_lib.tokenizer_for(config.data)


def check_workdir_tokenizer(config: config_lib.Config, workdir: Path) -> None:
    """CheckpointError for a BPE run whose workdir's ``tokenizer.json`` is corrupt, or missing
    beside its checkpoints."""
    if config.data.tokenizer != "bpe":
        return
    saved = workdir / tokenizer_lib.FILE_NAME
    try:
        if saved.exists():
            tokenizer_lib.load(saved)
        elif (workdir / "checkpoints").is_dir() and Checkpoints(workdir, keep=1).steps():
            raise tokenizer_lib.TokenizerError(
                f"{saved} is missing, but {workdir / 'checkpoints'} holds a BPE run's checkpoints")
    except tokenizer_lib.TokenizerError as e:
        raise CheckpointError(
            f"the run's tokenizer: {e}; the model can only resume with the tokenizer it was "
            "trained with (restore that file, or use another --workdir to start a new run)."
        ) from None


def preflight(config: config_lib.Config, workdir: Path) -> Plan:
    """Every check that can fail on bad input, before anything is compiled or written; returns
    how the step runs on the devices.

    It also starts JAX's backends, with ``config.cpu_devices`` CPU devices when that is set, and
    ``jax.distributed`` when the config asks for several processes or a cluster is detected.
    """
    try:
        use_cpu_devices(config.cpu_devices)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    sharding_lib.start_processes(config.distributed)
    plan = sharding_lib.plan(config)
    if config.model.attention == "cudnn":
        backend = jax.default_backend()
        if backend != "gpu" or config.model.dtype != "bfloat16":
            raise config_lib.ConfigError(
                f"model.attention='cudnn' needs a GPU and model.dtype=bfloat16 (this run: "
                f"backend {backend}, dtype {config.model.dtype}); allowed here: auto or xla."
            )
    from jaxtricks.lm import data as data_lib  # tensorflow-datasets, grain: only for the data

    data_lib.check_data(config.data)
    check_workdir_tokenizer(config, workdir)
    existing = workdir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise config_lib.ConfigError(f"workdir {str(workdir)!r} is not writable.")
    return plan


# --------------------------------------------------------------------------- the loop


def run(config: config_lib.Config, workdir: str | Path) -> dict[str, Any]:
    """Train (or resume) a run in ``workdir``; return the last step's metrics and evaluation.

    Raises:
      ConfigError, DataError: bad input, refused before anything is compiled or written.
      CheckpointError: a checkpoint that is not ours or was made for another model (refused before
        anything is compiled), or none in the workdir that can be read.
      TrainingStopped: ``train.max_consecutive_skips`` non-finite steps in a row.
      WorkdirLocked: another run holds the workdir (nothing written).
      WriteFailed: a checkpoint, the metrics or the report could not be written (a full disk, a
        read-only filesystem, a quota); the half-written checkpoint is removed.
    """
    workdir = Path(workdir)

    # Bad input is refused here, before anything is compiled or written.
    plan = preflight(config, workdir)

    # One run per workdir: its lock is the first thing written, and it is released however the
    # run ends. Process 0 takes it; the others go on only if it did.
    with workdir_lock(workdir):
        return train(config, workdir, plan)


def train(config: config_lib.Config, workdir: Path, plan: Plan) -> dict[str, Any]:
    """The whole of training, once :func:`run` has checked the input and locked the workdir."""
    tc = config.train
    main = is_main_process()  # process 0 prints and writes the logs; every process saves

    # Workdir and checkpoint: a workdir with a checkpoint resumes from the newest one.
    checkpoints = Checkpoints(workdir, keep=tc.keep_checkpoints)
    resume_from = checkpoints.latest_step()
    if resume_from is not None:
        for change in check_resumable(read_saved_config(checkpoints, resume_from), config):
            say(f"resuming with a changed config: {change}")

    # Tokenizer: the workdir's, or the data's (a BPE is learned from the training split once).
    tokenizer = run_tokenizer(config, workdir)

    # Mesh, model and optimizer, and the step: one function jitted over the mesh (or pmapped),
    # the state sharded as the logical axis rules say and donated. Nothing is allocated yet.
    start_state, steps = build_steps(config, plan, vocab_limit=tokenizer.vocab_size)
    rng = jax.random.key(tc.seed)  # the step folds in the step number

    # Data: global batches, the same on every process; each hands the step its own rows.
    from jaxtricks.lm import data as data_lib

    train_iter = data_lib.train_iterator(config.data, batch_size=tc.batch_size, seed=tc.seed,
                                         tokenizer=tokenizer)
    eval_set = data_lib.eval_batches(config.data, batch_size=tc.batch_size,
                                     num_batches=tc.eval_batches, tokenizer=tokenizer)

    # State: restored onto this run's devices (whatever mesh saved it) or made on them, sharded.
    # Only now is anything (but the lock) written.
    start = 0
    if resume_from is not None:
        start, state, data_state, _ = checkpoints.restore(steps.state_target(start_state.state))
        if steps.parallelism == "pmap":
            state = steps.put_state(state)
        train_iter.set_state(data_state)
        say(f"resumed from {checkpoints.directory / str(start)} at step {start}")
    else:
        state = steps.init_state(start_state.create)
    if main:
        write_run_files(workdir, config, steps, state, checkpoints.directory, tokenizer)
    flops = flops_per_token(config.model, config.data.seq_len)
    say(f"model: {count_params(start_state.model) / 1e6:.2f}M parameters, {flops / 1e6:.1f} "
        f"MFLOPs per token; {describe_devices(steps)}")

    # What the loop does besides stepping, each at its own frequency.
    progress = Progress(tc.steps, start, quiet=not main)
    train_log = TrainLog(
        MetricsLog(workdir, start) if main else NoMetricsLog(), progress, every=tc.log_every,
        last_step=tc.steps,
        throughput=Throughput(start, tokens_per_step=tc.batch_size * config.data.seq_len,
                              flops_per_token=flops, peak_flops=total_peak_flops(steps)),
    )
    nonfinite = NonFiniteGuard(tc.max_consecutive_skips, checkpoints.directory)
    latest: dict[str, Any] = {"step": start}  # what run returns

    # The loop. A step's metrics are read only once the next step is dispatched, so the host never
    # waits for the device.
    pending = None
    try:
        # SIGTERM / SIGINT (to any process): every process saves after the same step and leaves.
        with StopRequest(several_processes=jax.process_count() > 1) as stop:
            for step in range(start + 1, tc.steps + 1):
                batch = steps.put_batch(next(train_iter))
                state, metrics = steps.train(state, batch, rng)
                if pending is not None:
                    latest.update(finish_step(*pending, steps, train_log, nonfinite))
                pending = (step, metrics)
                progress.advance()
                if is_due(step, tc.eval_every, tc.steps):
                    latest.update(evaluate_and_log(steps, state.params, eval_set, tokenizer,
                                                   step, train_log))
                stopping = stop.check(step)
                if is_due(step, tc.checkpoint_every, tc.steps) or stopping:
                    checkpoints.save(step, steps.get_state(state), train_iter.get_state(),
                                     config_lib.to_dict(config))
                if stopping:
                    say(f"received {stop.signal_name}: saved a checkpoint at step {step} in "
                        f"{checkpoints.directory}; run the same command again to resume.")
                    break
            if pending is not None:
                latest.update(finish_step(*pending, steps, train_log, nonfinite))
    except BaseException:
        # The error that stopped the loop is the one to report, not one closing the files after.
        close_all(train_log, checkpoints, train_iter, quietly=True)
        raise
    close_all(train_log, checkpoints, train_iter)

    # The end: the report, and a sample unless a signal cut the run short.
    if main:
        from jaxtricks.lm.plots import write_report  # matplotlib: imported only when needed

        with stop_on_write_error(workdir / "report.png", what="writing the report",
                                 checkpoints=checkpoints.directory):
            say(f"report: {write_report(workdir)}")
    if not stop.requested and tc.sample_tokens > 0:
        params = gathered(steps.get_state(state).params)  # every process takes part
        if main:
            final_model = nnx.merge(start_state.graphdef, params, start_state.rest)
            say("sample:\n" + sample_text(final_model, tokenizer, tc.sample_prompt,
                                           tc.sample_tokens, tc.seed))
    return latest


# --------------------------------------------------------------------------- the loop's helpers


def say(message: str) -> None:
    """Print on process 0 (the others would repeat it)."""
    if is_main_process():
        print(message)


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """The workdir's :class:`RunLock`, taken by process 0; every process goes on only if it was
    (the others raise WorkdirLocked, process 0 its own error)."""
    lock, error = None, None
    if is_main_process():
        try:
            lock = RunLock(workdir).acquire()
        except Exception as e:  # WorkdirLocked, WriteFailed: the others must not wait for us
            error = e
    if not sharding_lib.agree(error is None):
        raise error or WorkdirLocked(
            f"process 0 could not take the lock of workdir {workdir} (its output says why).")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def describe_devices(steps: Steps) -> str:
    """E.g. ``4 x cpu, mesh data 1 x fsdp 2 x tensor 2, 2 processes``."""
    where = f"{steps.num_devices} x {jax.devices()[0].device_kind}, {steps.parallelism}"
    if steps.mesh is not None and steps.parallelism == "mesh":
        where += " " + " x ".join(f"{name} {size}" for name, size in steps.mesh.shape.items())
    if jax.process_count() > 1:
        where += f", {jax.process_count()} processes"
    return where


def write_run_files(workdir: Path, config: config_lib.Config, steps: Steps, state: TrainState,
                    checkpoint_dir: Path, tokenizer: Any) -> None:
    """``config.json``, ``run.json`` (the devices, the mesh and the state's bytes in all and on
    one device, so a user sees what sharding saved) and a BPE's ``tokenizer.json``."""
    total, per_device = sharding_lib.state_bytes(steps.get_state(state))
    run = {
        "parallelism": steps.parallelism,
        "mesh": None if steps.mesh is None else dict(steps.mesh.shape),
        "process_count": jax.process_count(),
        "device_count": steps.num_devices,
        "local_device_count": jax.local_device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "state_bytes": total,
        "state_bytes_per_device": per_device,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    for name, content in [("config.json", config_lib.to_dict(config)), ("run.json", run)]:
        with stop_on_write_error(workdir / name, checkpoints=checkpoint_dir):
            (workdir / name).write_text(json.dumps(content, indent=2) + "\n")
    saved = workdir / tokenizer_lib.FILE_NAME
    if tokenizer.name == "bpe" and not saved.exists():
        with stop_on_write_error(saved, checkpoints=checkpoint_dir):
            tokenizer.save(saved)


def gathered(tree: Any) -> Any:
    """``tree`` with every array whole on this process (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def is_due(step: int, every: int, last_step: int) -> bool:
    """Whether an action of every ``every`` steps runs after ``step``: multiples, and the last."""
    return step % every == 0 or step == last_step


def finish_step(step: int, device_metrics: dict[str, jax.Array], steps: Steps,
                train_log: TrainLog, nonfinite: NonFiniteGuard) -> dict[str, float]:
    """A step's metrics, read once the next step is queued: logged, then checked for a streak of
    non-finite steps (which raises :class:`TrainingStopped`)."""
    metrics = unreplicate_metrics(device_metrics, steps)
    train_log.record(step, metrics)
    nonfinite.check(step, metrics)
    return {"step": step, **metrics}


def close_all(*closeable: Any, quietly: bool = False) -> None:
    """Close each (grain's iterator has ``close`` only with worker processes); the first error is
    raised once all are closed, none when ``quietly``."""
    first_error = None
    for thing in closeable:
        if hasattr(thing, "close"):
            try:
                thing.close()
            except Exception as e:
                first_error = first_error or e
    if first_error is not None and not quietly:
        raise first_error


def read_saved_config(checkpoints: Checkpoints, step: int) -> dict:
    """The config a checkpoint was made with; CheckpointError when it is not one of ours."""
    try:
        return checkpoints.read_config(step)
    except Exception as e:  # Orbax raises many kinds; any of them means not a jaxtricks checkpoint
        raise CheckpointError(
            f"{checkpoints.directory / str(step)} is not a jaxtricks checkpoint "
            f"({str(e).splitlines()[0][:120]}); move it away or pass another --workdir."
        ) from None


def total_peak_flops(steps: Steps) -> float | None:
    """The peak FLOP/s of all the devices the step runs on, or None when the chip is unknown."""
    peak = peak_flops(jax.devices()[0])
    return None if peak is None else peak * steps.num_devices


def evaluate(steps: Steps, params: Any, eval_set: list[dict[str, np.ndarray]],
             tokenizer: Any) -> dict[str, float]:
    r"""Validation loss over the fixed evaluation batches: per token in nats, and per byte in bits.

    .. math::
        \text{val\_bits\_per\_byte} = \frac{\sum_t \ell_t}{\ln 2 \, \sum_t b_t}

    over the batches' target tokens :math:`t`, :math:`\ell_t` the loss in nats and :math:`b_t` the
    UTF-8 bytes the token stands for (``tokenizer.token_bytes``; the end-of-document token counts
    one): for bytes, the loss per token divided by ln 2.
    """
    # Every batch is dispatched before any result is read: one wait for the host, not one a batch.
    device_losses = [steps.eval(params, steps.put_batch(batch)) for batch in eval_set]
    losses = [float(np.mean(np.asarray(loss))) for loss in device_losses]  # means over tokens
    tokens = [batch["targets"].size for batch in eval_set]
    text_bytes = sum(int(tokenizer.token_bytes[batch["targets"]].sum()) for batch in eval_set)
    total_nats = sum(loss * n for loss, n in zip(losses, tokens, strict=True))
    return {"val_loss": total_nats / sum(tokens),
            "val_bits_per_byte": total_nats / math.log(2) / text_bytes}


def evaluate_and_log(steps: Steps, params: Any, eval_set: list[dict[str, np.ndarray]],
                     tokenizer: Any, step: int, train_log: TrainLog) -> dict[str, float]:
    """:func:`evaluate` after ``step``, written to the metrics and shown; the loop calls it every
    ``train.eval_every`` steps and after the last."""
    results = evaluate(steps, params, eval_set, tokenizer)
    train_log.metrics.write(step, results)
    train_log.progress.write(f"step {step}: val_loss {results['val_loss']:.4f}, "
                             f"{results['val_bits_per_byte']:.3f} bits/byte")
    return results


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard event files."""

    def __init__(self, workdir: Path, resume_step: int):
        self.path = workdir / "metrics.jsonl"
        self.checkpoints = workdir / "checkpoints"  # named when the disk is full
        kept = []
        if self.path.exists():  # drop what was logged after the checkpoint we resume from
            lines = [line for line in self.path.read_text(errors="replace").splitlines()
                     if line.strip()]
            records = [metrics_record(line) for line in lines]
            kept = [line for line, record in zip(lines, records, strict=True)
                    if record is not None and record["step"] <= resume_step]
            if torn := records.count(None):
                # A run killed (or out of disk space) mid-append leaves a torn last line.
                print(f"{self.path}: dropped {torn} line(s) that do not parse (a write cut "
                      "short); the run goes on")
        tmp = self.path.with_suffix(".jsonl.tmp")
        with stop_on_write_error(self.path, what="writing the metrics",
                                 checkpoints=self.checkpoints):
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
            self._file = self.path.open("a")
        from tensorboardX import SummaryWriter  # imported here: only the trainer needs it

        self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        with stop_on_write_error(self.path, what="writing the metrics",
                                 checkpoints=self.checkpoints):
            self._file.write(json.dumps({"step": step, **values}) + "\n")
            self._file.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        try:
            with stop_on_write_error(self.path, what="writing the metrics",
                                     checkpoints=self.checkpoints):
                self._file.close()
        finally:
            self._tb.close()


class NoMetricsLog:
    """What a process other than 0 writes of the metrics: nothing."""

    def write(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, CI) one plain line per logged step;
    nothing when ``quiet`` (the processes other than 0)."""

    def __init__(self, total_steps: int, start: int, *, quiet: bool = False):
        from tqdm import tqdm

        self.total_steps, self.quiet = total_steps, quiet
        self.bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True,
                        disable=None if sys.stderr.isatty() and not quiet else True)

    def advance(self) -> None:
        self.bar.update(1)

    def show(self, step: int, metrics: dict[str, float]) -> None:
        shown = {"loss": f"{metrics['loss']:.3f}", "lr": f"{metrics['learning_rate']:.2e}"}
        if "tokens_per_s" in metrics:
            shown["tok_s"] = f"{metrics['tokens_per_s']:,.0f}"
        if self.quiet:
            return
        if self.bar.disable:
            print(f"step {step}/{self.total_steps}: "
                  + ", ".join(f"{k} {v}" for k, v in shown.items()))
        else:
            self.bar.set_postfix(shown)

    def write(self, line: str) -> None:
        if not self.quiet:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


class Throughput:
    r"""Tokens, FLOPs and MFU per second between two log rows.

    .. math::
        \text{tokens\_per\_s} = \frac{B \, T \, \Delta\text{steps}}{\Delta t}, \quad
        \text{flops\_per\_s} = \text{tokens\_per\_s} \cdot \text{flops\_per\_token}, \quad
        \text{mfu} = \frac{\text{flops\_per\_s}}{\text{peak\_flops}}

    The clock starts after the run's first step (whose time is mostly compilation) and restarts
    at every ``train.log_every`` step. ``mfu`` is left out when the peak is unknown (CPU).
    """

    def __init__(self, start: int, *, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float | None, clock: Any = time.perf_counter):
        self.first_step = start + 1
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops, self._clock = peak_flops, clock
        self._since_step, self._since = start, clock()

    def measure(self, step: int) -> dict[str, float]:
        """The rates from the last restart to the end of ``step``; none for the first step."""
        if step <= self.first_step:
            return {}
        tokens_per_s = self.tokens_per_step * (step - self._since_step) / (
            self._clock() - self._since)
        rates = {"tokens_per_s": tokens_per_s,
                 "flops_per_s": tokens_per_s * self.flops_per_token}
        if self.peak_flops is not None:
            rates["mfu"] = rates["flops_per_s"] / self.peak_flops
        return rates

    def restart(self, step: int) -> None:
        self._since_step, self._since = step, self._clock()


class TrainLog:
    """Writes a step's metrics every ``every`` steps, at every skipped step and at the last."""

    def __init__(self, metrics: MetricsLog, progress: Progress, *, every: int, last_step: int,
                 throughput: Throughput):
        self.metrics, self.progress, self.throughput = metrics, progress, throughput
        self.every, self.last_step = every, last_step

    def record(self, step: int, metrics: dict[str, float]) -> None:
        if is_due(step, self.every, self.last_step) or metrics["skipped_step"]:
            row = {**metrics, **self.throughput.measure(step)}
            self.metrics.write(step, row)
            self.progress.show(step, row)
        if step == self.throughput.first_step or step % self.every == 0:
            self.throughput.restart(step)

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()


class NonFiniteGuard:
    """Stops the run after ``max_in_a_row`` skipped (non-finite) steps in a row, checked every
    step."""

    def __init__(self, max_in_a_row: int, checkpoint_dir: Path):
        self.max_in_a_row, self.checkpoint_dir = max_in_a_row, checkpoint_dir
        self.in_a_row = 0
        self.last_finite: tuple[int | None, float | None] = (None, None)  # (step, loss)

    def check(self, step: int, metrics: dict[str, float]) -> None:
        if metrics["skipped_step"]:
            self.in_a_row += 1
        else:
            self.in_a_row, self.last_finite = 0, (step, metrics["loss"])
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingStopped(
                f"stopped at step {step}: {self.in_a_row} steps in a row had non-finite "
                f"gradients (last finite loss {self.last_finite[1]} at step "
                f"{self.last_finite[0]}); the last good checkpoint is kept in "
                f"{self.checkpoint_dir}."
            )


class StopRequest:
    """Turns SIGTERM and SIGINT into a stop the loop checks after each step (it saves, leaves).

    With several processes, a signal to any of them stops all after the same step: JAX's
    preemption service (started by ``jax.distributed.initialize``) catches SIGTERM and
    ``multihost_utils.reached_preemption_sync_point`` makes the processes agree on the step;
    SIGINT is passed on to it as SIGTERM.
    """

    def __init__(self, *, several_processes: bool = False):
        self.several_processes = several_processes
        self.signal_name: str | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def check(self, step: int) -> bool:
        """Whether the run stops after ``step`` (every process calls it at every step)."""
        if self.several_processes and not self.requested:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = "a stop signal (SIGTERM or SIGINT, to one of the processes)"
        return self.requested

    def __enter__(self) -> StopRequest:
        if self.several_processes:  # SIGTERM is left to JAX's preemption service
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._pass_on)
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def _pass_on(self, signum, frame) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def sample_text(model: Transformer, tokenizer: Any, prompt: str, num_tokens: int, seed: int
                ) -> str:
    """``prompt`` and ``num_tokens`` tokens sampled after it (temperature 0.8, top-k 40)."""
    from jaxtricks.lm.sampling import generate

    out = generate(model, tokenizer.encode(prompt)[None, :], max_new_tokens=num_tokens,
                   rng=jax.random.key(seed), temperature=0.8, top_k=40,
                   vocab_limit=tokenizer.vocab_size)
    return tokenizer.decode(np.asarray(out)[0])


def load_model(workdir: str | Path) -> tuple[config_lib.Config, Transformer, int]:
    """The config, the model with the parameters of the newest checkpoint, and its step."""
    checkpoints = Checkpoints(workdir, keep=1_000_000)  # reading only: keep everything
    step = checkpoints.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoint in {checkpoints.directory}; train one with train.py.")
    config = config_lib.from_saved(checkpoints.read_config(step))
    start = init(config, abstract=True)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    step, state, _, _ = checkpoints.restore(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), start.state))
    checkpoints.close()
    return config, nnx.merge(start.graphdef, state.params, start.rest), step


def load_tokenizer(config: config_lib.Config, workdir: str | Path) -> Any:
    """The tokenizer a run in ``workdir`` was trained with: its ``tokenizer.json`` for a BPE run
    (CheckpointError when it is missing or corrupt), the byte tokenizer otherwise."""
    if config.data.tokenizer != "bpe":
        from jaxtricks.lm.tokenizer import ByteTokenizer

        return ByteTokenizer()
    try:
        return tokenizer_lib.load(Path(workdir) / tokenizer_lib.FILE_NAME)
    except tokenizer_lib.TokenizerError as e:
        raise CheckpointError(f"the run's tokenizer: {e}.") from None
