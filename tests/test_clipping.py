"""Clipping and skip_nonfinite: the formula in numpy, optax equivalence, dtypes, NaN/inf, states."""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtricks
from jaxtricks import clipping


def tree(scale=1.0, dtype=jnp.float32):
    return {
        "a": (scale * jnp.array([[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]])).astype(dtype),
        "b": (scale * jnp.array([3.0, -4.0])).astype(dtype),
    }


def numpy_clip(grads, max_norm):
    """Pascanu et al.'s formula, g / max(1, ||g|| / c), in float64."""
    leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    norm = math.sqrt(sum(float(np.sum(g**2)) for g in leaves))
    return [g / max(1.0, norm / max_norm) for g in leaves], norm


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])  # norms 0.057, 5.7, 572
@pytest.mark.parametrize("max_norm", [0.5, 5.0])
def test_clip_by_global_norm_is_the_formula(scale, max_norm):
    grads = tree(scale)
    tx = jaxtricks.clip_by_global_norm(max_norm)
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    want, norm = numpy_clip(grads, max_norm)
    for got, w in zip(jax.tree.leaves(updates), want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-6)
    np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-6)
    assert bool(state.clipped) == (norm > max_norm)
    new_norm = float(jaxtricks.global_norm(updates))
    assert new_norm == pytest.approx(min(norm, max_norm), rel=1e-6)


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_clip_by_global_norm_equals_optax(scale):
    grads = tree(scale)
    ours, theirs = jaxtricks.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    u_ours, _ = ours.update(grads, ours.init(grads))
    u_theirs, _ = theirs.update(grads, theirs.init(grads))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), u_ours, u_theirs)


def test_zero_gradient_passes_unchanged():
    grads = tree(0.0)
    tx = jaxtricks.clip_by_global_norm(1.0)
    updates, state = tx.update(grads, tx.init(grads))
    for u in jax.tree.leaves(updates):
        assert np.all(np.isfinite(u)) and np.all(np.asarray(u) == 0)
    assert float(state.grad_norm) == 0.0 and not bool(state.clipped)


def test_infinite_max_norm_records_the_norm_without_clipping():
    grads = tree(1000.0)
    tx = jaxtricks.clip_by_global_norm(math.inf)
    updates, state = tx.update(grads, tx.init(grads))
    jax.tree.map(np.testing.assert_array_equal, updates, grads)
    np.testing.assert_allclose(state.grad_norm, numpy_clip(grads, 1.0)[1], rtol=1e-6)
    assert not bool(state.clipped)


def test_clipped_gradient_is_not_written_out():
    """Clip then Adam, jitted with donated parameters and state: XLA fuses the clip into the
    moments' update and needs no temporary the size of the gradient. Dividing each element by
    the norm (the formula as written) made XLA write the clipped gradient out: a 4 MiB
    temporary for this tree."""
    params = {"w": jnp.ones((1024, 1024)), "b": jnp.ones((1024,))}
    tx = optax.chain(jaxtricks.clip_by_global_norm(1.0), optax.adam(1e-3))

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = (jax.jit(step, donate_argnums=(0, 1))
                .lower(params, tx.init(params), params).compile())
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    assert temp_bytes < params["w"].nbytes // 100, f"{temp_bytes} bytes of temporaries"


def test_clip_by_global_norm_keeps_bf16():
    grads = tree(10.0, jnp.bfloat16)
    tx = jaxtricks.clip_by_global_norm(1.0)
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert state.grad_norm.dtype == jnp.float32
    want, norm = numpy_clip(grads, 1.0)
    np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-6)  # the norm is taken in float32
    for got, w in zip(jax.tree.leaves(updates), want, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), w, rtol=1e-2, atol=1e-3)


def test_clip_by_value():
    grads = {"a": jnp.array([-3.0, -0.5, 0.0, 0.75, 2.0]), "b": jnp.array([[0.1]], jnp.bfloat16)}
    tx = jaxtricks.clip_by_value(1.0)
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_array_equal(updates["a"], [-1.0, -0.5, 0.0, 0.75, 1.0])
    assert updates["b"].dtype == jnp.bfloat16 and bool(state.clipped)
    _, state = tx.update(tree(0.1), state)
    assert not bool(state.clipped)


