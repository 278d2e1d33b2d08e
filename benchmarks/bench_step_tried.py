"""What was tried on the CPU training step and not kept, measured against the step that was kept.

``bench_step.py`` measures the step as ``train.py`` runs it, against PyTorch, and what each kept
speed-up gives. This script measures the rest of "Where the time goes" in BENCHMARKS.md: rewrites
of the model, of the step and of XLA's options that were tried and did not pay, so that every
figure of that list comes from a script. The model code of each rewrite lives here, not in
``jaxtricks``: a patch applied only while its step is traced and compiled.

Sections (``--sections``):
  step  each rewrite's step compiled in the same process as the kept step (``jaxtricks``' own
        ``make_steps``, the default optimizer), the two run in alternating blocks of steps, each
        step's metrics read once the next one is queued (as the trainer does); the median of
        the paired ratios (rewrite's time / kept step's) and their interquartile range. The
        first row, "kept step again", is the kept step compiled once more: an A/A control, whose
        ratio is what the method reports for no change (the first step compiled in a process
        ran 2-4% slower than later copies, so one is compiled and dropped before the
        reference);
  dots  GFLOP/s of the small model's matmul shapes in the three forms of a linear layer's
        forward and backward, under XLA's default (YNNPACK's dots), XLA with Eigen's dots, and
        PyTorch (in a worker process of its own), side by side;
  executor  how XLA:CPU's runtime uses the second core: one program of n independent batched
        dots of the tiny model's attention shape, its time over n times one dot's, and the
        cores the process kept busy, for n from 1 to 16; PyTorch's batched dot beside them;
  hlo   which XLA:CPU options change the tiny model's compiled step at all: each one's optimized
        HLO (metadata stripped) compared with the default's.

Usage:
  python benchmarks/bench_step_tried.py                  # every section, tiny and small models
  python benchmarks/bench_step_tried.py --sections step --models tiny --pairs 20
  python benchmarks/bench_step_tried.py --sections step --pairs 36 --copies 3 \
      --rewrites "kept step again,einsum attention"   # each side compiled 3 times
  python benchmarks/bench_step_tried.py --quick          # a smoke run (seconds), as in the tests
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import (  # noqa: E402
    MODELS,
    QUICK_MODELS,
    TOTAL_STEPS,
    _tokens,
    default_model,
    default_optimizer,
    make_spec,
)
from common import (  # noqa: E402
    Worker,
    busy_seconds,
    machine_line,
    markdown_table,
    median,
    median_seconds,
)

# --------------------------------------------------------------------------- the rewrites


def _einsum_blocks(q, k, v, num_blocks, layout="bshd"):
    """Causal attention in query blocks (as ``jaxtricks.model.causal_attention``), each block
    written as two einsums and a softmax instead of ``jax.nn.dot_product_attention``. ``layout``
    "bhsd": q, k, v already transposed to (batch, heads, seq, head_dim)."""
    import jax
    import jax.numpy as jnp

    seq = q.shape[1] if layout == "bshd" else q.shape[2]
    scale = q.shape[-1] ** -0.5
    scores_eq, out_eq = (("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd") if layout == "bshd"
                         else ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"))
    bounds = [seq * i // num_blocks for i in range(num_blocks + 1)]
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if layout == "bshd":
            qb, kb, vb = q[:, start:end], k[:, :end], v[:, :end]
        else:
            qb, kb, vb = q[:, :, start:end], k[:, :, :end], v[:, :, :end]
        scores = jnp.einsum(scores_eq, qb * scale, kb)
        mask = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        outputs.append(jnp.einsum(out_eq, jax.nn.softmax(scores, axis=-1), vb))
    return jnp.concatenate(outputs, axis=1 if layout == "bshd" else 2)


def einsum_attention(q, k, v, num_blocks=1):
    """Attention's query blocks as two einsums each, not ``jax.nn.dot_product_attention``."""
    return _einsum_blocks(q, k, v, max(num_blocks, 1))


