"""Test session setup, and the one place that starts child Pythons.

The JAX CPU backend, and TFDS data kept out of the user's home, for this process and every child.
A test that needs a second Python (a kill -9, fake devices, a clean interpreter) takes the
``python`` fixture: the child gets :func:`child_env`, runs in the repository root with a timeout,
and is killed with everything it started when the test ends, whatever happened.
"""

import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # for any one child; a hung child fails its test instead of hanging the suite

# All are read when jax / tensorflow_datasets are first imported, i.e. after this module runs, and
# children inherit them. The compilation cache lives as long as the session's temporary folders:
# the many runs of one tiny model compile each program once, not once per run.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests check what the compiled programs compute, not how fast they run: at LLVM's lowest
# optimization level XLA:CPU compiles the many small test programs much sooner (the quick loop
# takes about two thirds of the time), and they compute the same to float rounding. Speed is
# measured by benchmarks/, at XLA's default level. A level set in XLA_FLAGS by the user is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
for _variable, _prefix in [("TFDS_DATA_DIR", "tfds"), ("JAX_COMPILATION_CACHE_DIR", "xla")]:
    if _variable not in os.environ:
        os.environ[_variable] = tempfile.mkdtemp(prefix=f"jaxtricks-tests-{_prefix}-")
        atexit.register(shutil.rmtree, os.environ[_variable], ignore_errors=True)


def child_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child Python: this session's, JAX on the CPU (with ``devices`` fake
    CPU devices when given: XLA reads the flag when JAX starts), the repository importable."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TFDS_DATA_DIR=os.environ["TFDS_DATA_DIR"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env.update(extra)
    return env


class PythonProcesses:
    """Child Pythons started by one test (``sys.executable``, in the repository root)."""

    def __init__(self):
        self._started: list[subprocess.Popen] = []

    def start(self, *args: str, devices: int | None = None, env: dict | None = None,
              **popen_kwargs) -> subprocess.Popen:
        """Start ``python *args`` in its own process group (so that :meth:`close` reaches what it
        starts, e.g. grain workers); ``env`` adds to :func:`child_env`."""
        popen_kwargs.setdefault("cwd", ROOT)
        process = subprocess.Popen([sys.executable, *args], env=child_env(devices, **(env or {})),
                                   start_new_session=True, **popen_kwargs)
        self._started.append(process)
        return process

    def run(self, *args: str, devices: int | None = None, env: dict | None = None,
            timeout: float = TIMEOUT_S, **popen_kwargs) -> subprocess.CompletedProcess:
        """Run ``python *args`` to the end and capture its output (text); a child still running
        after ``timeout`` seconds is killed and the test fails."""
        process = self.start(*args, devices=devices, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, **popen_kwargs)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(process)
            out, err = process.communicate()
            pytest.fail(f"python {' '.join(args)[:200]} ran past {timeout} s:\n{out}\n{err}")
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its group: the child and what it started
        except ProcessLookupError:
            pass
        process.wait()

    def close(self) -> None:
        for process in self._started:
            if process.poll() is None:
                self._kill(process)


@pytest.fixture
def python():
    """Starts child Pythons (see :class:`PythonProcesses`); none outlives the test."""
    processes = PythonProcesses()
    yield processes
    processes.close()


class CompileLog(logging.Handler):
    """The programs JAX compiles while it is active, from ``jax.log_compiles``' log.

    ``names`` lists them in order as JAX names them, e.g. ``jit(train_step)``; :meth:`count` counts
    one function's. A program that JAX finds in its in-memory caches is not compiled, not listed.
    """

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.names.append(message.split()[1])

    def count(self, function_name: str) -> int:
        return sum(name.endswith(f"({function_name})") for name in self.names)

    def __enter__(self) -> "CompileLog":
        import jax

        self._log_compiles = jax.log_compiles()
        self._log_compiles.__enter__()
        logging.getLogger("jax").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("jax").removeHandler(self)
        self._log_compiles.__exit__(*exc)


@pytest.fixture
def compile_log():
    """A :class:`CompileLog` to enter around the code whose compiles a test counts."""
    return CompileLog()
