"""Training-step throughput on CPU: jaxtricks' jitted train step vs the same model in PyTorch.

The JAX side is the step the trainer runs: the config's ``Transformer``, ``optimizer_from_config``
(configs/default.yaml: adamw, clip 1.0, cosine schedule, skip_nonfinite) and ``make_steps``'s
jitted ``train_step`` with its donated state, built as ``training.run`` builds them, after
``tune_host_malloc()`` as ``train.py`` calls it. The PyTorch side is the same architecture
written here (pre-norm GPT-2: tied embedding, learned positions, LayerNorm, fused qkv Linear with
bias, ``F.scaled_dot_product_attention(is_causal=True)``, tanh GELU, GPT-2 init), trained eagerly
with ``AdamW`` + ``clip_grad_norm_`` + a cosine ``LambdaLR`` of the same hyperparameters.

Each row runs in a worker process of its own (no thread pool competes with another, and
``ru_maxrss`` is that row's peak memory); the parent interleaves blocks of steps of the rows
(A B, B A, ...) and reports medians. Each block reads a step's metrics once the next step is
dispatched, as the trainer does. The CPU's practical peak is a large float32 matmul timed between
the blocks by a JAX worker of its own. Synthetic random tokens, one batch placed once.

Rows besides "JAX" and "PyTorch":
  --variant SPEC   "JAX, SPEC": the step with config overrides (``cpu_devices=2``,
                   ``train.microbatches=2 train.unroll_microbatches=true``) and/or environment
                   variables, written in capitals, set in the worker before JAX starts
                   (``JAXTRICKS_HOST_MALLOC=default``: glibc's malloc as it is; ``XLA_FLAGS=...``),
                   and ``cpu_paths=false``: the plain model, without jaxtricks.lm.cpu's paths;
  --baseline DIR   "JAX at DIR": the same step of the jaxtricks checkout in DIR (e.g. a
                   ``git worktree`` of an older commit), to compare two commits in one run.

Sections: ``step`` (tokens/s, GFLOP/s, share of the matmul peak, compile time, peak memory) and
``scaling`` (step time vs sequence length at fixed tokens per batch, and vs width; tiny model).

Usage:
  python benchmarks/bench_step.py                 # default, tiny and small models; ~15 minutes
  python benchmarks/bench_step.py --sections step --models default --baseline /tmp/baseline
  python benchmarks/bench_step.py --quick         # a tiny smoke run (seconds), as in the tests
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import OthersShare, Worker, markdown_table, max_rss_mb, median  # noqa: E402

# Overrides of configs/default.yaml (the "default" model). "tiny" was configs/default.yaml's
# model when the step was first measured against PyTorch, "small" has 10.8M parameters.
MODELS = {
    "default": [],
    "tiny": ["model.num_layers=4", "model.d_model=192", "model.num_heads=4", "model.d_ff=768",
             "train.batch_size=32"],
    "small": ["model.num_layers=6", "model.d_model=384", "model.num_heads=6", "model.d_ff=1536",
              "train.batch_size=32"],
}
QUICK = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=128",
         "train.batch_size=8", "data.seq_len=16", "model.max_seq_len=16"]
TOTAL_STEPS = 10_000  # length of the cosine schedule of both optimizers (no effect on speed)


def parse_variant(spec: str) -> tuple[dict[str, str], list[str], dict[str, bool]]:
    """``--variant``'s ``KEY=VALUE`` words: (environment variables, config overrides, keywords of
    the model's constructor: ``cpu_paths=false`` is the plain model on a CPU)."""
    env, overrides, model = {}, [], {}
    for word in shlex.split(spec):
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"{word!r} is not KEY=VALUE")
        if key.isupper():
            env[key] = value
        elif key == "cpu_paths":
            if value.lower() not in ("true", "false"):
                raise ValueError(f"cpu_paths takes true or false, not {value!r}")
            model[key] = value.lower() == "true"
        else:
            overrides.append(word)
    return env, overrides, model


def resolve(overrides: list[str]) -> dict:
    """What every worker needs to build one model's step: the overrides (a JAX worker loads the
    config with its own jaxtricks) and their result as plain values (for PyTorch, FLOPs)."""
    from jaxtricks.lm import config as config_lib

    config = config_lib.load(None, overrides)
    return {"overrides": list(overrides), "model_kwargs": {},
            "model": dataclasses.asdict(config.model),
            "batch": config.train.batch_size, "seq": config.data.seq_len,
            "optimizer": dataclasses.asdict(config.optimizer), "cpu_devices": config.cpu_devices}


def checkout_name(path: str) -> str:
    """``path`` and its git commit, if it is a git checkout."""
    proc = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False)
    return f"{path} ({proc.stdout.strip()})" if proc.returncode == 0 else path


# --------------------------------------------------------------------------- JAX worker


