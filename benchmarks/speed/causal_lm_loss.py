"""The causal-LM task's loss layout: cross-entropy over [N·T, V] rows against the [N, V, T] layout.

`distinf.core.tasks.causal_lm_losses` is the per-example loss every causal-LM capture step
differentiates. Until session 3 it called F.cross_entropy on logits transposed to [N, V, T]
(class dimension 1); this times that layout against the row layout it uses now, forward +
backward on SmolLM2-sized logits (49,152-way), alternating call by call in one process, and checks
that both give the same per-example losses and gradients.

    .venv/bin/python -m benchmarks.speed.causal_lm_loss --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import _harness  # noqa: E402,F401  (the offline environment, before transformers loads)

from benchmarks.record import publish, run_line  # noqa: E402

VOCAB = 49_152  # SmolLM2's vocabulary


def class_dim_1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The former layout: [N, V, T] logits."""
    return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none").mean(1)


def rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The layout distinf uses: [N·T, V] rows."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="none").view(labels.shape).mean(1)


def step(loss_fn, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    logits.grad = None
    started = time.perf_counter()
    losses = loss_fn(logits[:, :-1], labels[:, 1:])
    losses.sum().backward()
    return time.perf_counter() - started, losses.detach(), logits.grad.clone()


def row(n: int, t: int, pairs: int) -> str:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(n, t, VOCAB, generator=generator).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (n, t), generator=generator)
    _, old_losses, old_grad = step(class_dim_1, logits, labels)
    _, new_losses, new_grad = step(rows, logits, labels)
    torch.testing.assert_close(new_losses, old_losses)
    torch.testing.assert_close(new_grad, old_grad)
    times = [(step(class_dim_1, logits, labels)[0], step(rows, logits, labels)[0]) for _ in range(pairs)]
    old = statistics.median(a for a, _ in times)
    new = statistics.median(b for _, b in times)
    ratio = statistics.median(a / b for a, b in times)
    return f"| {n} × {t} | {old:.3f} | {new:.3f} | {ratio:.2f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    lines = [row(4, 64, args.pairs), row(8, 128, args.pairs)]
    text = "\n".join([
        "## Causal-LM loss layout (the task every causal-LM capture step differentiates)", "",
        run_line("causal_lm_loss.py", args.pairs, args.threads, started) + " Forward + backward of the "
        f"per-example mean next-token cross-entropy on random float32 logits with {VOCAB:,} classes; the two "
        f"layouts alternate; median of {args.pairs} pairs; per-example losses and logit gradients checked equal.", "",
        "| batch (N × T) | [N, V, T] layout s | [N·T, V] rows s | ratio |",
        "|---|---|---|---|",
        *lines,
    ])
    publish(text + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
