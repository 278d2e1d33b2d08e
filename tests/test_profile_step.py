"""Tests of benchmarks/profile_step.py: its reading of ``perf script`` output (no perf needed)
and the script run as a user would (subprocesses, CPU), skipped where perf cannot record."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import profile_step  # noqa: E402

sys.path.pop(0)
LIB = "/site-packages/jaxlib/libjax_common.so"
ANON = "/tmp/perf-100.map"  # perf's name for anonymous executable memory of process 100
# `perf script -F comm,tid,ip,sym,dso --show-mmap-events` of a JAX worker whose pid is 100
# (main thread 100, XLAPjRtCpuClient threads 101-102 named "python", tf_XLAEigen 103-104).
SCRIPT = f"""\
python 0 PERF_RECORD_MMAP2 100/100: [0x7ff1c1400000(0x600000) @ 0 00:00 0 0]: rwxp //anon
python 0 PERF_RECORD_MMAP2 100/100: [0x7ff1c1600000(0x1000) @ 0 00:00 0 0]: r-xp //anon
python 0 PERF_RECORD_MMAP2 100/100: [0x7ff1e0000000(0x1000) @ 0x1000 fe:00 267 0]: r-xp {LIB}
     tf_XLAEigen   103      7ff1e0d0d9e3 ynn::dot_fp32_6x16x1_1x8x1_fma3 ({LIB})
     tf_XLAEigen   104      7ff1e0d0d9f0 ynn::dot_fp32_6x16x1_1x8x1_fma3 ({LIB})
     tf_XLAEigen   104      7ff1e0d10000 ynn::sum_kn_fp32_avx ({LIB})
     tf_XLAEigen   103      7ff1db000000 Eigen::internal::gemm_pack_colmajor_block<float> ({LIB})
     tf_XLAEigen   103      7ff1c1580000 [unknown] ({ANON})
     tf_XLAEigen   104      7ff1c1581000 [unknown] ({ANON})
          python   101      7ff1c1582fff [unknown] ({ANON})
          python   102      7ff1c1583000 [unknown] ({ANON})
          python   101      7ff1c1600000 [unknown] ({ANON})
          python   101      7ff1e0c3c88f xla::cpu::(anonymous namespace)::Run (x) ({LIB})
     tf_XLAEigen   104  ffffffff813a2313 finish_task_switch.isra.0 ([kernel.kallsyms])
          python   100      7ff1e1ea9605 operator new (/usr/lib/x86_64-linux-gnu/libstdc++.so.6)
          python   100      7ff1e2cff031 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)