class _StepBench:
    """What the JAX and PyTorch workers report alike: the time of ``n`` steps (``_steps``), peak
    memory over the baseline each takes once its framework has started, and its own use of the
    machine over its timed blocks since the last ``usage()`` call."""

    baseline_mb = 0.0
    _used: dict | None = None

    def run(self, n: int) -> tuple[float, float | None]:
        """Seconds for ``n`` steps and the share of the CPUs other processes used meanwhile."""
        with OthersShare() as others:
            start = time.perf_counter()
            self._steps(n)
            seconds = time.perf_counter() - start
        used = self._used = self._used or dict.fromkeys(USAGE, 0)
        for key, value in zip(USAGE, (seconds, others.own_cpu_s, others.own_sys_s,
                                      others.minor_faults, n), strict=True):
            used[key] += value
        return seconds, others.share

    def usage(self) -> dict:
        taken, self._used = self._used or dict.fromkeys(USAGE, 0), None
        return taken

    def memory(self) -> dict:
        return {"peak_rss_mb": max_rss_mb(), "baseline_mb": self.baseline_mb}


USAGE = ("wall_s", "cpu_s", "sys_s", "minor_faults", "steps")


class JaxBench(_StepBench):
    """The trainer's jitted step of a :func:`resolve` spec (``load``); ``env`` is set, and
    ``spec``'s CPU devices, before JAX starts; ``path``: the jaxtricks of the checkout there."""

    def __init__(self, spec: dict | None = None, env: dict | None = None,
                 path: str | None = None):
        os.environ.update(env or {})
        self.api = common.trainer(path)
        self.api.tune_host_malloc()  # as train.py does, before JAX starts its threads
        import jax

        self.api.use_cpu_devices(spec and spec["cpu_devices"])  # as training.preflight does
        jax.devices()  # start the backend before taking the memory baseline
        self.baseline_mb = max_rss_mb()
        self._matmul = None

    def load(self, spec: dict) -> dict:
        import jax

        self.built = None
        jax.clear_caches()
        config = self.api.load(None, spec["overrides"])
        built = self.built = common.build_step(self.api, config, TOTAL_STEPS,
                                               **spec["model_kwargs"])
        # Ahead-of-time lower + compile: split into tracing and XLA's share; jax.jit caches the
        # executable, so the first call below runs it without compiling again.
        start = time.perf_counter()
        lowered = built.steps.train.lower(built.state, built.batch, built.rng)
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start - lower_s
        analysis = compiled.memory_analysis()
        start = time.perf_counter()
        built.state, metrics = built.steps.train(built.state, built.batch, built.rng)
        jax.block_until_ready((built.state, metrics))
        return {"params": self.api.count_params(built.model), "lower_s": lower_s,
                "first_step_s": time.perf_counter() - start, "compile_s": compile_s,
                "xla_temp_mb": analysis and analysis.temp_size_in_bytes / 2**20,
                "loss": self.api.unreplicate_metrics(metrics, built.steps)["loss"]}

    def _steps(self, n: int) -> None:
        """``n`` steps, each step's metrics read once the next one is dispatched (as the trainer
        does)."""
        import jax

        b, metrics = self.built, None
        for _ in range(n):
            pending = metrics
            b.state, metrics = b.steps.train(b.state, b.batch, b.rng)
            if pending is not None:
                self.api.unreplicate_metrics(pending, b.steps)
        jax.block_until_ready((b.state, metrics))

    def matmul(self, size: int, n: int) -> tuple[float, float | None]:
        """Seconds per ``(size, size) @ (size, size)`` float32 matmul (median of ``n``), and
        the share of the CPUs other processes used meanwhile."""
        import jax
        import jax.numpy as jnp

        if self._matmul is None or self._matmul[0] != size:
            a, b = jax.random.normal(jax.random.key(1), (2, size, size), jnp.float32)
            f = jax.jit(jnp.matmul)
            f(a, b).block_until_ready()
            self._matmul = (size, lambda: f(a, b).block_until_ready())
        return _timed(self._matmul[1], n)


