"""Where a training step spends its CPU time: ``perf record`` of bench_step.py's JAX and PyTorch.

The profile figures of "Where the time goes" in BENCHMARKS.md. Each model and framework gets a
worker process (``JaxBench`` / ``TorchBench`` of bench_step.py: jaxtricks' jitted train step,
its eager PyTorch twin) that compiles the step and runs as many warm-up steps as it will
profile (the heap's first growth page-faults); then ``perf record -F
<frequency> -p <worker>`` samples it over ``--steps`` steps (no call graphs: a sample counts for
the function it was in). Printed: samples by thread; for the threads that execute the step,
samples by category (``CATEGORIES``, matmul kernels first) and the top symbols.

The threads that execute the step:
  JAX      all but the main thread, which only dispatches steps from Python. The step runs on
           the two pools of XLA's CPU client, one thread per core each: the intra-op pool
           ``XLAEigen`` (99% of the tiny model's samples) and ``XLAPjRtCpuClient`` (thunks and
           kernels too; a larger share only in --quick's toy step). TSL names a thread "tf_" +
           its pool's name: ``tf_XLAEigen``; "tf_XLAPjRtCpuClient" is longer than Linux's 15
           characters, so those threads keep the process's name, ``python`` (their ``perf
           record -g`` stacks start in TSL's Eigen ``WorkerLoop``). The compile threads
           (``llvm-worker-*``) and ``tf_foreach`` are idle.
  PyTorch  all: eager ops run on the main thread and on the OpenMP pool.

Run-time generated code: perf charges a sample in anonymous executable memory to no symbol
(``[unknown]``) and a pseudo-DSO (``/tmp/perf-<pid>.map``, where a JIT may list its symbols;
``//anon`` or ``[anon:...]`` elsewhere). A JAX step has two kinds of code there: XLA's fusions
(LLVM-compiled with the step; many functions, each sampled a little) and the GEMM kernels that
oneDNN generates at run time behind Eigen's dots (one small kernel sampled over and over). No
name tells them apart, so such code is a category of its own, split into its most-sampled
contiguous address range of at most 16 KB (the GEMM kernel, where one kernel dominates) and
the rest. The range is printed with the mapping it
lies in: XLA's fusions lie in page-sized r-x mappings, one per compiled object; the tiny model's
hottest range lay in a 6 MB rwx one, most likely oneDNN's kernels (its code generator, Xbyak,
leaves code buffers writable and executable by default).

Usage:
  python benchmarks/profile_step.py                # tiny and small, JAX and PyTorch, 10 steps
  python benchmarks/profile_step.py --quick        # a tiny smoke run (seconds), as in the tests
Needs ``perf`` and the right to attach it to one's own processes (root, or
``kernel.perf_event_paranoid`` <= 2).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402
from common import Worker, machine_line, markdown_table  # noqa: E402

FRAMEWORKS = {"jax": ("JAX", bench_step.JaxBench), "torch": ("PyTorch", bench_step.TorchBench)}
HOT_RANGE = 16 * 1024  # bytes: a generated function's "size" as the hottest range measures it
GENERATED = "run-time generated code"
HOTTEST = f"{GENERATED}: its hottest <= 16 KB range"
GENERATED_REST = f"{GENERATED}: the rest"
# (category, symbol regex, DSO regex): a sample is in the first whose either regex matches.
CATEGORIES = (
    ("matmul: YNNPACK dots", r"^ynn::dot_", None),
    ("matmul: GEMM code (BLAS, oneDNN, Eigen; kernels and packing)",
     r"gemm|gebp|mkl_blas|dnnl|general_matrix_matrix|TensorContraction", None),
    ("YNNPACK's other kernels (elementwise, reductions)", r"^ynn::", None),
    ("ATen's other kernels (elementwise, reductions, optimizer)", None, r"libtorch_cpu"),
    ("OpenMP runtime (libgomp)", None, r"libgomp|libiomp"),
    ("OS kernel", None, r"^\[kernel"),
)
OTHER = "the rest (XLA runtime, Python, libc, ...)"
ANONYMOUS_DSO = re.compile(r"^(/tmp/perf-\d+\.map|//anon|\[anon|\[JIT|/?memfd:)")
# One line of `perf script -F comm,tid,ip,sym,dso`: "comm tid ip symbol (dso)"; comm and the
# symbol may hold spaces, the symbol parentheses.
LINE = re.compile(r"^\s*(?P<comm>.+?)\s+(?P<tid>\d+)\s+(?P<ip>[0-9a-f]+)\s+(?P<sym>.*?)\s*"
                  r"\((?P<dso>[^()]*)\)\s*$")
# A mapping as `perf script --show-mmap-events` shows it: "... PERF_RECORD_MMAP2 pid/tid:
# [start(size) @ offset ...]: permissions name".
MMAP = re.compile(r"PERF_RECORD_MMAP2? .*\[0x(?P<start>[0-9a-f]+)\(0x(?P<size>[0-9a-f]+)\) @ "
                  r"[^\]]*\]: (?P<prot>\S+) (?P<name>.*?)\s*$")


class Sample(NamedTuple):
    comm: str  # the thread's name
    tid: int
    ip: int  # the instruction pointer
    sym: str  # "[unknown]" where perf found no symbol
    dso: str


class Mapping(NamedTuple):
    start: int
    size: int  # bytes
    prot: str  # e.g. "r-xp"
    name: str  # the file, or e.g. "//anon"


class ProfileError(RuntimeError):
    """perf could not record the worker."""


def parse_script(text: str) -> tuple[list[Sample], list[Mapping]]:
    """The samples and the mappings in ``perf script -F comm,tid,ip,sym,dso --show-mmap-events``
    output (other lines are skipped)."""
    samples, mappings = [], []
    for line in text.splitlines():
        if m := MMAP.search(line):
            mappings.append(Mapping(int(m["start"], 16), int(m["size"], 16), m["prot"], m["name"]))
        elif m := LINE.match(line):
            samples.append(Sample(m["comm"], int(m["tid"]), int(m["ip"], 16), m["sym"] or
                                  "[unknown]", m["dso"]))
    return samples, mappings


def is_generated(sample: Sample) -> bool:
    return ANONYMOUS_DSO.match(sample.dso) is not None


def hottest_range(ips: list[int], width: int = HOT_RANGE) -> tuple[int, int, int]:
    """(lowest, highest, count) of the sampled addresses in the most-sampled range < ``width``."""
    ips, best, lo = sorted(ips), (0, 0, 0), 0
    for hi, ip in enumerate(ips):
        while ip - ips[lo] >= width:
            lo += 1
        if hi - lo + 1 > best[2]:
            best = (ips[lo], ip, hi - lo + 1)
    return best


def categorize(samples: list[Sample], hot: tuple[int, int, int] | None = None):
    """Samples per category (``CATEGORIES``, ``HOTTEST``, ``GENERATED_REST``, ``OTHER``) and
    the hottest range ``hot`` of the generated code, (lowest, highest sampled address, count):
    by default, that of these samples."""
    hot = hot or hottest_range([s.ip for s in samples if is_generated(s)])
    counts = collections.Counter()
    for s in samples:
        if is_generated(s):
            counts[HOTTEST if hot[0] <= s.ip <= hot[1] and hot[2] else GENERATED_REST] += 1
            continue
        counts[next((name for name, sym, dso in CATEGORIES
                     if (sym and re.search(sym, s.sym)) or (dso and re.search(dso, s.dso))),
                    OTHER)] += 1
    return counts, hot


def is_step_thread(sample: Sample, framework: str, pid: int) -> bool:
    """Whether the sample's thread executes the step (see the docstring)."""
    return framework != "jax" or sample.tid != pid


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def _size(n: int) -> str:
    return f"{n / 1024:,.1f} KB" if n >= 1024 else f"{n} B"


