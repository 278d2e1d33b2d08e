"""make_optimizer, optimizer_stats and the config builders: a PyTorch recipe, optax, numpy."""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtricks
from jaxtricks import optimizer

# --------------------------------------------------------------------------- a PyTorch recipe
# Warmup, exponential decay, SGD with weight decay and clipping, as one PyTorch loop (one "epoch"
# = one update here):
#
#   optimizer = SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
#   lr_decay_scheduler = ExponentialLR(optimizer, gamma=0.99)
#   warmup_scheduler = LambdaLR(optimizer, lambda epoch: min(1.0, epoch / 10))
#   for epoch in range(30):
#       if epoch < 10: warmup_scheduler.step()
#       else: lr_decay_scheduler.step()
#       loss.backward(); clip_grad_norm_(model.parameters(), 1.0); optimizer.step()

BASE_LR, GAMMA, WARMUP, WD, CLIP, EPOCHS = 0.1, 0.99, 10, 1e-4, 1.0, 30


def torch_source_loop_lrs(epochs):
    """The lr each epoch trains with, from torch.optim.lr_scheduler's documented semantics.

    Constructing a scheduler steps it once (last_epoch -1 -> 0). ExponentialLR at last_epoch 0
    leaves lr at 0.1 and records initial_lr = 0.1; LambdaLR then sets lr = initial_lr * f(0) = 0.
    Each later step: LambdaLR sets lr = initial_lr * f(last_epoch); ExponentialLR (chainable form)
    multiplies the current lr by gamma. The loop steps a scheduler *before* training each epoch.
    """
    lam = lambda e: min(1.0, e / WARMUP)  # noqa: E731
    lr = BASE_LR * lam(0)
    warmup_last_epoch = 0
    lrs = []
    for epoch in range(epochs):
        if epoch < WARMUP:
            warmup_last_epoch += 1
            lr = BASE_LR * lam(warmup_last_epoch)
        else:
            lr = lr * GAMMA
        lrs.append(lr)
    return lrs


# A least-squares problem whose gradient norm starts above the clip threshold and drops below it
# at update 15, so both regimes of clip_grad_norm_ are exercised.
RNG = np.random.default_rng(0)
X = 1.5 * RNG.normal(size=(16, 4))
W_TRUE = RNG.normal(size=(4, 2))
Y = X @ W_TRUE + 0.1 * RNG.normal(size=(16, 2))
W0, B0 = W_TRUE + 0.5 * RNG.normal(size=(4, 2)), 0.5 * RNG.normal(size=(2,))


def torch_source_loop_trajectory(epochs):
    """Parameters after each update, in float64, as PyTorch's SGD + clip_grad_norm_ compute them."""
    w, b = W0.copy(), B0.copy()
    trajectory, clipped = [], []
    for lr in torch_source_loop_lrs(epochs):
        residual = X @ w + b - Y  # loss = 0.5 * mean_n ||x_n w + b - y_n||^2
        gw, gb = X.T @ residual / len(X), residual.sum(0) / len(X)
        # clip_grad_norm_(params, 1.0): coef = max_norm / (total_norm + 1e-6), clamped at 1.
        total_norm = math.sqrt(np.sum(gw**2) + np.sum(gb**2))
        coef = min(1.0, CLIP / (total_norm + 1e-6))
        gw, gb = gw * coef, gb * coef
        # SGD(weight_decay=wd).step(): d_p = grad + wd * p (after the clip), p -= lr * d_p.
        w, b = w - lr * (gw + WD * w), b - lr * (gb + WD * b)
        trajectory.append((w.copy(), b.copy()))
        clipped.append(coef < 1.0)
    return trajectory, clipped


def loss_fn(params):
    residual = jnp.asarray(X, jnp.float32) @ params["w"] + params["b"] - jnp.asarray(Y, jnp.float32)
    return 0.5 * jnp.mean(jnp.sum(residual**2, axis=1))


def run_jaxtricks(tx, epochs):
    params = {"w": jnp.asarray(W0, jnp.float32), "b": jnp.asarray(B0, jnp.float32)}

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, optimizer.optimizer_stats(state)

    state = tx.init(params)
    trajectory, stats = [], []
    for _ in range(epochs):
        params, state, s = step(params, state)
        trajectory.append(params)
        stats.append(s)
    return trajectory, stats


