r"""Everything that exists only to make the trainer fast on a CPU, in one place.

Two kinds of things live here:

- Process settings that must be applied before JAX starts its backend (:func:`tune_host_malloc`,
  :func:`use_cpu_devices`). They are harmless on GPU and TPU hosts.
- The model's CPU paths: the same functions as the plain model's layers, written the way XLA:CPU
  runs fastest (:class:`LayerNorm` with a hand-written backward pass, :func:`matmul_2d` for the
  linear layers and the tied output layer, :func:`causal_attention` in query blocks).
  :class:`jaxtricks.lm.model.Transformer` takes them when ``jax.default_backend() == "cpu"``
  (its ``cpu_paths`` argument forces either choice); they create no parameters of their own, so a
  checkpoint written on one path loads in the other.
"""

from __future__ import annotations

import ctypes
import os
import platform

import jax
import jax.numpy as jnp
from flax import nnx

HOST_MALLOC_ENV = "JAXTRICKS_HOST_MALLOC"  # "default": leave glibc's malloc as it is
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>
NORM_EPS = 1e-5  # PyTorch's nn.LayerNorm default, as in GPT-2 (the model's epsilon too)
ATTENTION_BLOCKS = 4  # query blocks of causal_attention in the model (3/8 of the scores skipped)


# --------------------------------------------------------------------------- process settings


def tune_host_malloc() -> bool:
    """Keep the host memory of XLA:CPU's per-step buffers mapped from one step to the next.

    XLA:CPU allocates each step's temporary buffers with ``malloc`` from its worker threads and
    frees them when the step ends. glibc serves blocks that large with ``mmap`` and unmaps them on
    ``free``, so every step page-faults all of them in again and the kernel zeroes each page. One
    malloc arena, no ``mmap`` and no trimming keep them mapped. Trimming is off altogether
    (threshold -1), not only above 2 GiB (the largest other threshold glibc takes): with the next
    step dispatched while one runs, as the trainer does, two steps' buffers of a larger model can
    push the free heap top past 2 GiB, and glibc would give it back every step. The price is
    resident memory: freed memory stays with the process, so its resident size stays at its peak,
    and that peak is higher than with glibc's defaults.

    Call it before JAX starts its backend (before the first array or ``jax.devices()``): threads
    that already have their own malloc arena keep it. ``train.py`` and ``jaxtricks lr-find`` call
    it first thing. It changes the whole process's ``malloc``, so the library never calls it on
    import. Nothing happens without glibc (macOS, musl) or with
    ``JAXTRICKS_HOST_MALLOC=default``; on a GPU or TPU it only concerns host memory.

    Returns:
      Whether glibc accepted the settings.

    References:
      mallopt(3), the Linux manual page: ``M_ARENA_MAX``, ``M_MMAP_MAX``, ``M_TRIM_THRESHOLD``,
      https://man7.org/linux/man-pages/man3/mallopt.3.html
    """
    if os.environ.get(HOST_MALLOC_ENV) == "default" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    settings = [(_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)]
    return all(mallopt(option, value) == 1 for option, value in settings)


def use_cpu_devices(count: int | None) -> None:
    """Split the host's CPU into ``count`` JAX devices (JAX's ``jax_num_cpu_devices``).

    With more than one local device :func:`jaxtricks.lm.step.make_steps` (``parallelism="auto"``)
    runs the step under ``jax.pmap``, each device on its share of the batch. The CPU devices share
    the cores: two half-batch steps side by side can fill the time during which XLA:CPU keeps one
    thread busy and the others idle (attention's small batched matmuls, reductions). Whether that
    pays depends on the model and the machine; ``benchmarks/bench_step.py`` measures it. ``None``
    leaves JAX's default (one CPU device, or ``--xla_force_host_platform_device_count``). GPU and
    TPU devices are not affected.

    Call it before JAX starts its backends; ``jaxtricks.lm.training.preflight`` does.

    Raises:
      ValueError: the backends have already started with another number of CPU devices.
    """
    if count is None:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backends have started: fine if they have ``count`` already
        have = len(jax.devices("cpu"))
        if have != count:
            raise ValueError(
                f"cpu_devices={count} cannot be applied: JAX's CPU backend has already started "
                f"in this process with {have} device(s). Set it before JAX starts (train.py "
                "does), or leave it null."
            ) from None


# --------------------------------------------------------------------------- the model's paths


@jax.custom_vjp
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    r"""LayerNorm over the last axis (epsilon :data:`NORM_EPS`), with a hand-written backward pass.

    .. math::
        \hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}, \qquad y = \hat x \, s + b

    with :math:`\mu, \sigma^2` the mean and the biased variance over the last axis, computed in two
    passes (mean, then variance), as ``torch.nn.LayerNorm``. The backward pass is the closed form
    PyTorch and Apex use,
    :math:`dx = (g - \overline{g} - \hat x \, \overline{g \hat x}) / \sqrt{\sigma^2 + \epsilon}`
    with :math:`g = dy \, s` (bars: means over the last axis), from :math:`\hat x` and the inverse
    standard deviation saved by the forward pass. It exists because autodiff of the forward pass
    gives XLA:CPU a backward that recomputes the statistics inside several large fusions. Only first
    derivatives are defined (``jax.custom_vjp``).

    Args:
      x: ``(..., features)``; computed in its dtype (:class:`LayerNorm` passes float32).
      scale: ``(features,)``.
      bias: ``(features,)``.

    Returns:
      ``y``, shaped and typed as ``x``.

    References:
      Ba et al., Layer Normalization, 2016, https://arxiv.org/abs/1607.06450;
      https://pytorch.org/docs/stable/generated/torch.nn.LayerNorm.html
    """
    return _layer_norm_forward(x, scale, bias)[0]


