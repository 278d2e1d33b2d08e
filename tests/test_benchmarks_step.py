"""Tests of benchmarks/bench_step.py and bench_gpu_mfu.py: their helpers in-process, and --quick
smoke runs of the scripts as a user would run them (subprocesses, CPU, marked slow).

The smoke runs pass with or without PyTorch installed and never need a GPU. No timing is
asserted: only that every row is there, its numbers are consistent, and rows that run the same
model on the same batch report the same first loss. XLA's backend optimizations are switched off
in the subprocesses to keep compilation short (the speed of a smoke run means nothing anyway).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import types

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_gpu_mfu  # noqa: E402
import bench_step  # noqa: E402
import common  # noqa: E402

sys.path.pop(0)
HAS_TORCH = importlib.util.find_spec("torch") is not None
NUMBER = r"[\d,]+(?:\.\d+)?"
OLD_COMMIT = "cf55d55"  # the last commit with the trainer in jaxtricks/ (before jaxtricks/lm/)


def _run(python, *args: str, devices: int = 1) -> str:
    """``python *args`` in a child Python (conftest's ``python`` fixture) with ``devices`` CPU
    devices; its standard output."""
    flags = ("--xla_backend_optimization_level=0 "
             f"--xla_force_host_platform_device_count={devices}")
    proc = python.run(*args, env={"XLA_FLAGS": flags}, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _table(out: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose first column is ``first_header``, as dicts."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    headers = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(headers), line
        rows.append(dict(zip(headers, cells, strict=True)))
    return rows


def _positive(cell: str) -> float:
    assert re.fullmatch(NUMBER, cell), cell
    value = float(cell.replace(",", ""))
    assert value > 0, cell
    return value


# --------------------------------------------------------------------------- smoke runs


@pytest.mark.slow
def test_bench_step_quick_prints_every_row_and_table(python):
    variants = ["cpu_devices=2", "train.microbatches=2 train.unroll_microbatches=true",
                "JAXTRICKS_HOST_MALLOC=default", "cpu_paths=false"]
    args = [arg for v in variants for arg in ("--variant", v)]
    # --baseline: this checkout again, run through the path given (an older commit: next test).
    out = _run(python, "benchmarks/bench_step.py", "--quick", *args, "--baseline", REPO)

    rows = _table(out, "model")
    baseline = rows[len(variants) + 1]["framework"]  # with the checkout's commit, from git
    assert re.fullmatch(rf"JAX at {re.escape(REPO)}( \([0-9a-f]+\))?", baseline), baseline
    names = ["JAX", *[f"JAX, {v}" for v in variants], baseline] + (["PyTorch"] * HAS_TORCH)
    assert [r["framework"] for r in rows] == names, out
    for r in rows:
        assert r["batch x seq"] == "8x16"
        step_ms, tokens_per_s = _positive(r["step ms"]), _positive(r["tokens/s"])
        assert tokens_per_s == pytest.approx(128 / (step_ms / 1e3), rel=0.5)  # ms are rounded
        assert re.fullmatch(r"\d+%", r["of matmul peak"]), r
        assert re.fullmatch(r"\d+ \(\+-?\d+.*\)", r["peak RSS MB (+ over imports)"]), r
        ratio = r["JAX / PyTorch tokens/s"]
        if r["framework"] == "PyTorch" or not HAS_TORCH:
            assert ratio == "", r
        else:
            assert re.fullmatch(r"\*\*\d+\.\d\dx\*\*", ratio), r
            compile_s = r["compile s: trace+lower + XLA (PyTorch: first step)"]
            assert re.fullmatch(r"\d+\.\d \+ \d+\.\d", compile_s), r
    # Every JAX row trains the same model on the same batch: one device or two, one batch or two
    # microbatches, either malloc, the CPU paths or the plain layers, this checkout through
    # --baseline: the same first loss.
    losses = [float(r["first step's loss"]) for r in rows if r["framework"] != "PyTorch"]
    assert losses == pytest.approx([losses[0]] * len(losses), abs=2e-4), losses

    (ratios,) = re.findall(r"^- quick: the row's step time / JAX's: (.*)$", out, re.M)
    others = [n for n in names if n not in ("JAX", "PyTorch")]
    assert re.fullmatch(", ".join(rf"{re.escape(n)} \d+\.\d\dx" for n in others), ratios), ratios
    (usage,) = re.findall(r"^- quick: each process's own CPU use over its timed blocks: .*", out,
                          re.M)
    for name in names:
        assert re.search(rf"{re.escape(name)} \d+\.\d\d cores, \d+\.\d{{3}} s of it system "
                         rf"time and {NUMBER} minor page faults per step", usage), (name, usage)
    assert ("PyTorch: not measured" in out) != HAS_TORCH

    for first, labels in (("sequence length", ["seq 16", "seq 32"]),
                          ("width", ["d_model 32", "d_model 64"])):
        scaling = _table(out, first)
        assert [r[first] for r in scaling] == labels
        assert scaling[0]["JAX time vs first row"] == "1.00"
        batch_seq = [[int(n) for n in r["batch x seq"].split("x")] for r in scaling]
        assert [b * s for b, s in batch_seq] == [128, 128]  # tokens per batch held fixed
        assert ("PyTorch step ms" in scaling[0]) == HAS_TORCH


@pytest.mark.slow
def test_bench_step_baseline_runs_an_older_checkout(python, tmp_path):
    """--baseline with the trainer's old layout (jaxtricks.model, jaxtricks.step, ...)."""
    archive = subprocess.run(["git", "-C", REPO, "archive", OLD_COMMIT, "jaxtricks", "configs"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT} is not in this checkout's history")
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    out = _run(python, "benchmarks/bench_step.py", "--quick", "--no-torch", "--sections", "step",
               "--baseline", str(tmp_path))
    jax_row, old_row = _table(out, "model")
    assert jax_row["framework"] == "JAX" and old_row["framework"] == f"JAX at {tmp_path}"
    _positive(old_row["tokens/s"])
    # The reorganisation kept the model: the same parameters and the same first loss.
    assert old_row["params"] == jax_row["params"]
    assert float(old_row["first step's loss"]) == pytest.approx(
        float(jax_row["first step's loss"]), abs=2e-4)
    assert re.search(rf"^- quick: the row's step time / JAX's: JAX at {re.escape(str(tmp_path))} "
                     r"\d+\.\d\dx$", out, re.M), out


@pytest.mark.slow
def test_bench_gpu_mfu_quick_runs_on_cpu_without_the_data_libraries(python):
    """Synthetic tokens: the script runs with tensorflow-datasets, grain and tensorboardX absent,
    on one device and over a 1 x 2 x 1 mesh (FSDP) of two."""
    code = ("import runpy, sys\n"
            "blocked = ('tensorflow_datasets', 'grain', 'tensorboardX')\n"
            "for name in blocked:\n"
            "    sys.modules[name] = None  # import fails\n"
            "sys.argv = ['bench_gpu_mfu.py', '--quick', *sys.argv[1:]]\n"
            "runpy.run_path('benchmarks/bench_gpu_mfu.py', run_name='__main__')\n"
            "print('still blocked:', all(sys.modules[n] is None for n in blocked))\n")
    rows = {}
    for devices, mesh in ((1, []), (2, ["--mesh", "1,2,1"])):
        out = _run(python, "-c", code, *mesh, devices=devices)
        assert "still blocked: True" in out
        assert "attention: the model took 'cpu_blocks'; compiled: XLA or CPU blocks" in out
        (rows[devices],) = _table(out, "device")
    assert [[r["device"], r["devices"], r["mesh data x fsdp x tensor"], r["attention"],
             r["batch x seq"]] for r in rows.values()] == [
        ["cpu", "1", "1 x 1 x 1", "cpu_blocks", "4x64"], ["cpu", "2", "1 x 2 x 1", "cpu_blocks",
                                                           "8x64"]]
    for row in rows.values():
        step_ms, tokens_per_s = _positive(row["step ms"]), _positive(row["tokens/s"])
        batch, seq = (int(n) for n in row["batch x seq"].split("x"))
        assert tokens_per_s == pytest.approx(batch * seq / (step_ms / 1e3), rel=0.05)
        assert row["MFU"].startswith("n/a")  # no peak FLOP/s for a CPU
        assert re.fullmatch(r"\d+\.\d \+ \d+\.\d", row["compile s (trace+lower + XLA)"]), row
        assert float(row["loss"]) == pytest.approx(6.24, abs=0.3)  # random tokens: about log(512)


# --------------------------------------------------------------------------- in-process


def _exit_message(capsys, main, *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code not in (0, None)
    return str(exited.value.code) + capsys.readouterr().err


def test_bench_step_refuses_bad_rows_before_starting_a_worker(capsys, tmp_path):
    message = _exit_message(capsys, bench_step.main, "--quick", "--variant", "model.no_such=1")
    assert "--variant 'model.no_such=1'" in message and "model.no_such" in message
    message = _exit_message(capsys, bench_step.main, "--quick", "--variant", "cpu_devices")
    assert "'cpu_devices' is not KEY=VALUE" in message
    message = _exit_message(capsys, bench_step.main, "--quick", "--variant", "cpu_devices=2",
                            "--variant", "cpu_devices=2")
    assert "given twice" in message
    message = _exit_message(capsys, bench_step.main, "--quick", "--baseline", str(tmp_path))
    assert "no jaxtricks package there" in message
    message = _exit_message(capsys, bench_step.main, "--models", "default,huge")
    assert "unknown model 'huge'" in message
    assert "Training step" not in capsys.readouterr().out


def test_parse_variant_splits_environment_from_config():
    assert bench_step.parse_variant(
        "cpu_devices=2 XLA_FLAGS='--a=1 --b=2' train.microbatches=2 cpu_paths=False") == (
        {"XLA_FLAGS": "--a=1 --b=2"}, ["cpu_devices=2", "train.microbatches=2"],
        {"cpu_paths": False})
    assert bench_step.parse_variant("cpu_paths=true")[2] == {"cpu_paths": True}
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        bench_step.parse_variant("cpu_devices")
    with pytest.raises(ValueError, match="cpu_paths takes true or false, not 'maybe'"):
        bench_step.parse_variant("cpu_paths=maybe")


def test_resolve_gives_the_tiny_model_of_the_table():
    spec = bench_step.resolve(bench_step.MODELS["tiny"])
    assert spec["overrides"] == bench_step.MODELS["tiny"]
    assert (spec["batch"], spec["seq"]) == (32, 128)
    assert {k: spec["model"][k] for k in ("num_layers", "d_model", "num_heads", "d_ff")} == {
        "num_layers": 4, "d_model": 192, "num_heads": 4, "d_ff": 768}
    assert spec["optimizer"]["name"] == "adamw" and spec["cpu_devices"] is None


def _package(root, name: str, modules: dict[str, str]) -> None:
    for module, source in {"__init__": "", **modules}.items():
        path = root / name / f"{module.replace('.', '/')}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(source)


@pytest.fixture
def clean_import(monkeypatch):
    """sys.path and sys.modules as they were after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def _names(*names: str) -> str:
    return "".join(f"def {name}(): pass\n" for name in names)


@pytest.mark.usefixtures("clean_import")
def test_trainer_finds_the_names_in_the_old_layout_and_the_new(tmp_path):
    step_names = ("TrainState", "make_steps", "unreplicate_metrics")
    model_names = ("Transformer", "count_params", "flops_per_token")
    _package(tmp_path / "old", "oldtricks", {
        "config": _names("load"), "optimizer": _names("optimizer_from_config"),
        "model": _names(*model_names),
        "step": _names(*step_names, "tune_host_malloc", "use_cpu_devices")})
    api = common.trainer(str(tmp_path / "old"), package="oldtricks")
    assert os.path.realpath(api.origin) == os.path.realpath(tmp_path / "old")
    assert api.optimizer_from_config.__module__ == "oldtricks.optimizer"
    assert api.tune_host_malloc.__module__ == "oldtricks.step"
    assert set(vars(api)) == {"origin", *common.TRAINER_NAMES}

    _package(tmp_path / "new", "newtricks", {
        "lm.config": _names("load", "optimizer_from_config"), "lm.model": _names(*model_names),
        "lm.step": _names(*step_names), "lm.cpu": _names("tune_host_malloc", "use_cpu_devices")})
    api = common.trainer(str(tmp_path / "new"), package="newtricks")
    assert api.optimizer_from_config.__module__ == "newtricks.lm.config"
    assert api.use_cpu_devices.__module__ == "newtricks.lm.cpu"
    assert api.make_steps.__module__ == "newtricks.lm.step"


@pytest.mark.usefixtures("clean_import")
def test_trainer_says_what_is_missing(tmp_path):
    _package(tmp_path, "brokentricks", {"config": "import no_such_dependency\n"})
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency"):  # not skipped silently
        common.trainer(str(tmp_path), package="brokentricks")
    _package(tmp_path, "emptytricks", {})
    with pytest.raises(ImportError, match="has load"):
        common.trainer(str(tmp_path), package="emptytricks")
    import jaxtricks  # noqa: F401

    with pytest.raises(RuntimeError, match="already imported"):  # the checkout's would not be
        common.trainer(str(tmp_path))


def test_blocks_keep_the_next_step_queued():
    """A timed block holds at least two steps, so the next step is dispatched while one runs (as
    in the trainer, where that is what made a 2 GiB heap-trim threshold cost 1.39x)."""
    assert bench_step._steps_per_block(10.0, 2.0) == 2  # a step longer than the block
    assert bench_step._steps_per_block(0.1, 2.0) == 20


def test_blocks_read_each_steps_metrics_once_the_next_is_dispatched():
    """As the trainer does. Without the reads, steps queue further ahead than in the trainer."""
    events = []

    class Steps:
        def train(self, state, batch, rng):
            events.append(("dispatch", state + 1))
            return state + 1, {"loss": state + 1}

    bench = object.__new__(bench_step.JaxBench)
    bench.api = types.SimpleNamespace(
        unreplicate_metrics=lambda metrics, steps: events.append(("read", metrics["loss"])))
    bench.built = types.SimpleNamespace(steps=Steps(), state=0, batch=None, rng=None)
    seconds, _ = bench.run(3)
    assert seconds > 0 and bench.built.state == 3
    assert events == [("dispatch", 1), ("dispatch", 2), ("read", 1), ("dispatch", 3), ("read", 2)]


def test_usage_sums_the_timed_blocks_and_resets():
    class Busy(bench_step._StepBench):
        def _steps(self, n):
            end = time.process_time() + 0.05 * n
            while time.process_time() < end:
                pass

    bench = Busy()
    assert bench.usage()["steps"] == 0  # nothing timed yet
    bench.run(2)
    bench.run(3)
    used = bench.usage()
    assert used["steps"] == 5 and used["wall_s"] >= 0.2
    assert 0.2 <= used["cpu_s"] and 0 <= used["sys_s"] <= used["cpu_s"]
    assert set(bench.usage().values()) == {0}


def test_others_share_counts_own_cpu_time_and_page_faults():
    """The step table's CPU-use note rests on these counts: the CPU time of a busy loop and the
    minor page faults of touching memory the process has not touched before."""
    import mmap

    size = 64 * 2**20
    with common.OthersShare() as block:
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


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="this machine has a GPU")
def test_bench_gpu_mfu_refuses_without_a_gpu(capsys):
    message = _exit_message(capsys, bench_gpu_mfu.main)
    assert "measures MFU on a GPU" in message and "--quick" in message
    message = _exit_message(capsys, bench_gpu_mfu.main, "--quick", "--mesh", "1,2")
    assert "give three sizes DATA,FSDP,TENSOR" in message


def test_compiled_attention_finds_cudnn_in_the_hlo():
    assert bench_gpu_mfu.compiled_attention('custom_call_target="__cudnn$fmhaSoftmax"') \
        .startswith("cuDNN")
    assert bench_gpu_mfu.compiled_attention("dot(...)").startswith("XLA")
