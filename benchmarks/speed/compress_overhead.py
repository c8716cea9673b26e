"""Compression overhead: distinf capture against the floor and the naive way, on SmolLM2-135M.

Configurations, each on one batch of N × T real tokens (default 8 × 128):
  floor      plain forward + backward with every weight frozen; a forward hook makes the input
             embedding's output require grad so backward runs through every layer. Loss = the
             sum of the per-example causal-LM losses. No gradient method can be cheaper.
  k=K        distinf: `GradientCapture(...).batch(batch, causal_lm_losses)` -> [N, K].
  naive      what one does without distinf: for each example alone, forward + backward with the
             weights requiring grad (so p-sized .grad buffers exist), then gather the same K
             entries (K = --naive-k) from each parameter's flattened .grad. N backward passes.

Timing: the machine drifts by ~15% within minutes, so every candidate is timed in the same
process alternating with the floor (floor, candidate, floor, candidate, ...) after warm-up, and
the reported number is the median of the per-pair ratios candidate/floor. The floor against
itself gives the calibration ratio (ideally ~1.0).

Memory: each configuration also runs alone in a fresh subprocess (model load, batch, 3
iterations); it reports the peak RSS and the increase over the RSS right after load + batch.

    .venv/bin/python -m benchmarks.speed.compress_overhead --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


from benchmarks._harness import (  # noqa: E402  (sets the offline environment before transformers loads)
    Clock, Runner, alternate, load_causal_lm, machine, packed_batch, reset_peak_rss, status_kib,
)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from distinf.assets import demo_corpus, smollm2_dir  # noqa: E402
from distinf.core.capture import GradientCapture  # noqa: E402
from distinf.core.index_set import IndexSet, draw_index_set  # noqa: E402
from distinf.core.tasks import causal_lm_losses  # noqa: E402
from distinf.core.tracking import Tracked, track_modules  # noqa: E402
from benchmarks.record import publish  # noqa: E402

SEED = 0


# ---------------------------------------------------------------------------------------------
# Setup


def load_model() -> nn.Module:
    return load_causal_lm(smollm2_dir())


def make_batch(batch_size: int, tokens: int) -> dict[str, Tensor]:
    """N rows of exactly T tokens of the demo training texts, packed (see _harness.packed_batch)."""
    return packed_batch(smollm2_dir(), demo_corpus()[0], batch_size, tokens)


def set_requires_grad(model: nn.Module, flag: bool) -> None:
    for param in model.parameters():
        param.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------
# The three ways to run one batch


def floor_runner(model: nn.Module, batch: dict[str, Tensor]) -> Runner:
    embedding = model.get_input_embeddings()

    def run() -> tuple[float, float]:
        set_requires_grad(model, False)
        # Frozen weights leave nothing upstream needing grad: make the embedding output a leaf
        # that does, so backward still traverses every layer (activation gradients only).
        handle = embedding.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        try:
            with Clock() as clock:
                losses = causal_lm_losses(model, batch)
                losses.sum().backward()
            return clock.times
        finally:
            handle.remove()

    return run


def capture_runner(model: nn.Module, tracked: Tracked, index_set: IndexSet, batch: dict[str, Tensor],
                   sink: dict | None = None) -> Runner:
    capture = GradientCapture(model, tracked, index_set)

    def run() -> tuple[float, float]:
        # The `with` block (registering hooks, freezing) is outside the timing: a real run
        # enters it once for all its batches.
        with capture:
            with Clock() as clock:
                grads, _ = capture.batch(batch, causal_lm_losses)
        if sink is not None:
            sink["grads"] = grads
        return clock.times

    return run


def naive_runner(model: nn.Module, index_set: IndexSet, batch: dict[str, Tensor],
                 sink: dict | None = None) -> Runner:
    params = dict(model.named_parameters())
    selected = [(params[name], torch.from_numpy(idx)) for name, idx in zip(index_set.names, index_set.flat_indices)]
    n = len(batch["input_ids"])

    def run() -> tuple[float, float]:
        set_requires_grad(model, True)
        try:
            clock = Clock().__enter__()
            rows = []
            for i in range(n):
                one = {key: value[i : i + 1] for key, value in batch.items()}
                model.zero_grad(set_to_none=True)  # fresh p-sized .grad buffers, as in a training loop
                causal_lm_losses(model, one)[0].backward()
                rows.append(torch.cat([p.grad.reshape(-1).index_select(0, idx) for p, idx in selected]))
            grads = torch.stack(rows)
            clock.__exit__()
        finally:
            model.zero_grad(set_to_none=True)
            set_requires_grad(model, False)
        if sink is not None:
            sink["grads"] = grads
        return clock.times

    return run


def runner_for(config: str, model: nn.Module, tracked: Tracked, batch: dict[str, Tensor],
               naive_k: int, sink: dict | None = None) -> Runner:
    if config == "floor":
        return floor_runner(model, batch)
    if config == "naive":
        return naive_runner(model, draw_index_set(tracked.param_shapes, naive_k, SEED), batch, sink)
    k = int(config.removeprefix("k="))
    return capture_runner(model, tracked, draw_index_set(tracked.param_shapes, k, SEED), batch, sink)


# ---------------------------------------------------------------------------------------------
# Measurement


def child_memory(args: argparse.Namespace) -> None:
    """Subprocess body: one configuration alone, 3 iterations; prints a JSON line."""
    torch.set_num_threads(args.threads)
    model = load_model()
    tracked = track_modules(model)
    set_requires_grad(model, False)
    batch = make_batch(args.batch, args.tokens)
    run = runner_for(args.child, model, tracked, batch, args.naive_k)
    gc.collect()
    was_reset = reset_peak_rss()
    base = status_kib("VmRSS")
    for _ in range(3):
        run()
    # VmHWM, not ru_maxrss: after fork + exec Linux seeds a child's ru_maxrss with the parent's
    # RSS at fork time (here the timing process, ~3 GB), and clear_refs does not reset it.
    peak = status_kib("VmHWM") if was_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"config": args.child, "base_kib": base, "peak_kib": peak, "ru_maxrss_kib": maxrss,
                      "reset": was_reset}))


def memory_of(config: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", __spec__.name, "--child", config, "--batch", str(args.batch), "--tokens",
           str(args.tokens), "--threads", str(args.threads), "--naive-k", str(args.naive_k)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"memory subprocess for {config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Report


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def table(rows: list[dict], mem: dict[str, dict]) -> str:
    floor_peak = mem.get("floor", {}).get("peak_kib")
    lines = [
        "| configuration | pairs | median wall s/batch | floor wall s/batch (same pairs) "
        "| median wall ratio to floor (min–max) | median CPU-time ratio | peak RSS "
        "| peak increase over post-load RSS | peak over floor's peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m = mem.get(row["config"])
        peak = mib(m["peak_kib"]) if m else "–"
        inc = mib(m["peak_kib"] - m["base_kib"]) if m else "–"
        over = f"{(m['peak_kib'] - floor_peak) / 1024:+.0f} MiB" if m and floor_peak else "–"
        timing = (
            f"{row['cand_s']:.2f} | {row['floor_s']:.2f} | {row['ratio']:.3f} "
            f"({row['ratio_min']:.2f}–{row['ratio_max']:.2f}) | {row['cpu_ratio']:.3f}"
            if row["pairs"] else "– | – | – | –"
        )
        lines.append(f"| {row['label']} | {row['pairs']} | {timing} | {peak} | {inc} | {over} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1024,8192,65536", help="comma-separated k values for capture")
    parser.add_argument("--pairs", type=int, default=8, help="timed (floor, candidate) pairs per configuration")
    parser.add_argument("--naive-pairs", type=int, default=None, help="pairs for the naive method (default: --pairs)")
    parser.add_argument("--naive-k", type=int, default=8192, help="k gathered by the naive method")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed runs of the floor (once) and of each candidate before its pairs")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--no-timing", action="store_true", help="only the peak-RSS subprocesses")
    parser.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_memory(args)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_model()
    tracked = track_modules(model)
    set_requires_grad(model, False)
    batch = make_batch(args.batch, args.tokens)
    info = machine()
    print(json.dumps(info), flush=True)
    print(f"tracked {tracked.tracked_numel:,} of {tracked.total_numel:,} parameters "
          f"({tracked.tracked_fraction:.1%}); batch {args.batch} x {args.tokens}", flush=True)

    floor = floor_runner(model, batch)
    for _ in range(0 if args.no_timing else args.warmup):
        floor()
    ks = [int(k) for k in args.ks.split(",") if k]
    configs = [("floor", "floor (calibration: floor vs floor)", args.pairs)]
    configs += [(f"k={k}", f"distinf capture k={k}", args.pairs) for k in ks]
    if not args.no_naive:
        configs.append(("naive", f"naive per-example .grad + gather, k={args.naive_k}",
                        args.naive_pairs or args.pairs))

    rows = []
    check: dict[str, dict] = {}
    for config, label, pairs in configs:
        sink = check.setdefault(config, {}) if config in ("naive", f"k={args.naive_k}") else None
        candidate = floor_runner(model, batch) if config == "floor" else runner_for(
            config, model, tracked, batch, args.naive_k, sink)
        result = {"pairs": 0} if args.no_timing else alternate(floor, candidate, pairs, args.warmup)
        rows.append({"config": config, "label": label, **result})
        print(json.dumps(rows[-1]), flush=True)

    agreement = None
    if "grads" in check.get("naive", {}) and "grads" in check.get(f"k={args.naive_k}", {}):
        a, b = check[f"k={args.naive_k}"]["grads"].double(), check["naive"]["grads"].double()
        agreement = ((a - b).norm() / b.norm()).item()
        print(f"capture vs naive at k={args.naive_k}: relative Frobenius error {agreement:.2e}", flush=True)

    mem = {}
    if not args.no_memory:
        for config, _, _ in configs:
            mem[config] = memory_of(config, args)
            print(json.dumps(mem[config]), flush=True)

    total = time.perf_counter() - started
    text = [
        f"machine: nproc={info['nproc']}, CPU {info['cpu']} ({info['capability']}), torch {info['torch']}, "
        f"torch threads {info['threads']}; batch {args.batch} x {args.tokens} tokens; "
        f"tracked {tracked.tracked_numel:,} of {tracked.total_numel:,} parameters",
        "",
        table(rows, mem),
        "",
        (f"Calibration (floor vs floor): median wall ratio {rows[0]['ratio']:.3f}, "
         f"CPU-time ratio {rows[0]['cpu_ratio']:.3f}. " if rows[0]["pairs"] else "") +
        f"Warm-up runs: {args.warmup} of the floor, then {args.warmup} of each candidate. Total wall time {total / 60:.1f} min.",
    ]
    if agreement is not None:
        text.append(f"Capture k={args.naive_k} vs naive gather: relative Frobenius error {agreement:.2e}.")
    report = "\n".join(text)
    publish(report, args.out)


if __name__ == "__main__":
    main()
