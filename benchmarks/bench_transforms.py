r"""Time one optimizer update: jaxtricks' chain against optax built-ins and PyTorch, on CPU.

Every JAX case is ``params, state = step(params, state, grads)`` where ``step`` runs
``tx.update`` and ``optax.apply_updates`` in one ``jax.jit`` with params and state donated,
compiled ahead of time. The PyTorch case does the same work in place (``clip_grad_norm_``, the L1/L2
gradient terms added to ``.grad``, ``AdamW.step()``, ``scheduler.step()``).

The machine is shared and noisy, so the cases of one table run interleaved (A, B, C, A, B, C, ...,
the order rotated every round), and every ratio is the median over rounds of the ratio of two
updates measured side by side in the same round; the IQR of those paired ratios shows the noise.
Run it with nothing else heavy on the machine::

    python benchmarks/bench_transforms.py            # the full run (a few minutes)
    python benchmarks/bench_transforms.py --quick    # tiny trees, a few rounds (smoke test)
    python benchmarks/bench_transforms.py --sections main --tune-host-malloc  # malloc as train.py

The ``tried`` section times rewrites of the update that were tried and not kept, against the kept
code, after checking that they compute the same updates and state.

It prints markdown (the tables of BENCHMARKS.md's "Transforms" section). PyTorch rows appear when
``torch`` is importable (``pip install torch==2.13.0``, a CPU build); otherwise a note says so.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX starts: this benchmark is about CPUs

import argparse
import dataclasses
import datetime
import gc
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxtricks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model  # noqa: E402

try:  # optional: the PyTorch rows
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None


# --------------------------------------------------------------------------- hyperparameters


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The one recipe every column computes (GPT-2-like AdamW with every trick on)."""

    peak_lr: float = 6e-4  # reached after the warmup
    warmup: int = 100  # steps of linear warmup from 0
    decay: float = 1e-3  # k: lr = peak * exp(-k (t - warmup)) after the warmup
    clip: float = 1.0  # max global gradient norm
    l1: float = 1e-6  # adds l1 * sign(w) to the gradient
    l2: float = 1e-5  # adds 2 * l2 * w to the gradient (penalty l2 * sum w**2)
    weight_decay: float = 0.1  # decoupled: adds wd * w to Adam's direction, times lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8


BENCH = Hyper()
# For the equivalence check every term must move the parameters visibly.
CHECK = Hyper(peak_lr=1e-2, warmup=2, decay=0.1, clip=1.0, l1=1e-2, l2=1e-2, weight_decay=0.1)


# --------------------------------------------------------------------------- the chains


def jaxtricks_chain(h: Hyper, *, mask: Any = None, skip_nonfinite: bool = False,
                    record_penalties: bool = False):
    """``jaxtricks.make_optimizer``: clip -> L1 -> L2 -> Adam -> decoupled decay -> -lr."""
    return jaxtricks.make_optimizer(
        name="adamw",
        learning_rate=jaxtricks.warmup_then(
            h.warmup, jaxtricks.exponential_decay(h.peak_lr, h.decay)
        ),
        b1=h.b1,
        b2=h.b2,
        eps=h.eps,
        clip_norm=h.clip,
        l1=h.l1,
        l2=h.l2,
        weight_decay=h.weight_decay,
        mask=mask,
        skip_nonfinite=skip_nonfinite,
        record_penalties=record_penalties,
    )


def optax_schedule(h: Hyper):
    """Linear warmup from 0, then ``peak * exp(-k t)`` written as optax's ``decay_rate ** t``."""
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, h.peak_lr, h.warmup),
            optax.exponential_decay(h.peak_lr, transition_steps=1, decay_rate=math.exp(-h.decay)),
        ],
        [h.warmup],
    )


def optax_l1(strength: float) -> optax.GradientTransformation:
    """``g + strength * sign(w)``: optax has no L1 transform, so one tree map (no state)."""

    def add_sign(updates, params):
        return jax.tree.map(lambda g, p: g + strength * jnp.sign(p), updates, params)

    return optax.stateless(add_sign)


def optax_chain(h: Hyper, *, mask: Any = None, **replace: optax.GradientTransformation):
    """The same recipe from optax built-ins; ``replace`` swaps one piece (for the breakdown)."""
    l1 = optax_l1(h.l1)
    if mask is not None:
        l1 = optax.masked(l1, mask)
    pieces = {
        "clip": optax.clip_by_global_norm(h.clip),
        "l1": l1,
        "l2": optax.add_decayed_weights(2 * h.l2, mask=mask),  # the gradient of l2 * sum w**2
        "adam": optax.scale_by_adam(b1=h.b1, b2=h.b2, eps=h.eps),
        "decay": optax.add_decayed_weights(h.weight_decay, mask=mask),
        "lr": optax.scale_by_learning_rate(optax_schedule(h)),
    }
    unknown = set(replace) - set(pieces)
    if unknown:
        raise ValueError(f"unknown pieces {sorted(unknown)}; known: {sorted(pieces)}")
    pieces.update(replace)
    return optax.chain(*[piece for piece in pieces.values() if piece is not None])


def jaxtricks_piece(name: str, h: Hyper) -> dict[str, Any]:
    """jaxtricks' own transform(s) for one piece of the optax chain."""
    if name == "clip":
        return {"clip": jaxtricks.clip_by_global_norm(h.clip)}
    if name in ("l1+l2", "l1+l2 recorded"):
        record = name == "l1+l2 recorded"
        return {"l1": jaxtricks.l1_regularization(h.l1, record_penalty=record),
                "l2": jaxtricks.l2_regularization(h.l2, record_penalty=record)}
    if name == "decay":
        return {"decay": jaxtricks.weight_decay(h.weight_decay)}
    if name == "lr":
        schedule = jaxtricks.warmup_then(h.warmup, jaxtricks.exponential_decay(h.peak_lr, h.decay))
        return {"lr": jaxtricks.scale_by_learning_rate(schedule)}
    raise ValueError(name)