# The step-index convention. optax evaluates a schedule at the count *before* the update, so update
# i (from 0) uses schedule(i): warmup_then(10, ...) gives 0, 0.01, ..., 0.09, then 0.1 at i = 10.
# The source's loop calls scheduler.step() *before* training each epoch, so epoch e trains with the
# lr of index e + 1: 0.01, ..., 0.1 (epoch 9), then 0.1 * 0.99 ** (e - 9). The exact equivalent of
# that loop is therefore the recipe evaluated one step ahead.
RECIPE = jaxtricks.warmup_then(WARMUP, jaxtricks.exponential_decay(BASE_LR, -math.log(GAMMA)))


def as_in_source(step):
    return RECIPE(step + 1)


def test_source_loop_learning_rates_are_the_recipe_one_step_ahead():
    torch_lrs = torch_source_loop_lrs(EPOCHS)
    # Spot-check the emulation against values worked out by hand from the PyTorch docs.
    assert torch_lrs[0] == pytest.approx(0.01) and torch_lrs[9] == pytest.approx(0.1)
    assert torch_lrs[10] == pytest.approx(0.099) and torch_lrs[12] == pytest.approx(0.1 * 0.99**3)
    ours = [float(as_in_source(jnp.asarray(e, jnp.int32))) for e in range(EPOCHS)]
    np.testing.assert_allclose(ours, torch_lrs, rtol=2e-6)
    # Without the shift, the first update would use lr 0 and every later one lags by one step.
    assert float(RECIPE(0)) == 0.0


def test_source_pytorch_recipe_trajectory():
    want, torch_clipped = torch_source_loop_trajectory(EPOCHS)
    assert any(torch_clipped) and not all(torch_clipped)  # both regimes are exercised
    tx = jaxtricks.make_optimizer(name="sgd", learning_rate=as_in_source, clip_norm=CLIP,
                                  l2=WD / 2)
    got, stats = run_jaxtricks(tx, EPOCHS)
    for (w, b), params in zip(want, got, strict=True):
        np.testing.assert_allclose(params["w"], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(params["b"], b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(s["learning_rate"]) for s in stats],
                               torch_source_loop_lrs(EPOCHS), rtol=2e-6)
    assert [bool(s["clipped"]) for s in stats] == torch_clipped

    # The details matter: a wrong L2 factor, or the unshifted schedule, leaves the trajectory.
    for wrong in (
        jaxtricks.make_optimizer(name="sgd", learning_rate=as_in_source, clip_norm=CLIP, l2=WD),
        jaxtricks.make_optimizer(name="sgd", learning_rate=RECIPE, clip_norm=CLIP, l2=WD / 2),
    ):
        off, _ = run_jaxtricks(wrong, EPOCHS)
        assert not np.allclose(off[-1]["w"], want[-1][0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- equivalence with optax


def params_and_grads(seed=0, n=4):
    key = jax.random.key(seed)
    k1, k2, *ks = jax.random.split(key, 2 + n)
    params = {"kernel": jax.random.normal(k1, (3, 4)), "bias": jax.random.normal(k2, (4,))}
    grads = [jax.tree.map(lambda p, k=k: 3.0 * jax.random.normal(k, p.shape), params) for k in ks]
    return params, grads


def run(tx, params, grads_seq):
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


SCHEDULE = jaxtricks.warmup_then(2, jaxtricks.cosine_decay(0.05, 10))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (dict(name="sgd", learning_rate=0.1), optax.sgd(0.1)),
        (dict(name="momentum", learning_rate=0.1, momentum=0.8), optax.sgd(0.1, momentum=0.8)),
        (dict(name="adam", learning_rate=SCHEDULE, b1=0.8, b2=0.95, eps=1e-6),
         optax.adam(SCHEDULE, b1=0.8, b2=0.95, eps=1e-6)),
        (dict(name="adamw", learning_rate=0.01), optax.adam(0.01)),  # weight_decay=0: Adam
        (dict(name="adamw", learning_rate=0.01, weight_decay=0.1, mask=jaxtricks.decay_mask),
         optax.adamw(0.01, weight_decay=0.1, mask=jaxtricks.decay_mask)),
        (dict(name="adam", learning_rate=0.01, clip_norm=1.0),
         optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.01))),
        # Coupled L2 sits before the scaling: Adam sees g + 2 * l2 * w.
        (dict(name="adam", learning_rate=0.01, l2=0.05),
         optax.chain(optax.add_decayed_weights(0.1), optax.adam(0.01))),
        (dict(name="momentum", learning_rate=0.1, clip_norm=2.0, l2=0.05, skip_nonfinite=True),
         optax.chain(optax.clip_by_global_norm(2.0), optax.add_decayed_weights(0.1),
                     optax.sgd(0.1, momentum=0.9))),
    ],
    ids=["sgd", "momentum", "adam-schedule", "adamw-no-decay", "adamw", "clip-adam", "l2-adam",
         "everything-momentum"],
)
def test_make_optimizer_equals_optax(ours, theirs):
    params, grads = params_and_grads()
    p_ours, _ = run(jaxtricks.make_optimizer(**ours), params, grads)
    p_theirs, _ = run(theirs, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7),
                 p_ours, p_theirs)


