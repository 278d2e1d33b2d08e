"""The transformer LM: shapes, parameter count, causality, dropout, bfloat16, KV cache, learning,
and its two paths (the plain layers and jaxtricks.lm.cpu's) computing the same model."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtricks.lm import cpu
from jaxtricks.lm.config import ModelConfig
from jaxtricks.lm.model import (
    KVCache,
    Transformer,
    attention_kind,
    count_params,
    flops_per_token,
    init_cache,
)

TINY = ModelConfig(vocab_size=257, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_seq_len=16)
GPT2_SMALL = ModelConfig(
    vocab_size=50304, num_layers=12, d_model=768, num_heads=12, d_ff=3072, max_seq_len=1024
)


def _cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY.__dict__, **overrides})


def _tokens(batch, seq, seed=0, vocab=TINY.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, seq)), jnp.int32)


def _model(**overrides) -> Transformer:
    """One model per config for the whole file (eager init compiles every op once: slow on CPU)."""
    return _build(_cfg(**overrides))


@functools.cache
def _build(cfg: ModelConfig) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(0))


@functools.cache
def _graphdef(cfg: ModelConfig, cpu_paths: bool) -> nnx.GraphDef:
    """The model's structure on one path, from nnx.eval_shape (no parameters are initialized)."""
    return nnx.graphdef(nnx.eval_shape(
        lambda: Transformer(cfg, rngs=nnx.Rngs(0), cpu_paths=cpu_paths)))


def _on_path(model: Transformer, cpu_paths: bool) -> Transformer:
    """``model``'s parameters in the model built for the plain path or the CPU path."""
    return nnx.merge(_graphdef(model.cfg, cpu_paths), nnx.state(model))


@pytest.fixture(params=["learned", "rope"])
def model(request):
    return _model(position=request.param)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, params, tokens, dropout_rng=None, positions=None):
    return nnx.merge(graphdef, params)(tokens, dropout_rng=dropout_rng, positions=positions)


def forward(model, tokens, dropout_rng=None, positions=None):
    """The trainer's pattern: split, then merge inside jit (compiled once per model and shape)."""
    graphdef, params = nnx.split(model)
    return _apply(graphdef, params, tokens, dropout_rng, positions)


def _expected_params(cfg: ModelConfig) -> int:
    """GPT-2 layout: biased linears and LayerNorms, tied embedding, learned or no positions."""
    d, f = cfg.d_model, cfg.d_ff
    attention = (d * 3 * d + 3 * d) + (d * d + d)
    mlp = (d * f + f) + (f * d + d)
    norms = 2 * (2 * d)
    positions = cfg.max_seq_len * d if cfg.position == "learned" else 0
    return cfg.vocab_size * d + positions + cfg.num_layers * (attention + mlp + norms) + 2 * d


def test_shapes_dtypes_and_float32_params(model):
    logits = forward(model, _tokens(2, 12))
    assert logits.shape == (2, 12, TINY.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)


@pytest.mark.parametrize("cfg", [TINY, _cfg(position="rope"), _cfg(vocab_size=300, d_ff=48)])
def test_param_count_matches_closed_form(cfg):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    assert count_params(abstract) == _expected_params(cfg)


def test_gpt2_small_is_124m_params():
    abstract = nnx.eval_shape(lambda: Transformer(GPT2_SMALL, rngs=nnx.Rngs(0)))
    n = count_params(abstract)
    assert n == _expected_params(GPT2_SMALL) == 124_475_904
    assert 123.5e6 < n < 125e6  # GPT-2 small: "124M"


def test_flops_per_token_counts_the_matmul_params_of_the_model():
    # Independent of the formula's algebra: read the matmul weights off the built model.
    for cfg, seq in [(TINY, 16), (GPT2_SMALL, 1024)]:
        abstract = nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0)))
        kernels = sum(
            math.prod(v.shape)
            for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
            if path[-1] == "kernel"
        )
        tied_output = cfg.vocab_size * cfg.d_model
        attention = 2 * 2 * cfg.num_layers * seq * cfg.d_model  # QK^T and AV: 2 FLOPs per MAC
        expected = 6 * (kernels + tied_output) + 3 * attention  # backward = 2x forward
        assert flops_per_token(cfg, seq) == pytest.approx(expected, rel=1e-12)
    # GPT-2 small at T=1024: 6 * (84,934,656 + 50304 * 768) + 12 * 12 * 1024 * 768.
    assert flops_per_token(GPT2_SMALL, 1024) == 854_654_976