def head_major_attention(q, k, v, num_blocks=1):
    """q, k and v transposed once to (batch, heads, seq, head_dim) and the blocks written as
    einsums in that layout, to spare the per-block transposes of the key and value prefixes."""
    t = (0, 2, 1, 3)
    y = _einsum_blocks(q.transpose(t), k.transpose(t), v.transpose(t), max(num_blocks, 1), "bhsd")
    return y.transpose(t)


def batch_parts_attention(q, k, v, num_blocks=1, parts=2):
    """The kept attention computed on ``parts`` equal parts of the batch, which XLA may run side
    by side (each YNNPACK batched dot of attention runs on one thread)."""
    import jax.numpy as jnp

    causal_attention = ORIGINALS[("jaxtricks.model", "causal_attention")]  # the kept one
    return jnp.concatenate([causal_attention(*qkv, num_blocks) for qkv in zip(
        jnp.split(q, parts), jnp.split(k, parts), jnp.split(v, parts), strict=True)])


def two_pass_layer_norm(x, scale, bias):
    """LayerNorm in two passes (mean, then the variance of the centred input), left to
    autodiff."""
    import jax
    import jax.numpy as jnp

    from jaxtricks.model import NORM_EPS

    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(var + NORM_EPS) * scale + bias


@functools.cache
def _gelu_with_vjp():
    """tanh-GELU with a hand-written backward (its derivative in closed form)."""
    import jax
    import jax.numpy as jnp

    c = (2 / jnp.pi) ** 0.5

    @jax.custom_vjp
    def gelu(x):
        return jax.nn.gelu(x, approximate=True)

    def fwd(x):
        return gelu(x), x

    def bwd(x, dy):
        inner = c * (x + 0.044715 * x**3)
        t = jnp.tanh(inner)
        grad = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
        return (dy * grad,)

    gelu.defvjp(fwd, bwd)
    return gelu


def mlp_with_gelu_vjp(self, x):
    """``jaxtricks.model.MLP.__call__`` with the hand-written GELU backward."""
    return self.down(_gelu_with_vjp()(self.up(x)))


@functools.cache
def _matmul_with_vjp(form: str):
    """``matmul_2d`` with a custom backward: "transposed W" computes the input gradient as
    ``dY @ W^T`` with ``W^T`` made explicit (an ``optimization_barrier`` keeps XLA from folding
    the transpose back into the dot); "ynnpack dW" computes the weight gradient as
    ``barrier(X^T) @ dY``, a plain matmul that YNNPACK takes, instead of ``X^T dY`` with both
    operands contracted on their rows, which XLA:CPU runs as an Eigen dot."""
    import jax

    def dot(a, b):
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())))

    @jax.custom_vjp
    def mm(x2, w):
        return dot(x2, w)

    def fwd(x2, w):
        return dot(x2, w), (x2, w)

    def bwd(saved, dy):
        x2, w = saved
        if form == "transposed W":
            dx = dot(dy, jax.lax.optimization_barrier(w.T))
            dw = jax.lax.dot_general(x2, dy, (((0,), (0,)), ((), ())))
        else:
            dx = jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())))
            dw = dot(jax.lax.optimization_barrier(x2.T), dy)
        return dx, dw

    mm.defvjp(fwd, bwd)

    def matmul(x, kernel, **kwargs):
        del kwargs  # float32 here: no precision or preferred type to pass on
        y = mm(x.reshape(-1, x.shape[-1]), kernel)
        return y.reshape(*x.shape[:-1], kernel.shape[-1])

    return matmul


def transposed_w_matmul(x, kernel, **kwargs):
    """``matmul_2d`` whose input gradient multiplies by an explicit ``W^T``."""
    return _matmul_with_vjp("transposed W")(x, kernel, **kwargs)


def ynnpack_dw_matmul(x, kernel, **kwargs):
    """``matmul_2d`` whose weight gradient is ``barrier(X^T) @ dY``."""
    return _matmul_with_vjp("ynnpack dW")(x, kernel, **kwargs)


