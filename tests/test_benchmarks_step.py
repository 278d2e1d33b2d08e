"""Smoke tests of benchmarks/bench_step.py, bench_attention.py and bench_gpu_mfu.py (--quick).

They run the scripts as a user would (subprocesses, CPU) and check the rows they print; they pass
with or without PyTorch installed and never need a GPU. No timing is asserted: only that every
row is there and its numbers are well formed. XLA's backend optimizations are switched off in the
subprocesses to keep compilation short (the speed of a smoke run means nothing anyway).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import jax
import pytest

import jaxtricks.lm.step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_gpu_mfu  # noqa: E402
import bench_step  # noqa: E402

sys.path.pop(0)
HAS_TORCH = importlib.util.find_spec("torch") is not None
NUMBER = r"[\d,]+(?:\.\d+)?"


def _run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", script), *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _rows(out: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown rows whose first cell is ``first_cell``."""
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def _positive(cell: str) -> float:
    assert re.fullmatch(NUMBER, cell), cell
    value = float(cell.replace(",", ""))
    assert value > 0, cell
    return value


@pytest.mark.slow
def test_bench_step_quick_prints_every_table():
    out = _run("bench_step.py", "--quick", "--variants", "all").stdout

    variants = [f"JAX, {v}" for v in bench_step.VARIANTS]
    frameworks = ["JAX", *variants] + (["PyTorch"] if HAS_TORCH else [])
    step_rows = [r for r in _rows(out, "quick") if r[3] in frameworks]
    assert [r[3] for r in step_rows] == frameworks
    for r in step_rows:
        assert r[2] == "8x16"
        step_ms, tokens_per_s = _positive(r[4]), _positive(r[5])
        assert tokens_per_s == pytest.approx(128 / (step_ms / 1e3), rel=0.5)  # ms are rounded
        assert re.fullmatch(r"\d+%", r[8]), r[8]
        assert re.fullmatch(r"\d+ \(\+-?\d+.*\)", r[10]), r[10]  # peak RSS (+ over imports)
    for jax_row in step_rows[:-1] if HAS_TORCH else step_rows:
        assert re.fullmatch(r"\d+\.\d \+ \d+\.\d", jax_row[9]), jax_row[9]  # trace+lower + XLA
        if HAS_TORCH:
            assert re.fullmatch(r"\*\*\d+\.\d\dx\*\*", jax_row[6]), jax_row[6]
    assert "float32 matmul" in out
    (usage,) = re.findall(r"quick: each process's own CPU use over its timed blocks: .*", out)
    for name in frameworks:
        assert re.search(rf"{re.escape(name)} \d+\.\d\d cores, \d+\.\d{{3}} s of it system "
                         rf"time and {NUMBER} minor page faults per step", usage), (name, usage)
    (gains,) = re.findall(r"quick: the variant's step time / JAX's: .*", out)
    for v in bench_step.VARIANTS:
        assert re.search(rf"{v} \d+\.\d\dx", gains), (v, gains)

    phases = ["forward", "backward", "optimizer", "step"]
    breakdown = [r for r in _rows(out, "quick") if r[1] in phases]
    assert [r[1] for r in breakdown] == phases
    for r in breakdown:  # JAX ms (, PyTorch ms, JAX / PyTorch)
        assert len(r) == (5 if HAS_TORCH else 3)

    for label in ("seq 16", "seq 32", "d_model 32", "d_model 64"):
        (row,) = _rows(out, label)
        _positive(row[2])
    assert _rows(out, "seq 16")[0][3] == "1.00"  # the reference row of each scaling table
    assert _rows(out, "d_model 32")[0][3] == "1.00"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="without torch the test above covers this path")
def test_bench_step_runs_without_torch():
    out = _run("bench_step.py", "--quick", "--no-torch", "--variants", "none",
               "--sections", "step").stdout
    assert "PyTorch: not measured" in out
    assert [r[3] for r in _rows(out, "quick")] == ["JAX"]
    assert "Scaling" not in out


@pytest.mark.slow
def test_bench_step_xla_flags_reach_the_worker(tmp_path):
    """--xla-flags adds a row whose worker starts XLA with those flags (here: dump the HLO)."""
    dump = tmp_path / "hlo"
    out = _run("bench_step.py", "--quick", "--no-torch", "--variants", "none", "--sections",
               "step", f"--xla-flags=--xla_dump_to={dump}").stdout
    name = f"JAX, XLA_FLAGS=--xla_dump_to={dump}"
    assert [r[3] for r in _rows(out, "quick")] == ["JAX", name]
    assert re.search(r"quick: the variant's step time / JAX's: XLA_FLAGS=\S+ \d+\.\d\dx", out)
    # The row's worker compiled the train step with the flag (the parent's check of the flags
    # compiles only a one-line function).
    assert any(".jit_train_step." in p.name for p in dump.iterdir())


