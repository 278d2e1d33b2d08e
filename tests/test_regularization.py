"""L1 / L2 / decoupled weight decay: against jax.grad of the penalties and optax, masks, states."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtricks
from jaxtricks import regularization


def make_params():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    return {
        "dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jax.random.normal(k2, (3,))},
        "embed": jax.random.normal(k3, (5, 2)),
        "norm": {"scale": 1.0 + jax.random.normal(k4, (3,))},
    }


def make_grads(params, seed=1):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves, strict=True)]
    )


def l1_penalty(params, strength, mask):
    leaves = [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m]
    return strength * sum(jnp.sum(jnp.abs(p)) for p in leaves)


def l2_penalty(params, strength, mask):
    leaves = [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m]
    return strength * sum(jnp.sum(p**2) for p in leaves)


ALL = {"dense": {"kernel": True, "bias": True}, "embed": True, "norm": {"scale": True}}
MATRICES = {"dense": {"kernel": True, "bias": False}, "embed": True, "norm": {"scale": False}}


def assert_tree_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


@pytest.mark.parametrize(
    "factory, penalty", [(jaxtricks.l1_regularization, l1_penalty),
                         (jaxtricks.l2_regularization, l2_penalty)], ids=["l1", "l2"]
)
@pytest.mark.parametrize(
    "mask, mask_tree",
    [(None, ALL), (MATRICES, MATRICES), (jaxtricks.decay_mask, MATRICES),
     ({"dense": False, "embed": True, "norm": False},  # a prefix of the params tree
      {"dense": {"kernel": False, "bias": False}, "embed": True, "norm": {"scale": False}})],
    ids=["none", "pytree", "callable", "prefix"],
)
def test_penalty_gradient_and_value_match_jax_grad(factory, penalty, mask, mask_tree):
    params, grads, strength = make_params(), make_grads(make_params()), 0.3
    tx = factory(strength, mask=mask, record_penalty=True)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    penalty_grad = jax.grad(penalty)(params, strength, mask_tree)
    assert_tree_close(updates, jax.tree.map(jnp.add, grads, penalty_grad), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.penalty, penalty(params, strength, mask_tree), rtol=1e-6)
    assert state.penalty.dtype == jnp.float32 and int(state.count) == 1
    # Masked-out leaves come back exactly as they were.
    if not mask_tree["norm"]["scale"]:
        np.testing.assert_array_equal(updates["norm"]["scale"], grads["norm"]["scale"])


def test_l1_and_l2_closed_forms():
    """The documented formulas, with numbers worked out by hand."""
    params = {"w": jnp.array([[2.0, -3.0], [0.0, 0.5]])}
    grads = {"w": jnp.ones((2, 2))}
    l1 = jaxtricks.l1_regularization(0.1, record_penalty=True)
    u1, s1 = l1.update(grads, l1.init(params), params)
    np.testing.assert_allclose(u1["w"], [[1.1, 0.9], [1.0, 1.1]], rtol=1e-6)
    np.testing.assert_allclose(s1.penalty, 0.1 * 5.5, rtol=1e-6)
    l2 = jaxtricks.l2_regularization(0.1, record_penalty=True)
    u2, s2 = l2.update(grads, l2.init(params), params)
    np.testing.assert_allclose(u2["w"], [[1.4, 0.4], [1.0, 1.1]], rtol=1e-6)
    np.testing.assert_allclose(s2.penalty, 0.1 * (4 + 9 + 0 + 0.25), rtol=1e-6)


@pytest.mark.parametrize("factory", [jaxtricks.l1_regularization, jaxtricks.l2_regularization],
                         ids=["l1", "l2"])
def test_penalty_is_not_recorded_by_default(factory):
    """Off by default: the same updates, penalty None, and no reduction in the compiled update."""
    params, grads = make_params(), make_grads(make_params())
    off, on = factory(0.3), factory(0.3, record_penalty=True)
    u_off, s_off = jax.jit(off.update)(grads, off.init(params), params)
    u_on, s_on = jax.jit(on.update)(grads, on.init(params), params)
    assert s_off.penalty is None and off.init(params).penalty is None and int(s_off.count) == 1
    assert float(s_on.penalty) > 0
    jax.tree.map(np.testing.assert_array_equal, u_off, u_on)
    hlo = jax.jit(off.update).lower(grads, off.init(params), params).as_text()
    assert "reduce" not in hlo
    assert "reduce" in jax.jit(on.update).lower(grads, on.init(params), params).as_text()
    with pytest.raises(ValueError, match="record_penalty must be True or False"):
        factory(0.3, record_penalty="yes")


def test_pytorch_sgd_weight_decay_is_l2_of_half_the_rate():
    """PyTorch SGD(weight_decay=wd): d_p = g + wd * w; here that is l2_regularization(wd / 2)."""
    params, grads, wd = make_params(), make_grads(make_params()), 1e-2
    tx = jaxtricks.l2_regularization(wd / 2)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert_tree_close(updates, jax.tree.map(lambda g, w: g + wd * w, grads, params), rtol=1e-6)


def test_schedule_as_strength_uses_the_count_before_the_update():
    strength = jaxtricks.linear_warmup(1.0, 4)  # 0, 0.25, 0.5, ...
    params = {"w": jnp.array([[1.0, -2.0]])}
    zeros = {"w": jnp.zeros((1, 2))}
    for factory, grad_of, penalty_of in [
        (jaxtricks.l1_regularization, lambda s: s * np.array([[1.0, -1.0]]), lambda s: 3.0 * s),
        (jaxtricks.l2_regularization, lambda s: 2 * s * np.array([[1.0, -2.0]]), lambda s: 5 * s),
        (jaxtricks.weight_decay, lambda s: s * np.array([[1.0, -2.0]]), None),
    ]:
        tx = factory(strength, record_penalty=True) if penalty_of else factory(strength)
        update = jax.jit(tx.update)
        state = tx.init(params)
        for t in range(3):
            s = t / 4
            updates, state = update(zeros, state, params)
            np.testing.assert_allclose(updates["w"], grad_of(s), rtol=1e-6, atol=1e-7)
            if penalty_of is not None:
                np.testing.assert_allclose(state.penalty, penalty_of(s), rtol=1e-6, atol=1e-7)
            else:
                np.testing.assert_allclose(state.rate, s, rtol=1e-6)
            assert int(state.count) == t + 1


@pytest.mark.parametrize("mask", [None, jaxtricks.decay_mask, MATRICES])
def test_weight_decay_equals_optax_add_decayed_weights(mask):
    params, grads = make_params(), make_grads(make_params())
    ours = jaxtricks.weight_decay(0.05, mask=mask)
    theirs = optax.add_decayed_weights(0.05, mask=mask)
    u_ours, _ = ours.update(grads, ours.init(params), params)
    u_theirs, _ = theirs.update(grads, theirs.init(params), params)
    assert_tree_close(u_ours, u_theirs, rtol=1e-7)


def test_weight_decay_after_adam_scaling_is_optax_adamw():
    """scale_by_adam -> weight_decay -> learning rate follows optax.adamw's trajectory."""
    lr, wd = 0.01, 0.1
    ours = optax.chain(optax.scale_by_adam(), jaxtricks.weight_decay(wd, mask=jaxtricks.decay_mask),
                       jaxtricks.scale_by_learning_rate(lr))
    theirs = optax.adamw(lr, weight_decay=wd, mask=jaxtricks.decay_mask)
    p_ours = p_theirs = make_params()
    s_ours, s_theirs = ours.init(p_ours), theirs.init(p_theirs)
    for seed in range(5):
        grads = make_grads(p_ours, seed=seed)
        u, s_ours = ours.update(grads, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_theirs = theirs.update(grads, s_theirs, p_theirs)
        p_theirs = optax.apply_updates(p_theirs, u)
    assert_tree_close(p_ours, p_theirs, rtol=1e-6, atol=1e-7)
    # The bias was not decayed but did move (Adam), and the kernel differs from plain Adam.
    adam = optax.adam(lr)
    p_adam, s_adam = make_params(), adam.init(make_params())
    for seed in range(5):
        u, s_adam = adam.update(make_grads(p_adam, seed=seed), s_adam, p_adam)
        p_adam = optax.apply_updates(p_adam, u)
    np.testing.assert_allclose(p_ours["dense"]["bias"], p_adam["dense"]["bias"], rtol=1e-6)
    assert not np.allclose(p_ours["dense"]["kernel"], p_adam["dense"]["kernel"], rtol=1e-6)


def test_decay_mask():
    params = {"kernel": jnp.ones((2, 3)), "conv": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(3),
              "scalar": jnp.ones(()),
              "nested": {"embedding": jnp.ones((7, 2)), "scale": jnp.ones(2)}}
    assert jaxtricks.decay_mask(params) == {
        "kernel": True, "conv": True, "bias": False, "scalar": False,
        "nested": {"embedding": True, "scale": False},
    }
    assert all(type(m) is bool for m in jax.tree.leaves(jaxtricks.decay_mask(params)))


@pytest.mark.parametrize(
    "factory", [jaxtricks.l1_regularization, jaxtricks.l2_regularization, jaxtricks.weight_decay]
)
def test_missing_params_is_a_clear_value_error(factory):
    tx = factory(0.1)
    params = make_params()
    with pytest.raises(ValueError, match="needs the current parameters.*params=None"):
        tx.update(make_grads(params), tx.init(params))


@pytest.mark.parametrize(
    "factory", [jaxtricks.l1_regularization, jaxtricks.l2_regularization, jaxtricks.weight_decay]
)
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1"])
def test_bad_strength_raises_value_error(factory, bad):
    name = "rate" if factory is jaxtricks.weight_decay else "strength"
    with pytest.raises(ValueError, match=name) as info:
        factory(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    "factory", [jaxtricks.l1_regularization, jaxtricks.l2_regularization, jaxtricks.weight_decay]
)
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_gradients_stay_bf16(factory, param_dtype):
    params = jax.tree.map(lambda p: p.astype(param_dtype), make_params())
    grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), make_grads(make_params()))
    record = {} if factory is jaxtricks.weight_decay else {"record_penalty": True}
    tx = factory(0.1, mask=jaxtricks.decay_mask, **record)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    if record:
        assert state.penalty.dtype == jnp.float32 and np.isfinite(state.penalty)


