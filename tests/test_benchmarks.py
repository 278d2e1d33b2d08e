"""Tests of benchmarks/bench_transforms.py: its HLO counts in-process, and its --quick mode.

The smoke runs run the script as a user would (a subprocess on the CPU, marked slow) and check the
rows it prints: the equivalence check of the chains, the table of the GPT-2-shaped tree and the
scaling table. They pass with or without PyTorch installed (without it the script prints a note
instead of the torch rows). No timing is asserted, only that every row is there and well formed.
XLA's backend optimizations are switched off in the subprocess to keep compilation short: the
speed of a smoke run means nothing, and the HLO-level columns do not depend on that flag.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec("torch") is not None
NUMBER = r"\d[\d,]*(?:\.\d+)?"
RATIO = rf"\*\*{NUMBER}\*\* \({NUMBER}-{NUMBER}\)"


def _run_quick(python, *args: str) -> str:
    """``bench_transforms.py --quick *args`` in a child Python (conftest's ``python`` fixture)."""
    proc = python.run("benchmarks/bench_transforms.py", "--quick", *args, env={
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
        "JAXTRICKS_HOST_MALLOC": "",  # not tune_host_malloc's opt-out, whatever the session has
    })
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_transforms_quick_prints_every_row(python):
    out = _run_quick(python)
    assert out.startswith("## Transforms")
    assert re.search(r"^- machine: .+, \d+ cores .*; JAX devices: ", out, re.M)
    assert "- host malloc: as it is (`--tune-host-malloc` not given)" in out
    # The chains compute the same numbers (the check fails loudly otherwise).
    assert "- equivalence OK" in out, out
    assert re.search(rf"^- jaxtricks vs optax: {NUMBER}", out, re.M)
    assert re.search(r"^total wall time \d+ s$", out, re.M), out
    # The main table: optax is the reference; jaxtricks has every column filled in.
    assert re.search(rf"^\| optax \| {NUMBER} \| \*\*1\.000\*\* ", out, re.M)
    filled = rf"\| \d+ \| \d+ \| {NUMBER} \| {NUMBER} \|$"  # kernels, copies, temp MiB, compile s
    jaxtricks_row = rf"^\| jaxtricks \| {NUMBER} \| {RATIO} {filled}"
    assert re.search(jaxtricks_row, out, re.M), out
    # The scaling table: one row per leaf count of the quick mode.
    for count in (1, 10):
        row = rf"^\| {count} \| {NUMBER} \| {NUMBER} \(\*\*{NUMBER}\*\*\) \|"  # optax, jaxtricks
        assert re.search(row, out, re.M), out
    assert "| no-op ms |" in out  # the floor per array of a jitted call, next to the chains
    if HAS_TORCH:
        for impl in ("for-loop", "foreach", "fused"):
            assert re.search(rf"^\| torch {impl} \| {NUMBER} \| {RATIO} \| - \|", out, re.M), out
            assert re.search(rf"^- torch {impl} vs optax: {NUMBER}", out, re.M)
    else:
        assert "torch: skipped (torch not installed" in out  # a note instead of the rows


@pytest.mark.slow
def test_bench_transforms_tune_host_malloc_in_header(python):
    out = _run_quick(python, "--sections", "check", "--tune-host-malloc")
    glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    if glibc:
        assert "- host malloc: `tune_host_malloc()` applied before JAX started" in out, out
    else:
        assert "- host malloc: `--tune-host-malloc` given but not applied" in out, out
    assert "- equivalence OK" in out and "### GPT-2" not in out  # only the asked section ran


@pytest.mark.slow
def test_bench_transforms_import_starts_no_jax_backend(python):
    """--tune-host-malloc must run before JAX starts its backend (its threads keep their malloc
    arenas): nothing at the import of the script may create an array or ask for a device."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import bench_transforms; "
            "from jax._src import xla_bridge; print(xla_bridge.backends_are_initialized())")
    proc = python.run("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False", proc.stdout


def _bench_transforms():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import bench_transforms
    finally:
        sys.path.pop(0)
    return bench_transforms


@pytest.mark.slow
def test_hlo_stats_tells_the_zero_updates_of_a_skipped_step_from_other_copies():
    """The wrappers table's note: whatever copies `apply_if_finite` / `skip_nonfinite` make XLA
    insert (how many depends on XLA's version) write the broadcast zeros of a skipped step; the
    plain chain's and a copy of a donated parameter are not such zeros."""
    import jax
    import jax.numpy as jnp
    import optax

    import jaxtricks

    bt = _bench_transforms()
    params = jax.tree.map(jnp.asarray, bt.random_arrays(
        bt.gpt2_shapes(vocab=256, context=32, width=32, layers=1), 0, 1.0))

    def stats(tx):
        def update(p, g, s):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        lowered = jax.jit(update, donate_argnums=(0, 2)).lower(params, params, tx.init(params))
        return bt.hlo_stats(lowered.compile())

    assert stats(bt.optax_chain(bt.BENCH))["zero_copies"] == 0
    for tx in (bt.never_give_up(bt.optax_chain(bt.BENCH)),
               jaxtricks.skip_nonfinite(bt.optax_chain(bt.BENCH))):
        wrapped = stats(tx)
        assert wrapped["zero_copies"] == wrapped["copies"], wrapped
        assert wrapped["fusions"] > 0 and wrapped["temp_mib"] >= 0, wrapped
    beside = jax.jit(lambda p, g: (p - g, (p * p).sum()), donate_argnums=0)
    copied = bt.hlo_stats(beside.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile())
    assert copied["zero_copies"] == 0, copied


def test_hlo_stats_counts_array_copies_and_broadcast_zeros_in_hlo_text():
    """The counting itself, on HLO text written here: a copy of a broadcast 0 (plain or wrapped
    in a fusion) is a zero copy; a copy of a parameter, of a broadcast 1 or a scalar is not."""
    bt = _bench_transforms()
    text = """\
  %constant.1 = f32[] constant(0)
  %constant.2 = f32[] constant(1)
  %broadcast.3 = f32[32]{0} broadcast(%constant.1), dimensions={}
  %wrapped_broadcast.4 = f32[8,4]{1,0} fusion(%constant.1), kind=kLoop, calls=%wrapped_b
  %broadcast.5 = f32[32]{0} broadcast(%constant.2), dimensions={}
  %copy.6 = f32[32]{0} copy(%broadcast.3)
  %copy.7 = f32[8,4]{1,0} copy(%wrapped_broadcast.4)
  %copy.8 = f32[32]{0} copy(%broadcast.5)
  %copy.9 = f32[64,64]{1,0} copy(%p.0)
  %copy.10 = f32[] copy(%constant.1)
  %fusion.11 = f32[32]{0} fusion(%copy.6), kind=kLoop, calls=%fused
"""

    class Compiled:
        def as_text(self):
            return text

        def memory_analysis(self):
            return None  # as on a backend that does not report it

    stats = bt.hlo_stats(Compiled())
    assert (stats["copies"], stats["zero_copies"], stats["fusions"]) == (4, 2, 2)
    assert stats["temp_mib"] != stats["temp_mib"]  # NaN: not reported
