"""The training loop: config -> (data, model, optimizer) -> step -> metrics and checkpoints.

Read :func:`run` from top to bottom: it is the whole of training.
"""

from __future__ import annotations

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
from jaxtricks.lm import data as data_lib
from jaxtricks.lm.checkpoint import CheckpointError, Checkpoints
from jaxtricks.lm.config import optimizer_from_config
from jaxtricks.lm.cpu import use_cpu_devices
from jaxtricks.lm.model import Transformer, count_params, flops_per_token
from jaxtricks.lm.step import TrainState, make_steps, unreplicate_metrics

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
    """A freshly initialized model, split for the step, with its optimizer and train state."""

    model: Transformer
    graphdef: nnx.GraphDef
    rest: Any  # nnx.State of what is not a parameter (merged back unchanged)
    optimizer: optax.GradientTransformation
    state: TrainState


def init(config: config_lib.Config, *, learning_rate: Any = None) -> Init:
    """The model, the optimizer (``learning_rate`` replaces the schedule) and the step-0 state."""
    model = Transformer(config.model, rngs=nnx.Rngs(config.train.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optimizer_from_config(config.optimizer, config.train.steps,
                                      learning_rate=learning_rate)
    return Init(model, graphdef, rest, optimizer,
                TrainState(jnp.int32(0), params, optimizer.init(params)))


def preflight(config: config_lib.Config, workdir: Path) -> None:
    """Every check that can fail on bad input, before anything is compiled or written.

    It also starts JAX's backends, with ``config.cpu_devices`` CPU devices when that is set.
    """
    try:
        use_cpu_devices(config.cpu_devices)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    devices = jax.local_devices()
    if config.parallelism != "single" and len(devices) > 1 or config.parallelism == "pmap":
        n = len(devices) * jax.process_count()
        k = config.train.microbatches
        if config.train.batch_size % (n * k):
            fewer = ", fewer cpu_devices" if config.cpu_devices else ""
            parts = f" times train.microbatches={k}" if k > 1 else ""
            raise config_lib.ConfigError(
                f"train.batch_size={config.train.batch_size} must be divisible by the number of "
                f"devices ({n}){parts}; use a multiple of {n * k}{fewer} or parallelism=single."
            )
    data_lib.check_data(config.data)
    existing = workdir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise config_lib.ConfigError(f"workdir {str(workdir)!r} is not writable.")


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard event files."""

    def __init__(self, workdir: Path, resume_step: int):
        self.path = workdir / "metrics.jsonl"
        kept = []
        if self.path.exists():  # drop what was logged after the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self._file = self.path.open("a")
        from tensorboardX import SummaryWriter  # imported here: only the trainer needs it

        self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (it then saves, exits)."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run(config: config_lib.Config, workdir: str | Path) -> dict[str, Any]:
    """Train (or resume) a run in ``workdir``; return the last metrics."""
    workdir = Path(workdir)
    preflight(config, workdir)
    checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints)
    resume_from = checkpoints.latest_step()
    if resume_from is not None:
        try:
            saved_config = checkpoints.read_config(resume_from)
        except Exception as e:
            raise CheckpointError(
                f"{checkpoints.directory / str(resume_from)} is not a jaxtricks checkpoint "
                f"({str(e).splitlines()[0][:120]}); move it away or pass another --workdir."
            ) from None
        for change in check_resumable(saved_config, config):
            print(f"resuming with a changed config: {change}")

    # The model, the optimizer and the state they update.
    tc = config.train
    model, graphdef, rest, optimizer, state = init(config)
    steps = make_steps(graphdef, rest, optimizer, config.parallelism,
                       microbatches=tc.microbatches, unroll_microbatches=tc.unroll_microbatches)
    rng = jax.random.key(tc.seed)

    # The data, each process reading its own shard.
    per_process_batch = tc.batch_size // jax.process_count()
    train_iter = data_lib.train_iterator(config.data, batch_size=per_process_batch, seed=tc.seed)
    eval_set = data_lib.eval_batches(config.data, batch_size=per_process_batch,
                                     num_batches=tc.eval_batches)

    start = 0
    if resume_from is not None:
        start, state, data_state, _ = checkpoints.restore(state)
        train_iter.set_state(data_state)
        print(f"resumed from {checkpoints.directory / str(start)} at step {start}")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(config), indent=2) + "\n")

    n_params = count_params(model)
    flops = flops_per_token(config.model, config.data.seq_len)
    device = jax.local_devices()[0]
    peak = peak_flops(device)
    print(f"model: {n_params / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOPs per token; "
          f"{steps.num_devices} x {device.device_kind} "
          f"({'pmap' if steps.num_devices > 1 else 'jit'})")
    tokens_per_step = tc.batch_size * config.data.seq_len

    def evaluate(params) -> dict[str, float]:
        losses = [float(steps.eval(params, steps.put_batch(b)).mean()) for b in eval_set]
        val_loss = float(np.mean(losses))
        # Byte-level tokens: one token per byte (the end-of-document token counted as one).
        return {"val_loss": val_loss, "val_bits_per_byte": val_loss / math.log(2)}

    log = MetricsLog(workdir, start)
    state = steps.put_state(state)
    last: dict[str, Any] = {"step": start}
    from tqdm import tqdm

    bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=None if sys.stderr.isatty() else True)
    t_last, step_last = time.perf_counter(), start
    skips_in_a_row, last_finite = 0, (None, None)

    def record(step: int, device_metrics) -> None:
        """Log one finished step; stop the run after too many non-finite steps in a row."""
        nonlocal t_last, step_last, skips_in_a_row, last_finite
        m = unreplicate_metrics(device_metrics, steps)
        last.update(step=step, **m)
        skips_in_a_row = skips_in_a_row + 1 if m["skipped_step"] else 0
        if not m["skipped_step"]:
            last_finite = (step, m["loss"])
        if step % tc.log_every == 0 or m["skipped_step"] or step == tc.steps:
            now = time.perf_counter()
            if step > start + 1:  # the first step's time is mostly compilation: no speed for it
                m["tokens_per_s"] = tokens_per_step * (step - step_last) / (now - t_last)
                m["flops_per_s"] = m["tokens_per_s"] * flops
                if peak is not None:
                    m["mfu"] = m["flops_per_s"] / (peak * steps.num_devices)
            log.write(step, m)
            progress = {"loss": f"{m['loss']:.3f}", "lr": f"{m['learning_rate']:.2e}"}
            if "tokens_per_s" in m:
                progress["tok_s"] = f"{m['tokens_per_s']:,.0f}"
            if bar.disable:  # not a terminal (a log file, CI): one plain line per log step
                print(f"step {step}/{tc.steps}: "
                      + ", ".join(f"{k} {v}" for k, v in progress.items()))
            else:
                bar.set_postfix(progress)
        if step == start + 1 or step % tc.log_every == 0:
            t_last, step_last = time.perf_counter(), step
        if skips_in_a_row >= tc.max_consecutive_skips:
            raise TrainingStopped(
                f"stopped at step {step}: {skips_in_a_row} steps in a row had non-finite "
                f"gradients (last finite loss {last_finite[1]} at step {last_finite[0]}); the "
                f"last good checkpoint is kept in {checkpoints.directory}."
            )

    pending = None  # the previous step's metrics: read one step late, so the host never stalls
    with _StopRequest() as stop:
        for step in range(start + 1, tc.steps + 1):
            batch = next(train_iter)
            state, metrics = steps.train(state, steps.put_batch(batch), rng)
            if pending is not None:
                record(*pending)
            pending = (step, metrics)
            bar.update(1)
            if step % tc.eval_every == 0 or step == tc.steps:
                ev = evaluate(state.params)
                log.write(step, ev)
                bar.write(f"step {step}: val_loss {ev['val_loss']:.4f}, "
                          f"{ev['val_bits_per_byte']:.3f} bits/byte")
                last.update(ev)
            if step % tc.checkpoint_every == 0 or step == tc.steps or stop.signal_name:
                checkpoints.save(step, steps.get_state(state), train_iter.get_state(),
                                 config_lib.to_dict(config))
            if stop.signal_name:
                print(f"received {stop.signal_name}: saved a checkpoint at step {step} in "
                      f"{checkpoints.directory}; run the same command again to resume.")
                break
        if pending is not None:
            record(*pending)
    bar.close()
    log.close()
    checkpoints.close()
    if hasattr(train_iter, "close"):  # grain worker processes, when data.num_workers > 0
        train_iter.close()
    from jaxtricks.lm.plots import write_report  # matplotlib: imported only when needed

    print(f"report: {write_report(workdir)}")
    if not stop.signal_name and tc.sample_tokens > 0:
        from jaxtricks.lm.sampling import generate

        model = nnx.merge(graphdef, steps.get_state(state).params, rest)
        tokenizer = data_lib.ByteTokenizer()
        prompt = tokenizer.encode(tc.sample_prompt)[None, :]
        out = generate(model, prompt, max_new_tokens=tc.sample_tokens,
                       rng=jax.random.key(tc.seed), temperature=0.8, top_k=40)
        print("sample:\n" + tokenizer.decode(np.asarray(out)[0]))
    return last



def load_model(workdir: str | Path) -> tuple[config_lib.Config, Transformer, int]:
    """The config, the model with the parameters of the newest checkpoint, and its step."""
    checkpoints = Checkpoints(workdir, keep=1_000_000)  # reading only: keep everything
    step = checkpoints.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoint in {checkpoints.directory}; train one with train.py.")
    config = config_lib.from_dict(checkpoints.read_config(step))
    _, graphdef, rest, _, state = init(config)
    step, state, _, _ = checkpoints.restore(state)
    checkpoints.close()
    return config, nnx.merge(graphdef, state.params, rest), step