def batch_halves_train_step(state, batch, rng, *, graphdef, rest, optimizer, axis_name):
    """``jaxtricks.step.train_step`` with the loss and gradient computed as two
    ``value_and_grad`` calls on the two halves of the batch, averaged (each half its own dropout
    key), which XLA may run side by side on the two cores."""
    import jax
    import optax
    from flax import nnx

    from jaxtricks.step import TrainState, cross_entropy, optimizer_stats

    assert axis_name is None, "one device only"
    dropout_rng = jax.random.fold_in(rng, state.step)
    half = batch["inputs"].shape[0] // 2

    def loss_fn(params, part, key):
        model = nnx.merge(graphdef, params, rest)
        return cross_entropy(model(batch["inputs"][part], dropout_rng=key),
                             batch["targets"][part])

    (loss_a, grads_a), (loss_b, grads_b) = (
        jax.value_and_grad(loss_fn)(state.params, part, jax.random.fold_in(dropout_rng, i))
        for i, part in enumerate((slice(None, half), slice(half, None))))
    grads = jax.tree.map(lambda a, b: (a + b) / 2, grads_a, grads_b)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": (loss_a + loss_b) / 2, **optimizer_stats(opt_state)}
    return TrainState(state.step + 1, params, opt_state), metrics


# XLA:CPU compiled with Eigen's dots instead of YNNPACK's (YNNPACK keeps the reductions).
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}

# name -> (what it is, {(owner, attribute): replacement} patched while the step is traced, XLA
# compiler options). Each is the kept step with that one thing changed; owners are named by their
# import path, so that the arguments are checked before JAX is imported.
REWRITES = {
    "kept step again": (
        "the kept step compiled a second time: an A/A control, whose ratio shows the noise",
        {}, {}),
    "einsum attention": (
        "each query block of attention as two einsums instead of jax.nn.dot_product_attention",
        {("jaxtricks.model", "causal_attention"): einsum_attention}, {}),
    "head-major attention": (
        "q, k, v transposed once to (batch, heads, seq, head_dim), the blocks as einsums in "
        "that layout", {("jaxtricks.model", "causal_attention"): head_major_attention}, {}),
    "attention in batch halves": (
        "attention computed on two halves of the batch",
        {("jaxtricks.model", "causal_attention"): batch_parts_attention}, {}),
    "attention in batch eighths": (
        "attention computed on eight parts of the batch: with 4 query blocks, 32 independent "
        "chains of dots, more than the 8 ready thunks XLA:CPU's executor needs before it hands "
        "work to a second thread", {("jaxtricks.model", "causal_attention"):
                                    functools.partial(batch_parts_attention, parts=8)}, {}),
    "step in batch halves": (
        "loss and gradient as two value_and_grad calls on the batch halves, averaged",
        {("jaxtricks.step", "train_step"): batch_halves_train_step}, {}),
    "two-pass LayerNorm, autodiff": (
        "LayerNorm as mean, then variance of the centred input, differentiated by JAX",
        {("jaxtricks.model", "layer_norm"): two_pass_layer_norm}, {}),
    "GELU backward by hand": (
        "tanh-GELU with a custom_vjp giving its derivative in closed form",
        {("jaxtricks.model.MLP", "__call__"): mlp_with_gelu_vjp}, {}),
    "transposed W": (
        "input gradients as dY @ W^T with W^T explicit (optimization_barrier)",
        {("jaxtricks.model", "matmul_2d"): transposed_w_matmul}, {}),
    "weight gradients on YNNPACK": (
        "weight gradients as barrier(X^T) @ dY (YNNPACK) instead of an Eigen dot",
        {("jaxtricks.model", "matmul_2d"): ynnpack_dw_matmul}, {}),
    "Eigen dots": (
        "XLA option xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE: Eigen's "
        "dots, YNNPACK's reductions", {}, EIGEN_DOTS),
    "concurrency-optimized schedule": (
        "XLA option xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED", {},
        {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}),
    "memory-optimized schedule": (
        "XLA option xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED", {},
        {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}),
    "Eigen on one thread": (
        "XLA option xla_cpu_multi_thread_eigen=false", {}, {"xla_cpu_multi_thread_eigen": False}),
}
REWRITES["step in batch halves + einsum attention"] = (
    "the two above at once", {**REWRITES["step in batch halves"][1],
                              **REWRITES["einsum attention"][1]}, {})


