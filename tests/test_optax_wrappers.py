"""Every public factory under optax's wrappers: inject_hyperparams, MultiSteps, masked.

Expected updates come from numpy written from the formulas (clip, sign, Adam's moments), not from
the code under test. Under ``optax.inject_hyperparams`` a hyperparameter is changed between two
jitted updates by setting ``state.hyperparams[name]``, as optax's documentation shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtricks


def _tree(w, b):
    return {"w": np.array(w, np.float32), "b": np.array(b, np.float32)}


PARAMS = _tree([[1.0, -2.0], [0.5, 3.0]], [0.5, -1.0])
GRADS = _tree([[3.0, -1.0], [0.0, 2.0]], [-4.0, 1.5])
GRADS_2 = _tree([[-1.0, 0.5], [2.0, 1.0]], [1.0, 2.0])


def f32(x):
    """A strongly typed float32 scalar, the dtype inject_hyperparams keeps (no retrace)."""
    return jnp.asarray(x, jnp.float32)


def tree(t):
    return jax.tree.map(jnp.asarray, t)


def assert_tree_close(actual, expected, rtol=1e-6, atol=1e-7):
    assert jax.tree.structure(jax.tree.map(np.asarray, actual)) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- numpy references


def np_global_norm(t):
    return np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in t.values()))


def ref_clip_by_global_norm(g, w, max_norm):
    factor = min(1.0, max_norm / np_global_norm(g))
    return {k: v * factor for k, v in g.items()}


def ref_clip_by_value(g, w, max_abs):
    return {k: np.clip(v, -max_abs, max_abs) for k, v in g.items()}


def ref_l1(g, w, strength):
    return {k: g[k] + strength * np.sign(w[k]) for k in g}


def ref_l2(g, w, strength):
    return {k: g[k] + 2.0 * strength * w[k] for k in g}


def ref_weight_decay(g, w, rate):
    return {k: g[k] + rate * w[k] for k in g}


def ref_learning_rate(g, w, learning_rate):
    return {k: -learning_rate * v for k, v in g.items()}


def ref_adamw_first_update(g, w, learning_rate, clip_norm, l2, weight_decay, eps=1e-8):
    """make_optimizer(name="adamw") from a fresh state: Adam's corrected moments are g, g**2."""
    g = ref_l2(ref_clip_by_global_norm(g, w, clip_norm), w, l2)
    adam = {k: v / (np.abs(v) + eps) for k, v in g.items()}
    return ref_learning_rate(ref_weight_decay(adam, w, weight_decay), w, learning_rate)


# name: (factory, first hyperparameters, second hyperparameters, reference(g, w, **hp), stateless)
FACTORIES = {
    "clip_by_global_norm": (jaxtricks.clip_by_global_norm, {"max_norm": 1.0}, {"max_norm": 2.5},
                            ref_clip_by_global_norm, True),
    "clip_by_value": (jaxtricks.clip_by_value, {"max_abs": 1.0}, {"max_abs": 2.5},
                      ref_clip_by_value, True),
    "l1_regularization": (jaxtricks.l1_regularization, {"strength": 0.1}, {"strength": 0.7},
                          ref_l1, True),
    "l2_regularization": (jaxtricks.l2_regularization, {"strength": 0.01}, {"strength": 0.3},
                          ref_l2, True),
    "weight_decay": (jaxtricks.weight_decay, {"rate": 0.1}, {"rate": 0.5}, ref_weight_decay, True),
    "scale_by_learning_rate": (jaxtricks.scale_by_learning_rate, {"learning_rate": 0.1},
                               {"learning_rate": 0.02}, ref_learning_rate, True),
    "make_optimizer": (
        lambda **hp: jaxtricks.make_optimizer(name="adamw", **hp),
        {"learning_rate": 0.1, "clip_norm": 1.0, "l2": 0.01, "weight_decay": 0.1},
        None, ref_adamw_first_update, False,
    ),
}


