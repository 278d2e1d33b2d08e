"""Schedules: jitted values against closed forms (numpy/math), optax equivalence, bad arguments."""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtricks
from jaxtricks import schedules

BIG = 2**31 - 1  # the largest int32 step


def evaluate(schedule, steps):
    """The schedule under jit at int32 steps, one call per step (as a training loop does)."""
    fn = jax.jit(schedule)
    values = [fn(jnp.asarray(t, jnp.int32)) for t in steps]
    for v in values:
        assert v.dtype == jnp.float32 and v.shape == ()
    return np.array([float(v) for v in values])


# Each case: the schedule, a closed form in float64 (math, written from the formula, not from the
# code), and the steps to check: 0, boundaries, mid-points, past the end, 2**31 - 1.
K = 0.05
CASES = {
    "exponential": (
        lambda: jaxtricks.exponential_decay(0.1, K),
        lambda t: 0.1 * math.exp(-K * t),
        [0, 1, 7, 100, 1000, BIG],
    ),
    "exponential_giant_steps_stay_meaningful": (
        lambda: jaxtricks.exponential_decay(1.0, 1e-9),
        lambda t: math.exp(-1e-9 * t),
        [0, 10**6, 10**9, BIG],
    ),
    "exponential_begin_end": (
        lambda: jaxtricks.exponential_decay(0.1, K, transition_begin=5, end_value=0.02),
        lambda t: max(0.1 * math.exp(-K * max(t - 5, 0)), 0.02),
        [0, 4, 5, 6, 20, 32, 33, 100, BIG],
    ),
    "polynomial_linear": (
        lambda: jaxtricks.polynomial_decay(1.0, 100),
        lambda t: 1.0 - min(t, 100) / 100,
        [0, 1, 50, 99, 100, 101, BIG],
    ),
    "polynomial_power": (
        lambda: jaxtricks.polynomial_decay(0.5, 40, power=2.5, end_value=0.1, transition_begin=10),
        lambda t: 0.1 + 0.4 * (1 - min(max(t - 10, 0), 40) / 40) ** 2.5,
        [0, 10, 11, 30, 49, 50, 51, BIG],
    ),
    "polynomial_sqrt_power": (
        lambda: jaxtricks.polynomial_decay(1.0, 9, power=0.5),
        lambda t: (1 - min(t, 9) / 9) ** 0.5,
        [0, 1, 8, 9, 10, BIG],
    ),
    "linear_warmup": (
        lambda: jaxtricks.linear_warmup(0.3, 8, init_value=0.1),
        lambda t: 0.1 + 0.2 * min(t, 8) / 8,
        [0, 1, 4, 7, 8, 9, BIG],
    ),
    "cosine": (
        lambda: jaxtricks.cosine_decay(2.0, 60, end_value=0.2),
        lambda t: 0.2 + 1.8 * (1 + math.cos(math.pi * min(t, 60) / 60)) / 2,
        [0, 1, 15, 30, 45, 59, 60, 61, BIG],
    ),
    "inverse_sqrt": (
        lambda: jaxtricks.inverse_sqrt(0.01, 16),
        lambda t: 0.01 * t / 16 if t < 16 else 0.01 * math.sqrt(16 / t),
        [0, 1, 8, 15, 16, 17, 64, 10**6, BIG],
    ),
    "constant": (lambda: jaxtricks.constant(0.25), lambda t: 0.25, [0, 1, BIG]),
    "warmup_then_exponential": (
        lambda: jaxtricks.warmup_then(10, jaxtricks.exponential_decay(0.1, K)),
        lambda t: 0.1 * t / 10 if t < 10 else 0.1 * math.exp(-K * (t - 10)),
        [0, 1, 5, 9, 10, 11, 50, BIG],
    ),
    "warmup_then_from_init": (
        lambda: jaxtricks.warmup_then(4, jaxtricks.cosine_decay(1.0, 8), init_value=0.2),
        lambda t: (0.2 + 0.8 * t / 4 if t < 4
                   else (1 + math.cos(math.pi * min(t - 4, 8) / 8)) / 2),
        [0, 1, 3, 4, 5, 8, 12, 13, BIG],
    ),
    "join": (
        lambda: jaxtricks.join_schedules(
            [jaxtricks.constant(1.0), jaxtricks.linear_warmup(2.0, 10), jaxtricks.constant(0.5)],
            [5, 20],
        ),
        lambda t: 1.0 if t < 5 else (2.0 * min(t - 5, 10) / 10 if t < 20 else 0.5),
        [0, 4, 5, 6, 10, 15, 19, 20, 21, BIG],
    ),
}


def wsd_reference(t, peak, w, s, d, init, end, shape):
    if t < w:
        return init + (peak - init) * t / w
    if t < w + s:
        return peak
    p = min(t - w - s, d) / d
    remaining = {"linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2,
                 "sqrt": 1 - math.sqrt(p)}[shape]
    return end + (peak - end) * remaining


