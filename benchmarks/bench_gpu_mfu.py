"""Model FLOPs utilization of the real train step for configs/gpt2_small.yaml on one GPU.

The step is jaxtricks' own: ``Transformer`` + ``optimizer_from_config`` of the config's optimizer
(adamw, clip, cosine, weight decay, skip_nonfinite) + ``make_steps(..., "single")``, compiled
ahead of time from the jitted step (the same executable the trainer's first call builds), with
its donated state. The tokens are synthetic (uniform random ids, one batch placed on the device
once), so no dataset is needed; the speed does not depend on the token values.

MFU = tokens/s x ``flops_per_token`` (6N + 12 L T d, PaLM's estimate, as the trainer logs it) /
``--peak-tflops`` (dense bf16; default 989, H100's and H200's). The script imports only the
trainer's config, model and step: no dataset library (tensorflow-datasets, grain) is needed.

``--attention xla,cudnn`` measures both attention implementations in one run: ``xla`` is the
model as written (``jax.nn.dot_product_attention(implementation=None)``, which jax resolves to
its XLA implementation); ``cudnn`` swaps in ``implementation="cudnn"`` (cuDNN's fused flash
attention; bf16/fp16 on an NVIDIA GPU) by wrapping ``jax.nn.dot_product_attention`` inside this
script, without touching model.py. The implementation actually compiled is read from the HLO
(cuDNN's fused attention is a ``__cudnn$fmha`` custom call).

Usage:
  python benchmarks/bench_gpu_mfu.py                        # one GPU: both attentions
  python benchmarks/bench_gpu_mfu.py --batch-size 32 --attention cudnn
  python benchmarks/bench_gpu_mfu.py --quick                # tiny model on CPU (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_step, machine_line, markdown_table, median, trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_OVERRIDES = [  # a tiny model that compiles and runs in seconds on a CPU
    "model.vocab_size=512", "model.num_layers=2", "model.d_model=64", "model.num_heads=2",
    "model.d_ff=256", "model.max_seq_len=64", "data.seq_len=64",
]
IMPLEMENTATIONS = ("xla", "cudnn")


@contextlib.contextmanager
def attention_implementation(name: str):
    """Make every ``jax.nn.dot_product_attention`` call use ``implementation=name``.

    ``xla`` leaves the model as written (it passes ``implementation=None``: XLA as of jax 0.10).
    model.py looks the function up on ``jax.nn`` at trace time, so replacing the attribute while
    the step is traced is enough.
    """
    import jax

    if name == "xla":
        yield
        return
    original = jax.nn.dot_product_attention

    def attention(*args, implementation=None, **kwargs):
        del implementation  # the model's choice (None) is what we override
        return original(*args, implementation=name, **kwargs)

    jax.nn.dot_product_attention = attention
    try:
        yield
    finally:
        jax.nn.dot_product_attention = original


def compiled_attention(hlo_text: str) -> str:
    """Which attention the compiled step runs, read from its optimized HLO."""
    if "__cudnn$fmha" in hlo_text or "cudnn$fmha" in hlo_text:
        return "cuDNN fused (__cudnn$fmha)"
    return "XLA (dots + softmax)"


def measure(config, implementation: str, batch_size: int, steps: int, blocks: int,
            peak: float | None) -> dict:
    """Compile and time the train step of ``config`` with one attention implementation."""
    import jax
    import numpy as np

    jax.clear_caches()
    device = jax.local_devices()[0]
    api = trainer()
    built = build_step(api, config, config.train.steps, "single", batch_size)
    train_steps, state, batch, rng = built.steps, built.state, built.batch, built.rng
    mc, seq = config.model, config.data.seq_len

    with attention_implementation(implementation):
        start = time.perf_counter()
        lowered = train_steps.train.lower(state, batch, rng)  # trace + lower to StableHLO
        lower_s = time.perf_counter() - start
    start = time.perf_counter()
    step = lowered.compile()  # XLA: the executable jax.jit would run
    compile_s = time.perf_counter() - start
    attention = compiled_attention(step.as_text())

    for _ in range(3):  # warm up (autotuning, allocator)
        state, metrics = step(state, batch, rng)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / steps)
    step_s = median(times)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"the step produced a non-finite loss ({loss}) with {implementation}")

    tokens_per_s = batch_size * seq / step_s
    flops = api.flops_per_token(mc, seq) * tokens_per_s
    peak = peak if device.platform == "gpu" else None
    stats = device.memory_stats() or {}
    return {
        "device": device.device_kind, "implementation": implementation, "attention": attention,
        "batch": f"{batch_size}x{seq}", "params": api.count_params(built.model),
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens_per_s, "tflops": flops / 1e12,
        "mfu": None if peak is None else flops / peak, "peak": peak,
        "lower_s": lower_s, "compile_s": compile_s, "loss": loss,
        "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 1e9 or None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "gpt2_small.yaml"))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per step on the one device (default 16; --quick: 4)")
    parser.add_argument("--attention", default=None,
                        help="comma-separated from xla, cudnn (default both; --quick: xla)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks (median reported)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak (default: H100 and H200, 989)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. model.dtype=float32 data.seq_len=512")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model on any backend (CPU included): a smoke test")
    args = parser.parse_args(argv)

    import jax

    from jaxtricks.lm import config as config_lib

    backend = jax.default_backend()
    if not args.quick and backend != "gpu":
        sys.exit(
            f"bench_gpu_mfu.py measures MFU on a GPU, but jax's backend is {backend!r} "
            f"(devices: {jax.devices()}). Run it on a machine with a GPU and jax[cuda], or use "
            "--quick for the tiny CPU smoke run."
        )
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.set)
    config = config_lib.load(args.config, overrides)
    batch_size = args.batch_size or (4 if args.quick else 16)
    if args.quick:
        args.steps, args.blocks = min(args.steps, 3), min(args.blocks, 2)
    implementations = (args.attention or ("xla" if args.quick else "xla,cudnn")).split(",")
    for name in implementations:
        if name not in IMPLEMENTATIONS:
            sys.exit(f"--attention: {name!r} is not one of {', '.join(IMPLEMENTATIONS)}.")
        if name == "cudnn" and backend != "gpu":
            sys.exit("--attention cudnn needs an NVIDIA GPU (cuDNN); use --attention xla here.")

    print(f"machine: {machine_line(('jax', 'jaxlib', 'jax-cuda12-plugin', 'flax', 'optax'))}")
    print(f"config: {os.path.relpath(args.config, REPO)} {' '.join(overrides)}".rstrip())
    print(f"model dtype {config.model.dtype}; synthetic random tokens; median of {args.blocks} "
          f"blocks of {args.steps} steps after 3 warm-up steps\n")
    rows = []
    for name in implementations:
        r = measure(config, name, batch_size, args.steps, args.blocks, 1e12 * args.peak_tflops)
        rows.append([
            r["device"], name, r["attention"], r["batch"], f"{r['params'] / 1e6:.1f}M",
            f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.2f}",
            "n/a (no peak for this device)" if r["mfu"] is None else f"**{100 * r['mfu']:.1f}%**",
            f"{r['lower_s']:.1f} + {r['compile_s']:.1f}",
            "n/a" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}",
            f"{r['loss']:.3f}",
        ])
    peak = rows and r["peak"]
    print(markdown_table(
        ["device", "--attention", "attention compiled", "batch x seq", "params", "step ms",
         "tokens/s", "model TFLOP/s", f"MFU (peak {peak / 1e12:.0f} TFLOP/s)" if peak else "MFU",
         "compile s (trace+lower + XLA)", "peak device GB", "loss"],
        rows,
    ))


if __name__ == "__main__":
    main()
