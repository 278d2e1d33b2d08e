"""The train step: jit and pmap wrappers of one per-device function agree, and it learns."""

import dataclasses
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.lm import config as config_lib
from jaxtricks.lm.step import accumulate_gradients, cross_entropy, make_steps
from jaxtricks.lm.training import init

TINY = ["data.tokenizer=byte",  # bytes: smaller and quicker than the default BPE
        "model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
        "model.max_seq_len=16", "data.seq_len=16", "train.batch_size=8", "train.steps=50",
        "optimizer.warmup_steps=0"]


# tests/test_training.py's tiny run: the same train and eval steps, which the session's
# compilation cache (tests/conftest.py) then compiles once for both.
TRAINING_TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
                 "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=8",
                 "train.steps=6", "optimizer.warmup_steps=0"]


def _setup(overrides=(), parallelism="single"):
    config = config_lib.load(None, TINY + list(overrides))
    start = init(config)
    steps = make_steps(start.graphdef, start.rest, start.optimizer, start.state, parallelism,
                       microbatches=config.train.microbatches)
    return config, steps, start.state


def _batch(seed=0, batch=8, seq=16):
    tokens = np.random.default_rng(seed).integers(0, 257, (batch, seq + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def test_cross_entropy_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.array([[0, 4, 2], [1, 1, 3]], np.int32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), targets), expected, rtol=1e-6)


def test_metrics_and_no_recompilation(compile_log):
    config, steps, state = _setup(TRAINING_TINY)
    state = steps.put_state(state)
    rng = jax.random.key(0)
    with compile_log:
        state, metrics = steps.train(state, steps.put_batch(_batch(0, seq=32)), rng)
        assert compile_log.count("train_step") == 1, compile_log.names
        for key in ("loss", "learning_rate", "grad_norm", "clipped", "skipped", "skipped_step"):
            assert key in metrics, key
        assert int(state.step) == 1
        # The returned (donated, device-resident) state and new batches: nothing compiled again.
        for i in range(1, 4):
            state, metrics = steps.train(state, steps.put_batch(_batch(i, seq=32)), rng)
        assert compile_log.count("train_step") == 1, compile_log.names
    assert steps.train._cache_size() == 1
    assert int(state.step) == 4 and np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
def test_overfits_one_batch():
    # A model that can learn drives the loss on one repeated batch close to zero.
    _, steps, state = _setup(["optimizer.learning_rate=1e-2", "optimizer.schedule=constant"])
    state = steps.put_state(state)
    batch = steps.put_batch(_batch(0, batch=4, seq=16))
    rng = jax.random.key(0)
    for _ in range(150):
        state, metrics = steps.train(state, batch, rng)
    assert float(metrics["loss"]) < 0.1, float(metrics["loss"])


def _numpy_cross_entropy(logits, targets):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, targets[..., None], -1).mean()


def test_eval_step_is_the_loss_without_dropout():
    from flax import nnx

    from jaxtricks.lm.model import Transformer

    config, steps, state = _setup([*TRAINING_TINY, "model.dropout=0.5"])
    batch = _batch(1, seq=32)
    got = float(steps.eval(state.params, steps.put_batch(batch)))
    # The same parameters (same seed) in a model built without dropout, and numpy's loss.
    model = Transformer(dataclasses.replace(config.model, dropout=0.0),
                        rngs=nnx.Rngs(config.train.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    logits = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x))(params, batch["inputs"])
    np.testing.assert_allclose(got, _numpy_cross_entropy(logits, batch["targets"]), rtol=1e-5)


def _toy_loss(params, batch, rng):
    # A mean over the batch, non-linear in the parameters, plus a term that depends on the key.
    per_row = jnp.tanh(batch["x"] @ params["w"] + params["b"]) ** 2
    return per_row.mean() + 0.01 * jax.random.uniform(rng)


def _toy():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.float32(0.1)}
    return params, {"x": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)}


