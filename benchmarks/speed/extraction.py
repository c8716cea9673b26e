"""Gradient-extraction throughput against the floor (issue 8): dropout, gaussian and fjlt at several k.

Models: SmolLM2-135M-Instruct (`smollm2`) and a random-initialised GPT-NeoX of Pythia-410M's shape
(`neox400m`: hidden 1024, 24 layers, 16 heads, intermediate 4096, vocabulary 50304, weights from
torch.manual_seed(0)). Both read the same real tokens (the demo corpus through SmolLM2's
tokenizer, packed into N rows of T tokens; every id is below both vocabularies).

Two copies of the model: the floor (forward + backward with frozen weights, no capture, see
compress_overhead.py) always runs on copy A, the candidate on copy B. Each round runs every
configuration once, in an order rotated from round to round, each as a pair (floor, candidate);
a configuration's ratio is the median over rounds of candidate / floor. `floor` paired with the
floor on copy B is the calibration (ideally 1.00).

  dropout K   distinf's capture with the shared index set of K entries.
  fjlt K      whole per-example gradients per tensor, then the subsampled randomised Hadamard
              transform. Run in micro-batches of --projection-batch examples (the padded
              per-example gradient of the output layer and its out-of-place transform hold
              ~3 x N x 2^26 floats at 400M), with --projection-pairs pairs: its cost hardly
              depends on K (the transform is over the padded p_l) and is far from the floor.
  gaussian K  extrapolated: the capture that forms the whole per-example gradients with the
              projection left out (measured once, whole batch, paired with the floor), plus the projection's
              seconds measured on one tensor and scaled by Σ_l k_l·p_l (its cost is drawing
              k_l·p_l normals and the same multiply-adds: linear in Σ_l k_l·p_l).

Throughput: examples/s = N / median wall seconds per batch, tokens/s = N·T / the same.

    nice -n 5 .venv/bin/python -m benchmarks.speed.extraction --model smollm2 --out benchmarks/RESULTS.md
    nice -n 5 .venv/bin/python -m benchmarks.speed.extraction --model neox400m --batch 4 --out benchmarks/RESULTS.md
    .venv/bin/python -m benchmarks.speed.extraction --quick      # a tiny NeoX, seconds, for development
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path


from benchmarks._harness import (  # noqa: E402  (sets the offline environment before transformers loads)
    Clock, Runner, machine, reset_peak_rss, status_kib,
)
from benchmarks.speed.compress_overhead import load_model as load_smollm2, make_batch, set_requires_grad  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from distinf.core.capture import GradientCapture  # noqa: E402
from distinf.core.compressors import build_compressor  # noqa: E402
from distinf.core.compressors.gaussian import GaussianCompressor  # noqa: E402
from distinf.core.tasks import causal_lm_losses  # noqa: E402
from distinf.core.tracking import Tracked, track_modules  # noqa: E402
from benchmarks.record import publish  # noqa: E402

TARGET = 1.05


# ---------------------------------------------------------------------------------------------
# Models


def neox_model(hidden: int = 1024, layers: int = 24, heads: int = 16, intermediate: int = 4096,
               vocab: int = 50304, seed: int = 0) -> nn.Module:
    """A GPT-NeoX of Pythia-410M's shape (defaults) with random weights from `seed`."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=2048,
                           rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config).float().eval()


def two_copies(name: str, quick: bool) -> tuple[nn.Module, nn.Module]:
    if quick:
        a = neox_model(hidden=64, layers=2, heads=4, intermediate=256)
    elif name == "smollm2":
        return load_smollm2(), load_smollm2()
    else:
        a = neox_model()
    return a, copy.deepcopy(a)


# ---------------------------------------------------------------------------------------------
# One batch of each configuration