def _owner(path: str):
    """The module or class that ``path`` names (``"jaxtricks.model.MLP"``)."""
    import importlib

    try:
        return importlib.import_module(path)
    except ImportError:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)


ORIGINALS: dict = {}  # (owner path, attribute) -> what it was before ``patched`` replaced it


@contextlib.contextmanager
def patched(replacements: dict):
    """Set each ``(owner, attribute)`` to its replacement; put the originals back on exit."""
    owners = {path: _owner(path) for path, _ in replacements}
    ORIGINALS.update({(path, name): getattr(owners[path], name) for path, name in replacements})
    try:
        for (path, name), value in replacements.items():
            setattr(owners[path], name, value)
        yield
    finally:
        for path, name in replacements:
            setattr(owners[path], name, ORIGINALS[(path, name)])


# --------------------------------------------------------------------------- compiled steps


class CompiledStep:
    """The trainer's jitted step (``make_steps``), traced and compiled ahead of time with
    ``replacements`` patched in and ``compiler_options`` given to XLA, plus its own state."""

    def __init__(self, spec: dict, replacements: dict | None = None,
                 compiler_options: dict | None = None):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from jaxtricks.config import ModelConfig, OptimizerConfig
        from jaxtricks.model import Transformer
        from jaxtricks.optimizer import optimizer_from_config
        from jaxtricks.step import TrainState, make_steps

        with patched(replacements or {}):
            model = Transformer(ModelConfig(**spec["model"]), rngs=nnx.Rngs(0))
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            optimizer = optimizer_from_config(OptimizerConfig(**spec["optimizer"]), TOTAL_STEPS)
            steps = make_steps(graphdef, rest, optimizer, "single")
            self.state = steps.put_state(TrainState(jnp.int32(0), params, optimizer.init(params)))
            tokens = _tokens(spec)
            self.batch = steps.put_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
            self.rng = jax.random.key(0)
            lowered = steps.train.lower(self.state, self.batch, self.rng)
            self.compiled = lowered.compile(compiler_options or None)
        analysis = self.compiled.memory_analysis()
        self.temp_mb = None if analysis is None else analysis.temp_size_in_bytes / 2**20
        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
        self.first_loss = float(metrics["loss"])

    def hlo(self) -> str:
        """The optimized HLO without what depends on the Python source rather than on XLA: the
        ops' metadata, the tables of source locations, the module's name."""
        text = re.sub(r",? metadata=\{[^}]*\}", "", self.compiled.as_text())
        text = re.sub(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n(.+\n)*\n?", "",
                      text, flags=re.M)
        return re.sub(r"^HloModule \S+", "HloModule", text, flags=re.M)

    def run(self, n: int) -> float:
        """Seconds for ``n`` steps, each step's metrics read once the next one is queued."""
        import jax

        metrics = None
        start = time.perf_counter()
        for _ in range(n):
            pending = metrics
            self.state, metrics = self.compiled(self.state, self.batch, self.rng)
            if pending is not None:
                float(pending["loss"])
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start


def paired(kept: list[CompiledStep], other: list[CompiledStep], pairs: int, steps: int):
    """Times of ``pairs`` pairs of blocks of ``steps`` steps, the two run back to back (the order
    swapped every pair), pair ``i`` on the ``i % len``-th compiled copy of each: (kept's block
    times, other's block times)."""
    kept_s, other_s = [], []
    for i in range(pairs):
        a, b = kept[i % len(kept)], other[i % len(other)]
        if i % 2:
            other_s.append(b.run(steps))
            kept_s.append(a.run(steps))
        else:
            kept_s.append(a.run(steps))
            other_s.append(b.run(steps))
    return kept_s, other_s


def quartiles(values: list[float]) -> tuple[float, float, float]:
    import numpy as np

    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return float(q1), float(q2), float(q3)


