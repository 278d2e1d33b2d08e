"""Sampling: the cache changes only the speed, filters exclude what they should, no recompiles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtricks.lm import sampling
from jaxtricks.lm.config import ModelConfig
from jaxtricks.lm.model import Transformer
from jaxtricks.lm.sampling import filter_logits, generate

TINY = ModelConfig(vocab_size=257, num_layers=2, d_model=32, num_heads=4, d_ff=64,
                   max_seq_len=16)


@functools.cache
def _model(position: str = "learned") -> Transformer:
    return Transformer(ModelConfig(**{**TINY.__dict__, "position": position}), rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, params, tokens):
    return nnx.merge(graphdef, params)(tokens)


def logits_of(model, tokens) -> np.ndarray:
    """Full forward pass, independent of the sampling code: (batch, seq, vocab) float32."""
    return np.asarray(_apply(*nnx.split(model), jnp.asarray(tokens, jnp.int32)))


def _prompts(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, (batch, length))


# --------------------------------------------------------------------------- filter_logits


def _numpy_filter(logits, top_k=None, top_p=None):
    logits = np.array(logits, np.float64)
    for row in logits.reshape(-1, logits.shape[-1]):
        if top_k is not None:
            kth = np.sort(row)[::-1][min(top_k, row.size) - 1]
            row[row < kth] = -np.inf
        if top_p is not None:
            order = np.argsort(-row, kind="stable")
            probs = np.exp(row[order] - row[order[0]])
            probs /= probs.sum()
            mass_before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
            row[order[mass_before >= top_p]] = -np.inf
    return logits


_filter = jax.jit(filter_logits, static_argnames="top_k")


@pytest.mark.parametrize(
    "top_k, top_p",
    [(1, None), (5, None), (50, None), (300, None), (None, 0.1), (None, 0.5), (None, 0.9),
     (None, 1.0), (5, 0.5)],
)
def test_filter_logits_matches_numpy(top_k, top_p):
    logits = np.random.default_rng(1).normal(0.0, 2.0, (4, 50)).astype(np.float32)
    got = np.asarray(_filter(jnp.asarray(logits), top_k=top_k, top_p=top_p))
    want = _numpy_filter(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_array_equal(got[~np.isinf(got)], logits[~np.isinf(want)])  # kept: untouched
    kept = (~np.isinf(got)).sum(-1)
    if top_k is not None:
        assert np.all(kept <= top_k)
    assert np.all(kept >= 1)  # the most likely token is always kept


def test_filter_logits_edge_cases():
    tied = jnp.array([1.0, 2.0, 2.0, 0.0])
    assert np.isinf(np.asarray(filter_logits(tied, top_k=2))).tolist() == [True, False, False, True]
    probs = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    # 0.5 < 0.8, then 0.5 + 0.3 reaches 0.8: exactly the two most likely tokens remain.
    excluded = lambda top_p: np.isinf(np.asarray(filter_logits(probs, top_p=top_p))).tolist()  # noqa: E731
    assert excluded(0.8) == [False, False, True, True]
    assert excluded(0.01) == [False, True, True, True]
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(probs, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(probs, top_p=1.5)


# --------------------------------------------------------------------------- generate


def greedy_reference(model, prompt, max_new_tokens) -> np.ndarray:
    """Greedy decoding token by token from full forward passes, independent of the sampling code.

    Each token is the argmax after the (at most ``max_seq_len``) tokens before it, read at
    positions ``0 ..``: one ``max_seq_len`` wide slice of the zero-padded sequence (the causal mask
    hides the slots not generated yet), so one shape is compiled.
    """
    context = model.cfg.max_seq_len
    tokens = np.zeros((prompt.shape[0], max(prompt.shape[1] + max_new_tokens, context)), np.int32)
    tokens[:, : prompt.shape[1]] = prompt
    for t in range(prompt.shape[1], prompt.shape[1] + max_new_tokens):
        start = max(t - context, 0)
        logits = logits_of(model, tokens[:, start : start + context])  # (batch, context, vocab)
        tokens[:, t] = logits[:, t - 1 - start].argmax(-1)
    return tokens[:, : prompt.shape[1] + max_new_tokens]


# (prompt_len, max_new_tokens) with max_seq_len=16: prefill, cached steps, then the sliding window;
# the cache full after one decoded token; the prompt filling the context (no cache at all).
@pytest.mark.parametrize("prompt_len, max_new_tokens", [(3, 20), (15, 4), (16, 3)])
@pytest.mark.parametrize("position", ["learned", pytest.param("rope", marks=pytest.mark.slow)])
def test_greedy_with_cache_equals_without_and_the_token_by_token_argmax(
    position, prompt_len, max_new_tokens
):
    model = _model(position)
    prompt = _prompts(2, prompt_len)
    greedy = functools.partial(generate, model, prompt, max_new_tokens=max_new_tokens,
                               rng=jax.random.key(0), temperature=0.0)
    cached, uncached = greedy(), greedy(use_cache=False)
    assert cached.shape == (2, prompt_len + max_new_tokens) and cached.dtype == np.int32
    np.testing.assert_array_equal(cached[:, :prompt_len], prompt)
    reference = greedy_reference(model, prompt, max_new_tokens)
    np.testing.assert_array_equal(cached, reference)  # token for token, past the context too
    np.testing.assert_array_equal(uncached, reference)


@pytest.mark.slow
@pytest.mark.parametrize("top_k, top_p, temperature", [(3, None, 2.0), (None, 0.5, 1.0)])
def test_top_k_and_top_p_never_pick_an_excluded_token(top_k, top_p, temperature):
    model, prompt = _model(), _prompts(32, 4, seed=5)
    sample = functools.partial(generate, model, prompt, max_new_tokens=8, temperature=temperature,
                               top_k=top_k, top_p=top_p)
    out = sample(rng=jax.random.key(1))
    logits = logits_of(model, out)[:, 3:-1] / temperature  # predicting positions 4..11
    allowed = ~np.isinf(_numpy_filter(logits, top_k, top_p))
    new = out[:, 4:]
    picked_allowed = np.take_along_axis(allowed, new[..., None], -1)[..., 0]
    assert picked_allowed.all()  # 256 draws, none outside the filter
    # ...and the draws are random within it: not all of them are the argmax.
    assert (new != logits.argmax(-1)).mean() > 0.1


@pytest.mark.slow
def test_sampling_is_reproducible_and_seeded():
    model, prompt = _model(), _prompts(32, 4, seed=5)  # the shapes of the test above
    sample = functools.partial(generate, model, prompt, max_new_tokens=8, temperature=2.0, top_k=3)
    a = sample(rng=jax.random.key(7))
    np.testing.assert_array_equal(a, sample(rng=jax.random.key(7)))
    assert not np.array_equal(a, sample(rng=jax.random.key(8)))
    # The key of position t is fold_in(rng, t) on both paths, so the cache does not change the text.
    np.testing.assert_array_equal(a, sample(rng=jax.random.key(7), use_cache=False))


def test_one_compile_for_all_tokens_and_none_again_and_1d_prompt(compile_log):
    model = _model()
    prompt = np.array([72, 101, 108])  # 1-D: one sequence; shapes unique to this test
    # 15 tokens so far after 12 new ones < max_seq_len: prefill and cached steps only; 30 new ones
    # also slide the window. Either is one program, traced and compiled once.
    for max_new_tokens in (12, 30):
        sample = functools.partial(generate, model, prompt, max_new_tokens=max_new_tokens, top_k=20)
        before, compiled = sampling.TRACE_COUNTS.copy(), compile_log.count("_generate")
        with compile_log:
            out = sample(rng=jax.random.key(0), temperature=0.8)
        assert out.shape == (3 + max_new_tokens,) and out[:3].tolist() == [72, 101, 108]
        assert sampling.TRACE_COUNTS - before == {"generate": 1}
        assert compile_log.count("_generate") == compiled + 1
        # A new seed, temperature and top_p value reuse it (they are traced, not static).
        before, compiled = sampling.TRACE_COUNTS.copy(), len(compile_log.names)
        with compile_log:
            again = sample(rng=jax.random.key(1), temperature=1.3)
        assert sampling.TRACE_COUNTS - before == {}
        assert len(compile_log.names) == compiled  # nothing compiled at all, not even a small op
        assert not np.array_equal(out, again)


@functools.cache
def _padded_model() -> Transformer:
    """320 embedding rows for 257 tokens, the padded rows made to win every argmax.

    The output norm's bias is all ones and so are the padded rows of the tied embedding: their
    logits are ``sum(LayerNorm(x) + 1) = d_model`` (the normalized part sums to zero), far above
    any real token's (rows of normal(0.02) noise).
    """
    model = Transformer(ModelConfig(**{**TINY.__dict__, "vocab_size": 320}), rngs=nnx.Rngs(0))
    model.norm_out.bias[...] = jnp.ones_like(model.norm_out.bias[...])
    model.embed.embedding[...] = model.embed.embedding[...].at[257:].set(1.0)
    return model


def test_vocab_limit_never_samples_a_padding_id():
    model, prompt = _padded_model(), _prompts(2, 3)
    greedy = functools.partial(generate, model, prompt, max_new_tokens=20, rng=jax.random.key(0),
                               temperature=0.0)
    assert np.all(greedy()[:, 3:] >= 257)  # without the limit the padding wins every time
    limited = greedy(vocab_limit=257)
    assert limited.max() < 257
    # ...and the limited argmax is the argmax over the real tokens, past the context too.
    context = TINY.max_seq_len
    for t in range(3, 23):
        start = max(t - context, 0)
        logits = logits_of(model, limited[:, start : start + context])[:, t - 1 - start, :257]
        np.testing.assert_array_equal(limited[:, t], logits.argmax(-1))
    # Sampling too: a high temperature would draw padding ids often; top-k keeps them all.
    sample = functools.partial(generate, model, prompt, max_new_tokens=12, rng=jax.random.key(3),
                               temperature=10.0, top_k=300)
    assert sample(vocab_limit=257).max() < 257
    assert np.mean(sample()[:, 3:] >= 257) > 0.5


def test_zero_new_tokens_returns_the_prompt():
    prompt = _prompts(2, 5)
    out = generate(_model(), prompt, max_new_tokens=0, rng=jax.random.key(0))
    np.testing.assert_array_equal(out, prompt)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(prompt=np.array([[1, 300]])), "vocab_size=257"),
        (dict(prompt=np.zeros((2, 0), np.int32)), "prompt"),
        (dict(prompt=np.array([0.5, 1.0])), "integer"),
        (dict(vocab_limit=0), "vocab_limit"),
        (dict(vocab_limit=258), "vocab_limit"),
        (dict(vocab_limit=True), "vocab_limit"),
        (dict(vocab_limit=100.0), "vocab_limit"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    args = {"prompt": np.array([[1, 2]]), "max_new_tokens": 3, "rng": jax.random.key(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(_model(), args.pop("prompt"), **args)
