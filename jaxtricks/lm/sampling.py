r"""Sampling text from the :class:`~jaxtricks.lm.model.Transformer`: greedy, temperature, top-k/p.

With the KV cache the prompt is read once (prefill) and each new token then costs one position.
:func:`generate` is one compiled program, as Flax's lm1b decoder: the prefill, then
``jax.lax.fori_loop`` over the cached single-token step, so no token waits for Python to dispatch
it. It is compiled once per (batch, prompt length, number of new tokens, sampling options: greedy
or not, top_k, whether top_p is set, vocab_limit), never per token; the seed, the temperature and
the top_p value are traced. Without the cache every token re-reads the whole context (the
reference), in the same kind of loop.

Sequences longer than the model's context slide: every token is predicted from at most the last
``max_seq_len`` tokens, which the model sees at positions ``0 .. max_seq_len - 1``. The cache serves
until the context is full; after that each further token re-reads the last ``max_seq_len`` tokens
(cached keys and values hold their old positions, so they cannot slide), which keeps the cached and
uncached paths equal at every length (token for token in float32; bfloat16 rounds the two paths
differently). That re-reading phase is a second ``fori_loop`` of the same program.
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


def _sample(logits, key, temperature, top_p, *, greedy: bool, top_k, use_top_p: bool,
            vocab_limit):
    """(batch, vocab) float32 logits -> (batch,) int32 tokens, never an id >= ``vocab_limit``."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        padding = jnp.arange(logits.shape[-1]) >= vocab_limit  # (vocab,)
        logits = jnp.where(padding, jnp.array(-jnp.inf, logits.dtype), logits)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p if use_top_p else None)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "greedy", "top_k", "use_top_p", "vocab_limit", "prompt_len",
                     "cache_len"),
    donate_argnames=("tokens",),
)
def _generate(graphdef, state, tokens, rng, temperature, top_p, *, greedy, top_k, use_top_p,
              vocab_limit, prompt_len, cache_len):
    """Fill ``tokens[:, prompt_len:]`` in one compiled program: prefill, then two loops.

    With ``cache_len > 0`` the prompt is read into a ``cache_len``-position cache and the tokens up
    to position ``cache_len`` are decoded one position each (``fori_loop``); every later token
    (all of them when ``cache_len == 0``) re-reads the last ``cache_len`` (or ``max_seq_len``)
    tokens in a second ``fori_loop``. The token at position ``t`` uses the key ``fold_in(rng, t)``.
    """
    TRACE_COUNTS["generate"] += 1
    model = nnx.merge(graphdef, state)
    batch, total = tokens.shape

    def sample(logits, length):  # (batch, vocab) -> the token at position `length`
        return _sample(logits, jax.random.fold_in(rng, length), temperature, top_p, greedy=greedy,
                       top_k=top_k, use_top_p=use_top_p, vocab_limit=vocab_limit)

    length = prompt_len  # tokens so far; the next one goes to position `length`
    if cache_len:
        cache = init_cache(model.cfg, batch, cache_len)
        logits, cache = model(tokens[:, :prompt_len], cache=cache)  # (batch, prompt_len, vocab)
        tokens = tokens.at[:, prompt_len].set(sample(logits[:, -1], prompt_len))

        def decode_step(length, carry):
            """Feed token ``length - 1`` through the cache; sample the token at ``length``."""
            cache, tokens = carry
            last = jax.lax.dynamic_slice_in_dim(tokens, length - 1, 1, axis=1)  # (batch, 1)
            logits, cache = model(last, cache=cache)  # (batch, 1, vocab)
            return cache, tokens.at[:, length].set(sample(logits[:, 0], length))

        # Token `length - 1` still fits into the cache while length <= cache_len.
        stop = min(total, cache_len + 1)
        _, tokens = jax.lax.fori_loop(prompt_len + 1, stop, decode_step, (cache, tokens))
        length = stop

    window = min(total, model.cfg.max_seq_len)  # the most tokens the model reads at once

    def window_step(length, tokens):
        """Re-read the last ``window`` tokens before ``length``; sample the token at ``length``."""
        start = jnp.maximum(length - window, 0)
        context = jax.lax.dynamic_slice_in_dim(tokens, start, window, axis=1)  # (batch, window)
        # Before the context is full the window also holds not-yet-generated slots after
        # `length`; the causal mask keeps them from affecting the logits at `length - 1`.
        logits = model(context)  # (batch, window, vocab)
        last = jax.lax.dynamic_index_in_dim(logits, length - 1 - start, axis=1, keepdims=False)
        return tokens.at[:, length].set(sample(last, length))

    if length < total:
        tokens = jax.lax.fori_loop(length, total, window_step, tokens)
    return tokens


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
    vocab_limit: int | None = None,
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
      vocab_limit: None, or sample only ids below it (``1 <= vocab_limit <= vocab_size``): the
        logits of ids ``>= vocab_limit`` (e.g. a vocabulary padded to a multiple of 64) are set to
        ``-inf`` before the temperature, the filters and the argmax.

    Returns:
      ``(batch, prompt_len + max_new_tokens)`` int32 numpy array: the prompt then the new tokens
      (``(prompt_len + max_new_tokens,)`` for a 1-D prompt). Beyond ``max_seq_len`` tokens the
      context slides (see the module docstring).

    >>> from jaxtricks.lm.config import ModelConfig
    >>> cfg = ModelConfig(vocab_size=257, num_layers=1, d_model=32, num_heads=2, d_ff=64,
    ...                   max_seq_len=16)
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
    if vocab_limit is not None and (
        isinstance(vocab_limit, bool) or not isinstance(vocab_limit, (int, np.integer))
        or not 1 <= vocab_limit <= cfg.vocab_size
    ):
        raise ValueError(
            f"vocab_limit={vocab_limit!r} must be None or an integer in [1, vocab_size="
            f"{cfg.vocab_size}]."
        )
    vocab_limit = None if vocab_limit is None else int(vocab_limit)
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
    if max_new_tokens == 0:
        return prompt[0].astype(np.int32) if squeeze else prompt.astype(np.int32)
    window = min(total, cfg.max_seq_len)  # the most tokens the model reads at once
    tokens = np.zeros((batch, total), np.int32)
    tokens[:, :prompt_len] = prompt
    graphdef, state = nnx.split(model)
    tokens = _generate(
        graphdef, state, jnp.asarray(tokens), rng, jnp.float32(temperature),
        jnp.float32(1.0 if top_p is None else top_p), greedy=temperature == 0, top_k=top_k,
        use_top_p=top_p is not None, vocab_limit=vocab_limit, prompt_len=prompt_len,
        cache_len=window if use_cache and prompt_len < window else 0,
    )
    out = np.asarray(tokens)
    return out[0] if squeeze else out