def section_step(models: dict, names: list[str], pairs: int, copies: int = 1) -> str:
    out = []
    table = REWRITES
    out.append("Each rewrite: " + "; ".join(f"**{n}**: {table[n][0]}" for n in names) + ".\n")
    for label, (arch, batch, seq) in models.items():
        spec = make_spec(arch, batch, seq, default_optimizer())
        # The first step compiled in a process ran 2-4% slower than later copies of the same
        # program (A/A rows: 0.961x, 0.961x, 0.992x); with one compiled and dropped first, the
        # copies measured 1.022x, 1.031x, 0.999x (BENCHMARKS.md). So the reference comes second.
        throwaway = CompiledStep(spec)
        throwaway.run(2)
        del throwaway
        # Copies of one program differed by a few percent (the A/A rows), so with ``copies`` > 1
        # each side is compiled that many times and the pairs cycle through the copies.
        kept = [CompiledStep(spec) for _ in range(copies)]
        for k in kept:
            k.run(2)
        steps = max(2, round(2.0 / (kept[0].run(2) / 2)))  # blocks of ~2 s, two steps at least
        rows, kept_times, kept_hlo = [], [], kept[0].hlo()
        for name in names:
            _, replacements, options = table[name]
            other = [CompiledStep(spec, replacements, options) for _ in range(copies)]
            for o in other:
                o.run(2)
            kept_s, other_s = paired(kept, other, pairs, steps)
            kept_times += kept_s
            q1, q2, q3 = quartiles([b / a for a, b in zip(kept_s, other_s, strict=True)])
            rows.append([label, name, f"{1e3 * median(other_s) / steps:.0f}", f"**{q2:.3f}**",
                         f"{q1:.3f}-{q3:.3f}", f"{other[0].temp_mb:.0f}",
                         f"{other[0].first_loss:.4f}",
                         "same" if other[0].hlo() == kept_hlo else "changed"])
            del other
        rows.insert(0, [label, "kept step", f"{1e3 * median(kept_times) / steps:.0f}", "1",
                        "", f"{kept[0].temp_mb:.0f}", f"{kept[0].first_loss:.4f}", ""])
        on_copies = f", cycling through {copies} compiled copies of each" if copies > 1 else ""
        out.append(f"{label}: {arch}, batch {batch} x {seq}, {pairs} pairs of blocks of "
                   f"{steps} steps{on_copies}\n")
        out.append(markdown_table(
            ["model", "step", "ms per step", "time / kept step's (median of pairs)",
             "IQR", "XLA temp MB", "first step's loss", "optimized HLO vs kept step's"],
            rows) + "\n")
    out.append("Every rewrite starts from the same parameters and batch, so its first step's loss "
               "is the kept step's when it computes the same function; \"changed\" says that "
               "its compiled program is not the kept one (metadata aside). \"kept step again\" "
               "is the kept program compiled a second time: its ratio is what this method "
               "reports for no change at all; read the other ratios against it.\n")
    return "\n".join(out)


# --------------------------------------------------------------------------- dots


def dot_cases(arch: dict, batch: int, seq: int) -> list[tuple[str, tuple, tuple, tuple]]:
    """(name, lhs shape, rhs shape, dot_general contracting dims) of a linear layer's three
    matmuls for each of the model's weight shapes: forward ``X W``, input gradient ``dY W^T``
    (rhs contracted on its last axis), weight gradient ``X^T dY`` (both on their first)."""
    n, d, f = batch * seq, arch["d_model"], arch["d_ff"]
    cases = []
    for k, m in ((d, 3 * d), (d, d), (d, f), (f, d)):
        cases += [(f"X W {n}x{k} . {k}x{m}", (n, k), (k, m), ((1,), (0,))),
                  (f"dY W^T {n}x{m} . ({k}x{m})^T", (n, m), (k, m), ((1,), (1,))),
                  (f"X^T dY ({n}x{k})^T . {n}x{m}", (n, k), (n, m), ((0,), (0,)))]
    return cases


