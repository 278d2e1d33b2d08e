r"""Sampling text from the :class:`~jaxtricks.lm.model.Transformer`: greedy, temperature, top-k/p.

With the KV cache the prompt is read once (prefill) and each new token then costs one position:
a jitted single-token step called from a Python loop, compiled once per (batch, cache length) and
never per token. Without the cache every token re-reads the whole context (the reference).

Sequences longer than the model's context slide: every token is predicted from at most the last
``max_seq_len`` tokens, which the model sees at positions ``0 .. max_seq_len - 1``. The cache serves
until the context is full; after that each further token re-reads the last ``max_seq_len`` tokens
(cached keys and values hold their old positions, so they cannot slide), which keeps the cached and
uncached paths equal at every length (token for token in float32; bfloat16 rounds the two paths
differently).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtricks.lm.model import Transformer, init_cache

# How often each jitted function below has been traced (i.e. compiled): for tests and diagnostics.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


def _check_filter_args(top_k, top_p) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be None or an integer >= 1.")
    if top_p is not None and isinstance(top_p, (int, float)) and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must be None or in (0, 1].")


def filter_logits(logits: jax.Array, *, top_k: int | None = None, top_p=None) -> jax.Array:
    r"""Set the logits of the tokens that top-k and then top-p (nucleus) exclude to ``-inf``.

    top-k keeps the ``top_k`` largest logits (all of them when tied at the boundary); top-p then
    keeps the smallest set of most likely tokens whose probability reaches ``top_p``:

    .. math::

        \text{keep } i \iff \sum_{j:\, p_j > p_i} p_j < \text{top\_p}

    so the most likely token is always kept.

    Args:
      logits: ``(..., vocab)`` float logits (already divided by the temperature).
      top_k: None, or the number of tokens to keep (a Python int; larger than vocab keeps all).
      top_p: None, or the probability mass to keep, in (0, 1] (may be a traced scalar under jit).

    Returns:
      ``logits`` with the excluded tokens at ``-inf``, same shape and dtype.

    >>> filter_logits(jnp.array([1.0, 3.0, 2.0, 0.0]), top_k=2)
    Array([-inf,   3.,   2., -inf], dtype=float32)
    >>> filter_logits(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), top_p=0.8).tolist()[2:]
    [-inf, -inf]

    References:
      Holtzman et al., The Curious Case of Neural Text Degeneration, 2019,
      https://arxiv.org/abs/1904.09751
    """
    _check_filter_args(top_k, top_p)
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]  # (..., 1)
        logits = jnp.where(logits < kth_largest, neg_inf, logits)
    if top_p is not None:
        sorted_logits = -jnp.sort(-logits, axis=-1)  # (..., vocab) descending
        probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        keep = (mass_before < top_p).at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def _sample(logits, key, temperature, top_p, *, greedy: bool, top_k, use_top_p: bool):
    """(batch, vocab) float32 logits -> (batch,) int32 tokens."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p if use_top_p else None)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


_STATIC = ("graphdef", "greedy", "top_k", "use_top_p")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "prompt_len", "cache_len"))
def _prefill(graphdef, state, tokens, rng, temperature, top_p, *, greedy, top_k, use_top_p,
             prompt_len, cache_len):
    """Read the prompt into a fresh cache and sample the token at position ``prompt_len``."""
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.cfg, tokens.shape[0], cache_len)
    logits, cache = model(tokens[:, :prompt_len], cache=cache)  # (batch, prompt_len, vocab)
    key = jax.random.fold_in(rng, prompt_len)
    token = _sample(logits[:, -1], key, temperature, top_p, greedy=greedy, top_k=top_k,
                    use_top_p=use_top_p)
    return cache, tokens.at[:, prompt_len].set(token)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache", "tokens"))
def _decode_step(graphdef, state, cache, tokens, length, rng, temperature, top_p, *, greedy, top_k,
                 use_top_p):
    """Feed token ``length - 1`` through the cache and sample the token at position ``length``."""
    TRACE_COUNTS["decode_step"] += 1
    model = nnx.merge(graphdef, state)
    last = jax.lax.dynamic_slice_in_dim(tokens, length - 1, 1, axis=1)  # (batch, 1)
    logits, cache = model(last, cache=cache)  # (batch, 1, vocab)
    token = _sample(logits[:, 0], jax.random.fold_in(rng, length), temperature, top_p,
                    greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    return cache, tokens.at[:, length].set(token)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "window"), donate_argnames=("tokens",))
