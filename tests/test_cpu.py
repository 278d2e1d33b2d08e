"""The model's CPU paths (jaxtricks.lm.cpu): each against the plain computation it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from jaxtricks.lm import cpu
from jaxtricks.lm.config import ModelConfig
from jaxtricks.lm.model import Transformer

TINY = ModelConfig(vocab_size=257, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_seq_len=16)


def _textbook_layer_norm(x, scale, bias, eps=1e-5):
    """torch.nn.LayerNorm's formula (biased variance, epsilon 1e-5), differentiated by jax."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("shape", [(5, 16), pytest.param((2, 3, 16), marks=pytest.mark.slow)])
def test_layer_norm_gradients_equal_autodiff_of_the_formula(shape):
    """The hand-written backward pass against jax.grad of the textbook LayerNorm."""
    keys = jax.random.split(jax.random.key(0), 4)
    x = 3.0 * jax.random.normal(keys[0], shape) + 1.0
    scale, bias = jax.random.normal(keys[1], (2, shape[-1]))
    weights = jax.random.normal(keys[2], shape)  # a loss that weighs every output differently

    def grads(norm):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(norm(*a)) * weights), argnums=(0, 1, 2))(
            x, scale, bias)

    expected = _textbook_layer_norm(x, scale, bias)
    np.testing.assert_allclose(cpu.layer_norm(x, scale, bias), expected, atol=1e-5)
    for ours, theirs in zip(grads(cpu.layer_norm), grads(_textbook_layer_norm), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    check_grads(cpu.layer_norm, (x, scale, bias), order=1, modes=["rev"], atol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, None])
def test_cpu_layer_norm_is_nnx_layer_norm_with_the_same_parameters(dtype):
    kwargs = dict(epsilon=1e-5, dtype=dtype, use_fast_variance=False)
    ours = cpu.LayerNorm(16, **kwargs, rngs=nnx.Rngs(0))
    flax_norm = nnx.LayerNorm(16, **kwargs, rngs=nnx.Rngs(0))
    assert isinstance(ours, nnx.LayerNorm)
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(flax_norm))
    # Trained parameters, so that scale and bias matter.
    scale, bias = jax.random.normal(jax.random.key(1), (2, 16))
    for norm in (ours, flax_norm):
        norm.scale[...], norm.bias[...] = scale, bias
    x = 2.0 * jax.random.normal(jax.random.key(2), (3, 5, 16)) - 1.0
    y = ours(x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, _textbook_layer_norm(x, scale, bias), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, flax_norm(x), rtol=1e-5, atol=1e-5)

    def grads(norm):
        graphdef, params = nnx.split(norm)
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x))), (0, 1))(params, x)

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(flax_norm)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_cpu_layer_norm_computes_in_float32_and_returns_its_dtype():
    """Statistics in float32 from the float32 input, then the cast (as autocast's layer_norm
    followed by a bfloat16 matmul)."""
    x = 2.0 * jax.random.normal(jax.random.key(2), (3, 16)) - 1.0
    f32 = cpu.LayerNorm(16, epsilon=1e-5, dtype=jnp.float32, rngs=nnx.Rngs(0))(x)
    bf16 = cpu.LayerNorm(16, epsilon=1e-5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(bf16, f32.astype(jnp.bfloat16))


def test_cpu_layer_norm_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="epsilon"):
        cpu.LayerNorm(8, rngs=nnx.Rngs(0))  # nnx's default epsilon, 1e-6
    with pytest.raises(ValueError, match="use_bias"):
        cpu.LayerNorm(8, epsilon=1e-5, use_bias=False, rngs=nnx.Rngs(0))