class JaxDots:
    """Each case's dot jitted with XLA's default options and with Eigen's dots."""

    def __init__(self, cases):
        import jax
        import jax.numpy as jnp

        self.fns = {}
        for name, lhs, rhs, contract in cases:
            a = jax.random.normal(jax.random.key(0), lhs, jnp.float32)
            b = jax.random.normal(jax.random.key(1), rhs, jnp.float32)
            lowered = jax.jit(functools.partial(
                jax.lax.dot_general, dimension_numbers=(contract, ((), ())))).lower(a, b)
            for backend, options in (("XLA (YNNPACK)", None), ("XLA (Eigen)", EIGEN_DOTS)):
                self.fns[(name, backend)] = (lowered.compile(options), a, b)

    def time(self, name: str, backend: str, calls: int) -> float:
        import jax

        fn, a, b = self.fns[(name, backend)]
        return median_seconds(lambda: jax.block_until_ready(fn(a, b)), calls)


class TorchDots:
    """Each case as ``torch.matmul`` of (transposed views of) float32 tensors, 2 threads."""

    def __init__(self, cases):
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        self.fns = {}
        for name, lhs, rhs, contract in cases:
            a, b = torch.randn(lhs), torch.randn(rhs)
            if contract == ((1,), (1,)):
                self.fns[name] = (lambda a=a, b=b: a @ b.T)
            elif contract == ((0,), (0,)):
                self.fns[name] = (lambda a=a, b=b: a.T @ b)
            else:
                self.fns[name] = (lambda a=a, b=b: a @ b)

    def time(self, name: str, backend: str, calls: int) -> float:
        del backend
        return median_seconds(self.fns[name], calls)


def section_dots(label: str, arch: dict, batch: int, seq: int, rounds: int, calls: int,
                 with_torch: bool) -> str:
    cases = dot_cases(arch, batch, seq)
    backends = ["XLA (YNNPACK)", "XLA (Eigen)"] + (["PyTorch"] if with_torch else [])
    workers = {"XLA (YNNPACK)": Worker(JaxDots, cases)}
    workers["XLA (Eigen)"] = workers["XLA (YNNPACK)"]  # one JAX process holds both
    if with_torch:
        workers["PyTorch"] = Worker(TorchDots, cases)
    try:
        times = {(c[0], b): [] for c in cases for b in backends}
        for r in range(rounds):  # interleaved: every case and backend once per round
            for name, *_ in cases:
                for backend in backends[r % len(backends):] + backends[:r % len(backends)]:
                    times[(name, backend)].append(
                        workers[backend].call("time", name, backend, calls))
    finally:
        for w in {id(w): w for w in workers.values()}.values():
            w.close()
    rows = []
    for name, lhs, rhs, contract in cases:
        flops = 2 * lhs[0] * lhs[1] * rhs[1 - contract[1][0]]  # lhs x rhs's free axis
        rows.append([f"`{name}`"] + [f"{flops / median(times[(name, b)]) / 1e9:.0f}"
                                      for b in backends])
    head = (f"{label}: {arch}, batch {batch} x {seq}; GFLOP/s, median of {rounds} interleaved "
            f"rounds of {calls} calls each (the median call of each round)\n")
    return head + "\n" + markdown_table(["dot"] + [f"{b} GFLOP/s" for b in backends], rows)


# --------------------------------------------------------------------------- executor

EXECUTOR_COUNTS = (1, 2, 8, 9, 10, 16)


class JaxIndependentDots:
    """For each count n, one jitted program of n independent batched dots ``q k^T`` (attention's
    scores, head-major), each on arrays of its own, so that nothing orders them."""

    def __init__(self, spec):
        from jaxtricks.step import tune_host_malloc

        tune_host_malloc()  # as train.py does, before JAX starts its threads
        import jax
        import jax.numpy as jnp

        shape, counts = spec
        self.fns = {}
        for n in counts:
            qs = [jax.random.normal(jax.random.key(i), shape, jnp.float32) for i in range(n)]
            ks = [jax.random.normal(jax.random.key(100 + i), shape, jnp.float32) for i in range(n)]
            fn = jax.jit(lambda qs, ks: [jnp.einsum("bhqd,bhkd->bhqk", q, k)
                                         for q, k in zip(qs, ks, strict=True)])
            self.fns[n] = (fn, qs, ks)

    def time(self, n: int, calls: int) -> tuple[float, float]:
        import jax

        fn, qs, ks = self.fns[n]
        return busy_seconds(lambda: jax.block_until_ready(fn(qs, ks)), calls)


