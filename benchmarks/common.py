"""Helpers shared by the benchmark scripts: machine info, markdown tables, worker processes.

Nothing here imports jax or torch at module level: a benchmark's worker process imports only the
framework it measures, so its peak memory is that framework's alone.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import multiprocessing
import os
import platform
import statistics
import subprocess
import traceback
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


def median_seconds(fn: Callable[[], Any], n: int) -> float:
    """Median seconds of ``n`` calls of ``fn`` (which must wait for its result), after one
    untimed call to compile or warm up."""
    return busy_seconds(fn, n)[0]


def busy_seconds(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """``median_seconds(fn, n)`` and the cores the process kept busy meanwhile: its CPU time
    (``OthersShare.own_cpu_s``: user and system, all threads) over the wall time of the calls."""
    import time

    fn()
    times = []
    with OthersShare() as block:
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return median(times), block.own_cpu_s / sum(times)


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


def others_busy(seconds: float = 1.0) -> float | None:
    """Share of the CPUs used by other processes over the next ``seconds``."""
    import time

    with OthersShare() as meter:
        time.sleep(seconds)
    return meter.share


def wait_for_quiet(max_wait_s: float, threshold: float = 0.1, window_s: int = 5) -> str:
    """Wait (up to ``max_wait_s``) until others use < ``threshold`` of the CPUs for ``window_s``
    seconds in a row; return a line saying how long it waited and whether it got quiet."""
    import time

    start, quiet = time.perf_counter(), 0
    while time.perf_counter() - start < max_wait_s:
        share = others_busy(1.0)
        if share is None:
            return "no /proc/stat: did not check the machine's load"
        quiet = quiet + 1 if share < threshold else 0
        if quiet >= window_s:
            return f"machine quiet (others < {threshold:.0%} CPU for {window_s} s) after " \
                   f"{time.perf_counter() - start:.0f} s"
    return f"machine NOT quiet after waiting {max_wait_s:.0f} s: figures may be contended"


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

    @property
    def pid(self) -> int:
        """The worker process's id (e.g. to attach a profiler to it)."""
        return self._proc.pid

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

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
