r"""The Flax NNX decoder-only transformer language model (GPT-2 shaped, pre-norm).

tokens -> token embedding (+ learned position embedding) -> dropout -> ``num_layers`` x
[x + attn(LN(x)), x + MLP(LN(x))] -> LN -> logits through the transposed token embedding (tied).

Choices, and why:

- GPT-2's layout and init (nanoGPT's): biases in every linear layer and LayerNorm, weights
  ``normal(0.02)``, the two residual projections of each block ``normal(0.02 / sqrt(2 * layers))``,
  biases zero, norm scales one. GPT-2 small (12 x 768, 12 heads, d_ff 3072, context 1024,
  vocab 50304) has 124,475,904 parameters.
- Attention is ``jax.nn.dot_product_attention`` on ``(batch, seq, heads, head_dim)`` straight
  from one fused q/k/v matmul: no transposes of our own. ``implementation=None`` lets jax
  choose; as of jax 0.10 that is its XLA implementation on every backend (cuDNN's fused kernel
  needs ``implementation="cudnn"`` and fp16/bf16 inputs on a GPU). Without a KV cache (training,
  evaluation) it runs in ``cfg.attention_blocks`` query blocks that skip the masked keys
  (:func:`causal_attention`); ``attention_blocks: 1`` is one ``is_causal=True`` call.
  It has no attention-probability dropout, so dropout is applied where nanoGPT also has it: after
  the embeddings and on each residual branch.
- GELU is the tanh approximation (GPT-2's own, and cheaper than erf on CPU).
- The linear layers and the output layer multiply ``(batch * seq, features)`` matrices
  (:func:`matmul_2d`): their weight gradients are then 2-D matmuls, which XLA:CPU runs faster than
  a contraction over the batch and sequence axes.
- Mixed precision like PyTorch autocast: parameters and the residual stream are float32; the inputs
  of every matmul are cast to ``cfg.dtype``; norms compute in float32; jax computes the attention
  softmax in float32; the logits come out of the tied output matmul in float32.
- Pure: no RNG or other state is mutated inside the module. Dropout takes its key as an argument,
  the KV cache is a :class:`KVCache` pytree passed in and returned, so
  ``nnx.merge(graphdef, params)(...)`` works inside ``jax.jit`` / ``jax.pmap`` and decoding jits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtricks.lm.config import ModelConfig

INIT_STD = 0.02  # GPT-2 / nanoGPT
NORM_EPS = 1e-5  # PyTorch's LayerNorm default, as in GPT-2
ROPE_BASE = 10_000.0


class KVCache(NamedTuple):
    """Keys and values of every layer for the positions decoded so far."""

    keys: tuple[jax.Array, ...]  # num_layers x (batch, max_len, num_heads, head_dim)
    values: tuple[jax.Array, ...]  # num_layers x (batch, max_len, num_heads, head_dim)
    index: jax.Array  # () int32: number of positions filled (the position of the next token)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty KV cache for ``max_len`` positions, in the compute dtype unless ``dtype`` is given.

    Args:
      cfg: the model's config.
      batch_size: number of sequences decoded together.
      max_len: positions the cache holds (prompt + new tokens), at most ``cfg.max_seq_len``.
      dtype: dtype of the cached keys and values; default ``cfg.dtype``.

    Returns:
      A :class:`KVCache` of zeros with ``index == 0``.

    >>> cfg = ModelConfig(num_layers=2, d_model=32, num_heads=4, d_ff=64, max_seq_len=16)
    >>> cache = init_cache(cfg, batch_size=3, max_len=10)
    >>> len(cache.keys), cache.keys[0].shape, int(cache.index)
    (2, (3, 10, 4, 8), 0)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if not 1 <= max_len <= cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} must be in [1, max_seq_len={cfg.max_seq_len}].")
    dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
    shape = (batch_size, max_len, cfg.num_heads, cfg.d_model // cfg.num_heads)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(keys=zeros, values=zeros, index=jnp.zeros((), jnp.int32))


def count_params(model: nnx.Module) -> int:
    """Number of scalars in the model's ``nnx.Param`` variables (also of an ``nnx.eval_shape``)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    r"""Training FLOPs per token (forward + backward), the PaLM / nanoGPT MFU estimate.

    .. math::

        6 N + 12 L T d, \qquad N = L (4 d^2 + 2 d f) + V d

    with :math:`N` the parameters that take part in matmuls: per layer the q/k/v and output
    projections (:math:`4 d^2`) and the MLP (:math:`2 d f`), plus the tied output layer :math:`V d`
    (the embedding lookup and position embeddings cost no FLOPs; biases and norms are ignored).
    :math:`12 L T d` is the attention itself (:math:`QK^T` and :math:`AV`, forward and backward,
    over the full ``seq_len`` :math:`T`, not halved for the causal mask, as in PaLM appendix B).

    Args:
      cfg: the model's config (``L = num_layers``, ``d = d_model``, ``f = d_ff``,
        ``V = vocab_size``).
      seq_len: the training sequence length :math:`T`.

    Returns:
      FLOPs per trained token; multiply by tokens/s and divide by peak FLOP/s for the MFU.

    >>> flops_per_token(ModelConfig(), 128)  # tiny default: 6 * 1,818,816 + 1,179,648
    12092544.0
    """
    d, layers = cfg.d_model, cfg.num_layers
    matmul_params = layers * (4 * d * d + 2 * d * cfg.d_ff) + cfg.vocab_size * d
    return float(6 * matmul_params + 12 * layers * seq_len * d)


# --------------------------------------------------------------------------- layers


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when ``key`` is None (eval) or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


@jax.custom_vjp
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    r"""LayerNorm over the last axis, with a hand-written backward pass.

    .. math::
        \hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}, \qquad y = \hat x \, s + b

    The backward pass is the closed form PyTorch and Apex use,
    :math:`dx = (g - \overline{g} - \hat x \, \overline{g \hat x}) / \sqrt{\sigma^2 + \epsilon}`
    with :math:`g = dy \, s` (bars: means over the last axis), from :math:`\hat x` and the inverse
    standard deviation saved by the forward pass. Autodiff of the forward pass gave XLA:CPU a
    backward that recomputed the statistics inside several large fusions: with this one the CPU
    train step ran 1.1x to 1.25x faster (about 1.0x since :func:`matmul_2d` removed the copies
    those fusions fed) and needs 12% less scratch memory (BENCHMARKS.md). Only first derivatives
    are defined (``jax.custom_vjp``).

    Args:
      x: ``(..., features)``; computed in its dtype (the model passes float32).
      scale: ``(features,)``.
      bias: ``(features,)``.

    Returns:
      ``y``, shaped and typed as ``x``.
    """
    return _layer_norm_forward(x, scale, bias)[0]


def _layer_norm_forward(x, scale, bias):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + NORM_EPS)
    x_hat = centered * inv_std
    return x_hat * scale + bias, (x_hat, inv_std, scale)


def _layer_norm_backward(saved, dy):
    x_hat, inv_std, scale = saved
    g = dy * scale
    dx = inv_std * (
        g - jnp.mean(g, axis=-1, keepdims=True)
        - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True)
    )
    leading = tuple(range(dy.ndim - 1))
    return dx, jnp.sum(dy * x_hat, axis=leading), jnp.sum(dy, axis=leading)


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nnx.Module):
    """:func:`layer_norm` computed in float32 (two passes: mean, then variance); output in
    ``dtype``."""

    def __init__(self, features: int, dtype):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(x.astype(jnp.float32), self.scale[...], self.bias[...])
        return y.astype(self.dtype)


def matmul_2d(x: jax.Array, kernel: jax.Array, **kwargs) -> jax.Array:
    r"""``x @ kernel`` over the last axis of ``x``, computed as one 2-D matmul.

    .. math::
        y_{\ldots j} = \sum_i x_{\ldots i} \, W_{ij}

    The leading axes of ``x`` (batch, sequence) are merged into one before the matmul and split
    again after it, as PyTorch's ``F.linear`` does. The result is the same; what changes is the
    backward pass: the kernel's gradient becomes a plain ``(features_in, n) @ (n, features_out)``
    matmul instead of a contraction over two axes, which XLA:CPU ran 1.15x slower in the training
    step of the tiny model (BENCHMARKS.md, "Where the time goes").

    Args:
      x: ``(..., features_in)``.
      kernel: ``(features_in, features_out)``.
      **kwargs: passed to ``jax.lax.dot_general`` (``precision``, ``preferred_element_type``).

    Returns:
      ``(..., features_out)``.
    """
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())), **kwargs)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 out_sharding=None):
    """``nnx.Linear``'s ``dot_general`` (``inputs @ kernel``) through :func:`matmul_2d`."""
    expected = (((lhs.ndim - 1,), (0,)), ((), ()))
    if dimension_numbers != expected or out_sharding is not None:
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision=precision,
            preferred_element_type=preferred_element_type, out_sharding=out_sharding,
        )
    return matmul_2d(lhs, rhs, precision=precision, preferred_element_type=preferred_element_type)


