"""zclip and skip_spikes: the algorithms transcribed in numpy, warm-up, dtypes, jit, skipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtricks

DIRECTION = {"a": np.array([0.6, 0.0], np.float32), "b": np.array([0.8], np.float32)}


def grads_with_norm(norm, dtype=jnp.float32):
    """A two-leaf gradient whose global norm is ``norm``."""
    return {k: jnp.asarray(v * norm, dtype) for k, v in DIRECTION.items()}


def numpy_zclip(norms, alpha, z_thresh, warmup_steps, max_norm):
    """ZClip's z-score mode with adaptive scaling (Kumar et al., 2025), in float64.

    Returns per step: (norm after clipping, clipped, mean, std, spike threshold or None).
    """
    cap = math.inf if max_norm is None else max_norm
    buffer, mean, var, out = [], 0.0, 0.0, []
    for step, g in enumerate(norms):
        if step < warmup_steps:
            buffer.append(g)
            if len(buffer) == warmup_steps:
                mean, var = float(np.mean(buffer)), float(np.var(buffer))
            out.append((min(g, cap), g > cap, mean, math.sqrt(var), None))
            continue
        std = math.sqrt(var)
        z = (g - mean) / (std + 1e-6)
        tau = mean + z_thresh * std / (z / z_thresh) if z > z_thresh else None
        clip_to = min(cap, math.inf if tau is None else tau)
        x = g if tau is None else tau
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
        out.append((min(g, clip_to), g > clip_to, mean, math.sqrt(var), tau))
    return out


def spiky_norms(n=60, seed=0):
    rng = np.random.default_rng(seed)
    norms = 1.0 + 0.1 * rng.standard_normal(n)
    for step, factor in [(30, 10.0), (40, 5.0), (41, 20.0), (55, 3.0)]:
        norms[step] *= factor
    return [float(np.float32(g)) for g in norms]


@pytest.mark.parametrize("max_norm", [None, 1.05])
def test_zclip_matches_the_numpy_transcription(max_norm):
    norms = spiky_norms()
    want = numpy_zclip(norms, 0.97, 2.5, 25, max_norm)
    assert sum(w[4] is not None for w in want) >= 4  # the spikes are detected as spikes
    if max_norm is not None:  # and ordinary steps above max_norm are capped too
        assert any(w[1] and w[4] is None for w in want[25:])
    tx = jaxtricks.zclip(alpha=0.97, z_thresh=2.5, warmup_steps=25, max_norm=max_norm)
    update = jax.jit(tx.update)
    state = tx.init(None)
    for step, (g, (out_norm, clipped, mean, std, tau)) in enumerate(zip(norms, want, strict=True)):
        updates, state = update(grads_with_norm(g), state)
        assert float(jaxtricks.global_norm(updates)) == pytest.approx(out_norm, rel=1e-5), step
        assert bool(state.clipped) == clipped, step
        assert float(state.norm) == pytest.approx(g, rel=1e-6)
        assert float(state.mean) == pytest.approx(mean, rel=1e-5, abs=1e-7), step
        assert float(state.std) == pytest.approx(std, rel=1e-4, abs=1e-6), step
        if tau is not None:
            assert float(state.threshold) == pytest.approx(min(tau, max_norm or math.inf), 1e-5)
        # The direction is kept: the update is the gradient times one factor.
        np.testing.assert_allclose(
            np.asarray(updates["b"]) * 0.6, np.asarray(updates["a"][0]) * 0.8, rtol=1e-6
        )
    assert int(state.count) == len(norms)


def test_a_spike_is_clipped_to_the_adaptive_threshold():
    tx = jaxtricks.zclip(alpha=0.9, z_thresh=2.0, warmup_steps=4)
    state = tx.init(None)
    for g in [1.0, 3.0, 1.0, 3.0]:  # mean 2, std 1
        _, state = tx.update(grads_with_norm(g), state)
    assert float(state.mean) == pytest.approx(2.0) and float(state.std) == pytest.approx(1.0)
    updates, state = tx.update(grads_with_norm(12.0), state)  # z = 10 -> 2 + 2 * 1 / 5 = 2.4
    assert bool(state.clipped)
    assert float(state.threshold) == pytest.approx(2.4, rel=1e-5)
    assert float(jaxtricks.global_norm(updates)) == pytest.approx(2.4, rel=1e-5)
    # The EMA follows the clipped norm, not the raw one.
    mean = 0.9 * 2.0 + 0.1 * 2.4
    assert float(state.mean) == pytest.approx(mean, rel=1e-6)
    assert float(state.var) == pytest.approx(0.9 + 0.1 * (2.4 - mean) ** 2, rel=1e-5)
    # A norm within z_thresh passes unchanged, and the threshold is the spike boundary.
    std = float(state.std)
    updates, state = tx.update(grads_with_norm(2.5), state)
    assert not bool(state.clipped)
    assert float(jaxtricks.global_norm(updates)) == pytest.approx(2.5, rel=1e-6)
    assert float(state.threshold) == pytest.approx(mean + 2.0 * std, rel=1e-5)


def test_zclip_warmup_does_not_clip_without_max_norm():
    tx = jaxtricks.zclip(warmup_steps=5)
    state = tx.init(None)
    for step, g in enumerate([1.0, 100.0, 1.0, 1e4, 2.0]):
        updates, state = tx.update(grads_with_norm(g), state)
        assert float(jaxtricks.global_norm(updates)) == pytest.approx(g, rel=1e-6)
        assert not bool(state.clipped)
        np.testing.assert_allclose(state.warmup_norms[step], g, rtol=1e-6)
        want_mean = 0.0 if step < 4 else pytest.approx(np.mean([1, 100, 1, 1e4, 2]))
        assert float(state.mean) == want_mean


def test_zclip_warmup_clips_to_max_norm():
    tx = jaxtricks.zclip(warmup_steps=5, max_norm=2.0)
    state = tx.init(None)
    for g in [1.0, 100.0, 1.5, 3.0]:
        updates, state = tx.update(grads_with_norm(g), state)
        assert float(jaxtricks.global_norm(updates)) == pytest.approx(min(g, 2.0), rel=1e-6)
        assert bool(state.clipped) == (g > 2.0)
        assert float(state.threshold) == 2.0


def test_zclip_keeps_bf16():
    tx = jaxtricks.zclip(warmup_steps=3, max_norm=1.0)
    update = jax.jit(tx.update)
    state = tx.init(None)
    for g in [0.5, 2.0, 0.5, 0.6, 50.0]:
        updates, state = update(grads_with_norm(g, jnp.bfloat16), state)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
        assert state.mean.dtype == jnp.float32 and state.norm.dtype == jnp.float32
        assert float(jaxtricks.global_norm(updates)) == pytest.approx(min(g, 1.0), rel=1e-2)
    assert bool(state.clipped)


def test_zclip_compiles_once():
    tx = jaxtricks.zclip(warmup_steps=10, max_norm=5.0)
    traces = []

    @jax.jit
    def step(grads, state):
        traces.append(1)
        return tx.update(grads, state)

    state = tx.init(None)
    for g in spiky_norms()[:30]:
        _, state = step(grads_with_norm(g), state)
    assert len(traces) == 1
    assert int(state.count) == 30


def test_zclip_under_inject_hyperparams():
    """alpha and z_thresh can be injected; warmup_steps sizes a buffer, so it is static."""
    tx = optax.inject_hyperparams(jaxtricks.zclip, static_args=("warmup_steps",))(
        alpha=0.9, z_thresh=2.0, warmup_steps=4
    )
    update = jax.jit(tx.update)
    state = tx.init(None)
    for g in [1.0, 3.0, 1.0, 3.0]:
        _, state = update(grads_with_norm(g), state)
    state.hyperparams["z_thresh"] = jnp.float32(4.0)
    updates, state = update(grads_with_norm(12.0), state)  # z = 10 -> 2 + 16 * 1 / 10
    assert float(jaxtricks.global_norm(updates)) == pytest.approx(3.6, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"z_thresh": 0.0}, "z_thresh"),
        ({"z_thresh": -1.0}, "z_thresh"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"max_norm": 0.0}, "max_norm"),
        ({"max_norm": -1.0}, "max_norm"),
    ],
)
def test_zclip_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        jaxtricks.zclip(**kwargs)


def test_optimizer_stats_report_zclip_and_skip_spikes():
    tx = optax.chain(
        jaxtricks.zclip(warmup_steps=2),
        jaxtricks.skip_spikes(jaxtricks.make_optimizer(clip_norm=1.0), window=4),
    )
    params = grads_with_norm(0.0)
    state = tx.init(params)
    for g in [1.0, 3.0, 30.0]:  # mean 2, std 1; z = 28: clipped to 2 + 2.5**2 / 28
        _, state = tx.update(grads_with_norm(g), state, params)
    stats = jaxtricks.optimizer_stats(state)
    zc = state[0]
    assert float(stats["grad_norm"]) == pytest.approx(30.0)  # zclip's raw norm
    assert float(stats["clipped"]) == 1.0
    assert float(stats["zclip_mean"]) == float(zc.mean)
    assert float(stats["zclip_std"]) == pytest.approx(float(np.sqrt(zc.var)))
    assert float(stats["zclip_threshold"]) == float(zc.threshold)
    assert float(zc.threshold) == pytest.approx(2 + 2.5**2 / 28, rel=1e-5)
    assert int(stats["skipped_spikes"]) == 0 and stats["skipped_spikes"].dtype == jnp.int32


# --------------------------------------------------------------------------- skip_spikes


def noisy_steps(n, seed=1):
    rng = np.random.default_rng(seed)
    return [(1.0 + 0.05 * rng.standard_normal(), 3.0 + 0.05 * rng.standard_normal())
            for _ in range(n)]


def assert_trees_equal(x, y):
    jax.tree.map(np.testing.assert_array_equal, x, y)


def test_gradient_and_loss_spikes_are_skipped():
    params = grads_with_norm(1.0)
    tx = jaxtricks.skip_spikes(optax.adam(0.1), window=16, threshold=6.0)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for g, loss in noisy_steps(20):
        _, state = update(grads_with_norm(g), state, params, loss=jnp.float32(loss))
    assert int(state.skipped_spikes) == 0 and int(state.filled) == 16

    for n, (g, loss) in enumerate([(100.0, 3.0), (1.0, 30.0)], start=1):  # gradient, then loss
        before = state
        updates, state = update(grads_with_norm(g), state, params, loss=jnp.float32(loss))
        for u in jax.tree.leaves(updates):
            np.testing.assert_array_equal(u, 0.0)
        assert_trees_equal(state.inner_state, before.inner_state)  # Adam's count, mu, nu
        assert_trees_equal((state.norms, state.losses, state.filled, state.index),
                           (before.norms, before.losses, before.filled, before.index))
        assert int(state.skipped_spikes) == n and bool(state.last_skipped)

    before = state
    updates, state = update(grads_with_norm(1.0), state, params, loss=jnp.float32(3.0))
    assert not bool(state.last_skipped) and int(state.skipped_spikes) == 2
    assert int(state.inner_state[0].count) == int(before.inner_state[0].count) + 1
    assert np.all(np.asarray(updates["b"]) != 0)
    assert int(state.index) == (int(before.index) + 1) % 16


def test_nothing_is_skipped_before_half_the_window():
    params = grads_with_norm(1.0)
    tx = jaxtricks.skip_spikes(optax.sgd(1.0), window=16)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for g, loss in noisy_steps(7):
        _, state = update(grads_with_norm(g), state, params, loss=jnp.float32(loss))
    updates, state = update(grads_with_norm(1e6), state, params, loss=jnp.float32(1e9))
    assert not bool(state.last_skipped) and int(state.skipped_spikes) == 0
    assert float(jaxtricks.global_norm(updates)) == pytest.approx(1e6, rel=1e-5)
    assert int(state.filled) == 8
    # With 8 clean values (half the window) in, the same value is skipped.
    state = tx.init(params)
    for g, loss in noisy_steps(8):
        _, state = update(grads_with_norm(g), state, params, loss=jnp.float32(loss))
    _, state = update(grads_with_norm(1e6), state, params, loss=jnp.float32(3.0))
    assert bool(state.last_skipped)


def test_a_slow_drift_is_never_a_spike():
    params = grads_with_norm(1.0)
    tx = jaxtricks.skip_spikes(optax.sgd(1.0), window=128, threshold=6.0)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step in range(400):
        grow = 1.01**step
        _, state = update(grads_with_norm(grow), state, params, loss=jnp.float32(2.0 * grow))
        assert not bool(state.last_skipped), step
    assert int(state.skipped_spikes) == 0 and int(state.filled) == 128


def test_skip_spikes_without_loss_and_the_counter():
    params = grads_with_norm(1.0)
    tx = jaxtricks.skip_spikes(optax.sgd(1.0), window=8, threshold=4.0)
    update = jax.jit(tx.update)
    state = tx.init(params)
    skipped = 0
    for step, (g, _) in enumerate(noisy_steps(40)):
        spike = step % 10 == 9
        updates, state = update(grads_with_norm(50.0 if spike else g), state, params)
        skipped += spike
        assert bool(state.last_skipped) == spike
        assert int(state.skipped_spikes) == skipped
    np.testing.assert_array_equal(state.losses, 0.0)
    assert int(state.skipped_spikes) == 4


def test_skip_spikes_forwards_extra_args_and_compiles_once():
    params = grads_with_norm(1.0)
    tx = jaxtricks.skip_spikes(jaxtricks.make_optimizer(name="sgd", learning_rate=0.1), window=4)
    traces = []

    @jax.jit
    def step(grads, state, loss):
        traces.append(1)
        return tx.update(grads, state, params, loss=loss, unused_extra=1.0)

    state = tx.init(params)
    for g, loss in noisy_steps(10):
        _, state = step(grads_with_norm(g), state, jnp.float32(loss))
    assert len(traces) == 1 and int(state.filled) == 4


@pytest.mark.parametrize(
    "kwargs, name",
    [({"window": 1}, "window"), ({"window": 3.5}, "window"), ({"threshold": 0.0}, "threshold"),
     ({"threshold": math.inf}, "threshold")],
)
def test_skip_spikes_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        jaxtricks.skip_spikes(optax.sgd(1.0), **kwargs)