# Scanned and unrolled, an odd count, and one row per part.
@pytest.mark.parametrize("microbatches, unroll", [(2, True), (3, False), (12, False)])
def test_accumulated_gradients_are_the_whole_batch_mean(microbatches, unroll):
    params, batch = _toy()
    key = jax.random.key(7)
    loss, grads = jax.jit(accumulate_gradients, static_argnums=(0, 4, 5))(
        _toy_loss, params, batch, key, microbatches, unroll)
    # The batch's own loss and gradient, the key term replaced by the mean of the parts' keys.
    keys_term = np.mean([0.01 * jax.random.uniform(jax.random.fold_in(key, i))
                         for i in range(microbatches)])
    whole, whole_grads = jax.value_and_grad(_toy_loss)(params, batch, key)
    np.testing.assert_allclose(loss, whole - 0.01 * jax.random.uniform(key) + keys_term,
                               rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(whole_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_one_microbatch_is_value_and_grad_itself():
    params, batch = _toy()
    key = jax.random.key(3)
    got = accumulate_gradients(_toy_loss, params, batch, key)
    want = jax.value_and_grad(_toy_loss)(params, batch, key)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.array_equal(a, b)


def test_microbatches_must_divide_the_batch():
    params, batch = _toy()
    with pytest.raises(ValueError, match="microbatches=5 must divide the batch; got a batch of 12"):
        accumulate_gradients(_toy_loss, params, batch, jax.random.key(0), 5)
    with pytest.raises(ValueError, match="microbatches=0 is out of range; allowed: an integer"):
        accumulate_gradients(_toy_loss, params, batch, jax.random.key(0), 0)


@pytest.mark.slow
def test_microbatched_steps_follow_the_whole_batch_and_scanned_ones_use_less_memory():
    config, batch = config_lib.load(None, TINY), _batch(0)
    runs, temp_bytes = {}, {}
    for k, unroll in [(1, False), (4, False), (4, True)]:
        start = init(config)
        steps = make_steps(start.graphdef, start.rest, start.optimizer, start.state, "single",
                           microbatches=k, unroll_microbatches=unroll)
        state, rng = steps.put_state(start.state), jax.random.key(0)
        compiled = steps.train.lower(state, steps.put_batch(batch), rng).compile()
        temp_bytes[k, unroll] = compiled.memory_analysis().temp_size_in_bytes
        losses = []
        for i in range(3):
            state, metrics = steps.train(state, steps.put_batch(_batch(i)), rng)
            losses.append(float(metrics["loss"]))
        runs[k, unroll] = losses, jax.tree.leaves(state.params)
    (losses, params) = runs[1, False]
    for k, unroll in [(4, False), (4, True)]:
        np.testing.assert_allclose(runs[k, unroll][0], losses, rtol=1e-5)
        # Adam's step is about lr wherever a gradient is rounding noise (see the pmap test).
        for a, b in zip(runs[k, unroll][1], params, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # The scan keeps one part's activations: XLA's temporaries shrink.
    assert temp_bytes[4, False] < 0.6 * temp_bytes[1, False], temp_bytes


PMAP_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    assert jax.local_device_count() == 8, jax.devices()
    from tests.test_step import _setup, _batch
    results = {}
    for parallelism, parts in (("single", 1), ("pmap", 1), ("pmap", 2)):
        _, steps, state = _setup(["train.batch_size=16", f"train.microbatches={parts}"],
                                 parallelism)
        assert steps.num_devices == (8 if parallelism == "pmap" else 1)
        state = steps.put_state(state)
        losses = []
        for i in range(3):
            batch = steps.put_batch(_batch(i, batch=16))
            state, metrics = steps.train(state, batch, jax.random.key(0))
            losses.append(float(np.asarray(metrics["loss"]).reshape(-1)[0]))
        params = jax.tree.leaves(steps.get_state(state).params)
        results[parallelism, parts] = (losses, [np.asarray(p) for p in params])
    (l1, p1), (l8, p8) = results["single", 1], results["pmap", 1]
    np.testing.assert_allclose(l1, l8, rtol=1e-5, atol=1e-5)
    # Each device's 2 sequences in 2 microbatches of 1: the same again.
    l8m, p8m = results["pmap", 2]
    np.testing.assert_allclose(l1, l8m, rtol=1e-5, atol=1e-5)
    for a, b in zip(p1, p8m):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # Summed over 8 devices, the gradients round differently, and Adam's step is about lr
    # whatever the gradient's size (m / sqrt(v)): where a component is rounding noise, its
    # direction is too. The three warmup steps move a parameter by at most 1.8e-4 (lr 0, 6e-5,
    # 1.2e-4); seen: 3e-5 on 1 of 2,048 elements. Checked: gradients summed instead of averaged
    # over the devices fail this (24 of 32 elements of one leaf off, by up to 5e-4).
    for a, b in zip(p1, p8):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    print("losses", l1, l8)
    """
)


@pytest.mark.slow
def test_pmap_on_8_cpu_devices_equals_single_device(python):
    # XLA_FLAGS must be set before JAX starts, so this runs in its own process.
    out = python.run("-c", PMAP_SCRIPT, devices=8)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "losses" in out.stdout


HOST_MALLOC_PROBE = textwrap.dedent("""
    import ctypes, sys, threading
    from jaxtricks.lm.cpu import tune_host_malloc

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    applied = tune_host_malloc()
    seen = []

    def big_block(size):  # from a fresh thread, as XLA's workers allocate
        mmapped = libc.mallinfo2().hblks
        block = libc.malloc(size)
        assert block, f"malloc({size}) failed"
        seen.append(libc.mallinfo2().hblks - mmapped)  # served by mmap?
        libc.free(block)
        seen.append(libc.mallinfo2().arena >= size)  # the heap still holds it?

    # 256 MiB, and 2.5 GiB (never touched, so address space only): more than 2**31 - 1 bytes,
    # the largest trim threshold glibc takes other than -1 (two steps of a 10M-parameter model).
    for size in (256 << 20, 5 << 29):
        thread = threading.Thread(target=big_block, args=(size,))
        thread.start()
        thread.join()
    print(applied, *seen)
""")


@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only",
)
@pytest.mark.parametrize(
    "env, expected",
    [({}, "True 0 True 0 True"), ({"JAXTRICKS_HOST_MALLOC": "default"}, "False 1 False 1 False")],
)
def test_tune_host_malloc_keeps_big_blocks_mapped(python, env, expected):
    """After tune_host_malloc a 256 MiB and a 2.5 GiB block from a new thread come from the heap
    (not mmap) and stay mapped after free; with JAXTRICKS_HOST_MALLOC=default glibc mmaps and
    unmaps them."""
    result = python.run("-c", HOST_MALLOC_PROBE, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == expected.split()