def test_every_public_factory_is_covered():
    factories = {
        name for name in jaxtricks.__all__
        if callable(getattr(jaxtricks, name)) and not isinstance(getattr(jaxtricks, name), type)
    }
    not_transforms = {"global_norm", "decay_mask", "optimizer_stats"}
    schedules = {name for name in factories if name in dir(jaxtricks.schedules)}
    # the skips wrap a transform; zclip: inject_hyperparams in tests/test_adaptive_clipping.py
    assert factories - not_transforms - schedules == set(FACTORIES) | {
        "skip_nonfinite", "skip_spikes", "zclip"}


# --------------------------------------------------------------------------- inject_hyperparams


@pytest.mark.parametrize("name", [n for n, spec in FACTORIES.items() if spec[4]])
def test_inject_hyperparams_change_between_jitted_updates(name):
    factory, hp0, hp1, reference, _ = FACTORIES[name]
    tx = optax.inject_hyperparams(factory)(**hp0)
    traces = []

    def update(g, state, params):
        traces.append(1)
        return tx.update(g, state, params)

    update = jax.jit(update)
    state = tx.init(tree(PARAMS))
    updates, state = update(tree(GRADS), state, tree(PARAMS))
    assert_tree_close(updates, reference(GRADS, PARAMS, **hp0))

    (key, value), = hp1.items()
    assert float(state.hyperparams[key]) == pytest.approx(hp0[key])
    state.hyperparams[key] = f32(value)
    updates, state = update(tree(GRADS_2), state, tree(PARAMS))
    assert_tree_close(updates, reference(GRADS_2, PARAMS, **hp1))
    assert float(state.hyperparams[key]) == pytest.approx(value)
    assert len(traces) == 1  # a new value is data, not a new program


def test_inject_clip_by_global_norm_records_the_norm_and_the_injected_threshold():
    tx = optax.inject_hyperparams(jaxtricks.clip_by_global_norm)(max_norm=1.0)
    update = jax.jit(tx.update)
    state = tx.init(tree(PARAMS))
    norm = np_global_norm(GRADS)  # sqrt(9 + 1 + 4 + 16 + 2.25) = sqrt(32.25)
    assert norm == pytest.approx(5.6789083458)
    _, state = update(tree(GRADS), state)
    assert float(state.inner_state.grad_norm) == pytest.approx(norm, rel=1e-6)
    assert bool(state.inner_state.clipped)
    state.hyperparams["max_norm"] = f32(6.0)  # above the norm now: not clipped
    updates, state = update(tree(GRADS), state)
    assert not bool(state.inner_state.clipped)
    assert_tree_close(updates, GRADS)


def test_inject_a_schedule_as_learning_rate():
    """inject_hyperparams evaluates the schedule at its own count; the state records the value."""
    tx = optax.inject_hyperparams(jaxtricks.scale_by_learning_rate)(
        learning_rate=jaxtricks.linear_warmup(1.0, 4))
    update = jax.jit(tx.update)
    state = tx.init(tree(PARAMS))
    for t in range(3):
        updates, state = update(tree(GRADS), state)
        assert_tree_close(updates, ref_learning_rate(GRADS, PARAMS, t / 4))
        assert float(state.inner_state.learning_rate) == t / 4


def sgd_reference(g, w, learning_rate, clip_norm, l1, l2, weight_decay):
    """make_optimizer(name="sgd"): clip, + l1 sign(w), + 2 l2 w, + wd w, times -lr."""
    g = ref_clip_by_global_norm(g, w, clip_norm)
    g = ref_weight_decay(ref_l2(ref_l1(g, w, l1), w, l2), w, weight_decay)
    return ref_learning_rate(g, w, learning_rate)


