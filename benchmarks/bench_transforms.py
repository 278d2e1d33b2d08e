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

It prints markdown (the tables of BENCHMARKS.md's "Transforms" section, which says what each case
and column is). PyTorch rows appear when ``torch`` is importable (``pip install torch``, a CPU
build); otherwise a note says so.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX starts: this benchmark is about CPUs

import argparse
import dataclasses
import gc
import math
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
from common import machine_line  # noqa: E402

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
    schedule = jaxtricks.warmup_then(h.warmup, jaxtricks.exponential_decay(h.peak_lr, h.decay))
    return jaxtricks.make_optimizer(
        name="adamw", learning_rate=schedule, b1=h.b1, b2=h.b2, eps=h.eps, clip_norm=h.clip,
        l1=h.l1, l2=h.l2, weight_decay=h.weight_decay, mask=mask, skip_nonfinite=skip_nonfinite,
        record_penalties=record_penalties)


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
        self.opt = torch.optim.AdamW(params, lr=h.peak_lr, betas=(h.b1, h.b2), eps=h.eps,
                                     weight_decay=h.weight_decay, **kwargs)

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
    """The run's command, machine and versions; ``host_malloc``: None when
    ``--tune-host-malloc`` was not given, else what ``tune_host_malloc()`` returned."""
    print(f"- command: `{' '.join(['python', *argv])}`")
    print(f"- machine: {machine_line(('jax', 'jaxlib', 'optax', 'numpy', 'torch'))}; JAX devices: "
          f"{jax.devices()}" + (f"; torch threads: {torch.get_num_threads()}" if torch else ""))
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (libgomp's default: spin, then sleep)")
    print(f"- OMP_WAIT_POLICY: {policy}")
    if os.environ.get("XLA_FLAGS"):
        print(f"- XLA_FLAGS: `{os.environ['XLA_FLAGS']}`")
    if host_malloc is None:
        print("- host malloc: as it is (`--tune-host-malloc` not given)")
    else:
        print("- host malloc: " + ("`tune_host_malloc()` applied before JAX started" if host_malloc
              else "`--tune-host-malloc` given but not applied (not glibc, or "
              "JAXTRICKS_HOST_MALLOC=default): as it is"))
    print()


# --------------------------------------------------------------------------- the sections


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
    if torch is None:
        print(TORCH_MISSING)


SECTIONS = ("check", "main", "breakdown", "scaling")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny trees, few rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the GPT-2 tables")
    parser.add_argument("--no-torch", action="store_true", help="leave out the PyTorch rows")
    parser.add_argument(
        "--sections",
        default=None,
        help="comma-separated subset of check,main,breakdown,scaling "
        "(default: all; with --quick: check,main,scaling)",
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
    default_sections = "check,main,scaling" if args.quick else ",".join(SECTIONS)
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

        def timing_for(count):
            return Timing(2)

    else:
        big = gpt2_shapes()
        title = "GPT-2 small"
        main_timing = Timing(args.rounds or 10)  # ~0.5 s per update: no settling needed
        breakdown_timing = main_timing
        counts = [c for c in (1, 10, 100, 1000, 3000, 10000) if c <= args.max_leaves]

        def timing_for(count):
            return Timing(20 if count <= 100 else 10, settle=1, inner=5)

    start = time.perf_counter()
    print("## Transforms\n")
    machine_header(sys.argv if argv is None else ["benchmarks/bench_transforms.py", *argv],
                   host_malloc)
    if "check" in sections:
        equivalence_check()
    if "main" in sections:
        section_main(big, title, main_timing)
    if "breakdown" in sections:
        section_breakdown(big, breakdown_timing)
    if "scaling" in sections:
        section_scaling(counts, 64, timing_for)
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