for _shape in jaxtricks.DECAY_SHAPES:
    CASES[f"wsd_{_shape}"] = (
        lambda shape=_shape: jaxtricks.warmup_stable_decay(
            1.0, 10, 30, 20, init_value=0.1, end_value=0.05, decay_shape=shape
        ),
        lambda t, shape=_shape: wsd_reference(t, 1.0, 10, 30, 20, 0.1, 0.05, shape),
        [0, 1, 5, 9, 10, 11, 25, 39, 40, 41, 45, 50, 59, 60, 61, BIG],
    )
CASES["wsd_no_warmup_no_plateau"] = (
    lambda: jaxtricks.warmup_stable_decay(1.0, 0, 0, 4, decay_shape="sqrt"),
    lambda t: 1 - math.sqrt(min(t, 4) / 4),
    [0, 1, 2, 4, 5, BIG],
)


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_matches_closed_form_under_jit(name):
    make, reference, steps = CASES[name]
    got = evaluate(make(), steps)
    want = np.array([reference(t) for t in steps])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_on_an_array_of_steps(name):
    """One call on a vector of steps (how a CLI plots a schedule) gives the per-step values."""
    make, reference, steps = CASES[name]
    got = jax.jit(make())(jnp.asarray(steps, jnp.int32))
    assert got.shape == (len(steps),) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, [reference(t) for t in steps], rtol=2e-6, atol=1e-7)


def test_python_int_and_float_steps_give_float32():
    schedule = jaxtricks.warmup_then(10, jaxtricks.cosine_decay(1.0, 100))
    for step in (5, 5.0, np.int64(5), jnp.asarray(5, jnp.int32)):
        value = schedule(step)
        assert value.dtype == jnp.float32
        assert float(value) == pytest.approx(0.5)


def test_schedule_traces_once_for_many_steps():
    traces = 0
    schedule = jaxtricks.warmup_stable_decay(1.0, 10, 10, 10, decay_shape="cosine")

    @jax.jit
    def f(step):
        nonlocal traces
        traces += 1
        return schedule(step)

    values = [float(f(jnp.asarray(t, jnp.int32))) for t in (0, 5, 15, 25, BIG)]
    assert traces == 1
    assert values[0] == 0.0 and values[2] == 1.0 and values[-1] == 0.0


# --------------------------------------------------------------------------- optax equivalence

STEPS = np.arange(0, 120)


def assert_same(ours, theirs, steps=STEPS, rtol=1e-5):
    steps = jnp.asarray(steps, jnp.int32)
    np.testing.assert_allclose(jax.jit(ours)(steps), jax.jit(theirs)(steps), rtol=rtol, atol=1e-7)


def test_exponential_decay_equals_optax():
    assert_same(jaxtricks.exponential_decay(0.3, 0.02),
                optax.exponential_decay(0.3, 1, math.exp(-0.02)))
    assert_same(
        jaxtricks.exponential_decay(0.3, 0.05, transition_begin=7, end_value=0.05),
        optax.exponential_decay(0.3, 1, math.exp(-0.05), transition_begin=7, end_value=0.05),
    )


def test_polynomial_decay_equals_optax():
    assert_same(
        jaxtricks.polynomial_decay(0.4, 50, power=3.0, end_value=0.01, transition_begin=20),
        optax.polynomial_schedule(0.4, 0.01, 3.0, 50, transition_begin=20),
    )


def test_linear_warmup_equals_optax():
    assert_same(jaxtricks.linear_warmup(0.7, 30, init_value=0.1),
                optax.linear_schedule(0.1, 0.7, 30))


def test_cosine_decay_equals_optax():
    assert_same(jaxtricks.cosine_decay(0.5, 80, end_value=0.05),
                optax.cosine_decay_schedule(0.5, 80, alpha=0.1))


def test_warmup_then_cosine_equals_optax_warmup_cosine():
    ours = jaxtricks.warmup_then(
        20, jaxtricks.cosine_decay(1.0, 80, end_value=0.1), init_value=0.05
    )
    theirs = optax.warmup_cosine_decay_schedule(0.05, 1.0, 20, 100, end_value=0.1)
    assert_same(ours, theirs)


def test_join_schedules_equals_optax():
    pieces = [jaxtricks.linear_warmup(1.0, 10), jaxtricks.cosine_decay(1.0, 50),
              jaxtricks.constant(0.1)]
    assert_same(jaxtricks.join_schedules(pieces, [10, 60]), optax.join_schedules(pieces, [10, 60]))


def test_warmup_then_zero_warmup_is_the_schedule_itself():
    inner = jaxtricks.exponential_decay(0.1, 0.1)
    assert_same(jaxtricks.warmup_then(0, inner), inner, rtol=0)
    assert_same(jaxtricks.warmup_stable_decay(1.0, 0, 5, 10),
                jaxtricks.polynomial_decay(1.0, 10, transition_begin=5), rtol=0)