def test_bench_step_refuses_flags_xla_does_not_know():
    proc = _run("bench_step.py", "--quick", "--xla-flags=--xla_cpu_no_such_flag=1", check=False)
    assert proc.returncode == 2
    assert "XLA refused it: Unknown flag in XLA_FLAGS: --xla_cpu_no_such_flag=1" in proc.stderr
    assert "Training step" not in proc.stdout  # refused before any worker started
    twice = "--xla-flags=--xla_cpu_enable_fast_math=false"
    proc = _run("bench_step.py", "--quick", twice, twice, check=False)
    assert proc.returncode == 2 and "each row needs its own flags" in proc.stderr


@pytest.mark.slow
def test_bench_gpu_mfu_quick_runs_on_cpu():
    out = _run("bench_gpu_mfu.py", "--quick").stdout
    (row,) = _rows(out, "cpu")
    assert row[1:4] == ["xla", "XLA (dots + softmax)", "4x64"]
    _positive(row[5])  # step ms
    _positive(row[6])  # tokens/s
    assert row[8].startswith("n/a")  # no peak FLOP/s for a CPU
    assert re.fullmatch(r"\d+\.\d \+ \d+\.\d", row[9]), row[9]
    assert float(row[11]) > 0  # the loss of random tokens: about log(vocab)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="this machine has a GPU")
def test_bench_gpu_mfu_refuses_without_a_gpu():
    proc = _run("bench_gpu_mfu.py", check=False)
    assert proc.returncode != 0
    assert "measures MFU on a GPU" in proc.stderr and "--quick" in proc.stderr
    proc = _run("bench_gpu_mfu.py", "--quick", "--attention", "cudnn", check=False)
    assert proc.returncode != 0 and "needs an NVIDIA GPU" in proc.stderr


def test_attention_override_reaches_the_model():
    """The --attention cudnn switch replaces the implementation the model passes (None)."""
    seen = []
    original = jax.nn.dot_product_attention
    jax.nn.dot_product_attention = lambda *a, implementation=None, **k: seen.append(implementation)
    try:
        with bench_gpu_mfu.attention_implementation("cudnn"):
            jax.nn.dot_product_attention(None, None, None, implementation=None)
        with bench_gpu_mfu.attention_implementation("xla"):
            jax.nn.dot_product_attention(None, None, None, implementation=None)
    finally:
        jax.nn.dot_product_attention = original
    assert seen == ["cudnn", None]
    assert bench_gpu_mfu.compiled_attention('custom_call_target="__cudnn$fmhaSoftmax"') \
        .startswith("cuDNN")
    assert bench_gpu_mfu.compiled_attention("dot(...)").startswith("XLA")


@pytest.mark.slow
def test_bench_attention_quick_prints_every_case():
    out = _run("bench_attention.py", "--quick", "--no-torch").stdout
    for label, batch_seq in (("seq 32", "8x32"), ("seq 64", "4x64")):
        (row,) = _rows(out, label)
        assert row[1] == batch_seq
        cells = row[2:]
        assert len(cells) == 4  # 1, 2, 4 and 8 query blocks
        for cell in cells:
            ms, ratio = re.fullmatch(rf"({NUMBER}) \(({NUMBER})\)", cell).groups()
            _positive(ms)
            _positive(ratio)
        assert cells[0].endswith("(1.00)")  # the reference: one call


def test_blocks_keep_the_next_step_queued():
    """A timed block holds at least two steps, so the next step is dispatched while one runs (as
    in the trainer, where that is what made a 2 GiB heap-trim threshold cost 1.39x)."""
    assert bench_step._steps_per_block(10.0, 2.0) == 2  # a step longer than the block
    assert bench_step._steps_per_block(0.1, 2.0) == 20