def never_give_up(chain):
    """``optax.apply_if_finite`` that, like jaxtricks.skip_nonfinite, skips every bad step."""
    return optax.apply_if_finite(chain, max_consecutive_errors=2**31 - 1)


# --------------------------------------------------------------------------- the trees


def gpt2_shapes(vocab=50304, context=1024, width=768, layers=12) -> dict[str, Any]:
    """GPT-2 small's parameter shapes (124,475,904 floats in 148 leaves at the defaults)."""

    def norm():
        return {"scale": (width,), "bias": (width,)}

    def dense(fan_in, fan_out):
        return {"kernel": (fan_in, fan_out), "bias": (fan_out,)}

    tree = {"wte": (vocab, width), "wpe": (context, width), "ln_f": norm()}
    for i in range(layers):
        tree[f"h{i:02d}"] = {
            "ln_1": norm(),
            "ln_2": norm(),
            "qkv": dense(width, 3 * width),
            "proj": dense(width, width),
            "fc": dense(width, 4 * width),
            "fc2": dense(4 * width, width),
        }
    return tree


def small_leaves_shapes(count: int, size: int = 64) -> dict[str, Any]:
    return {f"leaf{i:05d}": (size,) for i in range(count)}


def mixed_shapes() -> dict[str, Any]:
    """A small tree with matrices, vectors and a scalar (for the equivalence check and masks)."""
    return {"w": (12, 7), "b": (7,), "emb": (5, 3), "scale": (3,), "s": ()}


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def random_arrays(shapes, seed: int, scale: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    leaves = jax.tree.leaves(shapes, is_leaf=_is_shape)
    return [np.asarray(rng.standard_normal(s) * scale, dtype=np.float32) for s in leaves]


def to_jax(shapes, arrays):
    treedef = jax.tree.structure(shapes, is_leaf=_is_shape)
    return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in arrays])


# --------------------------------------------------------------------------- the cases


class JaxCase:
    """One jitted, donated ``update + apply_updates`` of ``tx``, compiled ahead of time."""

    def __init__(self, tx, shapes, params_np, grads):
        self.params = to_jax(shapes, params_np)
        self.state = tx.init(self.params)
        self.grads = grads

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        start = time.perf_counter()
        self.compiled = (
            jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.state, grads).compile()
        )
        self.compile_s = time.perf_counter() - start
        self.hlo = hlo_stats(self.compiled)

    def __call__(self):
        self.params, self.state = self.compiled(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))


def _is_broadcast_zero(text: str, name: str) -> bool:
    """Whether HLO instruction ``name`` broadcasts the constant 0 (as a ``broadcast`` or a loop
    fusion wrapping one: ``%wrapped_broadcast.2 = f32[32]{0} fusion(%constant.12), ...``)."""
    found = re.search(rf"^\s*{re.escape(name)} = \S+ (broadcast|fusion)\((%\S+?)\)(.*)$",
                      text, re.M)
    if found is None or (found[1] == "fusion" and "broadcast" not in name + found[3]):
        return False
    constant = re.search(rf"^\s*{re.escape(found[2])} = \S+ constant\(([-+.\de]+)\)", text,
                         re.M)
    return constant is not None and float(constant[1]) == 0.0