def test_chain_order_clip_acts_on_the_raw_gradient_before_l1():
    """update = -lr * (g / max(1, |g| / c) + l1 * sign(w)), computed by hand."""
    params = {"w": jnp.array([[2.0, -1.0]])}
    grads = {"w": jnp.array([[6.0, 8.0]])}  # norm 10
    tx = jaxtricks.make_optimizer(name="sgd", learning_rate=0.5, clip_norm=2.0, l1=0.1,
                                  record_penalties=True)
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * np.array([[1.2 + 0.1, 1.6 - 0.1]]), rtol=1e-6)
    stats = jaxtricks.optimizer_stats(state)
    assert float(stats["grad_norm"]) == pytest.approx(10.0)
    assert float(stats["l1_penalty"]) == pytest.approx(0.1 * 3.0)


def test_zero_or_none_leaves_a_trick_out_of_the_chain():
    params, grads = params_and_grads(n=1)

    def state_types(tx):
        state = tx.init(params)
        _, state = tx.update(grads[0], state, params)
        nodes = []
        jax.tree_util.tree_flatten(state, is_leaf=lambda n: nodes.append(type(n)) or False)
        return set(nodes)

    off = state_types(jaxtricks.make_optimizer(name="sgd", l1=0.0, l2=None, weight_decay=0))
    assert not off & {jaxtricks.L1RegularizationState, jaxtricks.L2RegularizationState,
                      jaxtricks.WeightDecayState, jaxtricks.SkipNonfiniteState}
    assert {jaxtricks.ClipByGlobalNormState, jaxtricks.LearningRateState} <= off
    on = state_types(jaxtricks.make_optimizer(name="sgd", l1=0.1, l2=0.1, weight_decay=0.1,
                                              skip_nonfinite=True))
    assert {jaxtricks.L1RegularizationState, jaxtricks.L2RegularizationState,
            jaxtricks.WeightDecayState, jaxtricks.SkipNonfiniteState} <= on


# --------------------------------------------------------------------------- optimizer_stats


