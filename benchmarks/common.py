"""Helpers shared by the benchmark scripts: machine info, markdown tables, worker processes.

Nothing here imports jax or torch at module level: a benchmark's worker process imports only the
framework it measures, so its peak memory is that framework's alone.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import traceback
import types
from collections.abc import Callable, Sequence
from typing import Any


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` reports it (``platform.processor()`` as a fallback)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_line(packages: Sequence[str] = ("jax", "flax", "optax", "torch")) -> str:
    """One line naming the date, the CPU, its core count and the package versions."""
    versions = ", ".join(f"{p} {version(p)}" for p in packages)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{datetime.date.today().isoformat()}; {cpu_model()}, {os.cpu_count()} cores "
            f"(load average at start {load}); {versions}; python {platform.python_version()}")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers should already be formatted as strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def max_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss`` is in KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- a shared machine


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine in clock ticks, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user .. steal
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class OthersShare:
    """Share of the machine's CPU capacity used by *other* processes during a ``with`` block.

    Busy time of the whole machine (/proc/stat) minus this process's own user + system time
    (all its threads), over the machine's total; None where /proc/stat is missing. A benchmark
    on a shared machine uses it to set aside blocks that ran while someone else was computing.
    """

    share: float | None = None
    # This process's own use over the block: CPU seconds (user + system), system seconds, and
    # minor page faults (pages the kernel mapped in, e.g. freed memory touched again).
    own_cpu_s: float = 0.0
    own_sys_s: float = 0.0
    minor_faults: int = 0

    def __enter__(self) -> OthersShare:
        self._faults = _minor_faults()
        self._times, self._jiffies = os.times(), _cpu_jiffies()
        return self

    def __exit__(self, *exc: Any) -> None:
        end, times = _cpu_jiffies(), os.times()
        self.minor_faults = _minor_faults() - self._faults
        self.own_sys_s = times.system - self._times.system
        self.own_cpu_s = times.user - self._times.user + self.own_sys_s
        if self._jiffies is None or end is None:
            return
        busy, total = end[0] - self._jiffies[0], end[1] - self._jiffies[1]
        own = self.own_cpu_s * os.sysconf("SC_CLK_TCK")
        self.share = max(0.0, busy - own) / total if total > 0 else None


# --------------------------------------------------------------------------- worker processes


def _serve(conn, factory: Callable[[Any], Any], spec: Any) -> None:
    """Child side: build ``factory(spec)``, then answer ``(method, args)`` requests until closed."""
    try:
        obj = factory(spec)
        conn.send(("ok", None))
    except BaseException:  # report any failure to the parent instead of dying silently
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        name, args = conn.recv()
        if name == "__close__":
            return
        try:
            conn.send(("ok", getattr(obj, name)(*args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class WorkerError(RuntimeError):
    """A request failed inside a worker process; the message holds its traceback."""


class Worker:
    """An object living in its own (spawned) process, called by method name over a pipe.

    Each framework runs in its own worker so that (1) the other framework's thread pools never
    compete with it, (2) its ``ru_maxrss`` is its own peak memory, and (3) the parent can interleave
    A and B measurements while both stay compiled and warm.
    """

    def __init__(self, factory: Callable[[Any], Any], spec: Any):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, factory, spec), daemon=True)
        self._proc.start()
        child.close()
        self._result()

    def _result(self) -> Any:
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise WorkerError(f"worker process died (exit code {self._proc.exitcode})") from None
        if status == "error":
            raise WorkerError(value)
        return value

    def call(self, name: str, *args: Any) -> Any:
        self._conn.send((name, args))
        return self._result()

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("__close__", ()))
            except OSError:
                pass
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join()
        self._conn.close()


# --------------------------------------------------------------------------- the trainer's step

# Where each name the step benchmarks use lives: ``jaxtricks.lm`` since the library and the
# trainer were split, ``jaxtricks`` before (so that ``bench_step.py --baseline`` can run the step
# of an older checkout). The first module that has the name wins.
TRAINER_NAMES = {
    "load": ("lm.config", "config"),
    "optimizer_from_config": ("lm.config", "optimizer"),
    "Transformer": ("lm.model", "model"),
    "count_params": ("lm.model", "model"),
    "flops_per_token": ("lm.model", "model"),
    "TrainState": ("lm.step", "step"),
    "make_steps": ("lm.step", "step"),
    "unreplicate_metrics": ("lm.step", "step"),
    "tune_host_malloc": ("lm.cpu", "lm.step", "step"),
    "use_cpu_devices": ("lm.cpu", "lm.step", "step"),
    "plan": ("lm.sharding",),  # since the step runs over a mesh; None before
}
OPTIONAL_NAMES = ("plan",)  # names an older checkout may lack


def trainer(path: str | None = None, package: str = "jaxtricks") -> types.SimpleNamespace:
    """The trainer's names of ``TRAINER_NAMES``, from whichever of its modules has them.

    ``path``: import ``package`` from the checkout there (put first on ``sys.path``); nothing of
    it may have been imported in this process yet, or the import would not be that checkout's.
    """
    if path is not None:
        if package in sys.modules:
            where = sys.modules[package].__file__
            raise RuntimeError(f"{package} is already imported (from {where})")
        sys.path.insert(0, os.path.abspath(path))
    found = {}
    for name, modules in TRAINER_NAMES.items():
        for module in (f"{package}.{m}" for m in modules):
            try:
                found_in = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if not module.startswith(e.name or "?"):  # a dependency is missing: say so
                    raise
                continue
            if hasattr(found_in, name):
                found[name] = getattr(found_in, name)
                break
        else:
            if name not in OPTIONAL_NAMES:
                raise ImportError(f"none of {package}'s modules {', '.join(modules)} has {name}")
            found[name] = None
    origin = os.path.dirname(os.path.dirname(sys.modules[package].__file__))
    if path is not None and os.path.realpath(origin) != os.path.realpath(path):
        raise ImportError(f"{package} was imported from {origin}, not from {path}")
    return types.SimpleNamespace(origin=origin, **found)


def tokens(vocab_size: int, batch: int, seq: int):
    """One batch of synthetic random token ids, ``(batch, seq + 1)``: inputs and shifted targets."""
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab_size, (batch, seq + 1), dtype=np.int32)


def build_step(api: types.SimpleNamespace, config, total_steps: int, parallelism: str | None = None,
               batch_size: int | None = None, **model_kwargs: Any) -> types.SimpleNamespace:
    """``config``'s model (``model_kwargs``: more arguments of its constructor), optimizer and
    jitted train step, built as ``training.run`` builds them (``api``: :func:`trainer`), with the
    step-0 state and one batch of :func:`tokens` placed as the step takes them.

    ``parallelism`` and ``batch_size`` replace the config's. The step of a checkout whose
    ``make_steps`` takes the state (its structure gives the shardings) runs over
    ``sharding.plan(config)``'s mesh; an older checkout's ``make_steps(graphdef, rest, optimizer,
    parallelism, ...)`` is called as it was.
    """
    import dataclasses
    import inspect

    import jax
    import jax.numpy as jnp
    from flax import nnx

    if parallelism is not None:
        config = dataclasses.replace(config, parallelism=parallelism)
    if batch_size is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                       batch_size=batch_size))
    model = api.Transformer(config.model, rngs=nnx.Rngs(config.train.seed), **model_kwargs)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = api.optimizer_from_config(config.optimizer, total_steps)
    state = api.TrainState(jnp.int32(0), params, optimizer.init(params))
    t = config.train
    accumulate = {"microbatches": t.microbatches, "unroll_microbatches": t.unroll_microbatches}
    if "state" in inspect.signature(api.make_steps).parameters:
        plan = api.plan(config)
        steps = api.make_steps(graphdef, rest, optimizer, state, plan.parallelism,
                               mesh_shape=plan.mesh_shape, **accumulate)
    else:
        steps = api.make_steps(graphdef, rest, optimizer, config.parallelism, **accumulate)
    state = steps.put_state(state)
    ids = tokens(config.model.vocab_size, t.batch_size, config.data.seq_len)
    batch = steps.put_batch({"inputs": ids[:, :-1], "targets": ids[:, 1:]})
    return types.SimpleNamespace(model=model, steps=steps, state=state, batch=batch,
                                 rng=jax.random.key(0))