def test_inject_make_optimizer_sgd_switches_a_trick_on_that_started_at_zero():
    """l1 and weight_decay start at 0; injected, they are arrays, stay in the chain, and can be
    switched on later (a Python 0 would have left them out of the chain for good)."""
    tx = optax.inject_hyperparams(jaxtricks.make_optimizer, static_args=("name",))(
        name="sgd", learning_rate=0.1, clip_norm=1.0, l2=0.01)
    update = jax.jit(tx.update)
    state = tx.init(tree(PARAMS))
    hp = dict(learning_rate=0.1, clip_norm=1.0, l1=0.0, l2=0.01, weight_decay=0.0)
    updates, state = update(tree(GRADS), state, tree(PARAMS))
    assert_tree_close(updates, sgd_reference(GRADS, PARAMS, **hp), rtol=1e-5)

    hp = dict(learning_rate=0.05, clip_norm=100.0, l1=0.5, l2=0.01, weight_decay=0.1)
    for key in ("learning_rate", "clip_norm", "l1", "weight_decay"):
        state.hyperparams[key] = f32(hp[key])
    updates, state = update(tree(GRADS_2), state, tree(PARAMS))
    assert_tree_close(updates, sgd_reference(GRADS_2, PARAMS, **hp), rtol=1e-5)
    stats = jaxtricks.optimizer_stats(state)
    assert float(stats["learning_rate"]) == np.float32(0.05)
    assert float(stats["grad_norm"]) == pytest.approx(np_global_norm(GRADS_2), rel=1e-6)
    assert float(stats["clipped"]) == 0.0