def test_init_follows_gpt2():
    model = _model()
    std = lambda v: float(jnp.std(v[...]))  # noqa: E731
    assert std(model.embed.embedding) == pytest.approx(0.02, rel=0.05)
    block = model.blocks[0]
    assert std(block.attn.qkv.kernel) == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * model.cfg.num_layers)  # 0.01, not 0.02
    assert std(block.attn.proj.kernel) == pytest.approx(residual_std, rel=0.1)
    assert std(block.mlp.down.kernel) == pytest.approx(residual_std, rel=0.1)
    assert float(jnp.abs(block.mlp.up.bias[...]).max()) == 0.0
    assert bool(jnp.all(block.norm_attn.scale[...] == 1.0))
    assert bool(jnp.all(model.norm_out.bias[...] == 0.0))
    assert block.norm_mlp.epsilon == 1e-5  # torch.nn.LayerNorm's default (GPT-2's), not nnx's


@pytest.mark.parametrize("cpu_paths", [True, False])
def test_causal(model, cpu_paths):
    model = _on_path(model, cpu_paths)
    tokens = _tokens(2, 12, seed=1)
    t = 7
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % TINY.vocab_size)
    a, b = forward(model, tokens), forward(model, changed)
    np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6)  # the past does not see the future
    assert float(jnp.abs(a[:, t:] - b[:, t:]).max()) > 1e-4  # ...but later positions do see it


@pytest.mark.slow  # test_cpu.py compares blocked attention with one call in the quick loop
def test_attention_choices_do_not_change_the_model():
    tokens = _tokens(2, 16)
    model = _model()  # on the CPU paths: attention in cpu.ATTENTION_BLOCKS query blocks
    assert model.blocks[0].attn.attention == "cpu_blocks"
    other = nnx.merge(_graphdef(_cfg(attention="xla"), True), nnx.state(model))
    assert other.blocks[0].attn.attention == "xla"
    np.testing.assert_allclose(forward(other, tokens), forward(model, tokens),
                               rtol=1e-5, atol=1e-5)


def test_auto_attention_falls_back_where_cudnn_does_not_apply():
    # This is a CPU: auto takes the blocked attention on the CPU paths and XLA's otherwise; a GPU
    # would take cuDNN for bfloat16 and a head dimension it accepts.
    assert jax.default_backend() == "cpu"
    assert attention_kind(_cfg(), cpu_paths=True) == "cpu_blocks"
    assert attention_kind(_cfg(dtype="bfloat16"), cpu_paths=False) == "xla"
    assert attention_kind(_cfg(attention="xla"), cpu_paths=True) == "xla"
    assert attention_kind(_cfg(attention="cudnn"), cpu_paths=False) == "cudnn"  # as asked


def test_explicit_positions():
    tokens = _tokens(2, 12)
    shifted = jnp.arange(12) + 4
    rope, learned = _model(position="rope"), _model(position="learned")
    default = forward(rope, tokens)
    np.testing.assert_allclose(default, forward(rope, tokens, positions=jnp.arange(12)), atol=1e-6)
    # rope sees only relative positions: shifting all of them changes nothing (to rounding)...
    np.testing.assert_allclose(default, forward(rope, tokens, positions=shifted), atol=1e-4)
    # ...while learned positions are absolute.
    assert float(jnp.abs(forward(learned, tokens) - forward(learned, tokens, positions=shifted))
                 .max()) > 1e-4


def test_too_long_sequence_is_rejected(model):
    with pytest.raises(ValueError, match="max_seq_len=16"):
        forward(model, _tokens(1, 17))


def test_dropout():
    model = _model(dropout=0.2)
    tokens = _tokens(2, 12)
    key1, key2 = jax.random.key(1), jax.random.key(2)
    eval_a, eval_b = forward(model, tokens), forward(model, tokens)
    np.testing.assert_array_equal(eval_a, eval_b)  # None: deterministic
    train_1, train_2 = forward(model, tokens, key1), forward(model, tokens, key2)
    np.testing.assert_array_equal(forward(model, tokens, key1), train_1)  # same key, same output
    assert float(jnp.abs(train_1 - train_2).max()) > 1e-3  # different key, different mask
    assert float(jnp.abs(train_1 - eval_a).max()) > 1e-3  # dropout does something
    # Inverted dropout is unbiased: the mean over many masks lands much closer to eval mode than one
    # draw does (a dropout that forgot the 1 / (1 - rate) rescale would not).
    keys = jax.random.split(jax.random.key(3), 32)
    mean = jnp.mean(jnp.stack([forward(model, tokens, k) for k in keys]), axis=0)
    assert float(jnp.abs(mean - eval_a).mean()) < 0.4 * float(jnp.abs(train_1 - eval_a).mean())
    # Rate 0 with a key is eval mode; the rate is not a parameter, so the outputs agree.
    no_dropout = _model()
    assert no_dropout.cfg.dropout == 0.0
    np.testing.assert_array_equal(forward(no_dropout, tokens, key1), forward(no_dropout, tokens))
    np.testing.assert_allclose(forward(no_dropout, tokens), eval_a, atol=1e-6)