@pytest.mark.parametrize(
    "make, argument, value",
    [(lambda: jaxtricks.clip_by_global_norm(0.0), "max_norm", "0.0"),
     (lambda: jaxtricks.clip_by_global_norm(-1.0), "max_norm", "-1.0"),
     (lambda: jaxtricks.clip_by_global_norm(float("nan")), "max_norm", "nan"),
     (lambda: jaxtricks.clip_by_global_norm("1"), "max_norm", "'1'"),
     (lambda: jaxtricks.clip_by_value(0.0), "max_abs", "0.0"),
     (lambda: jaxtricks.clip_by_value(float("inf")), "max_abs", "inf")],
)
def test_bad_arguments(make, argument, value):
    with pytest.raises(ValueError) as info:
        make()
    assert argument in str(info.value) and value in str(info.value)


# --------------------------------------------------------------------------- skip_nonfinite


@pytest.mark.parametrize(
    "bad, dtype",
    [(float("nan"), jnp.float32), (float("inf"), jnp.float32), (-float("inf"), jnp.bfloat16),
     (float("nan"), jnp.bfloat16)],
)
def test_skip_nonfinite_skips_and_keeps_inner_state(bad, dtype):
    inner = optax.chain(jaxtricks.clip_by_global_norm(1.0), optax.adam(0.1))
    tx = jaxtricks.skip_nonfinite(inner)
    traces = 0

    @jax.jit
    def step(params, state, grads):
        nonlocal traces
        traces += 1
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    params = tree(1.0, dtype)
    state = tx.init(params)
    good = tree(0.5, dtype)
    poisoned = {"a": good["a"].at[1, 2].set(bad), "b": good["b"]}

    params1, state1, _ = step(params, state, good)  # a finite step advances everything
    assert int(state1.total_skipped) == 0 and not bool(state1.last_skipped)
    assert int(state1.inner_state[1][0].count) == 1

    for k in range(1, 3):  # two bad steps in a row
        params2, state2, updates = step(params1, state1, poisoned)
        for u in jax.tree.leaves(updates):
            assert u.dtype == dtype and np.all(np.asarray(u, np.float32) == 0.0)
        jax.tree.map(np.testing.assert_array_equal, params2, params1)
        # The inner state (clip record, Adam moments and count) is exactly the old one.
        jax.tree.map(np.testing.assert_array_equal, state2.inner_state, state1.inner_state)
        assert int(state2.total_skipped) == k and int(state2.consecutive_skipped) == k
        assert bool(state2.last_skipped)
        params1, state1 = params2, state2

    params3, state3, _ = step(params1, state1, good)  # a finite step again
    assert int(state3.total_skipped) == 2 and int(state3.consecutive_skipped) == 0
    assert not bool(state3.last_skipped)
    assert int(state3.inner_state[1][0].count) == 2
    moved = np.asarray(params3["a"], np.float32) - np.asarray(params1["a"], np.float32)
    assert np.abs(moved).max() > 0
    assert traces == 1  # the skip is a jnp.where, not a retrace


def test_skip_nonfinite_passes_finite_steps_through_unchanged():
    inner = optax.sgd(0.1, momentum=0.9)
    tx = jaxtricks.skip_nonfinite(inner)
    params = tree()
    s_ours, s_inner = tx.init(params), inner.init(params)
    for scale in (1.0, 2.0, -0.5):
        u_ours, s_ours = tx.update(tree(scale), s_ours, params)
        u_inner, s_inner = inner.update(tree(scale), s_inner, params)
        jax.tree.map(np.testing.assert_array_equal, u_ours, u_inner)
    jax.tree.map(np.testing.assert_array_equal, s_ours.inner_state, s_inner)


def test_skip_nonfinite_forwards_extra_args():
    seen = {}

    def update_fn(updates, state, params=None, *, loss=None):
        seen["loss"] = loss
        return updates, state

    inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)
    tx = jaxtricks.skip_nonfinite(inner)
    tx.update(tree(), tx.init(tree()), tree(), loss=1.5)
    assert seen["loss"] == 1.5


def test_docstring_examples_run():
    result = doctest.testmod(clipping)
    assert result.attempted > 0 and result.failed == 0