def test_blocks_read_each_steps_metrics_once_the_next_is_dispatched(monkeypatch):
    """As the trainer does. Without the reads, steps queue further ahead than in the trainer: the
    2-CPU-device step of the 10.8M model then page-faulted its memory in again (BENCHMARKS.md)."""
    events = []

    class Steps:
        def train(self, state, batch, rng):
            events.append(("dispatch", state + 1))
            return state + 1, {"loss": state + 1}

    monkeypatch.setattr(jaxtricks.lm.step, "unreplicate_metrics",
                        lambda metrics, steps: events.append(("read", metrics["loss"])))
    bench = object.__new__(bench_step.JaxBench)
    bench.steps, bench.state, bench.batch, bench.rng = Steps(), 0, None, None
    seconds, _ = bench.run(3)
    assert seconds > 0 and bench.state == 3
    assert events == [("dispatch", 1), ("dispatch", 2), ("read", 1), ("dispatch", 3), ("read", 2)]


def test_bench_step_tried_quick_measures_each_rewrite_and_option():
    # Two rewrites (one of the model, one XLA option), the dots, the executor section and
    # the HLO comparison.
    out = _run("bench_step_tried.py", "--quick", "--rewrites",
               "GELU backward by hand,memory-optimized schedule").stdout
    kept, gelu, memory = _rows(out, "quick")
    assert kept[1] == "kept step"
    # The rewrite of the model computes the same function (its first step's loss is the kept
    # step's) with another compiled program; the XLA option changes the program, not the math.
    for row, name in ((gelu, "GELU backward by hand"), (memory, "memory-optimized schedule")):
        assert row[1] == name
        _positive(row[2])
        assert re.fullmatch(rf"\*\*{NUMBER}\*\*", row[3]) and re.fullmatch(
            rf"{NUMBER}-{NUMBER}", row[4]), row
        assert row[6] == kept[6], (row, kept)
        assert row[7] == "changed", row
    dots = _rows(out, "`X W 128x32 . 32x96`")
    assert len(dots) == 1 and len(dots[0]) == (4 if HAS_TORCH else 3), out
    for cell in dots[0][1:]:
        _positive(cell)
    # The executor section: one batched dot and ten independent ones in one program, each
    # program's time over n times the single dot's (1.00 for the single dot by definition).
    one, ten = _rows(out, "XLA: 1 batched dot"), _rows(out, "XLA: 10 independent batched dots")
    assert len(one) == len(ten) == 1, out
    assert one[0][2] == "1.00", one
    for cell in (one[0][1], ten[0][1], ten[0][2]):
        _positive(cell)
    for row in (one[0], ten[0]):
        assert re.fullmatch(r"\d+\.\d\d", row[3]), row  # cores busy (0.00 when too quick)
    assert len(_rows(out, "PyTorch: 1 batched dot")) == (1 if HAS_TORCH else 0), out
    assert re.search(r"^\| `xla_cpu_enable_fast_math=True` \| unchanged, byte for byte \|$", out,
                     re.M), out
    assert re.search(r"^\| `xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE` \| "
                     r"\d+ lines differ \|$", out, re.M), out


def test_bench_step_tried_refuses_unknown_rewrites():
    proc = _run("bench_step_tried.py", "--quick", "--rewrites", "faster please", check=False)
    assert proc.returncode == 2
    assert ("--rewrites: unknown ['faster please']; choose from kept step again, einsum "
            "attention") in proc.stderr


def test_others_share_counts_own_cpu_time_and_page_faults():
    """The step table's CPU-use note rests on these counts: the CPU time of a busy loop and the
    minor page faults of touching memory the process has not touched before."""
    import mmap
    import time

    size = 64 * 2**20
    with bench_step.OthersShare() as block:
        buf = mmap.mmap(-1, size)
        buf.madvise(mmap.MADV_NOHUGEPAGE)  # one fault per 4 KiB page, not per 2 MiB
        for offset in range(0, size, mmap.PAGESIZE):
            buf[offset] = 1
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
    buf.close()
    assert block.minor_faults >= size // mmap.PAGESIZE
    assert block.own_cpu_s >= 0.25
    assert 0 <= block.own_sys_s <= block.own_cpu_s


def test_usage_sums_the_timed_blocks_and_resets():
    bench_step.usage()  # whatever earlier tests left
    for cpu_s, faults in ((1.5, 10), (0.5, 30)):
        block = bench_step.OthersShare()
        block.own_cpu_s, block.own_sys_s, block.minor_faults = cpu_s, cpu_s / 10, faults
        bench_step._count_usage(block, seconds=1.0, steps=4)
    assert bench_step.usage() == pytest.approx(
        {"wall_s": 2.0, "cpu_s": 2.0, "sys_s": 0.2, "minor_faults": 40, "steps": 8})
    assert set(bench_step.usage().values()) == {0}