def _layer_norm_forward(x, scale, bias):
    mean = jnp.mean(x, axis=-1, keepdims=True)  # (..., 1)
    centered = x - mean
    inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + NORM_EPS)
    x_hat = centered * inv_std  # (..., features)
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


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` (the same parameters, made by its ``__init__``) computed by
    :func:`layer_norm` in float32, the result in ``dtype`` (float32 when None).

    Only what :func:`layer_norm` computes is accepted: the last axis, a scale and a bias, epsilon
    :data:`NORM_EPS`.
    """

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, **kwargs)
        settings = (self.epsilon, self.reduction_axes, self.feature_axes, self.use_scale,
                    self.use_bias)
        if settings != (NORM_EPS, -1, -1, True, True):
            raise ValueError(
                "jaxtricks.lm.cpu.LayerNorm computes (epsilon, reduction_axes, feature_axes, "
                f"use_scale, use_bias) = ({NORM_EPS}, -1, -1, True, True) only, got {settings}."
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(x.astype(jnp.float32), self.scale[...], self.bias[...])
        return y if self.dtype is None else y.astype(self.dtype)


def matmul_2d(x: jax.Array, kernel: jax.Array, **kwargs) -> jax.Array:
    r"""``x @ kernel`` over the last axis of ``x``, computed as one 2-D matmul.

    .. math::
        y_{\ldots j} = \sum_i x_{\ldots i} \, W_{ij}

    The leading axes of ``x`` (batch, sequence) are merged into one before the matmul and split
    again after it, as PyTorch's ``torch.nn.functional.linear`` does. The result is the same; what
    changes is the backward pass: the kernel's gradient becomes a plain
    ``(features_in, n) @ (n, features_out)`` matmul instead of a contraction over two axes, which
    XLA:CPU runs more slowly.

    Args:
      x: ``(..., features_in)``.
      kernel: ``(features_in, features_out)``.
      **kwargs: passed to ``jax.lax.dot_general`` (``precision``, ``preferred_element_type``).

    Returns:
      ``(..., features_out)``.

    >>> matmul_2d(jnp.ones((2, 3, 4)), jnp.ones((4, 5))).shape
    (2, 3, 5)
    """
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())), **kwargs)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def linear_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                       out_sharding=None):
    """``nnx.Linear``'s ``dot_general`` (``inputs @ kernel``) through :func:`matmul_2d`; any
    other contraction, or one with an ``out_sharding``, goes to ``jax.lax.dot_general``."""
    expected = (((lhs.ndim - 1,), (0,)), ((), ()))
    if dimension_numbers != expected or out_sharding is not None:
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision=precision,
            preferred_element_type=preferred_element_type, out_sharding=out_sharding,
        )
    return matmul_2d(lhs, rhs, precision=precision, preferred_element_type=preferred_element_type)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_blocks: int = 1) -> jax.Array:
    r"""Causal self-attention computed in ``num_blocks`` blocks of queries.

    .. math::
        y_t = \sum_{s \le t} \operatorname{softmax}_s\!\left(q_t \cdot k_s / \sqrt{h}\right) v_s

    Query block :math:`[a, b)` attends to keys :math:`[0, b)` only: the score blocks above the
    diagonal, masked anyway, are never computed, which skips :math:`(n - 1) / 2n` of the
    :math:`T \times T` scores for :math:`n` blocks (3/8 for 4), as FlashAttention's causal tiling
    skips them. Each block is one ``jax.nn.dot_product_attention`` call with its causal mask, so
    the result equals the one-call ``is_causal=True`` attention to float rounding.
    The model uses :data:`ATTENTION_BLOCKS` blocks (``model.attention=auto`` on a CPU);
    ``python benchmarks/bench_step.py --variant model.attention=xla`` measures the whole step
    with one call instead.

    Args:
      q, k, v: ``(batch, seq, heads, head_dim)``.
      num_blocks: query blocks (as equal as ``seq`` allows); 1, or ``seq < 2 * num_blocks``,
        makes one ``is_causal=True`` call over the whole sequence.

    Returns:
      ``(batch, seq, heads, head_dim)``.

    References:
      Vaswani et al., Attention Is All You Need, 2017, https://arxiv.org/abs/1706.03762;
      Dao et al., FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness,
      2022, https://arxiv.org/abs/2205.14135

    >>> q = k = v = jnp.ones((1, 8, 2, 4))
    >>> causal_attention(q, k, v, num_blocks=4).shape
    (1, 8, 2, 4)
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
        ))  # (batch, end - start, heads, head_dim)
    return jnp.concatenate(outputs, axis=1)