def _cell(text: str, limit: int = 90) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _label(sample: Sample, pid: int) -> str:
    return f"{sample.comm} (main thread)" if sample.tid == pid else sample.comm


def report(samples: list[Sample], mappings: list[Mapping], framework: str, pid: int,
           top: int) -> str:
    """Markdown: samples by thread, by category and by symbol (the last two: step threads)."""
    tids = collections.defaultdict(set)
    for s in samples:
        tids[_label(s, pid)].add(s.tid)
    by_label = collections.Counter(_label(s, pid) for s in samples)
    step_labels = {_label(s, pid) for s in samples if is_step_thread(s, framework, pid)}
    rows = [[label, len(tids[label]), "yes" if label in step_labels else "no", n,
             _share(n, len(samples))] for label, n in by_label.most_common()]
    out = [markdown_table(["thread name", "threads", "executes the step", "samples", "share"],
                          rows)]
    step = [s for s in samples if is_step_thread(s, framework, pid)]
    if not step:
        return "\n\n".join([*out, "no samples in the threads that execute the step"])

    counts, hot = categorize(step)
    lo, hi, _ = hot
    labels = [label for label, _ in by_label.most_common() if label in step_labels]
    per_label = {label: categorize([s for s in step if _label(s, pid) == label], hot)[0]
                 for label in labels} if len(labels) > 1 else {}
    names = [c[0] for c in CATEGORIES] + [HOTTEST, GENERATED_REST, OTHER]
    where = f"{lo:#x}, {_size(hi - lo + 1)}"  # from the first to the last sampled address
    if inside := [m for m in mappings if m.start <= lo < m.start + m.size]:
        where += f", in a {_size(inside[-1].size)} {inside[-1].prot} mapping"  # the latest
    rows = [[name + (f" ({where})" if name == HOTTEST else ""),
             counts[name], _share(counts[name], len(step)),
             *(_share(c[name], by_label[label]) for label, c in per_label.items())]
            for name in names if counts[name]]
    out.append(markdown_table(["category (step threads)", "samples", "share",
                               *(f"share in {label}" for label in per_label)], rows))
    dots = sum(counts[name] for name in names if name.startswith("matmul"))
    line = f"matmul: {_share(dots, len(step))} of the step threads' samples"
    if counts[HOTTEST]:
        line += (f", {_share(dots + counts[HOTTEST], len(step))} with the hottest range of "
                 "run-time generated code")
    out.append(line)

    def symbol(s: Sample) -> tuple[str, str]:
        if is_generated(s):
            part = "its hottest range" if lo <= s.ip <= hi else "elsewhere"
            return f"[{GENERATED}, {part}]", "anonymous memory"
        return s.sym, os.path.basename(s.dso)

    by_symbol = collections.Counter(symbol(s) for s in step)
    rows = [[_cell(sym), dso, _share(n, len(step))] for (sym, dso), n in
            by_symbol.most_common(top)]
    out.append(markdown_table(["symbol (step threads)", "DSO", "share"], rows))
    return "\n\n".join(out)