def _linear(features_in: int, features_out: int, std: float, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        features_in, features_out, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(std), dot_general=_dot_general, rngs=rngs,
    )


def rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    r"""Rotary position embedding (Su et al.), rotating the two halves of ``head_dim`` (GPT-NeoX).

    .. math::

        (x_1, x_2) \mapsto (x_1 \cos p\theta_i - x_2 \sin p\theta_i,\;
                            x_2 \cos p\theta_i + x_1 \sin p\theta_i),
        \qquad \theta_i = 10000^{-2i / h}

    Args:
      x: ``(batch, seq, heads, head_dim)`` queries or keys; ``head_dim`` even.
      positions: ``(seq,)`` or ``(batch, seq)`` integer positions.

    Returns:
      ``x`` rotated, same shape and dtype (the angles are computed in float32).

    References:
      Su et al., RoFormer: Enhanced Transformer with Rotary Position Embedding, 2021,
      https://arxiv.org/abs/2104.09864
    """
    half = x.shape[-1] // 2
    inv_freq = ROPE_BASE ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (half,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (batch?, seq, half)
    sin = jnp.sin(angles)[..., None, :]  # (batch?, seq, 1, half)
    cos = jnp.cos(angles)[..., None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_blocks: int = 1) -> jax.Array:
    r"""Causal self-attention computed in ``num_blocks`` blocks of queries.

    .. math::
        y_t = \sum_{s \le t} \operatorname{softmax}_s\!\left(q_t \cdot k_s / \sqrt{h}\right) v_s

    Query block :math:`[a, b)` attends to keys :math:`[0, b)` only: the score blocks above the
    diagonal, masked anyway, are never computed, which skips :math:`(n - 1) / 2n` of the
    :math:`T \times T` scores for :math:`n` blocks (3/8 for 4). Each block is one
    ``jax.nn.dot_product_attention`` call with its causal mask, so the result equals the
    one-call ``is_causal=True`` attention to float rounding. On XLA:CPU, 4 blocks made the
    attention's forward and backward 1.5x (sequence 128) to 2x (sequence 1024) faster
    (``benchmarks/bench_attention.py``; BENCHMARKS.md, "Attention alone").

    Args:
      q, k, v: ``(batch, seq, heads, head_dim)``.
      num_blocks: query blocks (as equal as ``seq`` allows); 1, or ``seq < 2 * num_blocks``,
        makes one ``is_causal=True`` call over the whole sequence.

    Returns:
      ``(batch, seq, heads, head_dim)``.
    """
    seq = q.shape[1]
    if num_blocks <= 1 or seq < 2 * num_blocks:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=None)
    bounds = [seq * i // num_blocks for i in range(num_blocks + 1)]
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        mask = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]  # (end - start, end)
        outputs.append(jax.nn.dot_product_attention(
            q[:, start:end], k[:, :end], v[:, :end], mask=mask[None, None], implementation=None,
        ))
    return jnp.concatenate(outputs, axis=1)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention through ``jax.nn.dot_product_attention``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_model // cfg.num_heads
        self.use_rope = cfg.position == "rope"
        self.attention_blocks = cfg.attention_blocks
        self.qkv = _linear(cfg.d_model, 3 * cfg.d_model, INIT_STD, dtype, rngs)
        self.proj = _linear(
            cfg.d_model, cfg.d_model, INIT_STD / math.sqrt(2 * cfg.num_layers), dtype, rngs
        )

    def __call__(self, x, positions, cache_kv=None, cache_index=None):
        batch, seq, _ = x.shape
        # One matmul for q, k and v; jnp.split (lax.split) rather than indexing, so the backward
        # pass is one concatenate instead of three zero-pads and two adds (~2% of a CPU step).
        shape = (batch, seq, self.num_heads, self.head_dim)
        q, k, v = (t.reshape(shape) for t in jnp.split(self.qkv(x), 3, axis=-1))
        if self.use_rope:
            q, k = rope(q, positions), rope(k, positions)
        if cache_kv is None:
            y = causal_attention(q, k, v, self.attention_blocks)
            new_kv = None
        else:
            cached_k, cached_v = cache_kv  # (batch, max_len, heads, head_dim)
            start = (0, cache_index, 0, 0)
            cached_k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), start)
            cached_v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), start)
            # Query i sits at position cache_index + i and sees cached positions <= its own; the
            # slots not yet written are masked too. (is_causal would align the mask at position 0.)
            query_pos = cache_index + jnp.arange(seq)
            mask = jnp.arange(cached_k.shape[1])[None, :] <= query_pos[:, None]  # (seq, max_len)
            y = jax.nn.dot_product_attention(
                q, cached_k.astype(q.dtype), cached_v.astype(q.dtype), mask=mask[None, None],
                implementation=None,
            )
            new_kv = (cached_k, cached_v)
        return self.proj(y.reshape(batch, seq, -1)), new_kv


