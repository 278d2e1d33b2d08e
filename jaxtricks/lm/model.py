r"""The Flax NNX decoder-only transformer language model (GPT-2 shaped, pre-norm).

tokens -> token embedding (+ learned position embedding) -> dropout -> ``num_layers`` x
[x + attn(LN(x)), x + MLP(LN(x))] -> LN -> logits through the transposed token embedding (tied).

Choices, and why:

- GPT-2's layout and init (nanoGPT's): biases in every linear layer and LayerNorm, weights
  ``normal(0.02)``, the two residual projections of each block ``normal(0.02 / sqrt(2 * layers))``,
  biases zero, norm scales one. GPT-2 small (12 x 768, 12 heads, d_ff 3072, context 1024,
  vocab 50304) has 124,475,904 parameters.
- The layers are Flax's own: ``nnx.Embed``, ``nnx.Linear`` and ``nnx.LayerNorm`` (epsilon 1e-5
  and two-pass statistics, as ``torch.nn.LayerNorm``).
- Attention is ``jax.nn.dot_product_attention(..., is_causal=True)`` on
  ``(batch, seq, heads, head_dim)`` straight from one fused q/k/v matmul: no transposes of our
  own. It has no attention-probability dropout, so dropout is applied where nanoGPT also has it:
  after the embeddings and on each residual branch.
- GELU is the tanh approximation (GPT-2's own).
- Mixed precision like PyTorch autocast: parameters and the residual stream are float32; the inputs
  of every matmul are cast to ``cfg.dtype``; norms compute in float32; jax computes the attention
  softmax in float32; the logits come out of the tied output matmul in float32.
- Pure: no RNG or other state is mutated inside the module. Dropout takes its key as an argument,
  the KV cache is a :class:`KVCache` pytree passed in and returned, so
  ``nnx.merge(graphdef, params)(...)`` works inside ``jax.jit`` / ``jax.pmap`` and decoding jits.
- On the CPU backend the same model computes through :mod:`jaxtricks.lm.cpu`, written for
  XLA:CPU: LayerNorm with a hand-written backward pass, the linear and output layers as 2-D
  matmuls, and (``model.attention=auto``) attention without a cache in query blocks that skip
  the masked keys. The parameters are the same on both paths, and so is the function (to float
  rounding); :class:`Transformer` chooses once, when it is built (``cpu_paths``). On a GPU,
  ``auto`` attention is cuDNN's fused kernel where it applies (:func:`attention_kind`).
- Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``, ``norm``)
  as Flax's ``out_sharding`` metadata; :mod:`jaxtricks.lm.sharding` maps them to mesh axes. The
  model itself never places an array (``eager_sharding=False``): it builds, runs and jits the same
  without a mesh.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtricks.lm import cpu
from jaxtricks.lm.config import ModelConfig
from jaxtricks.lm.sharding import constrain

INIT_STD = 0.02  # GPT-2 / nanoGPT
NORM_EPS = cpu.NORM_EPS  # 1e-5: PyTorch's LayerNorm default, as in GPT-2
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

    >>> cfg = ModelConfig(vocab_size=257, num_layers=2, d_model=32, num_heads=4, d_ff=64,
    ...                   max_seq_len=16)
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

    >>> flops_per_token(ModelConfig(vocab_size=257), 128)  # 6 * 622,720 + 589,824
    4326144.0
    """
    d, layers = cfg.d_model, cfg.num_layers
    matmul_params = layers * (4 * d * d + 2 * d * cfg.d_ff) + cfg.vocab_size * d
    return float(6 * matmul_params + 12 * layers * seq_len * d)


# --------------------------------------------------------------------------- layers


def attention_kind(cfg: ModelConfig, cpu_paths: bool) -> str:
    """How attention without a cache is computed: ``"cpu_blocks"`` (:func:`cpu.causal_attention`),
    or the ``implementation`` of ``jax.nn.dot_product_attention``: ``"cudnn"`` or ``"xla"``.

    ``model.attention=auto`` takes the CPU blocks on the CPU paths, cuDNN's fused kernel on a GPU
    when the compute dtype is bfloat16 and the head dimension a multiple of 8 up to 128 (what the
    kernel accepts), XLA otherwise. ``xla`` and ``cudnn`` are taken as asked (the trainer refuses
    ``cudnn`` where it cannot run, before compiling).
    """
    if cfg.attention != "auto":
        return cfg.attention
    if cpu_paths:
        return "cpu_blocks"
    head_dim = cfg.d_model // cfg.num_heads
    if (jax.default_backend() == "gpu" and cfg.dtype == "bfloat16" and head_dim % 8 == 0
            and head_dim <= 128):
        return "cudnn"
    return "xla"