class TorchBatchedDot:
    """The same batched dot as ``torch.matmul(q, k.transpose(-1, -2))``, on all cores."""

    def __init__(self, spec):
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        shape, _ = spec
        self.q, self.k = torch.randn(shape), torch.randn(shape)

    def time(self, n: int, calls: int) -> tuple[float, float]:
        del n
        return busy_seconds(lambda: self.q @ self.k.transpose(-1, -2), calls)


def section_executor(label: str, arch: dict, batch: int, seq: int, counts: tuple[int, ...],
                     rounds: int, calls: int, with_torch: bool) -> str:
    """How XLA:CPU runs independent work: n independent batched dots of attention's shape in
    one program, their time over n times one dot's (1.0: one after another; 0.5: two at once),
    and the cores the process kept busy; PyTorch's one batched dot beside them."""
    heads = arch["num_heads"]
    shape = (batch, heads, seq, arch["d_model"] // heads)
    spec = (shape, counts)
    cases = [("XLA", n) for n in counts] + ([("PyTorch", 1)] if with_torch else [])
    workers = {"XLA": Worker(JaxIndependentDots, spec)}
    if with_torch:
        workers["PyTorch"] = Worker(TorchBatchedDot, spec)
    try:
        seconds = {c: [] for c in cases}
        busy = {c: [] for c in cases}
        for r in range(rounds):  # interleaved: every case once per round, rotating the order
            for case in cases[r % len(cases):] + cases[:r % len(cases)]:
                s, b = workers[case[0]].call("time", case[1], calls)
                seconds[case].append(s)
                busy[case].append(b)
    finally:
        for w in workers.values():
            w.close()
    one = seconds[("XLA", 1)]
    rows = []
    for framework, n in cases:
        what = "1 batched dot" if n == 1 else f"{n} independent batched dots"
        ratio = ""  # over n times XLA's one dot, in the same round: for XLA's programs only
        if framework == "XLA":
            per_round = [s / (n * o) for s, o in zip(seconds[("XLA", n)], one, strict=True)]
            ratio = f"{median(per_round):.2f}"
        rows.append([f"{framework}: {what}", f"{median(seconds[(framework, n)]) * 1e3:.2f}",
                     ratio, f"{median(busy[(framework, n)]):.2f}"])
    head = (f"{label}: attention's scores `q k^T`, q and k of shape {shape} (batch, heads, seq, "
            f"head_dim) each; median of {rounds} interleaved rounds of {calls} calls each; "
            f"{os.cpu_count()} cores\n")
    return head + "\n" + markdown_table(
        ["program", "ms per call", "time / (n x one dot's)", "cores busy"], rows)


# --------------------------------------------------------------------------- hlo

QUICK_HLO_OPTIONS = ("xla_cpu_enable_fast_math", "xla_cpu_experimental_ynn_fusion_type")
HLO_OPTIONS = {  # XLA:CPU options tried on the step (as compiler options: the same DebugOptions)
    "xla_cpu_use_xnnpack": True,
    "xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY",
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,"
    "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
    "xla_cpu_experimental_enable_tiling_propagation": True,
    "xla_cpu_enable_concurrency_optimized_scheduler": True,
    "xla_cpu_enable_fast_math": True,
    "xla_cpu_multi_thread_eigen": False,
    "xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME",
    "xla_cpu_copy_insertion_use_region_analysis": True,
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "xla_cpu_use_fusion_emitters": False,
    **EIGEN_DOTS,
}


def section_hlo(label: str, arch: dict, batch: int, seq: int, options: dict) -> str:
    import difflib

    spec = make_spec(arch, batch, seq, default_optimizer())
    default = CompiledStep(spec).hlo().splitlines()
    rows = []
    for option, value in options.items():
        try:
            text = CompiledStep(spec, compiler_options={option: value}).hlo().splitlines()
        except Exception as e:  # an option this jaxlib does not know: say so, go on
            rows.append([f"`{option}={value}`", f"not accepted: {str(e).splitlines()[0][:80]}"])
            continue
        changed = sum(1 for line in difflib.unified_diff(default, text, lineterm="", n=0)
                      if line[:1] in "+-" and line[:3] not in ("+++", "---"))
        rows.append([f"`{option}={value}`",
                     "unchanged, byte for byte" if text == default else f"{changed} lines differ"])
    head = (f"{label}: the compiled step's optimized HLO ({len(default)} lines, metadata "
            "stripped) with each option, against the default's\n")
    return head + "\n" + markdown_table(["XLA option", "optimized HLO"], rows)


# --------------------------------------------------------------------------- main

SECTIONS = ("step", "dots", "executor", "hlo")


def main(argv=None) -> None:
    import importlib.util

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--models", default="tiny,small",
                        help=f"models of the step section: default, {', '.join(MODELS)} (default: "
                        "configs/default.yaml's model, batch and sequence length)")
    parser.add_argument("--rewrites", default=None,
                        help="comma-separated rewrites of the step section (default: all)")
    parser.add_argument("--pairs", type=int, default=10,
                        help="alternating pairs of blocks per rewrite (step section)")
    parser.add_argument("--copies", type=int, default=1,
                        help="compiled copies of the kept step and of each rewrite, the pairs "
                        "cycling through them (step section)")
    parser.add_argument("--no-torch", action="store_true", help="leave out PyTorch's dots")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model, two pairs, a few calls: a smoke run")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.copies < 1 or args.pairs < 1:
        parser.error(f"--copies and --pairs: at least 1 (got {args.copies}, {args.pairs})")
    known = list(REWRITES)
    names = known if args.rewrites is None else args.rewrites.split(",")
    if unknown := set(names) - set(known):
        parser.error(f"--rewrites: unknown {sorted(unknown)}; choose from {', '.join(known)}")
    if args.quick:
        models, pairs, rounds, calls = QUICK_MODELS, 2, 1, 2
    else:
        chosen = args.models.split(",")
        if unknown := set(chosen) - {"default", *MODELS}:
            parser.error(f"--models: unknown {sorted(unknown)}; choose from default, "
                         f"{', '.join(MODELS)}")
        models = {m: default_model() if m == "default" else MODELS[m] for m in chosen}
        pairs, rounds, calls = args.pairs, 5, 10
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None

    from jaxtricks.step import tune_host_malloc

    tune_host_malloc()  # as train.py does, before JAX starts its threads
    start = time.perf_counter()
    command = " ".join(["python benchmarks/bench_step_tried.py", *(argv or sys.argv[1:])])
    print(f"command: `{command}`\n\nmachine: {machine_line()}\n")
    if "step" in sections:
        print("### Rewrites of the step, each against the kept step in one process\n")
        print(section_step(models, names, pairs, args.copies))
    if "dots" in sections:
        label, (arch, batch, seq) = ("quick", QUICK_MODELS["quick"]) if args.quick else \
            ("small", MODELS["small"])
        print("### The model's matmuls alone\n")
        print(section_dots(label, arch, batch, seq, rounds, calls, with_torch) + "\n")
        if not with_torch:
            print("PyTorch: not installed or --no-torch, so no PyTorch column\n")
    if "executor" in sections:
        label, (arch, batch, seq) = ("quick", QUICK_MODELS["quick"]) if args.quick else \
            ("tiny", MODELS["tiny"])
        counts = (1, 10) if args.quick else EXECUTOR_COUNTS
        print("### Independent work in one program: when XLA:CPU runs it on a second thread\n")
        print(section_executor(label, arch, batch, seq, counts, 3 * rounds, calls, with_torch)
              + "\n")
    if "hlo" in sections:
        label, (arch, batch, seq) = ("quick", QUICK_MODELS["quick"]) if args.quick else \
            ("tiny", MODELS["tiny"])
        print("### XLA options: which change the compiled step\n")
        options = ({k: HLO_OPTIONS[k] for k in QUICK_HLO_OPTIONS} if args.quick else HLO_OPTIONS)
        print(section_hlo(label, arch, batch, seq, options) + "\n")
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