def test_optimizer_stats_under_jit_reads_every_state():
    params = {"w": jnp.array([[3.0, -4.0]]), "b": jnp.array([1.0])}
    lr = jaxtricks.linear_warmup(1.0, 4)
    tx = jaxtricks.make_optimizer(name="sgd", learning_rate=lr, clip_norm=1.0, l1=0.5, l2=0.25,
                                  weight_decay=0.1, mask=jaxtricks.decay_mask,
                                  skip_nonfinite=True, record_penalties=True)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, jaxtricks.optimizer_stats(state)

    state = tx.init(params)
    grads = {"w": jnp.array([[0.0, 0.0]]), "b": jnp.array([2.0])}  # norm 2 -> clipped
    p1, state, stats = step(params, state, grads)
    assert set(stats) == {"learning_rate", "grad_norm", "clipped", "skipped",
                          "consecutive_skipped", "skipped_step", "l1_penalty", "l2_penalty"}
    assert all(isinstance(v, jax.Array) and v.shape == () for v in stats.values())
    assert float(stats["learning_rate"]) == 0.0  # the first update uses step 0
    assert float(stats["grad_norm"]) == pytest.approx(2.0) and float(stats["clipped"]) == 1.0
    assert float(stats["l1_penalty"]) == pytest.approx(0.5 * 7.0)  # the bias is masked out
    assert float(stats["l2_penalty"]) == pytest.approx(0.25 * 25.0)
    assert int(stats["skipped"]) == 0 and float(stats["skipped_step"]) == 0.0

    small = {"w": jnp.array([[0.3, 0.0]]), "b": jnp.array([0.4])}
    p2, state, stats = step(p1, state, small)
    assert float(stats["learning_rate"]) == pytest.approx(0.25)
    assert float(stats["grad_norm"]) == pytest.approx(0.5) and float(stats["clipped"]) == 0.0

    nan = {"w": jnp.array([[jnp.nan, 0.0]]), "b": jnp.array([0.4])}
    p3, state, stats = step(p2, state, nan)
    jax.tree.map(np.testing.assert_array_equal, p3, p2)
    assert int(stats["skipped"]) == 1 and int(stats["consecutive_skipped"]) == 1
    assert float(stats["skipped_step"]) == 1.0
    # The inner states were kept: the stats still describe the last applied update.
    assert float(stats["learning_rate"]) == pytest.approx(0.25)
    assert float(stats["grad_norm"]) == pytest.approx(0.5)


def test_optimizer_stats_without_clipping_still_has_the_norm():
    tx = jaxtricks.make_optimizer(name="adam", clip_norm=None)
    params = {"w": jnp.ones(2)}
    _, state = tx.update({"w": jnp.array([30.0, 40.0])}, tx.init(params), params)
    stats = jaxtricks.optimizer_stats(state)
    assert float(stats["grad_norm"]) == pytest.approx(50.0) and float(stats["clipped"]) == 0.0
    assert int(stats["skipped"]) == 0 and "l1_penalty" not in stats
    # In the chain but not recorded (make_optimizer's default): no penalty keys either.
    tx = jaxtricks.make_optimizer(name="adam", l1=0.1, l2=0.1)
    _, state = tx.update({"w": jnp.array([30.0, 40.0])}, tx.init(params), params)
    assert not {"l1_penalty", "l2_penalty"} & set(jaxtricks.optimizer_stats(state))


def test_optimizer_stats_finds_states_in_a_users_own_chain():
    l1 = jaxtricks.l1_regularization(0.5, record_penalty=True)
    tx = optax.chain(optax.masked(l1, {"w": True, "b": False}),
                     jaxtricks.clip_by_global_norm(10.0), optax.adam(0.1))
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([5.0])}
    _, state = tx.update({"w": jnp.ones(2), "b": jnp.ones(1)}, tx.init(params), params)
    stats = jaxtricks.optimizer_stats({"opt_state": state, "step": 3})  # any enclosing pytree
    assert float(stats["l1_penalty"]) == pytest.approx(1.5)
    assert "learning_rate" not in stats and float(stats["clipped"]) == 0.0


def test_flax_nnx_parameters_with_decay_mask():
    """nnx.split's State (Param-wrapped leaves) works with masks, penalties and stats."""
    from flax import nnx

    _, params = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(lambda p: p + 0.5, params)  # a non-zero bias, to see it is masked out
    tx = jaxtricks.make_optimizer(name="sgd", learning_rate=1.0, l1=0.1,
                                  mask=jaxtricks.decay_mask, record_penalties=True)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"][...], -0.1 * np.sign(params["kernel"][...]))
    np.testing.assert_array_equal(updates["bias"][...], 0.0)
    want = 0.1 * float(jnp.sum(jnp.abs(params["kernel"][...])))
    assert float(jaxtricks.optimizer_stats(state)["l1_penalty"]) == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------- compilation, dtypes


def test_no_recompilation_on_the_second_update():
    tx = jaxtricks.make_optimizer(name="adamw", learning_rate=SCHEDULE, clip_norm=1.0, l1=1e-3,
                                  l2=jaxtricks.linear_warmup(1e-3, 3), weight_decay=0.01,
                                  mask=jaxtricks.decay_mask, skip_nonfinite=True)
    traces = 0

    @jax.jit
    def step(params, state, grads):
        nonlocal traces
        traces += 1
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, grads = params_and_grads(n=3)
    state = tx.init(params)
    for g in grads:
        params, state = step(params, state, g)
    assert traces == 1
    assert int(jaxtricks.optimizer_stats(state)["skipped"]) == 0