def test_warmup_then_exponential_decay_recipe():
    """10 warmup steps up to 0.1, then lr * exp(-k t) counted from there (warmup_then's recipe)."""
    recipe = jaxtricks.warmup_then(10, jaxtricks.exponential_decay(0.1, rate=-math.log(0.99)))
    values = evaluate(recipe, range(30))
    np.testing.assert_allclose(values[:11], 0.01 * np.arange(11), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(values[10:], 0.1 * 0.99 ** np.arange(20), rtol=1e-5)


# --------------------------------------------------------------------------- bad arguments

BAD = [
    (lambda: jaxtricks.exponential_decay(0.1, -0.5), "rate", "-0.5"),
    (lambda: jaxtricks.exponential_decay(float("nan"), 0.1), "init_value", "nan"),
    (lambda: jaxtricks.exponential_decay(0.1, float("inf")), "rate", "inf"),
    (lambda: jaxtricks.exponential_decay(0.1, 0.1, transition_begin=-1), "transition_begin", "-1"),
    (lambda: jaxtricks.exponential_decay(0.1, 0.1, end_value=0.2), "end_value", "0.2"),
    (lambda: jaxtricks.exponential_decay(0.1, 0.1, end_value=-0.1), "end_value", "-0.1"),
    (lambda: jaxtricks.polynomial_decay(1.0, 0), "decay_steps", "0"),
    (lambda: jaxtricks.polynomial_decay(1.0, -3), "decay_steps", "-3"),
    (lambda: jaxtricks.polynomial_decay(1.0, 2.5), "decay_steps", "2.5"),
    (lambda: jaxtricks.polynomial_decay(1.0, 10, power=0.0), "power", "0.0"),
    (lambda: jaxtricks.polynomial_decay(1.0, 10, power=-1.0), "power", "-1.0"),
    (lambda: jaxtricks.polynomial_decay(1.0, 10, end_value=float("inf")), "end_value", "inf"),
    (lambda: jaxtricks.polynomial_decay(1.0, 10, transition_begin=-2), "transition_begin", "-2"),
    (lambda: jaxtricks.linear_warmup(1.0, 0), "warmup_steps", "0"),
    (lambda: jaxtricks.linear_warmup(float("inf"), 10), "peak_value", "inf"),
    (lambda: jaxtricks.linear_warmup(1.0, 10, init_value=float("nan")), "init_value", "nan"),
    (lambda: jaxtricks.cosine_decay(1.0, 0), "decay_steps", "0"),
    (lambda: jaxtricks.cosine_decay(1.0, 10, end_value=float("-inf")), "end_value", "-inf"),
    (lambda: jaxtricks.inverse_sqrt(1.0, 0), "warmup_steps", "0"),
    (lambda: jaxtricks.inverse_sqrt(float("nan"), 10), "peak_value", "nan"),
    (lambda: jaxtricks.warmup_stable_decay(1.0, -1, 10, 10), "warmup_steps", "-1"),
    (lambda: jaxtricks.warmup_stable_decay(1.0, 1, -1, 10), "stable_steps", "-1"),
    (lambda: jaxtricks.warmup_stable_decay(1.0, 1, 1, 0), "decay_steps", "0"),
    (lambda: jaxtricks.warmup_stable_decay(1.0, 1, 1, 1, decay_shape="exp"), "decay_shape", "exp"),
    (lambda: jaxtricks.warmup_stable_decay(1.0, 1, 1, 1, end_value=float("nan")), "end_value",
     "nan"),
    (lambda: jaxtricks.join_schedules([], []), "schedules", "[]"),
    (lambda: jaxtricks.join_schedules([jaxtricks.constant(1.0)] * 2, []), "boundaries", "[]"),
    (lambda: jaxtricks.join_schedules([jaxtricks.constant(1.0)] * 3, [10, 5]), "boundaries",
     "[10, 5]"),
    (lambda: jaxtricks.join_schedules([jaxtricks.constant(1.0)] * 3, [5, 5]), "boundaries",
     "[5, 5]"),
    (lambda: jaxtricks.join_schedules([jaxtricks.constant(1.0)] * 2, [0]), "boundaries[0]", "0"),
    (lambda: jaxtricks.join_schedules([jaxtricks.constant(1.0), 0.5], [3]), "schedules[1]", "0.5"),
    (lambda: jaxtricks.warmup_then(-1, jaxtricks.constant(1.0)), "warmup_steps", "-1"),
    (lambda: jaxtricks.warmup_then(5, 0.1), "schedule", "0.1"),
    (lambda: jaxtricks.warmup_then(5, jaxtricks.constant(1.0), init_value=float("inf")),
     "init_value", "inf"),
    (lambda: jaxtricks.constant(float("nan")), "value", "nan"),
    (lambda: jaxtricks.constant("0.1"), "value", "'0.1'"),
]


@pytest.mark.parametrize("make, argument, value", BAD, ids=[f"{a}={v}" for _, a, v in BAD])
def test_bad_arguments_raise_value_error_naming_argument_and_value(make, argument, value):
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert argument in message and value in message, message


def test_integer_valued_float_steps_are_accepted():
    assert float(jaxtricks.polynomial_decay(1.0, 4.0)(2)) == 0.5


def test_docstring_examples_run():
    result = doctest.testmod(schedules)
    assert result.attempted > 0 and result.failed == 0
