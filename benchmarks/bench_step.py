"""Training-step throughput on CPU: jaxtricks' jitted train step vs the same model in PyTorch.

The JAX side is the real thing the trainer runs: ``Transformer`` + ``optimizer_from_config`` of the
default ``OptimizerConfig`` (adamw, clip 1.0, cosine schedule, skip_nonfinite) + ``make_steps``'s
jitted ``train_step`` with its donated state. The PyTorch side is the same architecture written
here (pre-norm GPT-2: tied embedding, learned positions, LayerNorm, fused qkv Linear with bias,
``F.scaled_dot_product_attention(is_causal=True)``, tanh GELU, final LayerNorm, GPT-2 init),
trained eagerly with ``AdamW(betas=(0.9, 0.99), eps=1e-8, weight_decay=0)`` +
``clip_grad_norm_(1.0)`` + a cosine ``LambdaLR``.

Each framework lives in its own worker process (so neither's thread pool competes with the other's
and ``ru_maxrss`` is its own peak memory); the parent interleaves blocks of steps of A and B and
reports medians. The CPU's practical peak is a large float32 matmul measured in the same
interleaved loop by a JAX worker of its own. Synthetic random tokens, one batch placed on the
device once.

Sections (``--sections``):
  step      tokens/s, GFLOP/s, share of the matmul peak, compile time and peak memory for the tiny
            default model and a ~10M-parameter model, JAX vs PyTorch, and the "JAX, <variant>"
            rows: the JAX step with one setting changed (``--variants``): one of its CPU
            speed-ups undone, or ``cpu_devices=2``, or ``train.microbatches`` (gradient
            accumulation, unrolled or scanned), or XLA flags added (``--xla-flags``), so that
            what each gives is measured in the same run;
  breakdown forward / backward / optimizer time of each framework (same models);
  scaling   step time vs sequence length (fixed 4,096 tokens per batch) and vs width.

Usage:
  python benchmarks/bench_step.py                 # all sections, about 22 minutes
  python benchmarks/bench_step.py --quick         # a tiny smoke run (seconds), as in the tests
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OthersShare, Worker, markdown_table, max_rss_mb, median  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_YAML = os.path.join(REPO, "configs", "default.yaml")
VOCAB = 257
# (architecture, batch, seq). "tiny" is the default model (configs/default.yaml when the
# issue was filed), "small" the ~10M-parameter one; --models default: configs/default.yaml now.
MODELS = {
    "tiny": (dict(num_layers=4, d_model=192, num_heads=4, d_ff=768), 32, 128),
    "small": (dict(num_layers=6, d_model=384, num_heads=6, d_ff=1536), 32, 128),  # 10.8M params
}
QUICK_MODELS = {"quick": (dict(num_layers=1, d_model=32, num_heads=2, d_ff=128), 8, 16)}
TOTAL_STEPS = 10_000  # length of the cosine schedule of both optimizers (no effect on speed)
# "JAX" is the step as train.py runs it. Each variant ("JAX, <name>" rows, --variants) is the same
# step with one setting changed, measured in the same interleaved run: one of the CPU speed-ups of
# BENCHMARKS.md undone (the ratio of the step times is what that fix gives), or an opt-in setting
# (cpu_devices=2, train.microbatches; the ratio is what it gives).
VARIANTS = {
    "glibc malloc": "without jaxtricks.lm.cpu.tune_host_malloc() (glibc's malloc as it is)",
    "heap trimmed above 2 GiB": "tune_host_malloc() with its trim threshold before commit "
    "3f92316: glibc gives the free heap top back once it passes 2 GiB",
    "autodiff LayerNorm": "LayerNorm as before its hand-written backward: one pass, autodiff",
    "3-D matmuls": "linear layers contracting over (batch, seq) instead of one merged axis",
    "one attention call": "model.attention_blocks=1: no query blocks",
    "2 CPU devices": "cpu_devices=2: the CPU split into two JAX devices, the step pmapped over "
    "two halves of the batch",
    "2 unrolled microbatches": "train.microbatches=2, unroll_microbatches=true: the gradient "
    "accumulated over two halves of the batch in an unrolled loop, which XLA may run side by side",
    "4 unrolled microbatches": "the same with four quarters",
    "8 unrolled microbatches": "the same with eight eighths",
    "4 microbatches": "train.microbatches=4: four quarters in turn (a scan), one quarter's "
    "activations in memory at a time",
}
# (train.microbatches, train.unroll_microbatches) of the variants that set them.
MICROBATCHES = {"2 unrolled microbatches": (2, True), "4 unrolled microbatches": (4, True),
                "8 unrolled microbatches": (8, True), "4 microbatches": (4, False)}
# The variants run by default: each JAX worker holds its model's buffers (up to 3 GB for the small
# model), so all of them at once would not fit a 24 GB machine; the others with --variants.
DEFAULT_VARIANTS = [v for v in VARIANTS if v not in MICROBATCHES]


def _undo(variant: str) -> None:
    """Put back, in this worker process, what ``variant`` names (see ``VARIANTS``)."""
    import jax
    import jax.numpy as jnp

    import jaxtricks.lm.model as model

    if variant == "autodiff LayerNorm":  # jaxtricks' LayerNorm before commit baec7f7

        def layer_norm(x, scale, bias):
            mean = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.maximum(jnp.mean(jnp.square(x), axis=-1, keepdims=True) - mean**2, 0.0)
            return (x - mean) * jax.lax.rsqrt(var + model.NORM_EPS) * scale + bias

        model.layer_norm = layer_norm
    elif variant == "3-D matmuls":  # nnx.Linear's own dot_general, before commit 96a8ff1

        def matmul(x, kernel, **kwargs):
            return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), **kwargs)

        model.matmul_2d = matmul
    elif variant == "heap trimmed above 2 GiB":  # tune_host_malloc before commit 3f92316
        import ctypes

        from jaxtricks.lm.step import _M_TRIM_THRESHOLD

        ctypes.CDLL(None).mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    elif variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def default_optimizer() -> dict:
    """The optimizer section of configs/default.yaml (what ``python train.py`` trains with)."""
    import dataclasses

    from jaxtricks.lm import config as config_lib

    return dataclasses.asdict(config_lib.load(DEFAULT_YAML).optimizer)


def default_model() -> tuple[dict, int, int]:
    """configs/default.yaml's model, batch size and sequence length."""
    import dataclasses

    from jaxtricks.lm import config as config_lib

    config = config_lib.load(DEFAULT_YAML)
    model = dataclasses.asdict(config.model)
    arch = {k: model[k] for k in ("num_layers", "d_model", "num_heads", "d_ff")}
    return arch, config.train.batch_size, config.data.seq_len