@pytest.mark.parametrize("name", ["sgd", "momentum"])
def test_bf16_parameters_and_gradients_stay_bf16(name):
    params = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    tx = jaxtricks.make_optimizer(name=name, learning_rate=0.1, clip_norm=1.0, l1=0.01, l2=0.01,
                                  weight_decay=0.01, skip_nonfinite=True)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert jaxtricks.optimizer_stats(state)["grad_norm"].dtype == jnp.float32


def test_adamw_keeps_bf16_gradients_bf16_and_matches_a_float32_computation():
    """bf16 params and gradients give bf16 updates, equal to numpy Adam in float32 (Kingma & Ba,
    algorithm 1, then clip / L2 / decoupled decay as documented) to bf16 precision."""
    rng = np.random.default_rng(0)
    shapes = {"w": (8, 4), "b": (4,)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.bfloat16) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.normal(size=s), jnp.bfloat16) for k, s in shapes.items()}
             for _ in range(3)]
    lr, b1, b2, eps, clip_norm, l2, wd = 0.01, 0.9, 0.999, 1e-8, 2.0, 0.01, 0.1
    tx = jaxtricks.make_optimizer(name="adamw", learning_rate=lr, b1=b1, b2=b2, eps=eps,
                                  clip_norm=clip_norm, l2=l2, weight_decay=wd)
    update = jax.jit(tx.update)
    state = tx.init(params)

    w = {k: np.asarray(v, np.float32) for k, v in params.items()}  # bf16 -> f32 is exact
    m = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    v = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    for t, g_bf16 in enumerate(grads, start=1):
        updates, state = update(g_bf16, state, params)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))

        g = {k: np.asarray(x, np.float32) for k, x in g_bf16.items()}
        norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
        assert norm > clip_norm  # the clip is exercised
        for k in shapes:
            gk = g[k] * min(1.0, clip_norm / norm) + 2 * l2 * w[k]
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk**2
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            want = -lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * w[k])
            # bf16 keeps 8 significant bits (relative step 2**-8); the moments are bf16 too.
            np.testing.assert_allclose(np.asarray(updates[k], np.float32), want,
                                       rtol=3e-2, atol=lr * 2e-2)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, argument, value",
    [(dict(name="rmsprop"), "name", "'rmsprop'"),
     (dict(learning_rate=-0.1), "learning_rate", "-0.1"),
     (dict(learning_rate=float("nan")), "learning_rate", "nan"),
     (dict(momentum=1.0), "momentum", "1.0"),
     (dict(b1=-0.1), "b1", "-0.1"),
     (dict(b2=1.5), "b2", "1.5"),
     (dict(eps=0.0), "eps", "0.0"),
     (dict(clip_norm=0.0), "clip_norm", "0.0"),
     (dict(clip_norm=-1.0), "clip_norm", "-1.0"),
     (dict(clip_norm=float("nan")), "clip_norm", "nan"),
     (dict(l1=-1e-3), "l1", "-0.001"),
     (dict(l2=float("inf")), "l2", "inf"),
     (dict(weight_decay=-0.1), "weight_decay", "-0.1")],
)
def test_make_optimizer_bad_arguments(kwargs, argument, value):
    with pytest.raises(ValueError) as info:
        jaxtricks.make_optimizer(**kwargs)
    message = str(info.value)
    assert argument in message and value in message, message


def test_bad_name_lists_the_allowed_names():
    with pytest.raises(ValueError, match="sgd, momentum, adam, adamw"):
        jaxtricks.make_optimizer(name="lion")


def test_missing_params_with_regularization_is_a_clear_error():
    tx = jaxtricks.make_optimizer(l2=0.1)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="l2_regularization needs the current parameters"):
        tx.update(params, tx.init(params))


def test_docstring_examples_run():
    result = doctest.testmod(optimizer)
    assert result.attempted > 0 and result.failed == 0