def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when ``key`` is None (eval) or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def _axes(*names: str | None) -> dict:
    """A parameter's logical axis names, as Flax metadata; placing it is left to the trainer."""
    return {"out_sharding": names, "eager_sharding": False}


def _linear(features_in: int, features_out: int, std: float, dtype, cpu_paths: bool,
            rngs: nnx.Rngs, axes: tuple[str, str]) -> nnx.Linear:
    """A biased ``nnx.Linear`` with float32 parameters that computes in ``dtype``; ``axes`` are
    the kernel's logical names (the bias takes the output's, ``norm`` when that is ``embed``)."""
    return nnx.Linear(
        features_in, features_out, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(std),
        dot_general=cpu.linear_dot_general if cpu_paths else jax.lax.dot_general, rngs=rngs,
        kernel_metadata=_axes(*axes),
        bias_metadata=_axes("norm" if axes[1] == "embed" else axes[1]),
    )


def _layer_norm(features: int, cpu_paths: bool) -> nnx.LayerNorm:
    """``nnx.LayerNorm`` over the last axis, computed and returned in float32 (autocast's rule for
    ``layer_norm``; the next matmul casts to the compute dtype)."""
    norm = cpu.LayerNorm if cpu_paths else nnx.LayerNorm
    # Its scale (ones) and bias (zeros) take no random draws: a separate Rngs leaves the model's
    # seed to the embeddings and linear layers.
    return norm(
        features, epsilon=NORM_EPS, dtype=jnp.float32, param_dtype=jnp.float32,
        use_fast_variance=False, rngs=nnx.Rngs(0), scale_metadata=_axes("norm"),
        bias_metadata=_axes("norm"),
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


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention through ``jax.nn.dot_product_attention``."""

    def __init__(self, cfg: ModelConfig, *, cpu_paths: bool, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_model // cfg.num_heads
        self.use_rope = cfg.position == "rope"
        self.attention = attention_kind(cfg, cpu_paths)
        # One fused q/k/v kernel: its output axis holds q, k, v one after another, so a tensor
        # split of it is not head-aligned (XLA moves the heads into place after the matmul).
        self.qkv = _linear(cfg.d_model, 3 * cfg.d_model, INIT_STD, dtype, cpu_paths, rngs,
                           axes=("embed", "heads"))
        self.proj = _linear(
            cfg.d_model, cfg.d_model, INIT_STD / math.sqrt(2 * cfg.num_layers), dtype, cpu_paths,
            rngs, axes=("heads", "embed"),
        )

    def __call__(self, x, positions, cache_kv=None, cache_index=None):
        batch, seq, _ = x.shape  # x: (batch, seq, d_model)
        # One matmul for q, k and v; jnp.split (lax.split) rather than indexing, so the backward
        # pass is one concatenate instead of three zero-pads and two adds.
        shape = (batch, seq, self.num_heads, self.head_dim)
        q, k, v = (t.reshape(shape) for t in jnp.split(self.qkv(x), 3, axis=-1))
        if self.use_rope:
            q, k = rope(q, positions), rope(k, positions)
        if cache_kv is None:
            if self.attention == "cpu_blocks":
                y = cpu.causal_attention(q, k, v, cpu.ATTENTION_BLOCKS)
            else:
                y = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                 implementation=self.attention)
            new_kv = None  # y: (batch, seq, heads, head_dim)
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
        return self.proj(y.reshape(batch, seq, -1)), new_kv  # (batch, seq, d_model)


class MLP(nnx.Module):
    """d_model -> d_ff -> GELU (tanh) -> d_model."""

    def __init__(self, cfg: ModelConfig, *, cpu_paths: bool, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.up = _linear(cfg.d_model, cfg.d_ff, INIT_STD, dtype, cpu_paths, rngs,
                          axes=("embed", "mlp"))
        self.down = _linear(
            cfg.d_ff, cfg.d_model, INIT_STD / math.sqrt(2 * cfg.num_layers), dtype, cpu_paths,
            rngs, axes=("mlp", "embed"),
        )

    def __call__(self, x):  # (batch, seq, d_model) -> (batch, seq, d_ff) -> (batch, seq, d_model)
        return self.down(jax.nn.gelu(self.up(x), approximate=True))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ModelConfig, *, cpu_paths: bool, rngs: nnx.Rngs):
        self.dropout = cfg.dropout
        self.norm_attn = _layer_norm(cfg.d_model, cpu_paths)
        self.attn = CausalSelfAttention(cfg, cpu_paths=cpu_paths, rngs=rngs)
        self.norm_mlp = _layer_norm(cfg.d_model, cpu_paths)
        self.mlp = MLP(cfg, cpu_paths=cpu_paths, rngs=rngs)

    def __call__(self, x, positions, dropout_rng=None, cache_kv=None, cache_index=None):
        attn_key = mlp_key = None
        if dropout_rng is not None:
            attn_key, mlp_key = jax.random.split(dropout_rng)
        y, new_kv = self.attn(self.norm_attn(x), positions, cache_kv, cache_index)
        x = x + _dropout(y, self.dropout, attn_key)  # (batch, seq, d_model) float32 residual
        x = x + _dropout(self.mlp(self.norm_mlp(x)), self.dropout, mlp_key)
        return x, new_kv


class Transformer(nnx.Module):
    """Decoder-only transformer LM with tied input/output embeddings.

    Args:
      cfg: the model's sizes, positions, dropout rate and compute dtype.
      rngs: the initialization's randomness (``nnx.Rngs(seed)``).
      cpu_paths: compute through :mod:`jaxtricks.lm.cpu`'s paths; default (None): when
        ``jax.default_backend() == "cpu"``. The parameters are the same either way.

    >>> cfg = ModelConfig(vocab_size=257, num_layers=2, d_model=32, num_heads=4, d_ff=64,
    ...                   max_seq_len=16)
    >>> model = Transformer(cfg, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((3, 10), jnp.int32)).shape
    (3, 10, 257)
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, cpu_paths: bool | None = None):
        if not isinstance(cfg.vocab_size, int):
            raise ValueError(
                f"vocab_size={cfg.vocab_size!r}: a model needs a number of embedding rows; "
                "'auto' is resolved by jaxtricks.lm.config.Config from the tokenizer.")
        self.cfg = cfg
        # The one place the CPU paths are chosen: XLA:CPU runs them faster; other backends (and
        # their fused attention kernels) take the plain layers.
        self.cpu_paths = jax.default_backend() == "cpu" if cpu_paths is None else bool(cpu_paths)
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=nnx.initializers.normal(INIT_STD),
            rngs=rngs, embedding_metadata=_axes("vocab", "embed"),
        )
        self.pos_embed = (
            nnx.Embed(
                cfg.max_seq_len, cfg.d_model, embedding_init=nnx.initializers.normal(INIT_STD),
                rngs=rngs, embedding_metadata=_axes(None, "embed"),
            )
            if cfg.position == "learned"
            else None  # rotary positions have no parameters
        )
        self.blocks = nnx.List(
            [Block(cfg, cpu_paths=self.cpu_paths, rngs=rngs) for _ in range(cfg.num_layers)]
        )
        self.norm_out = _layer_norm(cfg.d_model, self.cpu_paths)

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
        x = constrain(x, "batch", None, None)  # rows over the devices, the width whole
        if dropout_rng is not None:
            x = _dropout(x, cfg.dropout, jax.random.fold_in(dropout_rng, 0))
        new_keys, new_values = [], []
        for layer, block in enumerate(self.blocks):
            layer_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, layer + 1)
            cache_kv = None if cache is None else (cache.keys[layer], cache.values[layer])
            x, new_kv = block(
                x, positions, layer_rng, cache_kv, None if cache is None else cache.index
            )
            x = constrain(x, "batch", None, None)
            if cache is not None:
                new_keys.append(new_kv[0])
                new_values.append(new_kv[1])
        dtype = jnp.dtype(cfg.dtype)
        x = self.norm_out(x).astype(dtype)  # (batch, seq, d_model)
        embedding = self.embed.embedding[...].astype(dtype)  # (vocab, d_model)
        if self.cpu_paths:
            logits = cpu.matmul_2d(x, embedding.T, preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("bsd,vd->bsv", x, embedding, preferred_element_type=jnp.float32)
        if cache is None:
            return logits  # (batch, seq, vocab) float32
        return logits, KVCache(tuple(new_keys), tuple(new_values), cache.index + seq)