some warning perf printed
"""


def test_parse_script_reads_every_sample_and_mapping():
    samples, mappings = profile_step.parse_script(SCRIPT)
    assert mappings == [profile_step.Mapping(0x7FF1C1400000, 0x600000, "rwxp", "//anon"),
                        profile_step.Mapping(0x7FF1C1600000, 0x1000, "r-xp", "//anon"),
                        profile_step.Mapping(0x7FF1E0000000, 0x1000, "r-xp", LIB)]
    assert len(samples) == 13  # the warning line is skipped
    assert samples[0] == profile_step.Sample(
        "tf_XLAEigen", 103, 0x7FF1E0D0D9E3, "ynn::dot_fp32_6x16x1_1x8x1_fma3", LIB)
    assert samples[9].sym == "xla::cpu::(anonymous namespace)::Run (x)"  # parentheses kept
    assert samples[9].dso == LIB
    assert samples[10].ip == 0xFFFFFFFF813A2313 and samples[10].dso == "[kernel.kallsyms]"
    assert samples[11][:2] == ("python", 100) and samples[11].sym == "operator new"
    assert [s.tid for s in samples if profile_step.is_generated(s)] == [103, 104, 101, 102, 101]


def test_hottest_range_is_the_most_sampled_window_under_16_kb():
    assert profile_step.hottest_range([]) == (0, 0, 0)
    assert profile_step.hottest_range([5, 0x10000, 0x10010, 0x13000, 0x30000]) == (
        0x10000, 0x13000, 3)
    # 16 KB apart is one byte too far for one range.
    assert profile_step.hottest_range([0, 0x4000])[2] == 1
    assert profile_step.hottest_range([0, 0x3FFF]) == (0, 0x3FFF, 2)


def test_categorize_step_threads():
    samples, _ = profile_step.parse_script(SCRIPT)
    step = [s for s in samples if profile_step.is_step_thread(s, "jax", pid=100)]
    assert len(step) == 11  # all but the main thread's
    counts, hot = profile_step.categorize(step)
    # The four generated samples within 0x3000 bytes form the hottest range; 0x...1600000 not.
    assert hot == (0x7FF1C1580000, 0x7FF1C1583000, 4)
    assert counts == {
        "matmul: YNNPACK dots": 2,
        "matmul: GEMM code (BLAS, oneDNN, Eigen; kernels and packing)": 1,
        "YNNPACK's other kernels (elementwise, reductions)": 1,
        profile_step.HOTTEST: 4,
        profile_step.GENERATED_REST: 1,
        profile_step.OTHER: 1,
        "OS kernel": 1,
    }
    torch_like = [profile_step.Sample("python", 7, 1, sym, dso) for sym, dso in [
        ("mkl_blas_avx2_sgemm_kernel_0", "/torch/lib/libtorch_cpu.so"),
        ("mkl_blas_avx2_sgemm_scopy_down16_bdz", "/torch/lib/libtorch_cpu.so"),
        ("Sleef_tanhf8_u10", "/torch/lib/libtorch_cpu.so"),
        ("[unknown]", "/usr/lib/libgomp.so.1"),
    ]]
    counts, hot = profile_step.categorize(torch_like)
    assert hot == (0, 0, 0)
    assert counts == {"matmul: GEMM code (BLAS, oneDNN, Eigen; kernels and packing)": 2,
                      "ATen's other kernels (elementwise, reductions, optimizer)": 1,
                      "OpenMP runtime (libgomp)": 1}


def _rows(table_text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in table_text.splitlines() if line.startswith("|")][2:]


def _percent(cell: str) -> float:
    assert re.fullmatch(r"\d+\.\d%", cell), cell
    return float(cell[:-1])


def _tables(section: str) -> list[list[list[str]]]:
    return [_rows(block) for block in section.split("\n\n") if block.startswith("|")]


def test_report_tables_add_up():
    samples, mappings = profile_step.parse_script(SCRIPT)
    threads, categories, symbols = _tables(
        profile_step.report(samples, mappings, "jax", 100, top=3))
    assert threads == [["tf_XLAEigen", "2", "yes", "7", "53.8%"],
                       ["python", "2", "yes", "4", "30.8%"],
                       ["python (main thread)", "1", "no", "2", "15.4%"]]
    for column in (2, 3, 4):  # all step threads, tf_XLAEigen, python
        assert sum(_percent(r[column]) for r in categories) == pytest.approx(100, abs=0.5)
    (hot,) = [r for r in categories if r[0].startswith(profile_step.HOTTEST)]
    assert hot[0].endswith("(0x7ff1c1580000, 12.0 KB, in a 6,144.0 KB rwxp mapping)")
    assert hot[1:] == ["4", "36.4%", "28.6%", "50.0%"]
    assert len(symbols) == 3
    assert symbols[0] == ["[run-time generated code, its hottest range]", "anonymous memory",
                          "36.4%"]
    # PyTorch: every thread executes the step.
    threads, *_ = _tables(profile_step.report(samples, mappings, "torch", 100, top=3))
    assert all(r[2] == "yes" for r in threads)


def _run(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "profile_step.py"), *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )


def test_unknown_names_exit_2():
    proc = _run("--models", "tiny,huge")
    assert proc.returncode == 2
    assert "--models: unknown ['huge']; choose from default, tiny, small" in proc.stderr
    proc = _run("--frameworks", "jax,tf")
    assert proc.returncode == 2 and "choose from jax, torch" in proc.stderr


def test_says_what_is_missing_without_perf(tmp_path):
    proc = _run("--quick", path=str(tmp_path))  # an empty PATH: no perf
    assert proc.returncode == 1
    assert "cannot profile: `perf`" in proc.stderr and "is not on PATH" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_says_why_perf_record_did_not_start(tmp_path):
    fake = tmp_path / "perf"  # answers --version, refuses to record, as with a high paranoid
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "perf version 0" && exit 0\n'
                    'echo "Error: Access to performance monitoring is limited." >&2\nexit 255\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    proc = _run("--quick", "--frameworks", "jax", path=f"{tmp_path}:{os.environ['PATH']}")
    assert proc.returncode == 1, proc.stderr
    assert "did not start sampling: Error: Access to performance monitoring" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_quick_run_prints_tables_that_add_up(tmp_path):
    if shutil.which("perf") is None:
        pytest.skip("perf is not on PATH")
    probe = subprocess.run(["perf", "record", "-o", str(tmp_path / "probe.data"), "--", "true"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"perf cannot record here: {probe.stderr.strip()}")
    proc = _run("--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sections = proc.stdout.split("\n### ")[1:]
    names = [s.split(":", 1)[0] for s in sections]
    assert names[0] == "quick (8x16), JAX"
    assert names[1:] in ([], ["quick (8x16), PyTorch"])  # without torch: not profiled
    for section in sections:
        if "not installed" in section.splitlines()[0]:
            continue
        threads, categories, symbols = _tables(section)
        assert sum(_percent(r[4]) for r in threads) == pytest.approx(100, abs=0.5)
        assert sum(_percent(r[2]) for r in categories) == pytest.approx(100, abs=0.5)
        assert 1 <= len(symbols) <= 12
        assert re.search(r"^matmul: \d+\.\d% of the step threads' samples", section, re.M)
    jax_threads = {r[0]: r for r in _tables(sections[0])[0]}
    # XLA's intra-op pool sampled while it ran the steps, and counted as a step thread.
    assert jax_threads["tf_XLAEigen"][2] == "yes" and int(jax_threads["tf_XLAEigen"][3]) >= 1
    if "python (main thread)" in jax_threads:  # it only dispatches the steps
        assert jax_threads["python (main thread)"][2] == "no"
