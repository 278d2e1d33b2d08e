"""Everything that exists only to make the trainer fast on a CPU, in one place.

Process settings that must be applied before JAX starts its backend (:func:`tune_host_malloc`,
:func:`use_cpu_devices`). They are harmless on GPU and TPU hosts.
"""

from __future__ import annotations

import ctypes
import os
import platform

import jax

HOST_MALLOC_ENV = "JAXTRICKS_HOST_MALLOC"  # "default": leave glibc's malloc as it is
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>


def tune_host_malloc() -> bool:
    """Keep the host memory of XLA:CPU's per-step buffers mapped from one step to the next.

    XLA:CPU allocates each step's temporary buffers (110 MB for the default model, 405 MB for a
    1.85M-parameter one at batch 32) with ``malloc`` from its worker threads and frees them when
    the step ends. glibc serves blocks that large with ``mmap`` and unmaps them on ``free``, so
    every step page-faults all of them in again and the kernel zeroes each page. One malloc arena,
    no ``mmap`` and no trimming keep them mapped: CPU steps ran 1.3x to 1.6x faster
    (BENCHMARKS.md; 1.1x to 1.3x before the model's other CPU fixes). Trimming is off altogether
    (threshold -1), not only below 2 GiB (the largest other threshold glibc takes): with the next
    step dispatched while one runs, as the trainer does, two steps' buffers of a 10.8M-parameter
    model (1.1 GB each) made the free heap top pass 2 GiB, and glibc gave it back every step.
    The price is resident memory: freed memory stays with the process, so its resident size stays
    at its peak, and that peak is higher than with glibc's defaults (1031 vs 763 MB for the
    default model's benchmark; for the 10.8M model the same 4.2 GB as with the 2 GiB threshold).

    Call it before JAX starts its backend (before the first array or ``jax.devices()``): threads
    that already have their own malloc arena keep it. ``train.py`` and ``jaxtricks lr-find`` call
    it first thing. It changes the whole process's ``malloc``, so the library never calls it on
    import. Nothing happens without glibc (macOS, musl) or with
    ``JAXTRICKS_HOST_MALLOC=default``; on a GPU or TPU it only concerns host memory.

    Returns:
      Whether glibc accepted the settings.
    """
    if os.environ.get(HOST_MALLOC_ENV) == "default" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    settings = [(_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)]
    return all(mallopt(option, value) == 1 for option, value in settings)


def use_cpu_devices(count: int | None) -> None:
    """Split the host's CPU into ``count`` JAX devices (JAX's ``jax_num_cpu_devices``).

    With more than one local device :func:`make_steps` (``parallelism="auto"``) runs the step
    under ``jax.pmap``, each device on its share of the batch. The CPU devices share the cores,
    and two half-batch steps side by side fill the time during which XLA:CPU keeps one thread
    busy and the other idle (attention's small batched matmuls, reductions): on a 2-core machine
    2 devices made a 1.85M-parameter model's step 1.09x-1.16x faster, a 10.8M one's 0.98x-1.06x and
    the 0.64M default model's 0.96x-0.97x (BENCHMARKS.md). ``None`` leaves JAX's default (one CPU
    device, or ``--xla_force_host_platform_device_count``). GPU and TPU devices are not affected.

    Call it before JAX starts its backends; ``jaxtricks.lm.training.preflight`` does.

    Raises:
      ValueError: the backends have already started with another number of CPU devices.
    """
    if count is None:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backends have started: fine if they have ``count`` already
        have = len(jax.devices("cpu"))
        if have != count:
            raise ValueError(
                f"cpu_devices={count} cannot be applied: JAX's CPU backend has already started "
                f"in this process with {have} device(s). Set it before JAX starts (train.py "
                "does), or leave it null."
            ) from None