def make_spec(model: dict, batch: int, seq: int, optimizer: dict) -> dict:
    return {"model": {**model, "vocab_size": VOCAB, "max_seq_len": seq}, "batch": batch,
            "seq": seq, "optimizer": optimizer}


def _tokens(spec: dict):
    import numpy as np

    return np.random.default_rng(0).integers(
        0, VOCAB, (spec["batch"], spec["seq"] + 1), dtype=np.int32
    )


# --------------------------------------------------------------------------- JAX worker


# This worker process's own use of the machine over its timed step blocks (``run``), since the
# last ``usage()`` call: wall and CPU seconds, system seconds, minor page faults, steps.
_USAGE = dict.fromkeys(("wall_s", "cpu_s", "sys_s", "minor_faults", "steps"), 0)


def _count_usage(block: OthersShare, seconds: float, steps: int) -> None:
    for key, value in (("wall_s", seconds), ("cpu_s", block.own_cpu_s),
                       ("sys_s", block.own_sys_s), ("minor_faults", block.minor_faults),
                       ("steps", steps)):
        _USAGE[key] += value


def usage() -> dict:
    """What ``_USAGE`` holds, which is then reset."""
    taken = dict(_USAGE)
    _USAGE.update(dict.fromkeys(_USAGE, 0))
    return taken


class _StepBench:
    """What the JAX and PyTorch workers report alike: peak memory over the baseline that each
    takes once its framework has started, and ``usage()``."""

    baseline_mb = 0.0

    def memory(self) -> dict:
        return {"peak_rss_mb": max_rss_mb(), "baseline_mb": self.baseline_mb}

    usage = staticmethod(usage)