def floor_runner(model: nn.Module, batch: dict[str, Tensor]) -> Runner:
    """Forward + backward with frozen weights; the embedding output requires grad so backward
    reaches every layer (activation gradients only)."""
    embedding = model.get_input_embeddings()

    def run() -> tuple[float, float]:
        set_requires_grad(model, False)  # copy B's capture restores requires_grad when it exits
        handle = embedding.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        try:
            with Clock() as clock:
                causal_lm_losses(model, batch).sum().backward()
            return clock.times
        finally:
            handle.remove()

    return run


def capture_runner(model: nn.Module, tracked: Tracked, compressor, batch: dict[str, Tensor],
                   micro_batch: int) -> Runner:
    """distinf capture of the batch, `micro_batch` examples per forward + backward."""
    capture = GradientCapture(model, tracked, compressor)
    n = len(batch["input_ids"])
    parts = [{key: value[i : i + micro_batch] for key, value in batch.items()} for i in range(0, n, micro_batch)]

    def run() -> tuple[float, float]:
        with capture:  # hooks are registered once per real run: outside the timing
            with Clock() as clock:
                for part in parts:
                    capture.batch(part, causal_lm_losses)
        return clock.times

    return run


class UnprojectedGaussian(GaussianCompressor):
    """gaussian's capture with the projection left out: forms every whole per-example gradient."""

    def project(self, name: str, grad: Tensor) -> Tensor:
        return grad.new_zeros(grad.shape[0], self._k[name])


def gaussian_projection_seconds(gauss: GaussianCompressor, tracked: Tracked, examples: int) -> dict:
    """Seconds of `project` on one tensor (synthetic gradients), scaled by Σ k_l·p_l."""
    shapes = dict(tracked.param_shapes)
    sizes = dict(zip(gauss.layout.names, gauss.layout.sizes))
    units = {name: sizes[name] * math.prod(shapes[name]) for name in sizes}
    # The tensor with p_l nearest 2^20 (an MLP or attention weight): seconds, not minutes.
    sample = min(sizes, key=lambda n: abs(math.log(math.prod(shapes[n]) / (1 << 20))))
    grad = torch.randn(examples, math.prod(shapes[sample]))
    with Clock() as clock:
        gauss.project(sample, grad)
    wall, cpu = clock.times
    scale = sum(units.values()) / units[sample]
    return {"sample": sample, "sample_wall_s": wall, "sample_cpu_s": cpu, "scale": scale,
            "wall_s": wall * scale, "cpu_s": cpu * scale}


# ---------------------------------------------------------------------------------------------
# Measurement


def rounds(floor: Runner, candidates: dict[str, tuple[Runner, int, int]], warmup: int) -> dict[str, list]:
    """{name: [(floor wall, floor cpu, cand wall, cand cpu), ...]}: candidate `name` = (run, pairs,
    warm-up runs) runs `pairs` times, each right after a floor run, in an order rotated every round."""
    for _ in range(warmup):
        floor()
    for run, _, warm in candidates.values():
        for _ in range(warm):
            run()
    names = list(candidates)
    done: dict[str, list] = {name: [] for name in names}
    for r in range(max(pairs for _, pairs, _ in candidates.values())):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            run, pairs, _ = candidates[name]
            if len(done[name]) < pairs:
                f, c = floor(), run()
                done[name].append((*f, *c))
                print(json.dumps({"round": r, "config": name, "pair": [round(x, 3) for x in (*f, *c)],
                                  "ratio": round(c[0] / f[0], 3)}), flush=True)
                gc.collect()
    return done


def summary(pairs: list[tuple], examples: int, tokens: int, extra: tuple[float, float] = (0.0, 0.0)) -> dict:
    """Medians over pairs; `extra` (wall, cpu) is added to every candidate run (extrapolated work)."""
    cand = [(p[2] + extra[0], p[3] + extra[1]) for p in pairs]
    ratios = [c[0] / p[0] for c, p in zip(cand, pairs)]
    wall = statistics.median(c[0] for c in cand)
    return {
        "pairs": len(pairs),
        "cand_s": wall,
        "floor_s": statistics.median(p[0] for p in pairs),
        "examples_per_s": examples / wall,
        "tokens_per_s": examples * tokens / wall,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cpu_ratio": statistics.median(c[1] / p[1] for c, p in zip(cand, pairs)),
        "raw": [[round(x, 3) for x in p] for p in pairs],
    }


