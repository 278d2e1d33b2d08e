"""Model FLOPs utilization of the trainer's step for configs/gpt2_small.yaml on all local GPUs.

The step is the one a run compiles: ``plan = sharding.plan(config)`` (parallelism auto: one
device, or a ``data x fsdp x tensor`` mesh of all of them, all on ``data`` unless ``--mesh`` says
otherwise), ``training.build_steps(config, plan)``, the state made on the devices, sharded, by
``steps.init_state(start.create)``. The model computes in bfloat16 with ``model.attention=auto``
(cuDNN's fused attention on a GPU; the table names the implementation the model took and the one
found in the compiled HLO). The step is compiled ahead of time (the same executable the trainer's
first call builds) and timed in blocks after a warm-up. The tokens are synthetic (uniform random
ids, one global batch placed once with ``steps.put_batch``): the speed does not depend on them,
and no dataset library (tensorflow-datasets, grain) or tensorboardX is imported.

MFU = tokens/s x ``flops_per_token`` (6N + 12 L T d, PaLM's estimate, as the trainer logs it) /
(``training.peak_flops(device)`` x devices).

Usage:
  python benchmarks/bench_gpu_mfu.py                      # all local GPUs, the batch on `data`
  python benchmarks/bench_gpu_mfu.py --mesh 1,8,1         # data,fsdp,tensor: FSDP over 8 GPUs
  python benchmarks/bench_gpu_mfu.py --batch-size 32 --set model.attention=xla
  python benchmarks/bench_gpu_mfu.py --quick              # tiny model on CPU (smoke test)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, markdown_table, median, tokens  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["model.dtype=bfloat16", "model.attention=auto"]
QUICK_OVERRIDES = [  # a tiny model that compiles and runs in seconds on a CPU
    "model.vocab_size=512", "model.num_layers=2", "model.d_model=64", "model.num_heads=2",
    "model.d_ff=256", "model.max_seq_len=64", "data.seq_len=64",
]
BATCH_PER_DEVICE = 16  # sequences: GPT-2 small at 1024 tokens fits an 80 GB GPU with room
WARMUP_STEPS = 3


def compiled_attention(hlo_text: str) -> str:
    """Which attention the compiled step runs, read from its optimized HLO."""
    if "cudnn$fmha" in hlo_text:
        return "cuDNN fused (__cudnn$fmha)"
    return "XLA or CPU blocks (no cuDNN call)"


def measure(config, plan, steps_per_block: int, blocks: int) -> dict:
    """Compile and time the train step of ``config`` over ``plan``'s devices."""
    import jax
    import numpy as np

    from jaxtricks.lm import sharding, training  # training imports no data library
    from jaxtricks.lm.model import attention_kind, count_params, flops_per_token

    start, steps = training.build_steps(config, plan)
    state = steps.init_state(start.create)
    ids = tokens(config.model.vocab_size, config.train.batch_size, config.data.seq_len)
    batch = steps.put_batch({"inputs": ids[:, :-1], "targets": ids[:, 1:]})
    rng = jax.random.key(0)

    begin = time.perf_counter()
    lowered = steps.train.lower(state, batch, rng)  # trace + lower to StableHLO
    lower_s = time.perf_counter() - begin
    begin = time.perf_counter()
    step = lowered.compile()  # XLA: the executable the trainer's jitted step runs
    compile_s = time.perf_counter() - begin

    for _ in range(WARMUP_STEPS):  # autotuning, the allocator
        state, metrics = step(state, batch, rng)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(blocks):
        begin = time.perf_counter()
        for _ in range(steps_per_block):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - begin) / steps_per_block)
    loss = float(np.mean(jax.device_get(metrics["loss"])))  # pmap: one copy per device
    if not np.isfinite(loss):
        raise RuntimeError(f"the step produced a non-finite loss ({loss})")

    device, seq = jax.local_devices()[0], config.data.seq_len
    step_s = median(times)
    tokens_per_s = config.train.batch_size * seq / step_s
    flops = flops_per_token(config.model, seq) * tokens_per_s
    peak = training.peak_flops(device)
    peak = peak and peak * steps.num_devices
    stats = device.memory_stats() or {}
    return {
        "device": device.device_kind, "devices": steps.num_devices,
        "layout": "pmap" if steps.mesh is None else " x ".join(
            str(steps.mesh.shape[axis]) for axis in sharding.MESH_AXES),
        "attention": attention_kind(config.model, cpu_paths=start.model.cpu_paths),
        "compiled": compiled_attention(step.as_text()),
        "batch": f"{config.train.batch_size}x{seq}", "params": count_params(start.model),
        "step_ms": 1e3 * step_s, "tokens_per_s": tokens_per_s, "tflops": flops / 1e12,
        "mfu": peak and flops / peak, "peak": peak, "lower_s": lower_s, "compile_s": compile_s,
        "loss": loss, "mem_gb": stats.get("peak_bytes_in_use", 0) / 1e9 or None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "gpt2_small.yaml"))
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"global batch in sequences (default {BATCH_PER_DEVICE} per device; "
                             "--quick: 4 per device)")
    parser.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                        help="mesh sizes, e.g. 1,8,1 (default: all devices on data)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks (median reported)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. model.attention=xla data.seq_len=512")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model on any backend (CPU included): a smoke test")
    args = parser.parse_args(argv)

    import jax

    from jaxtricks.lm import config as config_lib
    from jaxtricks.lm import sharding

    backend = jax.default_backend()
    if not args.quick and backend != "gpu":
        sys.exit(
            f"bench_gpu_mfu.py measures MFU on a GPU, but jax's backend is {backend!r} "
            f"(devices: {jax.devices()}). Run it on a machine with a GPU and jax[cuda], or use "
            "--quick for the tiny CPU smoke run."
        )
    mesh = []
    if args.mesh:
        sizes = args.mesh.split(",")
        if len(sizes) != 3 or not all(n.lstrip("-").isdigit() for n in sizes):
            sys.exit(f"--mesh {args.mesh!r}: give three sizes DATA,FSDP,TENSOR, e.g. 1,8,1.")
        mesh = ["parallelism=mesh", *(f"mesh.{axis}={n}" for axis, n
                                      in zip(("data", "fsdp", "tensor"), sizes, strict=True))]
    per_device = 4 if args.quick else BATCH_PER_DEVICE
    batch_size = args.batch_size or per_device * jax.device_count()
    overrides = ((QUICK_OVERRIDES if args.quick else []) + MODEL + mesh
                 + [f"train.batch_size={batch_size}"] + list(args.set))
    if args.quick:
        args.steps, args.blocks = min(args.steps, 3), min(args.blocks, 2)
    try:
        config = config_lib.load(args.config, overrides)
        plan = sharding.plan(config)  # the mesh and the batch checked against the devices
    except config_lib.ConfigError as e:
        sys.exit(f"bench_gpu_mfu.py: {e}")
    print(f"machine: {machine_line(('jax', 'jaxlib', 'jax-cuda12-plugin', 'flax', 'optax'))}")
    print(f"config: {os.path.relpath(args.config, REPO)} {' '.join(overrides)}")
    print(f"synthetic random tokens; median of {args.blocks} blocks of {args.steps} steps after "
          f"{WARMUP_STEPS} warm-up steps\n")
    r = measure(config, plan, args.steps, args.blocks)
    print(f"attention: the model took {r['attention']!r}; compiled: {r['compiled']}\n")
    peak = r["peak"]
    print(markdown_table(
        ["device", "devices", "mesh data x fsdp x tensor", "attention", "batch x seq", "params",
         "step ms", "tokens/s", "model TFLOP/s",
         f"MFU (peak {peak / 1e12:,.0f} TFLOP/s)" if peak else "MFU",
         "compile s (trace+lower + XLA)", "peak GB per device", "loss"],
        [[r["device"], r["devices"], r["layout"], r["attention"], r["batch"],
          f"{r['params'] / 1e6:.1f}M", f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:,.0f}",
          f"{r['tflops']:.2f}",
          "n/a (no peak for this device)" if r["mfu"] is None else f"**{100 * r['mfu']:.1f}%**",
          f"{r['lower_s']:.1f} + {r['compile_s']:.1f}",
          "n/a" if r["mem_gb"] is None else f"{r['mem_gb']:.1f}", f"{r['loss']:.3f}"]],
    ))


if __name__ == "__main__":
    main()