def test_inject_make_optimizer_adamw_two_updates_against_numpy_adam():
    tx = optax.inject_hyperparams(jaxtricks.make_optimizer, static_args=("name",))(
        name="adamw", learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    update = jax.jit(tx.update)
    state = tx.init(tree(PARAMS))
    updates_1, state = update(tree(GRADS), state, tree(PARAMS))
    state.hyperparams["learning_rate"] = f32(0.01)
    state.hyperparams["b1"] = f32(0.5)
    state.hyperparams["weight_decay"] = f32(0.5)
    updates_2, state = update(tree(GRADS_2), state, tree(PARAMS))

    # Adam (Kingma & Ba, algorithm 1), with the b1 in use at each step, as optax.scale_by_adam.
    want_1, want_2 = {}, {}
    for k in PARAMS:
        g1, g2, w = (GRADS[k].astype(np.float64), GRADS_2[k].astype(np.float64),
                     PARAMS[k].astype(np.float64))
        m, v = 0.1 * g1, 0.001 * g1**2
        want_1[k] = -0.1 * (m / 0.1 / (np.sqrt(v / 0.001) + 1e-8))
        m, v = 0.5 * m + 0.5 * g2, 0.999 * v + 0.001 * g2**2
        m_hat, v_hat = m / (1 - 0.5**2), v / (1 - 0.999**2)
        want_2[k] = -0.01 * (m_hat / (np.sqrt(v_hat) + 1e-8) + 0.5 * w)
    assert_tree_close(updates_1, want_1, rtol=1e-5, atol=1e-7)
    assert_tree_close(updates_2, want_2, rtol=1e-5, atol=1e-7)


def test_inject_make_optimizer_momentum_changes_the_trace_decay():
    tx = optax.inject_hyperparams(jaxtricks.make_optimizer, static_args=("name",))(
        name="momentum", learning_rate=0.1, momentum=0.9)
    update = jax.jit(tx.update)
    state = tx.init(tree(PARAMS))
    updates_1, state = update(tree(GRADS), state, tree(PARAMS))
    state.hyperparams["momentum"] = f32(0.5)
    updates_2, state = update(tree(GRADS_2), state, tree(PARAMS))
    # PyTorch's SGD momentum: buf = momentum * buf + g; update = -lr * buf.
    assert_tree_close(updates_1, {k: -0.1 * GRADS[k] for k in GRADS})
    assert_tree_close(updates_2, {k: -0.1 * (0.5 * GRADS[k] + GRADS_2[k]) for k in GRADS},
                      rtol=1e-5)


def test_inject_with_a_callable_mask_needs_static_args():
    factory = optax.inject_hyperparams(jaxtricks.weight_decay)
    with pytest.raises(ValueError, match="mask.*static_args"):
        factory(rate=0.1, mask=jaxtricks.decay_mask).init(tree(PARAMS))

    tx = optax.inject_hyperparams(jaxtricks.weight_decay, static_args=("mask",))(
        rate=0.1, mask=jaxtricks.decay_mask)
    update = jax.jit(tx.update)
    state = tx.init(tree(PARAMS))
    state.hyperparams["rate"] = f32(0.3)
    updates, _ = update(tree(GRADS), state, tree(PARAMS))
    assert_tree_close(updates, {"w": GRADS["w"] + 0.3 * PARAMS["w"], "b": GRADS["b"]})


def test_inject_make_optimizer_with_static_mask_leaves_the_bias_alone():
    tx = optax.inject_hyperparams(jaxtricks.make_optimizer, static_args=("name", "mask"))(
        name="sgd", learning_rate=1.0, l2=0.0, mask=jaxtricks.decay_mask)
    update = jax.jit(tx.update)
    state = tx.init(tree(PARAMS))
    state.hyperparams["l2"] = f32(0.25)
    zeros = jax.tree.map(jnp.zeros_like, tree(PARAMS))
    updates, _ = update(zeros, state, tree(PARAMS))
    assert_tree_close(updates, {"w": -0.5 * PARAMS["w"], "b": np.zeros(2, np.float32)})


def test_inject_make_optimizer_with_bf16_parameters():
    """bf16 gradients give bf16 updates with float32 hyperparameters too (Adam's arithmetic in
    float32 would otherwise promote them); the first Adam update is -lr * g / (|g| + eps)."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), PARAMS)
    grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), GRADS)
    factory = optax.inject_hyperparams(jaxtricks.make_optimizer, static_args=("name",),
                                       hyperparam_dtype=jnp.float32)
    tx = factory(name="adamw", learning_rate=0.1, weight_decay=0.1)
    update = jax.jit(tx.update)
    updates, _ = update(grads, tx.init(params), params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    g = jax.tree.map(lambda x: np.asarray(x, np.float32), grads)
    w = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    want = {k: -0.1 * (g[k] / (np.abs(g[k]) + 1e-8) + 0.1 * w[k]) for k in g}
    assert_tree_close(jax.tree.map(lambda x: np.asarray(x, np.float32), updates), want,
                      rtol=1e-2, atol=1e-3)
    # In the parameters' dtype (the wrapper's default), b2 = 0.999 rounds to 1: refused, named.
    bf16_factory = optax.inject_hyperparams(jaxtricks.make_optimizer, static_args=("name",))
    with pytest.raises(ValueError, match=r"^b2 must satisfy 0 <= b2 < 1"):
        bf16_factory(name="adamw").init(params)


# --------------------------------------------------------------------------- bad values


BAD = [
    (jaxtricks.clip_by_global_norm, "max_norm", -1.0),
    (jaxtricks.clip_by_global_norm, "max_norm", float("nan")),
    (jaxtricks.clip_by_value, "max_abs", 0.0),
    (jaxtricks.l1_regularization, "strength", -0.1),
    (jaxtricks.l2_regularization, "strength", float("inf")),
    (jaxtricks.weight_decay, "rate", -0.5),
    (jaxtricks.scale_by_learning_rate, "learning_rate", -0.1),
    (jaxtricks.make_optimizer, "learning_rate", -1.0),
    (jaxtricks.make_optimizer, "b2", 1.0),
    (jaxtricks.make_optimizer, "eps", 0.0),
    (jaxtricks.make_optimizer, "clip_norm", -1.0),
    (jaxtricks.make_optimizer, "momentum", 1.5),
    (jaxtricks.make_optimizer, "weight_decay", -0.1),
]


@pytest.mark.parametrize("factory, arg, bad", BAD, ids=lambda x: getattr(x, "__name__", str(x)))
def test_bad_values_as_concrete_arrays_are_refused_naming_the_argument(factory, arg, bad):
    with pytest.raises(ValueError, match=rf"^{arg} must"):
        factory(**{arg: jnp.asarray(bad)})
    with pytest.raises(ValueError, match=rf"^{arg} must"):
        factory(**{arg: np.float32(bad)})
    # Through inject_hyperparams, the value reaches the factory as an array at init.
    with pytest.raises(ValueError, match=rf"^{arg} must"):
        optax.inject_hyperparams(factory)(**{arg: bad}).init(tree(PARAMS))


@pytest.mark.parametrize("factory, arg, _", BAD[::2], ids=lambda x: getattr(x, "__name__", ""))
def test_non_scalar_arrays_are_refused(factory, arg, _):
    with pytest.raises(ValueError, match=rf"^{arg} must be a real number \(a scalar\)"):
        factory(**{arg: jnp.ones(2)})
    with pytest.raises(ValueError, match=rf"^{arg} must be a real number \(a scalar\)"):
        factory(**{arg: np.ones((1,), np.float32)})


def test_a_non_scalar_injected_value_is_refused_under_jit_too():
    """A traced value's number is unknown, but its shape is known and checked."""
    tx = optax.inject_hyperparams(jaxtricks.clip_by_global_norm)(max_norm=1.0)
    state = tx.init(tree(PARAMS))
    state.hyperparams["max_norm"] = jnp.ones(2, jnp.float32)
    with pytest.raises(ValueError, match=r"^max_norm must be a real number \(a scalar\)"):
        jax.jit(tx.update)(tree(GRADS), state)


def test_a_bad_injected_value_is_refused_by_an_eager_update():
    tx = optax.inject_hyperparams(jaxtricks.l2_regularization)(strength=0.1)
    state = tx.init(tree(PARAMS))
    state.hyperparams["strength"] = f32(-1.0)
    with pytest.raises(ValueError, match=r"^strength must be a finite number >= 0"):
        tx.update(tree(GRADS), state, tree(PARAMS))


# --------------------------------------------------------------------------- MultiSteps, masked


@pytest.mark.parametrize("name", list(FACTORIES))
def test_multisteps_applies_the_transform_to_the_mean_gradient(name):
    factory, hp0, _, reference, _ = FACTORIES[name]
    tx = optax.MultiSteps(factory(**hp0), every_k_schedule=2)
    update = jax.jit(tx.update)
    state = tx.init(tree(PARAMS))
    updates, state = update(tree(GRADS), state, tree(PARAMS))
    assert_tree_close(updates, jax.tree.map(np.zeros_like, GRADS))  # accumulating
    updates, state = update(tree(GRADS_2), state, tree(PARAMS))
    mean = {k: (GRADS[k] + GRADS_2[k]) / 2 for k in GRADS}
    assert_tree_close(updates, reference(mean, PARAMS, **hp0), rtol=1e-5)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_masked_transforms_only_the_masked_leaves(name):
    factory, hp0, _, reference, _ = FACTORIES[name]
    tx = optax.masked(factory(**hp0), {"w": True, "b": False})
    update = jax.jit(tx.update)
    updates, _ = update(tree(GRADS), tx.init(tree(PARAMS)), tree(PARAMS))
    # The inner transform sees the "w" subtree only (a global norm is the norm of "w" alone).
    want = reference({"w": GRADS["w"]}, {"w": PARAMS["w"]}, **hp0)
    assert_tree_close(updates, {"w": want["w"], "b": GRADS["b"]}, rtol=1e-5)


# --------------------------------------------------------------------------- skip_nonfinite


def with_nan(t, key="w"):
    out = {k: v.copy() for k, v in t.items()}
    out[key][0, 0] = np.nan
    return out


def test_skip_nonfinite_inside_an_injected_make_optimizer():
    tx = optax.inject_hyperparams(jaxtricks.make_optimizer, static_args=("name",))(
        name="sgd", learning_rate=0.1, skip_nonfinite=True)
    update = jax.jit(tx.update)
    state = tx.init(tree(PARAMS))
    updates, state = update(tree(with_nan(GRADS)), state, tree(PARAMS))
    assert_tree_close(updates, jax.tree.map(np.zeros_like, GRADS))
    assert int(jaxtricks.optimizer_stats(state)["skipped"]) == 1

    state.hyperparams["learning_rate"] = f32(0.5)
    updates, state = update(tree(GRADS), state, tree(PARAMS))
    assert_tree_close(updates, {k: -0.5 * v for k, v in GRADS.items()})
    stats = jaxtricks.optimizer_stats(state)
    assert float(stats["learning_rate"]) == 0.5
    assert (int(stats["skipped"]), int(stats["consecutive_skipped"])) == (1, 0)


def test_skip_nonfinite_around_an_injected_optimizer_keeps_its_count():
    """A skipped step leaves the inner inject_hyperparams state as it was: its count too."""
    tx = jaxtricks.skip_nonfinite(optax.inject_hyperparams(optax.sgd)(
        learning_rate=jaxtricks.linear_warmup(1.0, 4)))
    update = jax.jit(tx.update)
    state = tx.init(tree(PARAMS))
    _, state = update(tree(GRADS), state, tree(PARAMS))  # lr(0) = 0
    _, state = update(tree(with_nan(GRADS)), state, tree(PARAMS))  # skipped
    updates, state = update(tree(GRADS), state, tree(PARAMS))  # lr(1) = 0.25
    assert_tree_close(updates, {k: -0.25 * v for k, v in GRADS.items()})
    assert int(state.inner_state.count) == 2 and int(state.total_skipped) == 1


def test_skip_nonfinite_under_multisteps_skips_a_nan_mean():
    tx = optax.MultiSteps(jaxtricks.skip_nonfinite(optax.sgd(0.1)), every_k_schedule=2)
    update = jax.jit(tx.update)
    state = tx.init(tree(PARAMS))
    _, state = update(tree(GRADS), state, tree(PARAMS))
    updates, state = update(tree(GRADS_2), state, tree(PARAMS))
    assert_tree_close(updates, {k: -0.1 * (GRADS[k] + GRADS_2[k]) / 2 for k in GRADS})
    assert int(state.inner_opt_state.total_skipped) == 0
    # A NaN in one mini-step makes the mean NaN: the inner step is skipped. (optax's accumulator
    # stays NaN after that, 0 * NaN; MultiSteps' should_skip_update_fn is optax's guard for it.)
    _, state = update(tree(with_nan(GRADS)), state, tree(PARAMS))
    updates, state = update(tree(GRADS_2), state, tree(PARAMS))
    assert_tree_close(updates, jax.tree.map(np.zeros_like, GRADS))
    assert int(state.inner_opt_state.total_skipped) == 1
    assert bool(state.inner_opt_state.last_skipped)


def test_skip_nonfinite_under_masked_checks_the_masked_leaves_only():
    tx = optax.masked(jaxtricks.skip_nonfinite(optax.sgd(0.1)), {"w": True, "b": False})
    update = jax.jit(tx.update)
    state = tx.init(tree(PARAMS))
    # A NaN in "w" (masked in): the inner update is skipped; "b" passes through untouched.
    updates, state = update(tree(with_nan(GRADS)), state, tree(PARAMS))
    assert_tree_close(updates, {"w": np.zeros((2, 2), np.float32), "b": GRADS["b"]})
    assert int(state.inner_state.total_skipped) == 1
    # A NaN in "b" only (masked out): the inner transform never sees it.
    nan_b = {"w": GRADS["w"], "b": np.array([np.nan, 1.0], np.float32)}
    updates, state = update(tree(nan_b), state, tree(PARAMS))
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * GRADS["w"], rtol=1e-6)
    assert np.isnan(np.asarray(updates["b"])[0])
    assert int(state.inner_state.total_skipped) == 1