def verdict(ratio: float) -> str:
    return "yes" if ratio <= TARGET else "**no**"


def table(rows: list[dict], floor_row: dict, examples: int, tokens: int) -> str:
    lines = [
        "| method | k | pairs | s/batch | examples/s | tokens/s | floor s/batch (same pairs) "
        "| ratio to floor, wall: median (min–max) | ratio, CPU time | ≤ 1.05× |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| floor vs floor (calibration) | – | {floor_row['pairs']} | {floor_row['cand_s']:.2f} "
        f"| {floor_row['examples_per_s']:.2f} | {floor_row['tokens_per_s']:.0f} | {floor_row['floor_s']:.2f} "
        f"| {floor_row['ratio']:.3f} ({floor_row['ratio_min']:.2f}–{floor_row['ratio_max']:.2f}) "
        f"| {floor_row['cpu_ratio']:.3f} | – |",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['k']:,} | {row['pairs']} | {row['cand_s']:.2f} | {row['examples_per_s']:.3g} "
            f"| {row['tokens_per_s']:.3g} | {row['floor_s']:.2f} | {row['ratio']:.3f} "
            f"({row['ratio_min']:.2f}–{row['ratio_max']:.2f}) | {row['cpu_ratio']:.3f} "
            f"| {verdict(row['ratio'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "neox400m"), default="smollm2")
    parser.add_argument("--ks", default="4096,8192,65536")
    parser.add_argument("--methods", default="dropout,fjlt,gaussian")
    parser.add_argument("--fjlt-ks", default=None, help="the k values fjlt runs at (default: --ks); its cost hardly "
                        "depends on k")
    parser.add_argument("--pairs", type=int, default=8, help="rounds: pairs of the calibration and of dropout")
    parser.add_argument("--projection-pairs", type=int, default=1,
                        help="pairs of fjlt and of gaussian's unprojected capture (both far from the floor)")
    parser.add_argument("--projection-batch", type=int, default=2,
                        help="micro-batch of fjlt and gaussian's capture (their whole per-example gradients)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs of the floor, the calibration and dropout (fjlt and gaussian: none)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny NeoX, batch 2 x 32, k 256/512, 2 pairs")
    parser.add_argument("--out", type=Path, default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    if args.quick:
        args.ks, args.pairs, args.projection_pairs, args.batch, args.tokens = "256,512", 2, 1, 2, 32
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    floor_model, cand_model = two_copies(args.model, args.quick)
    set_requires_grad(floor_model, False)
    tracked = track_modules(cand_model)
    batch = make_batch(args.batch, args.tokens)
    info = machine()
    model_line = (f"{'tiny GPT-NeoX (quick)' if args.quick else args.model}: {tracked.total_numel:,} parameters, "
                  f"{tracked.tracked_numel:,} tracked ({tracked.tracked_fraction:.1%})")
    print(json.dumps(info), "\n" + model_line, flush=True)

    ks = [int(k) for k in args.ks.split(",") if k]
    methods = [m for m in args.methods.split(",") if m]
    fjlt_ks = [int(k) for k in (args.fjlt_ks or args.ks).split(",") if k]
    candidates: dict[str, tuple[Runner, int, int]] = {"floor": (floor_runner(cand_model, batch), args.pairs, args.warmup)}
    labels: dict[str, tuple[str, str, int]] = {}
    for k in ks:
        if "dropout" in methods:
            candidates[f"dropout {k}"] = (capture_runner(cand_model, tracked, build_compressor(tracked, "dropout", k),
                                                         batch, args.batch), args.pairs, args.warmup)
            labels[f"dropout {k}"] = ("dropout", "dropout (distinf)", k)
        if "fjlt" in methods and k in fjlt_ks:
            candidates[f"fjlt {k}"] = (capture_runner(cand_model, tracked, build_compressor(tracked, "fjlt", k),
                                                      batch, args.projection_batch), args.projection_pairs, 0)
            labels[f"fjlt {k}"] = ("fjlt", f"fjlt (micro-batches of {args.projection_batch})", k)
    if "gaussian" in methods:  # the unprojected capture does not depend on k: measured once
        unprojected = UnprojectedGaussian(tracked.param_shapes, ks[0])
        candidates["gaussian capture"] = (capture_runner(cand_model, tracked, unprojected, batch, args.batch),
                                          args.projection_pairs, 0)

    gc.collect()
    reset_peak_rss()
    base_kib = status_kib("VmRSS")
    measured = rounds(floor_runner(floor_model, batch), candidates, args.warmup)
    peak_kib = status_kib("VmHWM")

    n, t = args.batch, args.tokens
    floor_row = summary(measured["floor"], n, t)
    rows = []
    for name, (method, label, k) in labels.items():
        rows.append({"method": method, "label": label, "k": k, **summary(measured[name], n, t)})
    projections = {}
    if "gaussian" in methods:
        for k in ks:
            proj = gaussian_projection_seconds(GaussianCompressor(tracked.param_shapes, k), tracked, n)
            per_batch = (proj["wall_s"], proj["cpu_s"])
            projections[k] = {**proj, "per_batch_wall_s": per_batch[0]}
            rows.append({"method": "gaussian", "label": "gaussian (extrapolated, see below)", "k": k,
                         **summary(measured["gaussian capture"], n, t, per_batch)})
    rows.sort(key=lambda row: (("dropout", "fjlt", "gaussian").index(row["method"]), row["k"]))
    for row in rows:
        print(json.dumps({key: row[key] for key in row if key != "raw"} | {"raw": row["raw"]}), flush=True)

    total = time.perf_counter() - started
    text = [
        "",
        f"### {model_line}",
        "",
        f"Command: `nice -n 5 .venv/bin/python -m benchmarks.speed.extraction {' '.join(sys.argv[1:])}`",
        f"Machine: nproc={info['nproc']}, CPU {info['cpu']} ({info['capability']}), torch {info['torch']} with "
        f"{info['threads']} threads, Python {info['python']}. Batch {n} × {t} tokens of real text; "
        f"{args.warmup} warm-up run(s) of the floor, the calibration and dropout, none of fjlt and gaussian; "
        "configurations rotated round by round. "
        f"Peak RSS of the process {peak_kib / 1024:.0f} MiB ({(peak_kib - base_kib) / 1024:+.0f} MiB over the "
        f"two loaded copies). Total {total / 60:.1f} min.",
        "",
        table(rows, floor_row, n, t),
        "",
    ]
    if "gaussian capture" in measured:
        g = summary(measured["gaussian capture"], n, t)
        text.append(
            f"gaussian: its capture without the projection took a median {g['cand_s']:.2f} s/batch "
            f"({g['ratio']:.2f}× the floor, {g['pairs']} pair(s), whole batch); "
            "the projection, timed once on " + ", ".join(
                f"k={k}: `{p['sample']}` {p['sample_wall_s']:.2f} s × {p['scale']:.0f} (Σ k_l·p_l ratio) "
                f"= {p['per_batch_wall_s']:.0f} s/batch" for k, p in projections.items()) + ", is added to each pair.")
    text.append("Per-pair raw seconds (floor wall, floor CPU, candidate wall, candidate CPU) are printed by the script.")
    report = "\n".join(text)
    publish(report, args.out)


if __name__ == "__main__":
    main()