def test_matmul_2d_equals_einsum_with_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    kernel = jax.random.normal(jax.random.key(1), (8, 5))
    np.testing.assert_allclose(cpu.matmul_2d(x, kernel), jnp.einsum("bsi,ij->bsj", x, kernel),
                               rtol=1e-6, atol=1e-6)

    def loss(f):
        return lambda x, kernel: jnp.sum(jnp.sin(f(x, kernel)))

    ours = jax.grad(loss(cpu.matmul_2d), argnums=(0, 1))(x, kernel)
    theirs = jax.grad(loss(lambda x, k: jnp.einsum("bsi,ij->bsj", x, k)), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    check_grads(cpu.matmul_2d, (x, kernel), order=1, modes=["rev"], atol=1e-2)


def test_linear_dot_general_is_nnx_linear_and_passes_other_contractions_on():
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    ours = nnx.Linear(8, 5, dot_general=cpu.linear_dot_general, rngs=nnx.Rngs(0))
    plain = nnx.Linear(8, 5, rngs=nnx.Rngs(0))
    kernel, bias = ours.kernel[...], ours.bias[...]
    np.testing.assert_allclose(ours(x), np.einsum("bsi,ij->bsj", x, kernel) + bias,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours(x), plain(x), rtol=1e-6, atol=1e-6)
    # A contraction that is not ``inputs @ kernel`` is jax.lax.dot_general's.
    y = jax.random.normal(jax.random.key(1), (8, 4))
    np.testing.assert_allclose(cpu.linear_dot_general(y, y, (((0,), (0,)), ((), ()))),
                               np.asarray(y).T @ np.asarray(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq, num_blocks", [
    (10, 3), (16, 1),  # uneven blocks; one call
    pytest.param(16, 4, marks=pytest.mark.slow), pytest.param(12, 2, marks=pytest.mark.slow),
    pytest.param(7, 4, marks=pytest.mark.slow),  # seq < 2 * blocks: one call
])
def test_blocked_causal_attention_equals_one_call(seq, num_blocks):
    """Query blocks that skip the masked keys give the one-call causal attention and its
    gradients, also for blocks of unequal size; too short a sequence falls back to one call."""
    q, k, v, weights = jax.random.normal(jax.random.key(0), (4, 2, seq, 3, 8))

    def one_call(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    def blocked(q, k, v):
        return cpu.causal_attention(q, k, v, num_blocks)

    np.testing.assert_allclose(jax.jit(blocked)(q, k, v), jax.jit(one_call)(q, k, v),
                               rtol=1e-5, atol=1e-6)

    def grads(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2)))(q, k, v)

    for ours, theirs in zip(grads(blocked), grads(one_call), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    calls = str(jax.make_jaxpr(blocked)(q, k, v)).count("dot_general") // 2  # q.k and p.v
    assert calls == (num_blocks if seq >= 2 * num_blocks else 1)


def _contractions_of_the_backward_pass(cpu_paths: bool):
    """Contracted axes of the dot_generals without batch axes in jax.grad of the model's loss
    (the linear layers' and the output layer's; attention's have batch axes)."""
    model = nnx.eval_shape(lambda: Transformer(TINY, rngs=nnx.Rngs(0), cpu_paths=cpu_paths))
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((2, 12), jnp.int32)

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(tokens) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    return [contract for contract, batch in (
        e.params["dimension_numbers"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
    ) if batch == ((), ())]


def test_every_matmul_of_the_backward_pass_contracts_one_axis():
    """On the CPU path the linear layers and the output layer flatten (batch, seq) first: the
    kernels' gradients are plain 2-D matmuls, not contractions over two axes."""
    contracted = _contractions_of_the_backward_pass(cpu_paths=True)
    # forward, input gradient and kernel gradient of 4 linear layers per block and the output layer
    assert len(contracted) == 3 * (4 * TINY.num_layers + 1)
    assert all(len(lhs) == len(rhs) == 1 for lhs, rhs in contracted), contracted
    # The plain path's kernel gradients contract (batch, seq): what the CPU path avoids.
    plain = _contractions_of_the_backward_pass(cpu_paths=False)
    assert any(len(lhs) == 2 for lhs, _ in plain), plain
