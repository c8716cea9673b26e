"""The cost of hessian.method kfac's factor sums in the capture, and its scale against the Gram, on SmolLM2-135M.

Timing (compress_overhead.py's protocol: each candidate alternates with the floor in one process,
median of per-pair ratios): the floor (frozen forward + backward), the dropout capture at k, and
the same capture also summing the Kronecker factors (GradientCapture(..., factors=FactorSums)).
Memory: each configuration alone in a fresh subprocess, peak RSS (VmHWM after a reset).
Curvature: seconds to turn the sums into Cholesky factors, gauss_newton against kfac.
Calibration: per tensor, tr(K_S) / tr(Gram_S) and ‖K_S − Gram_S‖_F / ‖Gram_S‖_F on the same batch.

    flock /tmp/distinf-heavy.lock .venv/bin/python -m benchmarks.speed.kfac_cost --k 8192
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time


from benchmarks._harness import (  # noqa: E402  (sets the offline environment before transformers loads)
    Clock, alternate, machine, reset_peak_rss, status_kib,
)

import torch  # noqa: E402

from benchmarks.speed import compress_overhead as co  # noqa: E402
from distinf.core.capture import GradientCapture  # noqa: E402
from distinf.core.curvature import GramSums, block_slices, factorize_  # noqa: E402
from distinf.core.index_set import draw_index_set  # noqa: E402
from distinf.core.kfac import FactorSums  # noqa: E402
from distinf.core.tasks import causal_lm_losses  # noqa: E402
from distinf.core.tracking import track_modules  # noqa: E402


def runner(model, tracked, index_set, batch, with_factors: bool, sink: dict | None = None):
    def run():
        factors = FactorSums(tracked, index_set) if with_factors else None
        with GradientCapture(model, tracked, index_set, factors=factors) as capture:
            with Clock() as clock:
                grads, _ = capture.batch(batch, causal_lm_losses)
        if sink is not None:
            sink.update(grads=grads, factors=factors)
        return clock.times

    return run


def setup(args):
    torch.set_num_threads(args.threads)
    model = co.load_model()
    tracked = track_modules(model)
    co.set_requires_grad(model, False)
    return model, tracked, draw_index_set(tracked.param_shapes, args.k, co.SEED), co.make_batch(args.batch, args.tokens)


def child(args) -> None:
    model, tracked, index_set, batch = setup(args)
    run = co.floor_runner(model, batch) if args.child == "floor" else runner(
        model, tracked, index_set, batch, args.child == "kfac")
    gc.collect()
    was_reset = reset_peak_rss()
    base = status_kib("VmRSS")
    for _ in range(3):
        run()
    print(json.dumps({"config": args.child, "base_kib": base, "peak_kib": status_kib("VmHWM"), "reset": was_reset}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    started = time.perf_counter()
    model, tracked, index_set, batch = setup(args)
    print(json.dumps(machine()), flush=True)
    floor = co.floor_runner(model, batch)
    for _ in range(args.warmup):
        floor()
    sink: dict = {}
    rows = {}
    for name, run in (("capture", runner(model, tracked, index_set, batch, False)),
                      ("kfac", runner(model, tracked, index_set, batch, True, sink))):
        rows[name] = alternate(floor, run, args.pairs, args.warmup)
        print(name, json.dumps({key: value for key, value in rows[name].items() if key != "raw"}), flush=True)

    memory = {}
    for config in ("floor", "capture", "kfac"):
        cmd = [sys.executable, "-m", __spec__.name, "--child", config, "--k", str(args.k), "--batch", str(args.batch),
               "--tokens", str(args.tokens), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory[config] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(memory[config]), flush=True)

    # curvature: the Gram's Cholesky against kfac's (forming K_S, then the same Cholesky)
    grads, factors = sink["grads"], sink["factors"]
    slices = block_slices(index_set, "layer")
    clock = time.perf_counter()
    factorize_(GramSums(slices).add(grads))
    gauss_newton_s = time.perf_counter() - clock
    clock = time.perf_counter()
    factorize_(factors.curvature_sums(GramSums(slices).add(grads)))
    kfac_s = time.perf_counter() - clock

    # calibration: K_S against the Gram of the same examples, per factored tensor
    gram = GramSums(slices).add(grads)
    trace_ratio, relative = [], []
    for name, block in zip(index_set.names, gram.blocks):
        if name not in factors.tensors or float(torch.trace(block)) == 0:
            continue
        k_block = factors.tensors[name].block_sum(factors.count)
        trace_ratio.append(float(torch.trace(k_block) / torch.trace(block)))
        relative.append(float(torch.linalg.norm(k_block - block) / torch.linalg.norm(block)))
    quartiles = lambda xs: [round(q, 3) for q in statistics.quantiles(xs, n=4)]  # noqa: E731
    summary = {
        "k": args.k, "batch": f"{args.batch}x{args.tokens}",
        "capture_ratio": round(rows["capture"]["ratio"], 3), "kfac_ratio": round(rows["kfac"]["ratio"], 3),
        "capture_s": round(rows["capture"]["cand_s"], 3), "kfac_s": round(rows["kfac"]["cand_s"], 3),
        "peak_mib": {c: round(m["peak_kib"] / 1024) for c, m in memory.items()},
        "factorize_s": {"gauss_newton": round(gauss_newton_s, 3), "kfac": round(kfac_s, 3)},
        "gram_fallback": factors.gram_fallback,
        "trace_ratio_quartiles": quartiles(trace_ratio), "relative_frobenius_quartiles": quartiles(relative),
        "tensors": len(trace_ratio), "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
