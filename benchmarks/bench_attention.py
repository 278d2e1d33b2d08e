"""Causal attention alone on CPU: query blocks (jaxtricks.lm.model.causal_attention) vs one call.

Forward + backward (``jax.grad`` of a weighted sum of the output) of the model's attention on
``(batch, seq, heads, head_dim)`` inputs, for ``num_blocks`` = 1 (one ``is_causal=True`` call of
``jax.nn.dot_product_attention``, what ``model.attention_blocks: 1`` runs), 2, 4 and 8, at 4,096
tokens per batch from sequence 128 to 1024; with PyTorch installed, ``F.scaled_dot_product_attention
(is_causal=True)`` forward + backward on the same shapes as the reference. JAX and PyTorch run in
worker processes of their own; the parent interleaves the cases and reports medians, and each
case's time over the one-call time in the same rounds.

Usage:
  python benchmarks/bench_attention.py            # tiny model's heads: 4 x 48, about 2 minutes
  python benchmarks/bench_attention.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Worker, machine_line, markdown_table, median, median_seconds  # noqa: E402


def _inputs(batch, seq, heads, head_dim):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.standard_normal((batch, seq, heads, head_dim), dtype=np.float32) for _ in range(4)]


class JaxAttention:
    def __init__(self, spec=None):
        import jax

        from jaxtricks.lm.cpu import tune_host_malloc

        tune_host_malloc()  # as train.py does
        jax.devices()
        self._compiled = {}

    def run(self, shape: tuple, num_blocks: int, n: int) -> float:
        import jax
        import jax.numpy as jnp

        from jaxtricks.lm.model import causal_attention

        if (shape, num_blocks) not in self._compiled:
            q, k, v, w = (jnp.asarray(x) for x in _inputs(*shape))
            grad = jax.jit(jax.grad(
                lambda q, k, v: jnp.sum(causal_attention(q, k, v, num_blocks) * w),
                argnums=(0, 1, 2),
            ))
            self._compiled[shape, num_blocks] = (grad, q, k, v)
        grad, q, k, v = self._compiled[shape, num_blocks]
        return median_seconds(lambda: jax.block_until_ready(grad(q, k, v)), n)


class TorchAttention:
    def __init__(self, spec=None):
        import torch

        torch.set_num_threads(os.cpu_count())

    def run(self, shape: tuple, num_blocks: int, n: int) -> float:
        import torch
        import torch.nn.functional as F

        del num_blocks
        q, k, v, w = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in _inputs(*shape))
        for t in (q, k, v):
            t.requires_grad_()

        def step():
            (F.scaled_dot_product_attention(q, k, v, is_causal=True) * w).sum().backward()

        return median_seconds(step, n)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape")
    parser.add_argument("--no-torch", action="store_true", help="JAX only")
    args = parser.parse_args(argv)
    heads, head_dim, tokens = 4, 48, 4096  # the tiny model of bench_step.py
    seqs, repeats, blocks = [128, 256, 512, 1024], 10, [1, 2, 4, 8]
    if args.quick:
        tokens, seqs, repeats, args.rounds = 256, [32, 64], 2, 2
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None

    start = time.perf_counter()
    print(f"machine: {machine_line()}")
    print(f"forward + backward of causal attention, {heads} heads x {head_dim}, {tokens:,} tokens "
          f"per batch; medians of {args.rounds} interleaved rounds of {repeats} calls each\n")
    workers = {"jax": Worker(JaxAttention, None)}
    if with_torch:
        workers["torch"] = Worker(TorchAttention, None)
    cases = [("jax", b) for b in blocks] + ([("torch", 0)] if with_torch else [])
    rows = []
    try:
        for seq in seqs:
            shape = (tokens // seq, seq, heads, head_dim)
            times = {case: [] for case in cases}
            for rnd in range(args.rounds):
                for case in cases if rnd % 2 == 0 else cases[::-1]:
                    times[case].append(workers[case[0]].call("run", shape, case[1], repeats))
            ref = times[("jax", 1)]
            row = [f"seq {seq}", f"{shape[0]}x{seq}"]
            for case in cases:
                ratio = median([t / r for t, r in zip(times[case], ref, strict=True)])
                row.append(f"{1e3 * median(times[case]):.2f} ({ratio:.2f})")
            rows.append(row)
    finally:
        for w in workers.values():
            w.close()
    headers = ["sequence", "batch x seq"] + [
        "1 block (one call) ms" if b == 1 else f"{b} blocks ms" for fw, b in cases if fw == "jax"
    ] + (["PyTorch SDPA ms"] if with_torch else [])
    print(markdown_table(headers, rows))
    print("\n(in parentheses: time over the one-call time of the same rounds, median)")
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
