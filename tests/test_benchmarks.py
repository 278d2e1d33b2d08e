"""Smoke test of benchmarks/bench_transforms.py in its --quick mode.

It runs the script as a user would (a subprocess on the CPU) and checks the rows it prints: the
equivalence check of the chains, the table of the GPT-2-shaped tree and the scaling table. It
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


def _run_quick() -> str:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
    }
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "bench_transforms.py"), "--quick"],
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
    # The chains compute the same numbers (the check fails loudly otherwise).
    assert "- equivalence OK" in out, out
    assert re.search(rf"^- jaxtricks vs optax: {NUMBER}", out, re.M)
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