def _window_step(graphdef, state, tokens, length, rng, temperature, top_p, *, greedy, top_k,
                 use_top_p, window):
    """Re-read the last ``window`` tokens before ``length`` and sample the token at ``length``."""
    TRACE_COUNTS["window_step"] += 1
    model = nnx.merge(graphdef, state)
    start = jnp.maximum(length - window, 0)
    context = jax.lax.dynamic_slice_in_dim(tokens, start, window, axis=1)  # (batch, window)
    # Before the context is full the window also holds not-yet-generated slots after `length`; the
    # causal mask keeps them from affecting the logits at `length - 1`.
    logits = model(context)  # (batch, window, vocab)
    last = jax.lax.dynamic_index_in_dim(logits, length - 1 - start, axis=1, keepdims=False)
    token = _sample(last, jax.random.fold_in(rng, length), temperature, top_p, greedy=greedy,
                    top_k=top_k, use_top_p=use_top_p)
    return tokens.at[:, length].set(token)


def generate(
    model: Transformer,
    prompt,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
) -> np.ndarray:
    r"""Continue ``prompt`` by ``max_new_tokens`` tokens sampled from ``model``.

    Each token is drawn from ``softmax(logits / temperature)`` restricted by :func:`filter_logits`
    (``temperature=0`` is greedy: the argmax). The token at position ``t`` uses the key
    ``fold_in(rng, t)``, so a seed gives the same text with or without the cache. Dropout is off.

    Args:
      model: the :class:`~jaxtricks.lm.model.Transformer`.
      prompt: ``(batch, prompt_len)`` int token ids (equal-length prompts), or ``(prompt_len,)``.
      max_new_tokens: number of tokens to add, >= 0.
      rng: a PRNG key (unused when greedy).
      temperature: >= 0; 0 is greedy decoding.
      top_k: None, or keep only the ``top_k`` most likely tokens (>= 1).
      top_p: None, or keep the smallest set of most likely tokens with mass >= ``top_p``, in (0, 1].
      use_cache: prefill a KV cache and decode one position per token (True), or re-read the whole
        context for every token (False, the reference).

    Returns:
      ``(batch, prompt_len + max_new_tokens)`` int32 numpy array: the prompt then the new tokens
      (``(prompt_len + max_new_tokens,)`` for a 1-D prompt). Beyond ``max_seq_len`` tokens the
      context slides (see the module docstring).

    >>> from jaxtricks.lm.config import ModelConfig
    >>> cfg = ModelConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64, max_seq_len=16)
    >>> model = Transformer(cfg, rngs=nnx.Rngs(0))
    >>> out = generate(model, np.array([72, 105]), max_new_tokens=5, rng=jax.random.key(0))
    >>> out.shape, out[:2].tolist()
    ((7,), [72, 105])
    """
    count = isinstance(max_new_tokens, (int, np.integer)) and not isinstance(max_new_tokens, bool)
    if not count or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0.")
    max_new_tokens = int(max_new_tokens)
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 = greedy).")
    if top_p is not None and not isinstance(top_p, (int, float)):
        raise ValueError(f"top_p={top_p!r} must be None or a number in (0, 1].")
    _check_filter_args(top_k, top_p)
    cfg = model.cfg
    prompt = np.asarray(prompt)
    squeeze = prompt.ndim == 1
    if squeeze:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise ValueError(
            f"prompt must be a non-empty (batch, prompt_len) or (prompt_len,) array of token ids, "
            f"got shape {prompt.shape}."
        )
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}.")
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        raise ValueError(
            f"prompt token ids must be in [0, vocab_size={cfg.vocab_size}), got ids in "
            f"[{prompt.min()}, {prompt.max()}]."
        )

    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    window = min(total, cfg.max_seq_len)  # the most tokens the model reads at once
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)
    graphdef, state = nnx.split(model)
    dynamic = (rng, jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p))
    static = dict(greedy=temperature == 0, top_k=top_k, use_top_p=top_p is not None)

    length = prompt_len  # tokens so far; the next one goes to position `length`
    if use_cache and max_new_tokens > 0 and prompt_len < window:
        cache, tokens = _prefill(graphdef, state, tokens, *dynamic, **static,
                                 prompt_len=prompt_len, cache_len=window)
        length += 1
        # Token `length - 1` still fits into the cache while length <= window.
        while length < total and length <= window:
            cache, tokens = _decode_step(graphdef, state, cache, tokens, jnp.int32(length),
                                         *dynamic, **static)
            length += 1
    while length < total:
        tokens = _window_step(graphdef, state, tokens, jnp.int32(length), *dynamic, **static,
                              window=window)
        length += 1
    out = np.asarray(tokens)
    return out[0] if squeeze else out