class MLP(nnx.Module):
    """d_model -> d_ff -> GELU (tanh) -> d_model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.up = _linear(cfg.d_model, cfg.d_ff, INIT_STD, dtype, rngs)
        self.down = _linear(
            cfg.d_ff, cfg.d_model, INIT_STD / math.sqrt(2 * cfg.num_layers), dtype, rngs
        )

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x), approximate=True))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.dropout = cfg.dropout
        self.norm_attn = LayerNorm(cfg.d_model, dtype)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.norm_mlp = LayerNorm(cfg.d_model, dtype)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, dropout_rng=None, cache_kv=None, cache_index=None):
        attn_key = mlp_key = None
        if dropout_rng is not None:
            attn_key, mlp_key = jax.random.split(dropout_rng)
        y, new_kv = self.attn(self.norm_attn(x), positions, cache_kv, cache_index)
        x = x + _dropout(y, self.dropout, attn_key)  # float32 residual stream
        x = x + _dropout(self.mlp(self.norm_mlp(x)), self.dropout, mlp_key)
        return x, new_kv


class Transformer(nnx.Module):
    """Decoder-only transformer LM with tied input/output embeddings.

    >>> cfg = ModelConfig(num_layers=2, d_model=32, num_heads=4, d_ff=64, max_seq_len=16)
    >>> model = Transformer(cfg, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((3, 10), jnp.int32)).shape
    (3, 10, 257)
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=nnx.initializers.normal(INIT_STD),
            rngs=rngs,
        )
        self.pos_embed = (
            nnx.Embed(
                cfg.max_seq_len, cfg.d_model, embedding_init=nnx.initializers.normal(INIT_STD),
                rngs=rngs,
            )
            if cfg.position == "learned"
            else None  # rotary positions have no parameters
        )
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm_out = LayerNorm(cfg.d_model, jnp.dtype(cfg.dtype))

    def __call__(self, tokens, *, dropout_rng=None, positions=None, cache=None):
        """Logits of the next token at every position.

        Args:
          tokens: ``(batch, seq)`` int token ids.
          dropout_rng: None for no dropout (eval); a PRNG key for dropout at rate ``cfg.dropout``.
          positions: ``(seq,)`` or ``(batch, seq)`` int positions; default ``arange(seq)``, or
            ``cache.index + arange(seq)`` with a cache.
          cache: a :class:`KVCache` (see :func:`init_cache`) for incremental decoding.

        Returns:
          ``(batch, seq, vocab_size)`` float32 logits; with a cache, ``(logits, new_cache)`` where
          ``new_cache`` holds these ``seq`` positions too and its index advanced by ``seq``.
        """
        cfg = self.cfg
        batch, seq = tokens.shape
        if seq > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq} exceeds the model's max_seq_len={cfg.max_seq_len}."
            )
        if positions is None:
            positions = jnp.arange(seq, dtype=jnp.int32)
            if cache is not None:
                positions = cache.index + positions
        x = self.embed(tokens)  # (batch, seq, d_model) float32
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        if dropout_rng is not None:
            x = _dropout(x, cfg.dropout, jax.random.fold_in(dropout_rng, 0))
        new_keys, new_values = [], []
        for layer, block in enumerate(self.blocks):
            layer_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, layer + 1)
            cache_kv = None if cache is None else (cache.keys[layer], cache.values[layer])
            x, new_kv = block(
                x, positions, layer_rng, cache_kv, None if cache is None else cache.index
            )
            if cache is not None:
                new_keys.append(new_kv[0])
                new_values.append(new_kv[1])
        x = self.norm_out(x)  # (batch, seq, d_model) in the compute dtype
        embedding = self.embed.embedding[...].astype(x.dtype)  # (vocab, d_model)
        logits = matmul_2d(x, embedding.T, preferred_element_type=jnp.float32)
        if cache is None:
            return logits
        return logits, KVCache(tuple(new_keys), tuple(new_values), cache.index + seq)