def record(pid: int, frequency: int, path: str, run):
    """``run()``'s result, with ``perf record`` sampling process ``pid`` into ``path`` meanwhile.

    perf starts with its events disabled (``-D -1``) and is enabled over its control pipe; its
    acknowledgment means it is attached and sampling, so no step runs before it is.
    """
    ctl_r, ctl_w = os.pipe()
    ack_r, ack_w = os.pipe()
    perf = subprocess.Popen(
        ["perf", "record", "-F", str(frequency), "-p", str(pid), "-o", path, "-D", "-1",
         "--control", f"fd:{ctl_r},{ack_w}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, pass_fds=(ctl_r, ack_w))
    os.close(ctl_r)
    os.close(ack_w)  # so that the read below ends if perf exits
    started = False
    try:
        try:
            os.write(ctl_w, b"enable\n")
            if select.select([ack_r], [], [], 60)[0]:
                started = os.read(ack_r, 64).startswith(b"ack")  # "ack\n\0"
        except OSError:  # perf exited: the pipe is broken
            pass
        result = run() if started else None
    finally:
        if perf.poll() is None:  # perf writes its file on SIGINT; it re-raises the signal
            perf.send_signal(signal.SIGINT if started else signal.SIGKILL)
        stderr = perf.communicate(timeout=120)[1].strip()
        os.close(ctl_w)
        os.close(ack_r)
    if not started:
        raise ProfileError(f"`perf record -p {pid}` did not start sampling: "
                           f"{stderr or 'no answer'}")
    if perf.returncode not in (0, -signal.SIGINT):
        raise ProfileError(f"`perf record` failed ({perf.returncode}): {stderr}")
    return result


def profile(factory, spec: dict, steps: int, frequency: int, path: str):
    """(samples, mappings, the worker's pid, seconds) of ``steps`` steps of ``factory``'s worker,
    after as many warm-up steps: the first steps fault the heap's pages in (the small model's
    spent 8.5% of its samples zeroing pages in the kernel after 2 warm-up steps), which is not
    what a training run's steps cost."""
    with Worker(factory, spec) as worker:
        worker.call("run", steps)
        seconds, _ = record(worker.pid, frequency, path, lambda: worker.call("run", steps))
        pid = worker.pid
    proc = subprocess.run(["perf", "script", "-i", path, "-F", "comm,tid,ip,sym,dso",
                           "--show-mmap-events"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`perf script -i {path}` failed: {proc.stderr.strip()}")
    return *parse_script(proc.stdout), pid, seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    known_models = ", ".join(["default", *bench_step.MODELS])
    parser.add_argument("--models", default="tiny,small",
                        help=f"comma-separated subset of {known_models} (default: "
                        "configs/default.yaml's model, batch and sequence length)")
    parser.add_argument("--frameworks", default="jax,torch",
                        help=f"comma-separated subset of {', '.join(FRAMEWORKS)}")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps profiled per model and framework (default 10; --quick 50)")
    parser.add_argument("--frequency", type=int, default=499, help="perf's samples per second")
    parser.add_argument("--top", type=int, default=12, help="rows of the symbol tables")
    parser.add_argument("--quick", action="store_true",
                        help="a one-layer model with d_model 32: a smoke run")
    args = parser.parse_args(argv)
    frameworks = args.frameworks.split(",")
    if unknown := set(frameworks) - set(FRAMEWORKS):
        parser.error(f"--frameworks: unknown {sorted(unknown)}; choose from "
                     f"{', '.join(FRAMEWORKS)}")
    if args.quick:
        models, steps = bench_step.QUICK_MODELS, args.steps or 50
    else:
        chosen = args.models.split(",")
        if unknown := set(chosen) - {"default", *bench_step.MODELS}:
            parser.error(f"--models: unknown {sorted(unknown)}; choose from {known_models}")
        models = {m: bench_step.default_model() if m == "default" else bench_step.MODELS[m]
                  for m in chosen}
        steps = args.steps or 10
    if min(steps, args.frequency, args.top) < 1:
        parser.error("--steps, --frequency and --top: at least 1")
    if shutil.which("perf") is None:
        sys.exit("profile_step.py: cannot profile: `perf` (Linux perf_events' tool, e.g. the "
                 "linux-perf or linux-tools package) is not on PATH")
    version = subprocess.run(["perf", "--version"], capture_output=True, text=True)
    if version.returncode != 0:  # e.g. a distribution's wrapper without the kernel's perf
        sys.exit(f"profile_step.py: cannot profile: `perf --version` failed: "
                 f"{(version.stdout + version.stderr).strip()}")

    command = " ".join(["python benchmarks/profile_step.py",
                        *(sys.argv[1:] if argv is None else argv)])
    print(f"command: `{command}`\n\nmachine: {machine_line()}\n")
    print(f"{version.stdout.strip()}; `perf record -F {args.frequency} -p <worker>` over {steps} "
          f"steps after {steps} warm-up steps\n")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (arch, batch, seq) in models.items():
            spec = bench_step.make_spec(arch, batch, seq, bench_step.default_optimizer())
            for key in frameworks:
                name, factory = FRAMEWORKS[key]
                if key == "torch" and importlib.util.find_spec("torch") is None:
                    print(f"### {label} ({batch}x{seq}), {name}: not installed, not profiled\n")
                    continue
                path = os.path.join(tmp, f"{label}-{key}.data")
                try:
                    samples, mappings, pid, seconds = profile(factory, spec, steps,
                                                              args.frequency, path)
                except ProfileError as e:
                    sys.exit(f"profile_step.py: cannot profile: {e}")
                print(f"### {label} ({batch}x{seq}), {name}: {len(samples):,} samples over "
                      f"{steps} steps ({1e3 * seconds / steps:.0f} ms per step)\n")
                print(report(samples, mappings, key, pid, args.top) + "\n")


if __name__ == "__main__":
    main()
