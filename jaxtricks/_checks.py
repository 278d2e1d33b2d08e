"""Argument checks shared by the schedules and transforms; each message names argument and value.

A hyperparameter is a Python number or a concrete scalar array (checked and returned as a float),
or a traced value: its shape and dtype are checked (a real scalar), its number cannot be, and it is
returned as it is. Traced values arrive when ``optax.inject_hyperparams`` calls a factory inside a
jitted ``update``. The values it started with were checked as concrete arrays when it called the
factory in ``init``; a value set later in ``state.hyperparams`` is checked by an eager ``update``
only, so under ``jit`` a bad number goes through as it would in optax's own transforms.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer (its number is unknown until the program runs)."""
    return isinstance(value, jax.core.Tracer)


def _is_real_scalar_array(value: Any) -> bool:
    return (
        isinstance(value, jax.Array | np.ndarray)
        and value.shape == ()
        and (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer))
    )


def check_real(name: str, value: Any) -> Any:
    """A real number (inf and NaN included) as a float; a traced value as it is.

    A traced value's number is unknown, but its shape and dtype are not: it must be a real scalar
    too (a vector of learning rates set in ``state.hyperparams`` is refused here, not broadcast).
    """
    if isinstance(value, bool | np.bool_ | str):
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    if isinstance(value, numbers.Real):
        return float(value)
    if _is_real_scalar_array(value):
        return value if is_traced(value) else float(value)
    raise ValueError(f"{name} must be a real number (a scalar), got {value!r}.")


def check_finite(name: str, value: Any) -> Any:
    """A finite real number."""
    x = check_real(name, value)
    if not is_traced(x) and not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return x


def check_nonnegative(name: str, value: Any) -> Any:
    """A finite number >= 0."""
    x = check_finite(name, value)
    if not is_traced(x) and x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return x


def check_positive(name: str, value: Any) -> Any:
    """A finite number > 0."""
    x = check_finite(name, value)
    if not is_traced(x) and x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return x


def check_positive_or_inf(name: str, value: Any, inf_means: str) -> Any:
    """A number > 0, where ``inf`` is allowed and means ``inf_means``."""
    x = check_real(name, value)
    if not is_traced(x) and (math.isnan(x) or x <= 0):
        raise ValueError(f"{name} must be a number > 0 (inf: {inf_means}), got {value!r}.")
    return x


def check_unit_interval(name: str, value: Any) -> Any:
    """A number in ``[0, 1)`` (a decay rate such as momentum or Adam's betas)."""
    x = check_finite(name, value)
    if not is_traced(x) and not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must satisfy 0 <= {name} < 1, got {value!r}.")
    return x


def check_steps(name: str, value: Any, minimum: int) -> int:
    """An integer number of steps >= minimum (integer-valued floats such as 10.0 are accepted)."""
    ok = not isinstance(value, bool) and (
        isinstance(value, numbers.Integral)
        or (isinstance(value, numbers.Real) and float(value).is_integer())
    )
    if not ok or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """True or False."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def check_schedule(name: str, value: Any) -> Callable:
    """A callable ``step -> value``."""
    if not callable(value):
        raise ValueError(f"{name} must be a schedule (a callable step -> value), got {value!r}.")
    return value


def check_scalar_or_schedule(name: str, value: Any) -> Any:
    """A schedule is returned as is; a number must be finite and >= 0."""
    if callable(value):
        return value
    return check_nonnegative(name, value)


def value_at(value: Any, count: jax.Array) -> jax.Array:
    """``value(count)`` for a schedule, else the number itself, as a float32 scalar."""
    out = value(count) if callable(value) else value
    return jnp.asarray(out, dtype=jnp.float32)