def hlo_stats(compiled) -> dict[str, float]:
    """Kernels launched per update, array copies XLA inserted, and its temporary memory."""
    text = compiled.as_text()
    # Whole module, not only ENTRY: lax.cond (optax.apply_if_finite) puts kernels in branches.
    copied = re.findall(r"\[[0-9,]+\]\{[0-9,]*\} copy\((%\S+?)\)", text)  # scalars excluded
    stats = {"fusions": len(re.findall(r" fusion\(", text)), "copies": len(copied),
             "zero_copies": sum(_is_broadcast_zero(text, name) for name in copied)}
    try:
        stats["temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    except (AttributeError, NotImplementedError, RuntimeError):  # not every backend reports it
        stats["temp_mib"] = float("nan")
    return stats


class TorchCase:
    """The same recipe in PyTorch, in place; ``impl`` is AdamW's for-loop, foreach or fused.

    ``.grad`` is not reset between timed updates (a backward pass would overwrite it; here its
    values drift but every update does the same work). The for-loop is AdamW's and
    ``clip_grad_norm_``'s default on CPU tensors.
    """

    IMPLS = ("for-loop", "foreach", "fused")

    def __init__(self, h: Hyper, impl: str, params, grads):
        self.impl = impl
        self.h = h
        self.params = params  # leaf tensors with .grad set; may be shared between cases
        self.grads = grads
        kwargs = {"foreach": impl == "foreach"}
        if impl == "fused":
            kwargs = {"fused": True}
        self.opt = torch.optim.AdamW(
            params,
            lr=h.peak_lr,
            betas=(h.b1, h.b2),
            eps=h.eps,
            weight_decay=h.weight_decay,
            **kwargs,
        )

        def factor(epoch):  # same as optax_schedule / jaxtricks' warmup_then, over peak_lr
            if epoch < h.warmup:
                return epoch / h.warmup
            return math.exp(-h.decay * (epoch - h.warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.compile_s = 0.0
        self.hlo = None

    def __call__(self):
        h = self.h
        loop = self.impl == "for-loop"
        torch.nn.utils.clip_grad_norm_(self.params, h.clip, foreach=not loop)
        with torch.no_grad():
            if loop:
                for p in self.params:
                    p.grad.add_(torch.sign(p), alpha=h.l1).add_(p, alpha=2 * h.l2)
            else:
                torch._foreach_add_(self.grads, torch._foreach_sign(self.params), alpha=h.l1)
                torch._foreach_add_(self.grads, self.params, alpha=2 * h.l2)
        self.opt.step()
        self.scheduler.step()


def torch_tensors(params_np, grads_np):
    params = [torch.from_numpy(a.copy()).requires_grad_() for a in params_np]
    for p, g in zip(params, grads_np, strict=True):
        p.grad = torch.from_numpy(g.copy())
    return params, [p.grad for p in params]


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Result:
    name: str
    times: list[float]
    compile_s: float
    hlo: dict[str, float] | None


def run_interleaved(
    cases: dict[str, Callable[[], None]], rounds: int, *, settle: int = 0, inner: int = 1
):
    """Time every case once per round, the order rotated each round; return per-case times.

    In a round each case first runs ``settle`` untimed updates (the previous case's runtime may
    still hold the cores: XLA's and PyTorch's worker threads spin for a while after their work),
    then ``inner`` timed ones, whose mean is that round's time.
    """
    names = list(cases)
    for name in names:
        cases[name]()  # first run: buffers allocated, pages touched
    times = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                case = cases[name]
                for _ in range(settle):
                    case()
                start = time.perf_counter()
                for _ in range(inner):
                    case()
                times[name].append((time.perf_counter() - start) / inner)
    finally:
        gc.enable()
    return [
        Result(name, times[name], cases[name].compile_s, getattr(cases[name], "hlo", None))
        for name in names
    ]


def paired_ratio(result: Result, reference: Result) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios result / reference."""
    ratios = [a / b for a, b in zip(result.times, reference.times, strict=True)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


def median_ms(result: Result) -> float:
    return statistics.median(result.times) * 1e3


# --------------------------------------------------------------------------- output


def print_table(results: list[Result], reference: str, *, per_leaf: int | None = None) -> None:
    ref = next(r for r in results if r.name == reference)
    print(
        f"| case | ms / update (median) | ratio vs {reference} (median, IQR) "
        "| XLA kernels | array copies | XLA temp MiB | compile s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        median, q1, q3 = paired_ratio(r, ref)
        hlo = r.hlo
        kernels = f"{hlo['fusions']}" if hlo else "-"
        copies = f"{hlo['copies']}" if hlo else "-"
        temp = f"{hlo['temp_mib']:.0f}" if hlo else "-"
        compile_s = f"{r.compile_s:.1f}" if hlo else "-"
        print(
            f"| {r.name} | {median_ms(r):.3f} | **{median:.3f}** ({q1:.3f}-{q3:.3f}) "
            f"| {kernels} | {copies} | {temp} | {compile_s} |"
        )
    print()


def machine_header(argv: list[str], host_malloc: bool | None = None) -> None:
    """The run's command, date, machine and versions; ``host_malloc``: None when
    ``--tune-host-malloc`` was not given, else what ``tune_host_malloc()`` returned."""
    versions = (
        f"python {platform.python_version()}, jax {jax.__version__}, "
        f"jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else '?'}, "
        f"optax {optax.__version__}, numpy {np.__version__}, "
        + (
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
            if torch
            else "torch not installed"
        )
    )
    print(f"- command: `{' '.join(['python', *argv])}`")
    print(f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} CPU cores, JAX devices: {jax.devices()}")
    print(f"- versions: {versions}")
    policy = os.environ.get(
        "OMP_WAIT_POLICY", "unset (libgomp's default: spin a while, then sleep)"
    )
    print(f"- OMP_WAIT_POLICY: {policy}")
    if os.environ.get("XLA_FLAGS"):
        print(f"- XLA_FLAGS: `{os.environ['XLA_FLAGS']}`")
    if host_malloc is None:
        print("- host malloc: as it is (`--tune-host-malloc` not given)")
    elif host_malloc:
        print("- host malloc: `jaxtricks.lm.cpu.tune_host_malloc()` applied before JAX started "
              "(one arena, no mmap, no trimming)")
    else:
        print("- host malloc: `--tune-host-malloc` given but not applied (not glibc, or "
              "JAXTRICKS_HOST_MALLOC=default): as it is")
    print()


LEGEND = """\
What each case computes (same math in every row, float32; see `Hyper` in the script):
- **optax**: `optax.chain(clip_by_global_norm(c), L1, add_decayed_weights(2*l2), scale_by_adam,
  add_decayed_weights(wd), scale_by_learning_rate(join_schedules([linear_schedule(0, peak, W),
  exponential_decay(peak, 1, exp(-k))], [W])))`, where L1 is a one-line `optax.stateless` tree map
  `g + l1*sign(w)` (optax has no L1 transform).
- **jaxtricks**: `jaxtricks.make_optimizer(name="adamw", learning_rate=warmup_then(W,
  exponential_decay(peak, k)), clip_norm=c, l1=l1, l2=l2, weight_decay=wd)`: the same chain, which
  also records the pre-clip norm, whether it clipped and the lr in its state (not the L1/L2
  penalties: `record_penalties=False` is the default; the breakdown shows what recording costs).
- **torch <impl>**: `clip_grad_norm_`, `.grad += l1*sign(w) + 2*l2*w`,
  `AdamW(weight_decay=wd).step()`, `LambdaLR.step()`, in place; `for-loop` (`foreach=False`, the
  default for CPU tensors), `foreach` (`foreach=True`, also for the clip and the L1/L2 terms) or
  `fused` (`fused=True`).
- JAX rows: `tx.update` + `optax.apply_updates` in one `jax.jit`, params and state donated.
  XLA kernels = fusions in the compiled update (a kernel launch each);
  array copies = non-scalar `copy` ops XLA inserted (a full read + write of that array when it
  runs; in the `skip_nonfinite` / `apply_if_finite` rows they write the zero updates of a skipped
  step, in the branch that a finite step does not run);
  XLA temp = its temporary buffers per update.
- Ratios: median over rounds of (case / optax) timed back to back in the same round, with the
  interquartile range of those per-round ratios; ms: median over rounds.
"""


# --------------------------------------------------------------------------- the sections


def donation_copies() -> None:
    """Why recording the L1/L2 penalties cost a copy of every parameter (fix 1 in BENCHMARKS.md),
    in two lines: a reduction of donated ``p`` that feeds only another output is not ordered
    before ``p``'s in-place update, so XLA copies ``p``; one that feeds the update is."""
    p, g = jnp.ones((256, 256)), jnp.ones((256, 256))
    beside = "`lambda p, g: (p - 0.1 * g, jnp.sum(p * p))`"  # the sum feeds another output
    inside = "`lambda p, g: p - 0.1 * g * jnp.sum(p * p)`"  # the sum feeds the update
    cases = {beside: lambda p, g: (p - 0.1 * g, jnp.sum(p * p)),
             inside: lambda p, g: p - 0.1 * g * jnp.sum(p * p)}
    copies = {name: hlo_stats(jax.jit(f, donate_argnums=0).lower(p, g).compile())["copies"]
              for name, f in cases.items()}
    print("Array copies of the donated `p` (jitted, `donate_argnums=0`): " + "; ".join(
        f"{name}: {n}" for name, n in copies.items()) + "\n")


def equivalence_check(steps: int = 6) -> None:
    """Run a few updates of every column on one tree and print how far apart they end."""
    shapes = mixed_shapes()
    params_np = random_arrays(shapes, 0, 1.0)
    grads_np = [random_arrays(shapes, 10 + i, 3.0) for i in range(steps)]
    # The skipping pair also sees a non-finite gradient (both must skip that step alike).
    grads_nan = [[g.copy() for g in step] for step in grads_np]
    grads_nan[steps // 2][0].flat[0] = np.nan

    def run(tx, grads_seq):
        @jax.jit
        def updates(params, stacked_grads):  # one compilation per chain: init and every step
            def body(carry, grads):
                return _apply(tx, *carry, grads), None

            (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), stacked_grads)
            return params

        stacked = [np.stack(leaf) for leaf in zip(*grads_seq, strict=True)]
        out = updates(to_jax(shapes, params_np), to_jax(shapes, stacked))
        return [np.asarray(leaf) for leaf in jax.tree.leaves(out)]

    reference = run(optax_chain(CHECK), grads_np)
    moved = _max_diff(reference, params_np)
    diffs = {"jaxtricks vs optax": _max_diff(run(jaxtricks_chain(CHECK), grads_np), reference)}
    masked_ref = run(never_give_up(optax_chain(CHECK, mask=jaxtricks.decay_mask)), grads_nan)
    masked = run(jaxtricks_chain(CHECK, mask=jaxtricks.decay_mask, skip_nonfinite=True), grads_nan)
    name = "jaxtricks(mask=decay_mask, skip_nonfinite) vs optax(masked, apply_if_finite), one NaN"
    diffs[name] = _max_diff(masked, masked_ref)
    if torch is not None:
        for impl in TorchCase.IMPLS:
            params, grads = torch_tensors(params_np, grads_np[0])
            case = TorchCase(CHECK, impl, params, grads)
            for step in grads_np:
                for p, g in zip(params, step, strict=True):
                    p.grad.copy_(torch.from_numpy(g))
                case()
            got = [p.detach().numpy() for p in params]
            diffs[f"torch {impl} vs optax"] = _max_diff(got, reference)
    ok = all(d < 1e-5 for d in diffs.values())
    print(
        f"Same math: {steps} updates on a mixed tree with warmup {CHECK.warmup} "
        f"(parameters moved by up to {moved:.3g}); max |difference| of the final parameters:"
    )
    for name, d in diffs.items():
        print(f"- {name}: {d:.2g}")
    print(f"- equivalence {'OK' if ok else 'MISMATCH'} (tolerance 1e-5)")
    if torch is None:
        print(f"- {TORCH_MISSING}")
    print()


def _apply(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _max_diff(a, b) -> float:
    pairs = zip(a, b, strict=True)  # np.max, not max(): a NaN must show, not vanish
    return float(np.max([np.max(np.abs(np.asarray(x) - np.asarray(y))) for x, y in pairs]))


def make_cases(shapes, named_txs: dict[str, Any], *, with_torch: bool, grad_scale: float):
    params_np = random_arrays(shapes, 0, 0.02)
    grads_np = random_arrays(shapes, 1, grad_scale)
    grads = to_jax(shapes, grads_np)
    cases: dict[str, Any] = {}
    for name, tx in named_txs.items():
        cases[name] = JaxCase(tx, shapes, params_np, grads)
    if with_torch and torch is not None:
        params, torch_grads = torch_tensors(params_np, grads_np)  # shared: saves memory
        for impl in TorchCase.IMPLS:
            cases[f"torch {impl}"] = TorchCase(BENCH, impl, params, torch_grads)
    return cases


def describe(shapes) -> str:
    leaves = jax.tree.leaves(shapes, is_leaf=_is_shape)
    return f"{sum(math.prod(s) for s in leaves):,} float32 parameters in {len(leaves)} leaves"


@dataclasses.dataclass(frozen=True)
class Timing:
    rounds: int  # interleaved rounds; every ratio is a median over them
    settle: int = 0  # untimed updates of a case before its timed ones, in every round
    inner: int = 1  # timed updates of a case per round (their mean is the round's time)

    def __str__(self) -> str:
        if not self.settle:
            return f"{self.rounds} rounds"
        return f"{self.rounds} rounds, {self.settle} untimed + {self.inner} timed updates per case"


def timed(shapes, named_txs, timing: Timing, *, with_torch: bool) -> list[Result]:
    cases = make_cases(shapes, named_txs, with_torch=with_torch, grad_scale=1e-3)
    results = run_interleaved(cases, timing.rounds, settle=timing.settle, inner=timing.inner)
    del cases
    gc.collect()
    return results


def both_chains() -> dict[str, Any]:
    return {"optax": optax_chain(BENCH), "jaxtricks": jaxtricks_chain(BENCH)}


TORCH_MISSING = (
    "torch: skipped (torch not installed, or --no-torch; `pip install torch==2.13.0`, a CPU build, "
    "for those rows)\n"
)


def section_main(shapes, title: str, timing: Timing) -> None:
    print(f"### {title}: {describe(shapes)}, {timing}\n")
    print_table(timed(shapes, both_chains(), timing, with_torch=True), "optax")
    if torch is None:
        print(TORCH_MISSING)


def section_breakdown(shapes, timing: Timing) -> None:
    """Swap one piece of the optax chain for jaxtricks' to see what each costs."""
    print(f"### Breakdown: what each jaxtricks piece costs ({describe(shapes)}, {timing})\n")
    print(
        "Each row is the optax chain with one piece replaced by jaxtricks' transform(s); "
        "its ratio against the plain optax chain is that piece's cost.\n"
    )
    pieces = {"optax": optax_chain(BENCH)}
    for piece, label in [
        ("clip", "clip -> jaxtricks.clip_by_global_norm"),
        ("l1+l2", "L1, L2 -> jaxtricks.l1_regularization, l2_regularization"),
        ("l1+l2 recorded", "L1, L2 -> the same with record_penalty=True"),
        ("decay", "decay -> jaxtricks.weight_decay"),
        ("lr", "lr -> jaxtricks.scale_by_learning_rate(jaxtricks schedule)"),
    ]:
        pieces[f"optax, {label}"] = optax_chain(BENCH, **jaxtricks_piece(piece, BENCH))
    print_table(timed(shapes, pieces, timing, with_torch=False), "optax")

    print(
        "Wrappers and masks (configs/default.yaml has `decay_all: false`, i.e. "
        "`mask=jaxtricks.decay_mask`, and `skip_nonfinite: true`):\n"
    )
    wrapped = {
        "optax": optax_chain(BENCH),
        "optax.apply_if_finite(optax)": never_give_up(optax_chain(BENCH)),
        "jaxtricks.skip_nonfinite(optax)": jaxtricks.skip_nonfinite(optax_chain(BENCH)),
        "optax.apply_if_finite(optax, masked)": never_give_up(
            optax_chain(BENCH, mask=jaxtricks.decay_mask)
        ),
        "jaxtricks(mask=decay_mask, skip_nonfinite=True)": jaxtricks_chain(
            BENCH, mask=jaxtricks.decay_mask, skip_nonfinite=True
        ),
    }
    results = timed(shapes, wrapped, timing, with_torch=False)
    print_table(results, "optax")
    print("Of their array copies, those that write a broadcast zero (the zero updates of a "
          "skipped step, in the branch a finite step does not run): " + "; ".join(
              f"{r.name} {r.hlo['zero_copies']} of {r.hlo['copies']}" for r in results
              if r.hlo and r.hlo["copies"]) + "\n")


FLAT = "optax.flatten(jaxtricks)"
NOOP = "no-op"


def noop_chain() -> optax.GradientTransformation:
    """The jaxtricks chain's inputs and outputs without its arithmetic: the state (same leaves)
    passes through, the update is the gradient (``apply_updates`` adds it: one kernel a leaf).
    What a jitted call costs per array, whatever the update computes."""
    chain = jaxtricks_chain(BENCH)
    return optax.GradientTransformation(chain.init, lambda updates, state, params=None: (
        updates, state))


def returned_and_ready_ms(call: Callable[[], Any], calls: int) -> tuple[float, float]:
    """Median ms until ``call()`` returns (JAX's host-side work: the arguments, donation, the
    output arrays; XLA runs the kernels asynchronously) and until what it returned is ready. The
    gap between the two is about what XLA's kernels take."""
    returned, ready = [], []
    for _ in range(calls + 2):  # the first two warm up
        start = time.perf_counter()
        out = call()
        returned.append(time.perf_counter() - start)
        jax.block_until_ready(out)
        ready.append(time.perf_counter() - start)
    return 1e3 * statistics.median(returned[2:]), 1e3 * statistics.median(ready[2:])


def noop_dispatch_ms(shapes, calls: int) -> tuple[float, float]:
    """:func:`returned_and_ready_ms` of the no-op update."""
    case = make_cases(shapes, {NOOP: noop_chain()}, with_torch=False, grad_scale=1e-3)[NOOP]

    def call():
        case.params, case.state = case.compiled(case.params, case.state, case.grads)
        return case.params, case.state

    return returned_and_ready_ms(call, calls)


def section_scaling(counts: list[int], size: int, timing_for: Callable[[int], Timing]) -> None:
    print(f"### Scaling with the number of leaves (every leaf ({size},) float32)\n")
    print(
        f"`{FLAT}` is the jaxtricks chain run on one flat vector (`optax.flatten` ravels the "
        "gradient, the parameters and the state): a remedy for many small leaves, not a "
        "jaxtricks API (per-leaf masks such as `decay_mask` do not survive the ravel). "
        f"`{NOOP}` takes and returns the same arrays as the jaxtricks chain (the parameters, "
        "the gradient, the state) but only adds the gradient to the parameters: the floor a "
        "jitted call sets per array, whatever the update computes.\n"
    )
    rows = []
    for count in counts:
        shapes = small_leaves_shapes(count, size)
        chains = {**both_chains(), FLAT: optax.flatten(jaxtricks_chain(BENCH)),
                  NOOP: noop_chain()}
        results = timed(shapes, chains, timing_for(count), with_torch=True)
        rows.append((count, {r.name: r for r in results}))
        if count == 1000:
            print(f"#### 1,000 small leaves: {describe(shapes)}, {timing_for(count)}\n")
            print_table(results, "optax")
    names = list(rows[0][1])
    jax_names = [n for n in names if rows[0][1][n].hlo]
    print("Median ms per update, and (in bold) the paired median ratio against optax:\n")
    header = " | ".join(f"{n} ms" for n in names)
    listed = ", ".join(jax_names)
    print(f"| leaves | {header} | compile s: {listed} | XLA kernels: {listed} |")
    print("|---:|" + "---:|" * (len(names) + 2))
    for count, by_name in rows:
        ref = by_name["optax"]
        cells = " | ".join(
            f"{median_ms(by_name[n]):.3f}"
            + ("" if n == "optax" else f" (**{paired_ratio(by_name[n], ref)[0]:.2f}**)")
            for n in names
        )
        compile_s = ", ".join(f"{by_name[n].compile_s:.1f}" for n in jax_names)
        kernels = ", ".join(str(by_name[n].hlo["fusions"]) for n in jax_names)
        print(f"| {count:,} | {cells} | {compile_s} | {kernels} |")
    print()
    returned, ready = noop_dispatch_ms(small_leaves_shapes(counts[-1], size), 30)
    print(f"`{NOOP}` on its own, {counts[-1]:,} leaves, median of 30 calls: the call returns "
          f"after {returned:.2f} ms, its results are ready after {ready:.2f} ms "
          f"({returned / ready:.0%} of the time passes before the call returns). The call's "
          "host-side work (JAX's handling of each argument, the donation, the output arrays; "
          "XLA runs the kernels asynchronously) is the first figure.\n")
    if torch is None:
        print(TORCH_MISSING)


# --------------------------------------------------------------------------- tried, not kept
# Rewrites that were measured against the kept code and not kept (BENCHMARKS.md says why). Each
# keeps the kept code's contract and state, so `tried_check` compares them number for number.

KEPT_SKIP = "jaxtricks(mask=decay_mask, skip_nonfinite=True)"
SMALL_BELOW = 4096  # elements: a leaf this small joins the concatenated vector of the norm


def all_finite(tree) -> jax.Array:
    """Whether every element is finite: one reduction per leaf, as in skip_nonfinite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(tree)]))


def skipped_state(state, skip, inner_state) -> jaxtricks.SkipNonfiniteState:
    """skip_nonfinite's state after a step whose inner state is ``inner_state``."""
    zero = jnp.zeros([], jnp.int32)
    return jaxtricks.SkipNonfiniteState(
        inner_state=inner_state,
        total_skipped=jnp.where(
            skip, optax.safe_increment(state.total_skipped), state.total_skipped
        ),
        consecutive_skipped=jnp.where(skip, optax.safe_increment(state.consecutive_skipped), zero),
        last_skipped=skip,
    )


def zeroed(skip, updates):
    return jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), updates)


def skip_by_select(inner) -> optax.GradientTransformationExtraArgs:
    """skip_nonfinite without a branch, as it was before commit cb7ef3a: the inner update always
    runs, then ``jnp.where(skip, old, new)`` over every leaf of the inner state and
    ``jnp.where(skip, 0, u)`` over the updates. Not kept: to keep the old state next to the new
    one XLA copies the parameters and both Adam moments, and the selects are extra passes
    (BENCHMARKS.md: 1.46x-1.61x the branch's time on GPT-2, 346 copies, 965 MiB of temps)."""
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        skip = jnp.logical_not(all_finite(updates))
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        kept = jax.tree.map(lambda old, new: jnp.where(skip, old, new), state.inner_state,
                            new_inner)
        return zeroed(skip, new_updates), skipped_state(state, skip, kept)

    return optax.GradientTransformationExtraArgs(jaxtricks.skip_nonfinite(inner).init, update_fn)


def skip_branch_state_only(inner) -> optax.GradientTransformationExtraArgs:
    """A ``lax.cond`` that chooses the inner state only; the updates are computed again outside
    the branch and zeroed with ``jnp.where``, so that ``apply_updates`` could fuse them into the
    parameters. Not kept: the inner update runs twice and XLA copies more (BENCHMARKS.md: 2.2x
    the branch's time on GPT-2, 642 copies)."""
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        skip = jnp.logical_not(all_finite(updates))

        def advance(_):
            return inner.update(updates, state.inner_state, params, **extra_args)[1]

        kept = jax.lax.cond(jnp.logical_not(skip), advance, lambda _: state.inner_state, None)
        new_updates, _ = inner.update(updates, state.inner_state, params, **extra_args)
        return zeroed(skip, new_updates), skipped_state(state, skip, kept)

    return optax.GradientTransformationExtraArgs(jaxtricks.skip_nonfinite(inner).init, update_fn)


def skip_on_global_norm(inner) -> optax.GradientTransformationExtraArgs:
    """skip_nonfinite's branch, the skip decided on the gradient's global norm (the expression
    the clip computes): a NaN or inf element makes it non-finite, so the per-leaf ``isfinite``
    reductions run only then, in a ``lax.cond`` (an overflowing norm of finite elements must not
    skip). Not kept: no gain once the update is a branch (BENCHMARKS.md: 1.239x optax's time for
    the default config against 1.231x, and 358 more kernels to compile)."""
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        skip = jax.lax.cond(
            jnp.isfinite(jaxtricks.global_norm(updates)),
            lambda _: jnp.zeros([], jnp.bool_),
            lambda _: jnp.logical_not(all_finite(updates)),
            None,
        )

        def apply(_):  # the branches of skip_nonfinite (jaxtricks/clipping.py)
            return inner.update(updates, state.inner_state, params, **extra_args)

        def reject(_):
            zeros = jax.tree.map(lambda u: jnp.zeros(u.shape, u.dtype),
                                 jax.eval_shape(apply, None)[0])
            return zeros, state.inner_state

        new_updates, kept = jax.lax.cond(jnp.logical_not(skip), apply, reject, None)
        return new_updates, skipped_state(state, skip, kept)

    return optax.GradientTransformationExtraArgs(jaxtricks.skip_nonfinite(inner).init, update_fn)


def skip_variants(h: Hyper) -> dict[str, Any]:
    """The default config's chain (the kept code first) and the tried ways to skip around it."""
    inner = jaxtricks_chain(h, mask=jaxtricks.decay_mask)
    return {
        KEPT_SKIP: jaxtricks_chain(h, mask=jaxtricks.decay_mask, skip_nonfinite=True),
        "no branch: jnp.where over the state and the updates": skip_by_select(inner),
        "branch for the state only, updates again outside": skip_branch_state_only(inner),
        "skip decided on the global norm": skip_on_global_norm(inner),
    }


def clip_by_concatenated_norm(max_norm: float, small_below: int) -> optax.GradientTransformation:
    """jaxtricks.clip_by_global_norm (one factor, the pre-clip norm in its state) whose norm sums
    the leaves under ``small_below`` elements as one concatenated vector, the big ones per leaf:
    fewer kernels on many small leaves. Not kept: a gain of the order of the noise
    (BENCHMARKS.md: 0.90x-0.99x the plain chain's time on 1,000 leaves, 0.92x on 100, 1.05x on
    GPT-2)."""

    def norm(tree):
        leaves = [g.astype(jnp.promote_types(g.dtype, jnp.float32)) for g in jax.tree.leaves(tree)]
        small = [g.ravel() for g in leaves if g.size < small_below]
        squares = [jnp.sum(jnp.square(g)) for g in leaves if g.size >= small_below]
        if small:
            squares.append(jnp.sum(jnp.square(jnp.concatenate(small))))
        return jnp.sqrt(sum(squares, start=jnp.zeros([], jnp.float32))).astype(jnp.float32)

    def update_fn(updates, state, params=None):
        del state, params
        grad_norm = norm(updates)
        factor = 1.0 / jnp.maximum(1.0, grad_norm / max_norm)
        clipped = jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates)
        return clipped, jaxtricks.ClipByGlobalNormState(grad_norm, grad_norm > max_norm)

    return optax.GradientTransformation(jaxtricks.clip_by_global_norm(max_norm).init, update_fn)


def clip_variants(h: Hyper, small_below: int = SMALL_BELOW) -> dict[str, Any]:
    """The plain jaxtricks chain, and the same with the concatenated norm in the clip (the
    pieces of make_optimizer in its order; `tried_check` checks that the states match)."""
    schedule = jaxtricks.warmup_then(h.warmup, jaxtricks.exponential_decay(h.peak_lr, h.decay))
    concatenated = optax.chain(
        clip_by_concatenated_norm(h.clip, small_below),
        jaxtricks.l1_regularization(h.l1),
        jaxtricks.l2_regularization(h.l2),
        optax.scale_by_adam(b1=h.b1, b2=h.b2, eps=h.eps),
        jaxtricks.weight_decay(h.weight_decay),
        jaxtricks.scale_by_learning_rate(schedule),
    )
    return {"jaxtricks": jaxtricks_chain(h), "jaxtricks, clip norm over small leaves "
            f"(< {small_below:,}) concatenated": concatenated}


def trajectory(tx, shapes, params_np, grads_seq) -> list[Any]:
    """(updates, state) after each step of ``tx``, jitted, the updates applied in between."""
    update = jax.jit(tx.update)
    params = to_jax(shapes, params_np)
    state = tx.init(params)
    out = []
    for grads_np in grads_seq:
        updates, state = update(to_jax(shapes, grads_np), state, params)
        params = optax.apply_updates(params, updates)
        out.append(jax.device_get((updates, state)))
    return out


def tree_diff(a, b) -> float:
    """Max |a - b| over the leaves of two trees (inf if their structures differ; equal values,
    inf included, differ by 0; a NaN against anything gives NaN)."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return math.inf
    diffs = [0.0]
    with np.errstate(invalid="ignore"):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            diffs.append(np.max(np.where(x == y, 0.0, np.abs(x - y)), initial=0.0))
    return float(np.max(diffs))


def tried_check() -> None:
    """Each tried rewrite against the kept code: updates and state after every step of a few."""
    shapes = mixed_shapes()
    params_np = random_arrays(shapes, 0, 1.0)
    finite = [random_arrays(shapes, 20 + i, 0.3) for i in range(3)]  # norm ~3: clipped
    nan = [g.copy() for g in finite[1]]
    nan[0].flat[0] = np.nan
    huge = [g * 1e30 for g in finite[2]]  # finite, but the squares' sum overflows: no skip
    skip_grads = [finite[0], nan, huge, finite[1]]
    clip_grads = [finite[0], finite[1], [g * 1e-3 for g in finite[2]]]  # clipped, then not
    runs = [(skip_variants(CHECK), skip_grads), (clip_variants(CHECK, small_below=32), clip_grads)]
    print(f"Same contract: each rewrite against the kept code (the first row of its table) over "
          f"a few jitted steps on a mixed tree ({describe(shapes)}); max |difference| of the "
          "updates and the state after every step:")
    diffs, skipped = {}, []
    for variants, grads_seq in runs:
        (kept_name, kept_tx), *tried = variants.items()
        kept = trajectory(kept_tx, shapes, params_np, grads_seq)
        if kept_name == KEPT_SKIP:
            skipped = [bool(state.last_skipped) for _, state in kept]
        for name, tx in tried:
            diffs[name] = tree_diff(kept, trajectory(tx, shapes, params_np, grads_seq))
            print(f"- {name}: {diffs[name]:.2g}")
    # The steps must test the contract: the NaN step skipped, the overflowing norm's not.
    print(f"- steps the kept skip_nonfinite skipped (finite, NaN, norm overflows, finite): "
          f"{skipped}")
    ok = skipped == [False, True, False, False] and all(d < 1e-5 for d in diffs.values())
    print(f"- tried rewrites {'OK' if ok else 'MISMATCH'} (tolerance 1e-5)\n")


def add_only_ms(count: int, size: int, state_count: int, calls: int) -> tuple[float, float]:
    """:func:`returned_and_ready_ms` of the smallest jitted call over the no-op row's arrays:
    ``p + g`` over ``count`` arrays of ``(size,)`` each, a ``state_count``-array state passed
    through unchanged, ``p`` and the state donated."""

    def arrays(n):
        return {f"leaf{i:05d}": jnp.full((size,), i, jnp.float32) for i in range(n)}

    p, g, state = arrays(count), arrays(count), arrays(state_count)

    def add(p, g, state):
        return jax.tree.map(jnp.add, p, g), state

    compiled = jax.jit(add, donate_argnums=(0, 2)).lower(p, g, state).compile()

    def call():
        nonlocal p, state
        p, state = compiled(p, g, state)
        return p, state

    return returned_and_ready_ms(call, calls)


def section_tried(big, big_title: str, big_timing: Timing, counts: list[int],
                  leaves_timing: Timing, floor_count: int) -> None:
    """The rewrites of the update that BENCHMARKS.md reports as tried and not kept."""
    print("### Tried and not kept\n")
    print("Each table times rewrites against the kept code, its first row (the reference of "
          "the ratios), interleaved; every rewrite keeps the kept code's contract and state.\n")
    tried_check()
    print(f"#### skip_nonfinite written other ways, around the default config's chain: "
          f"{big_title}, {describe(big)}, {big_timing}\n")
    print_table(timed(big, skip_variants(BENCH), big_timing, with_torch=False), KEPT_SKIP)
    trees = [(f"{count:,} small leaves", small_leaves_shapes(count), leaves_timing)
             for count in counts] + [(big_title, big, big_timing)]
    for title, shapes, timing in trees:
        print(f"#### The clip's norm over the small leaves concatenated: {title}, "
              f"{describe(shapes)}, {timing}\n")
        print_table(timed(shapes, clip_variants(BENCH), timing, with_torch=False), "jaxtricks")
    size = 64
    many = add_only_ms(floor_count, size, 2 * floor_count, 30)
    one = add_only_ms(1, floor_count * size, 1, 30)
    print(f"The floor of a jitted call per array: `p + g` alone (jitted, `p` and the state "
          f"donated), median of 30 calls. Over {floor_count:,} arrays of ({size},) per `p` and "
          f"`g` and a {2 * floor_count:,}-array state passed through: the call returns after "
          f"{many[0]:.2f} ms, its results are ready after {many[1]:.2f} ms. The same arithmetic "
          f"on one {floor_count * size:,}-element array per argument: returns after "
          f"{one[0]:.2f} ms, ready after {one[1]:.2f} ms.\n")


SECTIONS = ("check", "main", "breakdown", "scaling", "tried")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny trees, few rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the GPT-2 tables")
    parser.add_argument("--no-torch", action="store_true", help="leave out the PyTorch rows")
    parser.add_argument(
        "--sections",
        default=None,
        help="comma-separated subset of check,main,breakdown,scaling,tried "
        "(default: all; with --quick: check,main,scaling,tried). tried: rewrites of the update "
        "measured against the kept code and not kept",
    )
    parser.add_argument(
        "--max-leaves",
        type=int,
        default=1000,
        help="largest leaf count of the scaling table (its compile time grows superlinearly: "
        "1,000 leaves take about a minute, 3,000 several)",
    )
    parser.add_argument(
        "--tune-host-malloc",
        action="store_true",
        help="call jaxtricks.lm.cpu.tune_host_malloc() first, as train.py does (XLA's temporary "
        "buffers stay mapped between updates; the header says whether glibc took it)",
    )
    args = parser.parse_args(argv)
    host_malloc = None  # not asked
    if args.tune_host_malloc:  # before JAX starts its backend and threads: nothing above does
        from jaxtricks.lm.cpu import tune_host_malloc

        host_malloc = tune_host_malloc()
    default_sections = "check,main,scaling,tried" if args.quick else ",".join(SECTIONS)
    sections = (args.sections or default_sections).split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    global torch
    if args.no_torch:
        torch = None
    elif torch is not None:
        torch.manual_seed(0)

    if args.quick:
        big = gpt2_shapes(vocab=256, context=32, width=32, layers=1)
        title = "GPT-2-shaped, tiny (--quick)"
        main_timing = breakdown_timing = Timing(args.rounds or 2)
        counts = [c for c in (1, 10) if c <= args.max_leaves]
        tried_counts, tried_timing, floor_count = [10], Timing(2), 10

        def timing_for(count):
            return Timing(2)

    else:
        big = gpt2_shapes()
        title = "GPT-2 small"
        main_timing = Timing(args.rounds or 10)  # ~0.5 s per update: no settling needed
        breakdown_timing = main_timing
        counts = [c for c in (1, 10, 100, 1000, 3000, 10000) if c <= args.max_leaves]
        tried_counts, tried_timing, floor_count = [100, 1000], Timing(20, settle=1, inner=5), 1000

        def timing_for(count):
            return Timing(20 if count <= 100 else 10, settle=1, inner=5)

    start = time.perf_counter()
    print("## Transforms\n")
    machine_header(sys.argv if argv is None else ["benchmarks/bench_transforms.py", *argv],
                   host_malloc)
    print(LEGEND)
    if "check" in sections:
        equivalence_check()
        donation_copies()
    if "main" in sections:
        section_main(big, title, main_timing)
    if "breakdown" in sections:
        section_breakdown(big, breakdown_timing)
    if "scaling" in sections:
        section_scaling(counts, 64, timing_for)
    if "tried" in sections:
        section_tried(big, title, main_timing, tried_counts, tried_timing, floor_count)
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
