"""Kept entries by gather-multiply-sum against the dense [N, rows, cols] block, per layer shape.

distinf forms the kept entries Σ_t gy[n, t, r]·x[n, t, c] either one entry at a time (gather both
operands, multiply, sum over t: O(N·T·k) work, the path that keeps LLM layers cheap) or, where the
kept entries fill a good part of the rows × columns they touch, with one matmul over that block
and a pick of the entries (`_DENSE_BLOCK_FACTOR` in distinf/core/adapters/base.py). This measures
both paths on the layer shapes where the choice matters, alternating them call by call in one
process, and the whole capture of the retraining benchmark's Fashion-MNIST CNN with the rule as
shipped against the gather path alone.

    .venv/bin/python -m benchmarks.speed.dense_block --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import _harness  # noqa: E402,F401  (the offline environment, before transformers loads)

from distinf.core.adapters import base  # noqa: E402
from distinf.core.capture import GradientCapture  # noqa: E402
from distinf.core.compressors import build_compressor  # noqa: E402
from distinf.core.tracking import track_modules  # noqa: E402
from benchmarks.record import publish, run_line  # noqa: E402
from benchmarks.quality.retraining_image import SmallCNN, per_example_losses  # noqa: E402

# (label, N, T, out, in, kept fraction of the layer's entries)
SHAPES = [
    ("CNN conv1 (1→8, 5×5) on 28×28, batch 128", 128, 784, 8, 25, 0.5),
    ("CNN conv2 (8→16, 5×5) on 14×14, batch 128", 128, 196, 16, 200, 0.5),
    ("same, 5% kept", 128, 196, 16, 200, 0.05),
    ("CNN head (784 → 10), batch 128, 18% kept", 128, 1, 10, 784, 0.18),
    ("LoRA A factor (8 × 384), batch 16 × 40", 16, 40, 8, 384, 0.1),
    ("LoRA B factor (384 × 8), batch 16 × 40", 16, 40, 384, 8, 0.1),
    ("SmolLM2 q_proj (576 × 576), batch 8 × 128, 10% kept", 8, 128, 576, 576, 0.1),
    ("SmolLM2 q_proj (576 × 576), batch 8 × 128, 1% kept", 8, 128, 576, 576, 0.01),
    ("SmolLM2 up_proj (1536 × 576), batch 8 × 128, 0.05% kept", 8, 128, 1536, 576, 0.0005),
]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def paired(a, b, pairs: int) -> tuple[float, float, float]:
    """(median a s, median b s, median of per-pair a/b) with a and b alternating."""
    a(), b()  # warm-up
    times = [(timed(a), timed(b)) for _ in range(pairs)]
    return (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times),
            statistics.median(t[0] / t[1] for t in times))


def layer_row(label: str, n: int, t: int, out: int, inp: int, fraction: float, pairs: int) -> str:
    p = out * inp
    k = max(1, int(p * fraction))
    rows, cols = np.divmod(np.sort(np.random.default_rng(0).choice(p, k, replace=False)), inp)
    plan = base.plan_weight(rows, cols)
    x_cols = torch.randn(n, t, inp)[:, :, plan.unique_cols]
    gy = torch.randn(n, t, out)
    gather = lambda: base.selected_products(x_cols, plan.col_of_entry, gy, plan.rows)  # noqa: E731
    dense = lambda: base.dense_block_products(x_cols, gy, plan)  # noqa: E731
    torch.testing.assert_close(gather(), dense(), rtol=1e-4, atol=1e-3)
    g, d, ratio = paired(gather, dense, pairs)
    block = plan.block_size
    chosen = "dense block" if base.use_dense_block(plan, gy) else "gather"
    return (f"| {label} | {p:,} | {k:,} | {block / k:.1f} | {g * 1e3:.2f} | {d * 1e3:.2f} | {ratio:.2f} | {chosen} |")


def cnn_row(k: int, batch: int, pairs: int) -> str:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    tracked = track_modules(model)
    capture = GradientCapture(model, tracked, build_compressor(tracked, "dropout", k))
    images = {"pixel_values": torch.randn(batch, 1, 28, 28), "labels": torch.randint(0, 10, (batch,))}

    def run(factor: int):
        def go():
            base._DENSE_BLOCK_FACTOR = factor
            with capture:
                capture.batch(images, per_example_losses)
        return go

    shipped = base._DENSE_BLOCK_FACTOR
    try:
        g, d, ratio = paired(run(0), run(shipped), pairs)
    finally:
        base._DENSE_BLOCK_FACTOR = shipped
    return (f"| whole capture, SmallCNN ({tracked.tracked_numel:,} params), k = {k:,}, batch {batch} | "
            f"{tracked.tracked_numel:,} | {k:,} | – | {g * 1e3:.1f} | {d * 1e3:.1f} | {ratio:.2f} | "
            f"rule as shipped (factor {shipped}) |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = [layer_row(*shape, pairs=args.pairs) for shape in SHAPES] + [cnn_row(2048, 128, args.pairs)]
    text = "\n".join([
        "## Dense block for densely kept layers (kept-entry products)", "",
        run_line("dense_block.py", args.pairs, args.threads, started) + " Random operands of each layer's shape; "
        f"the two paths alternate call by call; median of {args.pairs} pairs. 'block / k' is the size of the "
        f"[rows × cols] block the kept entries touch over k; the rule forms the block when it is at most "
        f"{base._DENSE_BLOCK_FACTOR}× k. Both paths agree to 1e-4 (checked here; tests/test_adapters.py runs "
        f"the adapters' torch.func checks through each path).", "",
        "| layer | p | k | block / k | gather ms | dense block ms | gather / dense | rule picks |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    publish(text + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