class JaxBench(_StepBench):
    """jaxtricks' own train step (make_steps), as ``training.run`` builds it; with ``variant``,
    that step with one setting changed (``VARIANTS``); with ``xla_flags``, XLA started with
    those flags added to XLA_FLAGS."""

    def __init__(self, spec: dict | None = None, variant: str | None = None,
                 xla_flags: str | None = None):
        from jaxtricks.lm.cpu import tune_host_malloc, use_cpu_devices

        if xla_flags:  # read when the backend starts (jax.devices() below), not before
            os.environ["XLA_FLAGS"] = _with_xla_flags(xla_flags)
        if variant != "glibc malloc":
            tune_host_malloc()  # as train.py does, before JAX starts its threads
        if variant is not None:
            _undo(variant)
        self.variant = variant
        import jax

        use_cpu_devices(2 if variant == "2 CPU devices" else None)  # as training.preflight does
        jax.devices()  # start the backend before taking the memory baseline

        self.baseline_mb = max_rss_mb()
        self._matmul = None
        self._parts = None
        if spec is not None:
            self.load(spec)

    def load(self, spec: dict) -> dict:
        import dataclasses

        import jax
        import jax.numpy as jnp
        from flax import nnx

        from jaxtricks.lm.config import ModelConfig, OptimizerConfig, optimizer_from_config
        from jaxtricks.lm.model import Transformer, count_params
        from jaxtricks.lm.step import TrainState, make_steps, unreplicate_metrics

        self.state = self.steps = self._parts = None
        jax.clear_caches()
        cfg = ModelConfig(**spec["model"])
        if self.variant == "one attention call":
            cfg = dataclasses.replace(cfg, attention_blocks=1)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.optimizer = optimizer_from_config(OptimizerConfig(**spec["optimizer"]), TOTAL_STEPS)
        state = TrainState(jnp.int32(0), params, self.optimizer.init(params))
        microbatches, unroll = MICROBATCHES.get(self.variant, (1, False))
        self.steps = make_steps(self.graphdef, self.rest, self.optimizer, "auto",
                                microbatches=microbatches, unroll_microbatches=unroll)
        self.state = self.steps.put_state(state)
        tokens = _tokens(spec)
        self.batch = self.steps.put_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
        self.rng = jax.random.key(0)
        # Ahead-of-time lower + compile: split into tracing and XLA's share; jax.jit caches the
        # executable, so the first call below runs it without compiling again.
        start = time.perf_counter()
        lowered = self.steps.train.lower(self.state, self.batch, self.rng)
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start - lower_s
        analysis = compiled.memory_analysis()
        temp_mb = None if analysis is None else analysis.temp_size_in_bytes / 2**20
        start = time.perf_counter()
        self.state, metrics = self.steps.train(self.state, self.batch, self.rng)
        jax.block_until_ready((self.state, metrics))
        first = time.perf_counter() - start
        return {"params": count_params(model), "first_step_s": first, "lower_s": lower_s,
                "compile_s": compile_s, "xla_temp_mb": temp_mb,
                "loss": unreplicate_metrics(metrics, self.steps)["loss"]}

    def run(self, n: int) -> tuple[float, float | None]:
        """Seconds for ``n`` steps, each step's metrics read once the next one is dispatched (as
        the trainer does), and the share of the CPUs other processes used meanwhile."""
        import jax

        from jaxtricks.lm.step import unreplicate_metrics

        metrics = None
        with OthersShare() as others:
            start = time.perf_counter()
            for _ in range(n):
                pending = metrics
                self.state, metrics = self.steps.train(self.state, self.batch, self.rng)
                if pending is not None:
                    unreplicate_metrics(pending, self.steps)
            jax.block_until_ready((self.state, metrics))
            seconds = time.perf_counter() - start
        _count_usage(others, seconds, n)
        return seconds, others.share

    def matmul(self, size: int, n: int) -> tuple[float, float | None]:
        """Seconds per ``(size, size) @ (size, size)`` float32 matmul (median of ``n``), and
        the share of the CPUs other processes used meanwhile."""
        import jax
        import jax.numpy as jnp

        if self._matmul is None or self._matmul[0] != size:
            a, b = jax.random.normal(jax.random.key(1), (2, size, size), jnp.float32)
            f = jax.jit(jnp.matmul)
            f(a, b).block_until_ready()
            self._matmul = (size, f, a, b)
        _, f, a, b = self._matmul
        times = []
        with OthersShare() as others:
            for _ in range(n):
                start = time.perf_counter()
                f(a, b).block_until_ready()
                times.append(time.perf_counter() - start)
        return median(times), others.share

    def _build_parts(self):
        """Forward, forward+backward and the optimizer update, each jitted on its own."""
        import jax
        import optax
        from flax import nnx

        from jaxtricks.lm.step import cross_entropy

        graphdef, rest, batch, optimizer = self.graphdef, self.rest, self.batch, self.optimizer

        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest)
            return cross_entropy(model(batch["inputs"], dropout_rng=self.rng), batch["targets"])

        def update(grads, opt_state, params):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        fwd = jax.jit(loss_fn)
        fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
        upd = jax.jit(update)
        params, opt_state = self.state.params, self.state.opt_state
        _, grads = jax.block_until_ready(fwd_bwd(params))
        jax.block_until_ready((fwd(params), upd(grads, opt_state, params)))
        self._parts = (fwd, fwd_bwd, upd, grads)

    def breakdown(self, n: int) -> tuple[dict, float | None]:
        """Median milliseconds of forward, backward (= fwd+bwd - fwd), optimizer, full step."""
        import jax

        if self._parts is None:
            self._build_parts()
        fwd, fwd_bwd, upd, grads = self._parts
        params, opt_state = self.state.params, self.state.opt_state

        def timed(fn):
            times = []
            for _ in range(n):
                start = time.perf_counter()
                jax.block_until_ready(fn())
                times.append(time.perf_counter() - start)
            return 1e3 * median(times)

        with OthersShare() as others:
            t_fwd = timed(lambda: fwd(params))
            t_fwd_bwd = timed(lambda: fwd_bwd(params))
            t_upd = timed(lambda: upd(grads, opt_state, params))
            t_step = 1e3 * median([self.run(1)[0] for _ in range(n)])
        return {"forward": t_fwd, "backward": t_fwd_bwd - t_fwd, "optimizer": t_upd,
                "step": t_step}, others.share