def test_bfloat16_compute_close_to_float32():
    f32, bf16 = _model(), _model(dtype="bfloat16")
    params32 = jax.tree.leaves(nnx.state(f32, nnx.Param))
    params16 = jax.tree.leaves(nnx.state(bf16, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params16)  # parameters stay float32
    for a, b in zip(params32, params16, strict=True):
        np.testing.assert_array_equal(a, b)
    tokens = _tokens(2, 12)
    a, b = forward(f32, tokens), forward(bf16, tokens)
    assert b.dtype == jnp.float32
    error = float(jnp.abs(a - b).max())
    assert 0.0 < error < 0.02 * float(jnp.abs(a).max())  # close, yet really computed in bfloat16
    assert init_cache(bf16.cfg, 2, 16).keys[0].dtype == jnp.bfloat16


@functools.partial(jax.jit, static_argnums=0)
def _apply_cached(graphdef, params, tokens, cache):
    return nnx.merge(graphdef, params)(tokens, cache=cache)


@pytest.mark.parametrize("cpu_paths", [True, False])
def test_cached_decoding_matches_full_forward(model, cpu_paths):
    model = _on_path(model, cpu_paths)
    cfg = model.cfg
    graphdef, params = nnx.split(model)
    tokens = _tokens(2, 12, seed=2)
    full = forward(model, tokens)
    cache = init_cache(cfg, batch_size=2, max_len=cfg.max_seq_len)
    assert isinstance(cache, KVCache) and cache.keys[0].shape == (2, 16, 4, 8)
    logits, cache = _apply_cached(graphdef, params, tokens[:, :5], cache)  # prefill
    pieces = [logits]
    for t in range(5, 12):  # then one position at a time
        logits, cache = _apply_cached(graphdef, params, tokens[:, t : t + 1], cache)
        pieces.append(logits)
    assert int(cache.index) == 12
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_init_cache_validates():
    with pytest.raises(ValueError, match="max_len"):
        init_cache(TINY, 1, TINY.max_seq_len + 1)
    with pytest.raises(ValueError, match="batch_size"):
        init_cache(TINY, 0, 4)


@pytest.mark.slow
def test_tiny_model_overfits_one_batch():
    model = _model()
    graphdef, params = nnx.split(model)
    batch = _tokens(4, 17, seed=3)
    tx = optax.adam(2e-2)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(50):
        params, opt_state, loss = train_step(params, opt_state)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(math.log(model.cfg.vocab_size), abs=0.1)  # uniform at init
    assert losses[-1] < 0.05  # 64 random next tokens memorized


# --------------------------------------------------------------------------- the two paths


def test_the_cpu_paths_are_chosen_on_the_cpu_backend(monkeypatch):
    def build(**kwargs):
        return nnx.eval_shape(lambda: Transformer(TINY, rngs=nnx.Rngs(0), **kwargs))

    tokens = jnp.zeros((2, 12), jnp.int32)

    def primitives(model):
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state)
        return {e.primitive.name for e in jaxpr.jaxpr.eqns}

    assert jax.default_backend() == "cpu"  # tests/conftest.py
    default = build()
    assert default.cpu_paths is True
    assert isinstance(default.norm_out, cpu.LayerNorm)
    assert default.blocks[0].attn.qkv.dot_general is cpu.linear_dot_general
    assert "custom_vjp_call" in primitives(default)  # cpu.layer_norm's hand-written backward
    plain = build(cpu_paths=False)  # forced off on the CPU
    assert plain.cpu_paths is False
    assert type(plain.norm_out) is nnx.LayerNorm
    assert plain.blocks[0].attn.qkv.dot_general is jax.lax.dot_general
    assert "custom_vjp_call" not in primitives(plain)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert build().cpu_paths is False  # any other backend: the plain layers
    assert build(cpu_paths=True).cpu_paths is True  # forced on


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_both_paths_create_the_same_parameters(position):
    """Same paths, variable types, shapes and initial values: a checkpoint of one loads in the
    other."""
    cfg = _cfg(position=position)
    on_cpu = nnx.to_flat_state(nnx.state(_build(cfg)))
    plain = nnx.to_flat_state(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0), cpu_paths=False)))
    assert [path for path, _ in on_cpu] == [path for path, _ in plain]
    assert len(on_cpu) == 4 + 12 * cfg.num_layers - (position == "rope")  # every variable a Param
    for (path, a), (_, b) in zip(on_cpu, plain, strict=True):
        assert type(a) is type(b) is nnx.Param, path
        assert a[...].dtype == b[...].dtype == jnp.float32, path
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, params, tokens, dropout_rng):
    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1], dropout_rng=dropout_rng)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("position, dropout, dtype", [
    ("learned", 0.0, "float32"),
    pytest.param("rope", 0.1, "float32", marks=pytest.mark.slow),
    pytest.param("learned", 0.1, "bfloat16", marks=pytest.mark.slow),
    pytest.param("rope", 0.0, "bfloat16", marks=pytest.mark.slow),
])
def test_both_paths_give_the_same_loss_and_gradients(position, dropout, dtype):
    """The same parameters and batch through the plain layers and through jaxtricks.lm.cpu's (the
    dropout masks are the same: both draw them from the same keys)."""
    params = nnx.state(_model(position=position))  # neither dropout nor dtype is a parameter
    cfg = _cfg(position=position, dropout=dropout, dtype=dtype)
    tokens = _tokens(4, 17, seed=4)  # 16 positions: cpu.ATTENTION_BLOCKS=4 query blocks
    rng = jax.random.key(5) if dropout else None
    loss_cpu, grads_cpu = _loss_and_grads(_graphdef(cfg, True), params, tokens, rng)
    loss_plain, grads_plain = _loss_and_grads(_graphdef(cfg, False), params, tokens, rng)
    assert math.isfinite(float(loss_plain))
    leaves_cpu, leaves_plain = jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_plain)
    assert len(leaves_cpu) == len(leaves_plain) == len(jax.tree.leaves(params))
    if dtype == "float32":
        np.testing.assert_allclose(loss_cpu, loss_plain, rtol=1e-6)
        for a, b in zip(leaves_cpu, leaves_plain, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    else:  # rounded to bfloat16 at other points: close, not equal
        np.testing.assert_allclose(loss_cpu, loss_plain, rtol=1e-3)
        for a, b in zip(leaves_cpu, leaves_plain, strict=True):
            assert float(jnp.linalg.norm(a - b)) <= 3e-2 * float(jnp.linalg.norm(b))


def _numpy_transformer(cfg: ModelConfig, params: nnx.State, tokens: np.ndarray) -> np.ndarray:
    """GPT-2's forward pass written out in float64 numpy: the logits (batch, seq, vocab)."""
    p = {".".join(map(str, path)): np.asarray(v[...], np.float64)
         for path, v in nnx.to_flat_state(params)}
    batch, seq = tokens.shape
    heads, head_dim = cfg.num_heads, cfg.d_model // cfg.num_heads

    def norm(x, name):  # torch.nn.LayerNorm: biased variance, epsilon 1e-5
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * p[f"{name}.scale"] + p[f"{name}.bias"]

    def linear(x, name):
        return x @ p[f"{name}.kernel"] + p[f"{name}.bias"]

    def rotate(x):  # RoFormer's rotation of the two halves of head_dim (GPT-NeoX layout)
        half = head_dim // 2
        angles = np.arange(seq)[:, None] * 10_000.0 ** (-np.arange(half) / half)  # (seq, half)
        sin, cos = np.sin(angles)[:, None], np.cos(angles)[:, None]  # (seq, 1, half)
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    x = p["embed.embedding"][tokens]  # (batch, seq, d_model)
    if cfg.position == "learned":
        x = x + p["pos_embed.embedding"][:seq]
    future = np.triu(np.ones((seq, seq), bool), k=1)
    for layer in range(cfg.num_layers):
        name = f"blocks.{layer}"
        qkv = linear(norm(x, f"{name}.norm_attn"), f"{name}.attn.qkv")
        q, k, v = (t.reshape(batch, seq, heads, head_dim) for t in np.split(qkv, 3, axis=-1))
        if cfg.position == "rope":
            q, k = rotate(q), rotate(k)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        scores = np.where(future, -np.inf, scores)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, -1)
        x = x + linear(attended, f"{name}.attn.proj")
        hidden = linear(norm(x, f"{name}.norm_mlp"), f"{name}.mlp.up")
        gelu = 0.5 * hidden * (1 + np.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden**3)))
        x = x + linear(gelu, f"{name}.mlp.down")
    return norm(x, "norm_out") @ p["embed.embedding"].T


@pytest.mark.parametrize("cpu_paths", [True, False])
def test_forward_equals_a_numpy_transformer(model, cpu_paths):
    # Random norms and biases, so that every parameter shows in the logits.
    state = nnx.state(model)
    keys = iter(jax.random.split(jax.random.key(6), 64))
    state = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(next(keys), v.shape), state)
    tokens = _tokens(2, 16, seed=7)
    ours = forward(nnx.merge(_graphdef(model.cfg, cpu_paths), state), tokens)
    expected = _numpy_transformer(model.cfg, state, np.asarray(tokens))
    assert float(np.abs(expected).max()) > 0.1  # not a vanishing comparison
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