def _timed(fn, n: int) -> tuple[float, float | None]:
    """Median seconds of ``n`` calls of ``fn``, and the share of the CPUs others used meanwhile."""
    times = []
    with OthersShare() as others:
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return median(times), others.share


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

        del spec  # load() takes it
        torch.set_num_threads(os.cpu_count())  # all cores, as XLA's CPU client uses
        self.baseline_mb = max_rss_mb()
        self._matmul = None

    def load(self, spec: dict) -> dict:
        import torch

        o = spec["optimizer"]
        m = spec["model"]
        if o["name"] != "adamw" or o["schedule"] != "cosine" or o["l1"] or o["l2"] or m.get(
                "position", "learned") != "learned" or m.get("dropout") or m["dtype"] != "float32":
            raise ValueError(f"the PyTorch twin implements float32, learned positions, no "
                             f"dropout, adamw + cosine only, not {m}, {o}")
        torch.manual_seed(0)
        self.model = _torch_gpt()(**{k: m[k] for k in (
            "vocab_size", "num_layers", "d_model", "num_heads", "d_ff", "max_seq_len")})
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
        ids = torch.from_numpy(common.tokens(m["vocab_size"], spec["batch"], spec["seq"])).long()
        self.inputs, self.targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        start = time.perf_counter()
        loss = self._step()
        first = time.perf_counter() - start
        params = sum(p.numel() for p in self.model.parameters())
        return {"params": params, "first_step_s": first, "loss": float(loss)}

    def _step(self):
        import torch
        import torch.nn.functional as F

        logits = self.model(self.inputs)  # (batch, seq, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def _steps(self, n: int) -> None:
        for _ in range(n):
            self._step()

    def matmul(self, size: int, n: int) -> tuple[float, float | None]:
        import torch

        if self._matmul is None or self._matmul[0] != size:
            a, b = torch.randn(size, size), torch.randn(size, size)
            a @ b
            self._matmul = (size, lambda: a @ b)
        return _timed(self._matmul[1], n)


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


def _start_workers(rows: dict, spec: dict | None, with_torch: bool) -> tuple[dict, dict]:
    """A worker per row (``rows``: name -> JaxBench keywords) and (maybe) a PyTorch worker,
    started one after the other so that each one's compile / first step is timed without another
    starting up. A variant's overrides are added to ``spec``'s."""
    kinds = {}
    for name, kwargs in rows.items():
        env, overrides = kwargs.get("env"), kwargs.get("overrides", [])
        row_spec = spec and {**resolve(spec["overrides"] + overrides),
                             "model_kwargs": kwargs.get("model", {})}
        kinds[name] = (functools.partial(JaxBench, env=env, path=kwargs.get("path")), row_spec)
    if with_torch:
        kinds["PyTorch"] = (TorchBench, spec)
    workers, info = {}, {}
    try:
        for name, (factory, row_spec) in kinds.items():
            workers[name] = Worker(factory, row_spec)
            if row_spec is not None:
                info[name] = workers[name].call("load", row_spec)
    except BaseException:
        for w in workers.values():
            w.close()
        raise
    return workers, info


def section_step(args, models: dict, with_torch: bool) -> str:
    """Throughput, share of the matmul peak, compile time and memory of every row."""
    from jaxtricks.lm.config import ModelConfig
    from jaxtricks.lm.model import flops_per_token

    rows, notes = [], []
    for label, spec in models.items():
        batch, seq = spec["batch"], spec["seq"]
        flops = flops_per_token(ModelConfig(**spec["model"]), seq)
        # Fresh workers per model: each one's ru_maxrss is this model's peak memory.
        workers, info = _start_workers(args.rows, spec, with_torch)
        # The matmul runs in a JAX process of its own: run in the "JAX" worker between its
        # blocks, it slowed that worker's steps (A/A runs: 1.03x the time of the same step in a
        # second worker), biasing every ratio against the "JAX" row.
        peak_worker = None
        try:
            peak_worker = Worker(JaxBench, None)
            per_block = {}
            for name, w in workers.items():  # warm up (two steps in flight, as in the blocks);
                step_s = w.call("run", 2)[0] / 2  # size the blocks from compiled steps
                per_block[name] = _steps_per_block(step_s, args.block_seconds)
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
        if others := [name for name in workers if name not in ("JAX", "PyTorch")]:
            notes.append(f"{label}: the row's step time / JAX's: " + ", ".join(
                f"{name} {step_s[name] / step_s['JAX']:.2f}x" for name in others))
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
                f"{i['loss']:.4f}",
            ])
    return "\n".join([markdown_table(
        ["model", "params", "batch x seq", "framework", "step ms", "tokens/s",
         "JAX / PyTorch tokens/s", "GFLOP/s", "of matmul peak",
         "compile s: trace+lower + XLA (PyTorch: first step)", "peak RSS MB (+ over imports)",
         "first step's loss"],
        rows,
    ), ""] + [f"- {n}" for n in notes])