@pytest.mark.parametrize(
    "factory", [jaxtricks.l1_regularization, jaxtricks.l2_regularization, jaxtricks.weight_decay]
)
@pytest.mark.parametrize("strength", [0.1, jaxtricks.linear_warmup(0.1, 5)], ids=["float", "sched"])
def test_no_recompilation_on_the_second_update(factory, strength):
    tx = factory(strength, mask=jaxtricks.decay_mask)
    traces = 0

    @jax.jit
    def step(params, state, grads):
        nonlocal traces
        traces += 1
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = make_params()
    state = tx.init(params)
    for seed in range(3):
        params, state = step(params, state, make_grads(params, seed))
    assert traces == 1
    assert int(state.count) == 3


def test_works_inside_optax_masked_too():
    """Wrapped by optax.masked the state nests, and the penalty covers the unmasked leaves only."""
    params, grads = make_params(), make_grads(make_params())
    tx = optax.masked(jaxtricks.l2_regularization(0.2, record_penalty=True), jaxtricks.decay_mask)
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(state.inner_state.penalty, l2_penalty(params, 0.2, MATRICES),
                               rtol=1e-6)
    np.testing.assert_allclose(updates["norm"]["scale"], grads["norm"]["scale"])


def test_docstring_examples_run():
    result = doctest.testmod(regularization)
    assert result.attempted > 0 and result.failed == 0
