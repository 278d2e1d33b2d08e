"""Smoke test of benchmarks/bench_transforms.py in its --quick mode.

It runs the script as a user would (a subprocess on the CPU) and checks the rows it prints: the
equivalence check of the chains, the table of the GPT-2-shaped tree, the scaling table and the
rewrites tried and not kept (with the check that they keep the kept code's contract). It
passes with or without PyTorch installed (without it the script prints a note instead of the torch
rows). No timing is asserted, only that every row is there and well formed. XLA's backend
optimizations are switched off in the subprocess to keep compilation short: the speed of a smoke
run means nothing, and the HLO-level columns (kernels, copies) do not depend on that flag.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec("torch") is not None
NUMBER = r"\d[\d,]*(?:\.\d+)?"
RATIO = rf"\*\*{NUMBER}\*\* \({NUMBER}-{NUMBER}\)"


def _run_quick(*args: str) -> str:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
    }
    env.pop("JAXTRICKS_HOST_MALLOC", None)  # tune_host_malloc's opt-out
    script = os.path.join(REPO, "benchmarks", "bench_transforms.py")
    proc = subprocess.run(
        [sys.executable, script, "--quick", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_transforms_quick_prints_every_row():
    out = _run_quick()
    assert out.startswith("## Transforms")
    assert re.search(r"^- machine: .+, \d+ CPU cores", out, re.M)
    assert "- host malloc: as it is (`--tune-host-malloc` not given)" in out
    # The chains compute the same numbers (the check fails loudly otherwise).
    assert "- equivalence OK" in out, out
    assert re.search(rf"^- jaxtricks vs optax: {NUMBER}", out, re.M)
    # Fix 1's cause in two lines: the reduction beside the donated update costs a copy.
    assert ("`lambda p, g: (p - 0.1 * g, jnp.sum(p * p))`: 1; "
            "`lambda p, g: p - 0.1 * g * jnp.sum(p * p)`: 0") in out, out
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
    # ... and how much of it is the call's host-side work: returned <= ready.
    split = re.search(rf"no-op` on its own, 10 leaves, .*returns after ({NUMBER}) ms, its "
                      rf"results are ready after ({NUMBER}) ms", out)
    assert split and float(split[1]) <= float(split[2]), out
    if HAS_TORCH:
        for impl in ("for-loop", "foreach", "fused"):
            assert re.search(rf"^\| torch {impl} \| {NUMBER} \| {RATIO} \| - \|", out, re.M), out
            assert re.search(rf"^- torch {impl} vs optax: {NUMBER}", out, re.M)
    else:
        assert "torch: skipped (torch not installed" in out  # a note instead of the rows

    _check_tried(out)


def _check_tried(out: str) -> None:
    """The section of rewrites tried and not kept: contract check, one table per tree, floor."""
    tried = out[out.index("### Tried and not kept"):]
    # Each rewrite gives the kept code's updates and state, and the NaN step (only) was skipped.
    assert "- tried rewrites OK" in tried, tried
    assert "skipped (finite, NaN, norm overflows, finite): [False, True, False, False]" in tried
    filled = rf"\| \d+ \| \d+ \| {NUMBER} \| {NUMBER} \|$"  # kernels, copies, temp MiB, compile s
    skip_rows = ["jaxtricks(mask=decay_mask, skip_nonfinite=True)",  # the kept code first
                 "no branch: jnp.where over the state and the updates",
                 "branch for the state only, updates again outside",
                 "skip decided on the global norm"]
    clip_rows = ["jaxtricks", "jaxtricks, clip norm over small leaves (< 4,096) concatenated"]
    tables = tried.split("#### ")[1:]
    titles = [t.split("\n", 1)[0] for t in tables]
    assert len(tables) == 3, titles  # skip variants (GPT-2-shaped); clip on 10 leaves, GPT-2
    assert titles[0].startswith("skip_nonfinite written other ways") and "GPT-2" in titles[0]
    assert "10 small leaves" in titles[1] and "GPT-2" in titles[2], titles
    for table, rows in zip(tables, [skip_rows, clip_rows, clip_rows], strict=True):
        found = re.findall(r"^\| (?!case \|)([^|-][^|]*?) \| ", table, re.M)
        assert found == rows, table
        # The kept code is the reference (ratio 1); every row has every column.
        kept = re.escape(rows[0])
        assert re.search(rf"^\| {kept} \| {NUMBER} \| \*\*1\.000\*\* ", table, re.M), table
        for row in rows:
            assert re.search(rf"^\| {re.escape(row)} \| {NUMBER} \| {RATIO} {filled}", table,
                             re.M), table
    floor = re.search(
        rf"Over 10 arrays of \(64,\) .* a 20-array state passed through: the call returns after "
        rf"({NUMBER}) ms, its results are ready after ({NUMBER}) ms\. The same arithmetic on one "
        rf"640-element array per argument: returns after ({NUMBER}) ms, ready after ({NUMBER}) ms",
        tried)
    assert floor, tried
    assert float(floor[1]) <= float(floor[2]) and float(floor[3]) <= float(floor[4]), tried


def test_bench_transforms_tune_host_malloc_in_header():
    out = _run_quick("--sections", "check", "--tune-host-malloc")
    glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    if glibc:
        assert ("- host malloc: `jaxtricks.lm.cpu.tune_host_malloc()` applied before JAX"
                in out), out
    else:
        assert "- host malloc: `--tune-host-malloc` given but not applied" in out, out
    assert "- equivalence OK" in out and "### Tried" not in out  # only the asked section ran


def test_bench_transforms_import_starts_no_jax_backend():
    """--tune-host-malloc must run before JAX starts its backend (its threads keep their malloc
    arenas): nothing at the import of the script may create an array or ask for a device."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import bench_transforms; "
            "from jax._src import xla_bridge; print(xla_bridge.backends_are_initialized())")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False", proc.stdout


def test_hlo_stats_tells_the_zero_updates_of_a_skipped_step_from_other_copies():
    """The wrappers table's note: the copies `apply_if_finite` / `skip_nonfinite` add write the
    broadcast zeros of a skipped step; the copy of a donated parameter is not one of them."""
    import jax
    import jax.numpy as jnp
    import optax

    import jaxtricks

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import bench_transforms as bt
    finally:
        sys.path.pop(0)
    params = jax.tree.map(jnp.asarray, bt.random_arrays(
        bt.gpt2_shapes(vocab=256, context=32, width=32, layers=1), 0, 1.0))

    def stats(tx):
        def update(p, g, s):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        lowered = jax.jit(update, donate_argnums=(0, 2)).lower(params, params, tx.init(params))
        return bt.hlo_stats(lowered.compile())

    plain = stats(bt.optax_chain(bt.BENCH))
    assert plain["copies"] == plain["zero_copies"] == 0
    for tx in (bt.never_give_up(bt.optax_chain(bt.BENCH)),
               jaxtricks.skip_nonfinite(bt.optax_chain(bt.BENCH))):
        wrapped = stats(tx)
        assert wrapped["copies"] > 0 and wrapped["zero_copies"] == wrapped["copies"], wrapped
    beside = jax.jit(lambda p, g: (p - g, (p * p).sum()), donate_argnums=0)
    copied = bt.hlo_stats(beside.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile())
    assert copied["copies"] == 1 and copied["zero_copies"] == 0, copied