def section_scaling(args, base: list[str], with_torch: bool) -> str:
    """Step time vs sequence length (tokens per batch fixed) and vs width (batch fixed)."""
    spec = resolve(base)
    tokens_per_batch, heads = spec["batch"] * spec["seq"], spec["model"]["num_heads"]
    seq_specs = [(f"seq {s}", resolve(base + [f"train.batch_size={tokens_per_batch // s}",
                                              f"data.seq_len={s}", f"model.max_seq_len={s}"]))
                 for s in args.seq_lens]
    width_specs = [(f"d_model {d}", resolve(base + [f"model.d_model={d}", f"model.d_ff={4 * d}"]))
                   for d in args.widths if d % heads == 0]
    workers, _ = _start_workers({"JAX": {}}, None, with_torch)  # reused: one model after another
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and few repetitions: a smoke test of the script")
    parser.add_argument("--sections", default="step,scaling",
                        help="comma-separated: step, scaling (default: both)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated from {', '.join(MODELS)} (default: all)")
    parser.add_argument("--no-torch", action="store_true", help="JAX only")
    parser.add_argument("--variant", action="append", default=[], metavar="SPEC",
                        help="a 'JAX, SPEC' row: SPEC is space-separated key=value config "
                             "overrides and CAPITALS=value environment variables, e.g. "
                             "'cpu_devices=2' or 'JAXTRICKS_HOST_MALLOC=default' (repeat it)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="a 'JAX at DIR' row: the same step of the jaxtricks checkout in DIR")
    parser.add_argument("--reps", type=int, default=15, help="interleaved A/B repetitions")
    parser.add_argument("--scaling-reps", type=int, default=3)
    parser.add_argument("--block-seconds", type=float, default=2.0,
                        help="wall time of one timed block of steps")
    parser.add_argument("--max-others", type=float, default=0.1,
                        help="set aside blocks during which other processes used more than this "
                             "share of the CPUs (and run more, up to 3x --reps rounds)")
    args = parser.parse_args(argv)

    args.sections = set(args.sections.split(","))
    if unknown := args.sections - {"step", "scaling"}:
        parser.error(f"unknown sections {sorted(unknown)}")
    args.rows = {"JAX": {}}
    for spec in args.variant:
        try:
            env, overrides, model = parse_variant(spec)
            resolve(overrides)
        except ValueError as e:  # the config's ConfigError included
            parser.error(f"--variant {spec!r}: {e}")
        if f"JAX, {spec}" in args.rows:
            parser.error(f"--variant {spec!r} given twice")
        args.rows[f"JAX, {spec}"] = {"env": env, "overrides": overrides, "model": model}
    if args.baseline:
        if not os.path.isfile(os.path.join(args.baseline, "jaxtricks", "__init__.py")):
            parser.error(f"--baseline {args.baseline!r}: no jaxtricks package there")
        args.rows[f"JAX at {checkout_name(args.baseline)}"] = {"path": args.baseline}
    if args.quick:
        models = {"quick": resolve(QUICK)}
        args.matmul, args.seq_lens, args.widths = 128, [16, 32], [32, 64]
        args.reps, args.scaling_reps, args.block_seconds = 2, 2, 0.05
    else:
        for name in args.models.split(","):
            if name not in MODELS:
                parser.error(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
        models = {name: resolve(MODELS[name]) for name in args.models.split(",")}
        args.matmul, args.seq_lens, args.widths = 2048, [128, 256, 512, 1024], [128, 256, 384, 512]
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None

    from common import machine_line

    print(f"machine: {machine_line()}")
    print(f"threads: XLA's CPU client default (all {os.cpu_count()} cores)"
          + (f"; torch.set_num_threads({os.cpu_count()})" if with_torch else
             "; PyTorch: not measured"))
    o = next(iter(models.values()))["optimizer"]
    print(f"optimizer (configs/default.yaml): {o['name']} lr {o['learning_rate']} "
          f"betas ({o['b1']}, {o['b2']}) eps {o['eps']} wd {o['weight_decay']}, clip "
          f"{o['clip_norm']}, {o['schedule']} schedule, skip_nonfinite {o['skip_nonfinite']} "
          "(JAX only)")
    print(f"rows: {'; '.join(args.rows)}" + ("; PyTorch" if with_torch else ""))
    print(f"medians of {args.reps} interleaved A/B blocks (blocks during which other processes "
          f"used >= {args.max_others:.0%} of the CPUs are set aside and rerun, up to "
          f"{3 * args.reps} rounds); synthetic random tokens\n")
    start = time.perf_counter()
    if "step" in args.sections:
        print("## Training step\n")
        print(section_step(args, models, with_torch) + "\n")
    if "scaling" in args.sections:
        base = QUICK if args.quick else MODELS["tiny"]
        spec = resolve(base)
        m = spec["model"]
        print(f"## Scaling ({m['num_layers']} layers, {m['num_heads']} heads, d_ff = 4 d_model; "
              f"sequence rows: d_model {m['d_model']}, {spec['batch'] * spec['seq']:,} tokens "
              f"per batch; width rows: batch {spec['batch']} x {spec['seq']})\n")
        print(section_scaling(args, base, with_torch) + "\n")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"total wall time {time.perf_counter() - start:.0f} s; load average at the end {load}")


if __name__ == "__main__":
    main()