# --------------------------------------------------------------------------- PyTorch worker


def _torch_gpt():
    """The PyTorch twin of jaxtricks.lm.model.Transformer (learned positions, tied embedding)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d_model, num_heads, d_ff):
            super().__init__()
            self.num_heads = num_heads
            self.norm_attn = nn.LayerNorm(d_model)
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.proj = nn.Linear(d_model, d_model)
            self.norm_mlp = nn.LayerNorm(d_model)
            self.up = nn.Linear(d_model, d_ff)
            self.down = nn.Linear(d_ff, d_model)

        def forward(self, x):
            batch, seq, d_model = x.shape
            qkv = self.qkv(self.norm_attn(x)).view(batch, seq, 3, self.num_heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (batch, heads, seq, head_dim)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(batch, seq, d_model))
            return x + self.down(F.gelu(self.up(self.norm_mlp(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self, vocab_size, num_layers, d_model, num_heads, d_ff, max_seq_len):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, d_model)
            self.pos_embed = nn.Embedding(max_seq_len, d_model)
            self.blocks = nn.ModuleList(
                [Block(d_model, num_heads, d_ff) for _ in range(num_layers)]
            )
            self.norm_out = nn.LayerNorm(d_model)
            for module in self.modules():  # GPT-2 / nanoGPT init
                if isinstance(module, nn.Linear | nn.Embedding):
                    nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)
            for block in self.blocks:
                for residual_proj in (block.proj, block.down):
                    nn.init.normal_(residual_proj.weight, std=0.02 / math.sqrt(2 * num_layers))

        def forward(self, tokens):
            positions = torch.arange(tokens.shape[1])
            x = self.embed(tokens) + self.pos_embed(positions)
            for block in self.blocks:
                x = block(x)
            return F.linear(self.norm_out(x), self.embed.weight)  # tied output layer

    return GPT


class TorchBench(_StepBench):
    """The same model in eager PyTorch with the same optimizer, on all cores."""

    def __init__(self, spec: dict | None = None):
        import torch

        self.threads = os.cpu_count()
        torch.set_num_threads(self.threads)  # all cores, as XLA's CPU client uses
        self.baseline_mb = max_rss_mb()
        self._matmul = None
        if spec is not None:
            self.load(spec)

    def load(self, spec: dict) -> dict:
        import torch

        o = spec["optimizer"]
        if o["name"] != "adamw" or o["schedule"] != "cosine" or o["l1"] or o["l2"]:
            raise ValueError(f"the PyTorch twin implements adamw + cosine only, not {o}")
        torch.manual_seed(0)
        self.model = _torch_gpt()(**spec["model"])
        self.opt = torch.optim.AdamW(  # PyTorch's defaults otherwise (foreach/fused: None)
            self.model.parameters(), lr=o["learning_rate"], betas=(o["b1"], o["b2"]),
            eps=o["eps"], weight_decay=o["weight_decay"],
        )
        self.clip_norm = o["clip_norm"]
        warmup, end = o["warmup_steps"], o["end_value"] / o["learning_rate"]

        def cosine(step):  # jaxtricks' warmup_then(cosine_decay) as a LambdaLR factor
            if step < warmup:
                return step / warmup
            t = min(step - warmup, TOTAL_STEPS - warmup) / (TOTAL_STEPS - warmup)
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cosine)
        tokens = torch.from_numpy(_tokens(spec)).long()
        self.inputs, self.targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        start = time.perf_counter()
        loss = self._step()
        first = time.perf_counter() - start
        params = sum(p.numel() for p in self.model.parameters())
        return {"params": params, "first_step_s": first, "loss": float(loss),
                "threads": torch.get_num_threads()}

    def _forward(self):
        import torch.nn.functional as F

        logits = self.model(self.inputs)  # (batch, seq, vocab)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1))

    def _update(self):
        import torch

        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def _step(self):
        loss = self._forward()
        loss.backward()
        self._update()
        return loss.detach()

    def run(self, n: int) -> tuple[float, float | None]:
        with OthersShare() as others:
            start = time.perf_counter()
            for _ in range(n):
                self._step()
            seconds = time.perf_counter() - start
        _count_usage(others, seconds, n)
        return seconds, others.share

    def matmul(self, size: int, n: int) -> tuple[float, float | None]:
        import torch

        if self._matmul is None or self._matmul[0] != size:
            a, b = torch.randn(size, size), torch.randn(size, size)
            a @ b
            self._matmul = (size, a, b)
        _, a, b = self._matmul
        times = []
        with OthersShare() as others:
            for _ in range(n):
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
        return median(times), others.share

    def breakdown(self, n: int) -> tuple[dict, float | None]:
        parts = {"forward": [], "backward": [], "optimizer": [], "step": []}
        with OthersShare() as others:
            for _ in range(n):  # eager CPU PyTorch is synchronous: wall time per phase is exact
                t0 = time.perf_counter()
                loss = self._forward()
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                self._update()
                t3 = time.perf_counter()
                for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                    parts[key].append(value)
        return {k: 1e3 * median(v) for k, v in parts.items()}, others.share


# --------------------------------------------------------------------------- the parent


def _interleaved(workers: dict, call, reps: int, max_others: float) -> dict:
    """Blocks of ``call(name, worker) -> (value, others' CPU share)``, the workers alternating
    (A B, B A, ...) until each has ``reps`` clean blocks (others used < ``max_others`` of the
    CPUs) or 3 x ``reps`` rounds have run. Returns ``{name: [(value, share), ...]}``."""
    results = {name: [] for name in workers}
    names = list(workers)
    for rnd in range(3 * reps):
        for name in names if rnd % 2 == 0 else names[::-1]:
            results[name].append(call(name, workers[name]))
        if all(len(_clean(r, max_others)) >= reps for r in results.values()):
            break
    return results


def _clean(blocks: list, max_others: float) -> list:
    return [v for v, share in blocks if share is None or share < max_others]


def _usable(blocks: list, max_others: float) -> list:
    """The clean blocks' values, or every block's when none is clean."""
    return _clean(blocks, max_others) or [v for v, _ in blocks]


def _steps_per_block(step_s: float, block_s: float) -> int:
    # At least 2, so that the next step is dispatched while one runs, as in the trainer.
    return max(2, round(block_s / max(step_s, 1e-6)))


def _start_workers(spec: dict | None, with_torch: bool, variants: tuple[str, ...] = (),
                   xla_flags: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """A JAX worker, one per variant and per set of XLA flags, and (maybe) a PyTorch worker,
    started one after the other so that each one's compile / first step is timed without another
    starting up."""
    kinds = [("JAX", JaxBench)]
    kinds += [(f"JAX, {v}", functools.partial(JaxBench, variant=v)) for v in variants]
    kinds += [(f"JAX, XLA_FLAGS={f}", functools.partial(JaxBench, xla_flags=f))
              for f in xla_flags]
    if with_torch:
        kinds.append(("PyTorch", TorchBench))
    workers, info = {}, {}
    try:
        for name, factory in kinds:
            workers[name] = Worker(factory, None)
            if spec is not None:
                info[name] = workers[name].call("load", spec)
    except BaseException:
        for w in workers.values():
            w.close()
        raise
    return workers, info


def section_step(args, models: dict, with_torch: bool) -> str:
    """Throughput, share of the matmul peak, compile time and memory; optionally the breakdown."""
    from jaxtricks.lm.config import ModelConfig
    from jaxtricks.lm.model import flops_per_token

    rows, notes, breakdown_rows = [], [], []
    for label, (arch, batch, seq) in models.items():
        spec = make_spec(arch, batch, seq, args.optimizer)
        flops = flops_per_token(ModelConfig(**spec["model"]), seq)
        # Fresh workers per model: each one's ru_maxrss is this model's peak memory.
        workers, info = _start_workers(spec, with_torch, args.variants, args.xla_flags)
        # The matmul runs in a JAX process of its own: run in the "JAX" worker between its
        # blocks, it slowed that worker's steps (A/A runs of the tiny model: 1.03x the time of
        # the same step in a second worker), biasing every ratio against the "JAX" row.
        peak_worker = None
        try:
            peak_worker = Worker(JaxBench, None)
            per_block, warm_s = {}, {}
            for name, w in workers.items():  # warm up (two steps in flight, as in the blocks);
                warm_s[name] = w.call("run", 2)[0] / 2  # size the blocks from compiled steps
                per_block[name] = _steps_per_block(warm_s[name], args.block_seconds)
            peak_worker.call("matmul", args.matmul, 1)  # compile the matmul outside the loop
            for w in workers.values():
                w.call("usage")  # count the timed blocks only

            def one(name, w, per_block=per_block, peak_worker=peak_worker):
                seconds, share = w.call("run", per_block[name])
                matmul_s, matmul_share = peak_worker.call("matmul", args.matmul, 3)
                shares = [x for x in (share, matmul_share) if x is not None]
                return (seconds / per_block[name], matmul_s), max(shares, default=None)

            timings = _interleaved(workers, one, args.reps, args.max_others)
            memory = {name: w.call("memory") for name, w in workers.items()}
            used = {name: w.call("usage") for name, w in workers.items()}
            torch_mm = workers["PyTorch"].call("matmul", args.matmul, 3)[0] if with_torch else None
            if "breakdown" in args.sections:  # of JAX and PyTorch (not of the variants)
                # Each call times every phase n times (about one block of wall time in all).
                pair = {k: w for k, w in workers.items() if k in ("JAX", "PyTorch")}
                n = _steps_per_block(2 * max(warm_s[k] for k in pair), args.block_seconds)
                parts = _interleaved(pair, lambda _, w, n=n: w.call("breakdown", n), 3,
                                     args.max_others)
                breakdown_rows += _breakdown_rows(label, parts, args.max_others)
        finally:
            for w in [*workers.values(), peak_worker]:
                if w is not None:
                    w.close()

        step_s, kept = {}, {}
        for name, blocks in timings.items():
            step_s[name] = median([t for t, _ in _usable(blocks, args.max_others)])
            kept[name] = f"{len(_clean(blocks, args.max_others))}/{len(blocks)}"
        all_blocks = [v for blocks in timings.values() for v in _usable(blocks, args.max_others)]
        peak = 2 * args.matmul**3 / median([mm for _, mm in all_blocks])
        if changed := [name for name in workers if name not in ("JAX", "PyTorch")]:
            gains = [f"{name.removeprefix('JAX, ')} {step_s[name] / step_s['JAX']:.2f}x"
                     for name in changed]
            notes.append(f"{label}: the variant's step time / JAX's: " + ", ".join(gains))
        notes.append(f"{label}: each process's own CPU use over its timed blocks: " + "; ".join(
            f"{name} {u['cpu_s'] / u['wall_s']:.2f} cores, {u['sys_s'] / u['steps']:.3f} s of it "
            f"system time and {u['minor_faults'] / u['steps']:,.0f} minor page faults per step"
            for name, u in used.items()))
        notes.append(
            f"{label}: {args.matmul}x{args.matmul} @ {args.matmul}x{args.matmul} float32 matmul, "
            f"interleaved with the steps: jax {peak / 1e9:.1f} GFLOP/s (the peak of this row)"
            + (f"; torch {2 * args.matmul**3 / torch_mm / 1e9:.1f} GFLOP/s" if torch_mm else "")
            + f"; clean blocks (others < {args.max_others:.0%} CPU): "
            + ", ".join(f"{name} {k}" for name, k in kept.items())
        )
        for name in workers:
            tok_s = batch * seq / step_s[name]
            achieved = tok_s * flops
            i, mem = info[name], memory[name]
            if name != "PyTorch":
                first = f"{i['lower_s']:.1f} + {i['compile_s']:.1f}"
                temp = "" if i["xla_temp_mb"] is None else f"; XLA temp {i['xla_temp_mb']:.0f}"
            else:  # eager: no compilation; the first step pays for allocation and warm-up
                first, temp = f"({i['first_step_s']:.2f})", ""
            vs_torch = (f"**{step_s['PyTorch'] / step_s[name]:.2f}x**"
                        if with_torch and name != "PyTorch" else "")
            rows.append([
                label, f"{i['params'] / 1e6:.2f}M", f"{batch}x{seq}", name,
                f"{1e3 * step_s[name]:.0f}", f"{tok_s:,.0f}", vs_torch,
                f"{achieved / 1e9:.1f}", f"{100 * achieved / peak:.0f}%", first,
                f"{mem['peak_rss_mb']:.0f} (+{mem['peak_rss_mb'] - mem['baseline_mb']:.0f}{temp})",
            ])
    out = [markdown_table(
        ["model", "params", "batch x seq", "framework", "step ms", "tokens/s",
         "JAX / PyTorch tokens/s", "GFLOP/s", "of matmul peak",
         "compile s: trace+lower + XLA (PyTorch: first step)", "peak RSS MB (+ over imports)"],
        rows,
    ), ""] + [f"- {n}" for n in notes]
    if breakdown_rows:
        headers = ["model", "phase", "JAX ms"] + (["PyTorch ms", "JAX / PyTorch time"]
                                                  if with_torch else [])
        out += ["", markdown_table(headers, breakdown_rows)]
    return "\n".join(out)


def _breakdown_rows(label: str, parts: dict, max_others: float) -> list[list[str]]:
    rows = []
    for phase in ("forward", "backward", "optimizer", "step"):
        ms = {name: median([p[phase] for p in _usable(blocks, max_others)])
              for name, blocks in parts.items()}
        row = [label, phase] + [f"{value:.1f}" for value in ms.values()]
        if "PyTorch" in ms:
            row += [f"{ms[name] / ms['PyTorch']:.2f}" for name in ms if name != "PyTorch"]
        rows.append(row)
    return rows


def section_scaling(args, base: tuple[dict, int, int], with_torch: bool) -> str:
    """Step time vs sequence length (tokens per batch fixed) and vs width (batch fixed)."""
    arch, batch, seq = base
    tokens = batch * seq
    seq_specs = [(f"seq {s}", make_spec(arch, tokens // s, s, args.optimizer))
                 for s in args.seq_lens]
    width_specs = [
        (f"d_model {d}", make_spec({**arch, "d_model": d, "d_ff": 4 * d}, batch, seq,
                                   args.optimizer))
        for d in args.widths
    ]
    workers, _ = _start_workers(None, with_torch)  # reused: one model after the other
    try:
        tables = []
        for title, specs in (("sequence length", seq_specs), ("width", width_specs)):
            rows, ref = [], {}
            for label, spec in specs:
                per_block = {}
                for name, w in workers.items():
                    w.call("load", spec)
                    per_block[name] = _steps_per_block(w.call("run", 1)[0],
                                                       args.block_seconds / 2)

                def one(name, w, per_block=per_block):
                    seconds, share = w.call("run", per_block[name])
                    return seconds / per_block[name], share

                times = _interleaved(workers, one, args.scaling_reps, args.max_others)
                step = {name: median(_usable(ts, args.max_others)) for name, ts in times.items()}
                ref = ref or step
                row = [label, f"{spec['batch']}x{spec['seq']}"]
                for name in workers:
                    row += [f"{1e3 * step[name]:.0f}", f"{step[name] / ref[name]:.2f}"]
                if with_torch:
                    row.append(f"**{step['PyTorch'] / step['JAX']:.2f}x**")
                rows.append(row)
            headers = [title, "batch x seq"]
            for name in workers:
                headers += [f"{name} step ms", f"{name} time vs first row"]
            if with_torch:
                headers.append("JAX / PyTorch tokens/s")
            tables.append(markdown_table(headers, rows))
    finally:
        for w in workers.values():
            w.close()
    return "\n\n".join(tables)


def _with_xla_flags(flags: str) -> str:
    """XLA_FLAGS as it is in this process's environment, with ``flags`` added."""
    return f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def _xla_flags_problem(flags: str) -> str | None:
    """Why XLA will not start with ``flags`` added to XLA_FLAGS (it aborts the process on an
    unknown flag or value, so this is tried in a subprocess first), or None."""
    import subprocess

    env = {**os.environ, "XLA_FLAGS": _with_xla_flags(flags)}
    proc = subprocess.run(
        [sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    if proc.returncode == 0:
        return None
    logged = re.findall(r"^[EF]\d{4} [^\]]*\] (.*)$", proc.stderr, re.MULTILINE)  # glog lines
    lines = logged or proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
    return lines[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and few repetitions: a smoke test of the script")
    parser.add_argument("--sections", default="step,breakdown,scaling",
                        help="comma-separated: step, breakdown, scaling (default: all)")
    parser.add_argument("--models", default="tiny,small",
                        help=f"comma-separated from {', '.join(MODELS)}, default")
    parser.add_argument("--no-torch", action="store_true", help="JAX only")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated 'JAX, <variant>' rows, each the step with one "
                             f"setting changed: {', '.join(VARIANTS)}; all, or none (default: "
                             f"{', '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--xla-flags", action="append", default=[], metavar="FLAGS",
                        help="a 'JAX, XLA_FLAGS=FLAGS' row: the step with these XLA flags added "
                             "to XLA_FLAGS; write it with '=', as in --xla-flags="
                             "--xla_cpu_enable_fast_math=true (repeat for more rows)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved A/B repetitions")
    parser.add_argument("--scaling-reps", type=int, default=3)
    parser.add_argument("--block-seconds", type=float, default=2.0,
                        help="wall time of one timed block of steps")
    parser.add_argument("--max-others", type=float, default=0.1,
                        help="set aside blocks during which other processes used more than this "
                             "share of the CPUs (and run more, up to 3x --reps rounds)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the machine to be quiet")
    args = parser.parse_args(argv)

    args.sections = set(args.sections.split(","))
    named = {"none": (), "all": tuple(VARIANTS)}
    args.variants = named.get(args.variants, tuple(args.variants.split(",")))
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}, "
                     "all or none")
    args.xla_flags = tuple(args.xla_flags)
    if len(set(args.xla_flags)) < len(args.xla_flags):
        parser.error(f"--xla-flags: each row needs its own flags; given {list(args.xla_flags)}")
    for flags in args.xla_flags:
        if problem := _xla_flags_problem(flags):
            parser.error(f"--xla-flags {flags!r}: XLA refused it: {problem}")
    unknown = args.sections - {"step", "breakdown", "scaling"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    args.optimizer = default_optimizer()
    if args.quick:
        models = QUICK_MODELS
        args.matmul, args.seq_lens, args.widths = 128, [16, 32], [32, 64]
        args.reps, args.scaling_reps, args.block_seconds = 2, 2, 0.05
    else:
        known = {**MODELS, "default": default_model()}
        for name in args.models.split(","):
            if name not in known:
                parser.error(f"--models: unknown model {name!r}; choose from {', '.join(known)}")
        models = {name: known[name] for name in args.models.split(",")}
        args.matmul, args.seq_lens, args.widths = 2048, [128, 256, 512, 1024], [128, 256, 384, 512]
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None

    from common import machine_line, wait_for_quiet

    if args.wait_quiet > 0:
        print(wait_for_quiet(args.wait_quiet, args.max_others))
    print(f"machine: {machine_line()}")
    print(f"threads: XLA's CPU client default (all {os.cpu_count()} cores)"
          + (f"; torch.set_num_threads({os.cpu_count()})" if with_torch else
             "; PyTorch: not measured"))
    o = args.optimizer
    print(f"optimizer (configs/default.yaml): {o['name']} lr {o['learning_rate']} "
          f"betas ({o['b1']}, {o['b2']}) eps {o['eps']} wd {o['weight_decay']}, clip "
          f"{o['clip_norm']}, {o['schedule']} schedule, skip_nonfinite {o['skip_nonfinite']} "
          "(JAX only)")
    if args.sections & {"step", "breakdown"}:
        print("'JAX': the step as train.py runs it (tune_host_malloc() called first)"
              + "".join(f"; 'JAX, {v}': {VARIANTS[v]}" for v in args.variants)
              + "".join(f"; 'JAX, XLA_FLAGS={f}': with {f} added to XLA_FLAGS"
                        for f in args.xla_flags))
    print(f"medians of {args.reps} interleaved A/B blocks (blocks during which other processes "
          f"used >= {args.max_others:.0%} of the CPUs are set aside and rerun, up to "
          f"{3 * args.reps} rounds); synthetic random tokens\n")
    start = time.perf_counter()
    if args.sections & {"step", "breakdown"}:
        print("## Training step\n")
        print(section_step(args, models, with_torch) + "\n")
    if "scaling" in args.sections:
        base = next(iter(models.values())) if args.quick else MODELS["tiny"]
        arch, batch, seq = base
        print(f"## Scaling ({arch['num_layers']} layers, {arch['num_heads']} heads, d_ff = 4 "
              f"d_model; sequence rows: d_model {arch['d_model']}, {batch * seq:,} tokens per "
              f"batch; width rows: batch {batch} x {seq})\n")
        print(section_scaling(args, base, with_torch) + "\n")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"total wall time {time.perf_counter() - start:.0f} s; load average at the end {load}")


if __name__ == "__main__":
    main()
