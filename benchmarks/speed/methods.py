"""The paper's comparison systems on SmolLM2-135M: compression cost (Table 11) and solve cost (Table 10).

Compression, at the same k for every method (default 8192, each tensor's share k_l as the
stratified allocation gives it), on one batch of N x T real tokens (default 4 x 64):
  floor     plain forward + backward with frozen weights (no gradient method can be cheaper)
  dropout   GradientCapture with the shared index set (distinf's default)
  logra     the Kronecker projection from layer inputs and output gradients
  none      the whole per-example gradient, k = p (the compression step of "Orig")
  fjlt      whole per-example gradients, then the randomised Hadamard transform per tensor
Each round runs every method once on the same batch, each right after a floor run of its own
(a pair), the methods in an order rotated from round to round; the floor row pairs the floor with
itself (the calibration: ideally 1.00). The table gives the median over rounds of each method's
seconds, of its ratio to its paired floor, and of its ratio to dropout in the same round. Times
are wall seconds; the CPU
seconds of this process (all threads) are listed too: when the shared machine is loaded, both
grow (the thread pools spin while they wait for a core), so compare ratios within a round.

gaussian and pca cannot run whole here. gaussian draws Σ_l k_l·p_l normals per batch (its matrix
is never stored) and pca's map holds Σ_l k_l·p_l floats; both are timed on the tensors of one
decoder layer (their own k_l of the whole-model allocation, synthetic [N, p_l] gradients) and
extrapolated linearly in k_l·p_l, then added to `none`'s measured capture (which forms the
per-example gradients both start from).

Peak memory: each method alone in a fresh subprocess (model load, batch, one batch):
the increase of the peak RSS (VmHWM, reset after loading) over the RSS after loading, over one
batch (the first: buffers and caches included).

Solve (hessian.method), at the same k on n training and m query gradients laid out as the
dropout index set lays them out (random values: the cost depends on the shapes alone): fit +
preconditioning of the m queries, blocks layer and full, methods alternated per round, median.

    .venv/bin/python -m benchmarks.speed.methods --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path


from benchmarks._harness import (  # noqa: E402  (sets the offline environment before transformers loads)
    Clock, load_causal_lm, machine, reset_peak_rss, status_kib, token_stream,
)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from distinf.assets import demo_corpus, smollm2_dir  # noqa: E402
from distinf.core.capture import GradientCapture  # noqa: E402
from distinf.core.compressors import build_compressor  # noqa: E402
from distinf.core.compressors.gaussian import GaussianCompressor  # noqa: E402
from distinf.core.compressors.none import human_bytes  # noqa: E402
from distinf.core.compressors.pca import fit_bytes  # noqa: E402
from distinf.core.curvature import block_slices  # noqa: E402
from distinf.core.curvatures import fit_solver  # noqa: E402
from distinf.core.tasks import causal_lm_losses  # noqa: E402
from distinf.core.tracking import track_modules  # noqa: E402
from benchmarks.record import publish  # noqa: E402

CAPTURED = ("dropout", "logra", "none", "fjlt")
SOLVERS = ("gauss_newton", "identity", "datainf", "lissa")
SUBSET = r"model\.layers\.0\..*"  # the tensors gaussian and pca are timed on


def load_model() -> nn.Module:
    return load_causal_lm(smollm2_dir()).requires_grad_(True)


def batches(count: int, size: int, tokens: int) -> list[dict[str, Tensor]]:
    """`count` batches of size x tokens of packed real text."""
    ids = torch.tensor(token_stream(smollm2_dir(), demo_corpus()[0], count * size * tokens)).view(count, size, tokens)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids]


def floor_seconds(model: nn.Module, batch: dict[str, Tensor]) -> Clock:
    for param in model.parameters():
        param.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        with Clock() as clock:
            causal_lm_losses(model, batch).sum().backward()
        return clock
    finally:
        handle.remove()
        for param in model.parameters():
            param.requires_grad_(True)


def capture_seconds(capture: GradientCapture, batch: dict[str, Tensor]) -> Clock:
    with capture, Clock() as clock:
        capture.batch(batch, causal_lm_losses)
    return clock


def subset_projection(model: nn.Module, method: str, k: int, size: int, repeats: int) -> dict:
    """Seconds of gaussian's or pca's projection over the SUBSET tensors, and Σ k_l·p_l there and in all."""
    import re

    tracked = track_modules(model)
    gauss = GaussianCompressor(tracked.param_shapes, k)
    sizes = dict(zip(gauss.layout.names, gauss.layout.sizes))
    shapes = dict(tracked.param_shapes)
    names = [n for n in sizes if re.fullmatch(SUBSET, n.rsplit(".", 1)[0])]
    total = sum(sizes[n] * math.prod(shapes[n]) for n in sizes)
    part = sum(sizes[n] * math.prod(shapes[n]) for n in names)
    grads = {n: torch.randn(size, math.prod(shapes[n])) for n in names}
    maps = {n: torch.randn(sizes[n], math.prod(shapes[n])) for n in names} if method == "pca" else {}
    seconds = []
    for _ in range(repeats):
        with Clock() as clock:
            for n in names:
                if method == "gaussian":
                    gauss.project(n, grads[n])
                else:  # pca applies a stored k_l x p_l map: the matmul alone
                    grads[n] @ maps[n].T
        seconds.append(clock.wall)
    return {"seconds": statistics.median(seconds), "units": part, "total_units": total, "tensors": len(names)}


def compression_rounds(model: nn.Module, batch: dict[str, Tensor], k: int, rounds: int, warmup: int) -> dict:
    tracked = track_modules(model)
    captures = {m: GradientCapture(model, tracked, build_compressor(tracked, m, k)) for m in CAPTURED}
    times: dict[str, list[Clock]] = {m: [] for m in ("floor", *CAPTURED)}
    floors: dict[str, list[Clock]] = {m: [] for m in ("floor", *CAPTURED)}  # each run's paired floor
    ks = {m: c.layout.k for m, c in captures.items()}
    order = ("floor", *CAPTURED)
    for r in range(warmup + rounds):
        row = {}
        for i in range(len(order)):
            method = order[(r + i) % len(order)]
            before = floor_seconds(model, batch)
            row[method] = (before, floor_seconds(model, batch) if method == "floor"
                           else capture_seconds(captures[method], batch))
            gc.collect()
        print(json.dumps({"round": r, **{m: [round(f.wall, 2), round(c.wall, 2)] for m, (f, c) in row.items()}}),
              flush=True)
        if r >= warmup:
            for m, (f, c) in row.items():
                floors[m].append(f)
                times[m].append(c)
    return {"times": times, "floors": floors, "k": ks, "p": tracked.tracked_numel}


def solve_rounds(model: nn.Module, k: int, n: int, m: int, rounds: int) -> dict:
    compressor = build_compressor(track_modules(model), "dropout", k)
    g = torch.randn(n + m, compressor.layout.k, generator=torch.Generator().manual_seed(0))
    train, queries = g[:n], g[n:]
    ids = [str(i) for i in range(n)]
    result = {}
    for blocks in ("layer", "full"):
        slices = block_slices(compressor.layout, blocks)
        times: dict[str, list[float]] = {s: [] for s in SOLVERS}
        for _ in range(rounds):
            for method in SOLVERS:
                with Clock() as clock:
                    solver = fit_solver(method, slices, train, "auto", ids)
                    solver.precondition(queries)
                times[method].append(clock.wall)
        result[blocks] = {s: statistics.median(t) for s, t in times.items()}
        result[blocks]["blocks"] = len(slices)
        print(json.dumps({"solve": blocks, **result[blocks]}), flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# Peak memory, one method per subprocess


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = load_model()
    batch = batches(1, args.batch, args.tokens)[0]
    tracked = track_modules(model)
    if args.child in CAPTURED:
        capture = GradientCapture(model, tracked, build_compressor(tracked, args.child, args.k))
        run = lambda: capture_seconds(capture, batch)  # noqa: E731
    elif args.child == "floor":
        run = lambda: floor_seconds(model, batch)  # noqa: E731
    else:
        run = lambda: subset_projection(model, args.child, args.k, args.batch, 1)  # noqa: E731
    gc.collect()
    reset_peak_rss()  # the model load's peak would mask the run's
    base = status_kib("VmRSS")
    run()  # one batch: its peak is the method's peak
    print(json.dumps({"method": args.child, "base_kib": base, "peak_kib": status_kib("VmHWM")}))


def memory_of(method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", __spec__.name, "--child", method, "--k", str(args.k), "--batch", str(args.batch),
           "--tokens", str(args.tokens), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"method": method, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Report


def machine_line(threads: int) -> str:
    info = machine()
    return (f"nproc={info['nproc']}, CPU {info['cpu']}, torch {info['torch']} with {threads} threads, "
            f"Python {info['python']}")


def report(args: argparse.Namespace, comp: dict, subsets: dict, mem: dict, solve: dict, facts: dict,
           minutes: float) -> str:
    n, cpu = args.batch, {m: [c.cpu for c in cs] for m, cs in comp["times"].items()}
    times = {m: [c.wall for c in cs] for m, cs in comp["times"].items()}
    floor = times["floor"]
    paired = {m: [f.wall for f in fs] for m, fs in comp["floors"].items()}
    ratio = {m: statistics.median([s / f for s, f in zip(times[m], paired[m])]) for m in ("floor", *CAPTURED)}
    to_drop = {m: statistics.median([s / d for s, d in zip(times[m], times["dropout"])]) for m in ("floor", *CAPTURED)}
    lines = [
        f"Command: `.venv/bin/python -m benchmarks.speed.methods{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`",
        f"Machine: {machine_line(args.threads)}. SmolLM2-135M-Instruct (float32), {comp['p']:,} tracked parameters; "
        f"one batch of {args.batch} x {args.tokens} tokens of real text (demo corpus); k = {args.k}; "
        f"{args.rounds} timed rounds after {args.warmup} warm-up round(s). Total wall time {minutes:.1f} min.",
        "",
        "Compression (the paper's Table 11 reports, per method, seconds to compress all gradients: GPT-2 "
        "FJLT 453.87 s against dropout 9.76 s, a 46x ratio):",
        "",
        "| method | k | s / batch | s / example | CPU s / batch | ratio to floor | ratio to dropout | "
        "peak RSS increase |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def mem_cell(method: str) -> str:
        m = mem.get(method)
        if not m:
            return "–"
        if "error" in m:
            return f"failed: {m['error'][:60]}"
        return human_bytes((m["peak_kib"] - m["base_kib"]) * 1024)

    f_med = statistics.median(floor)
    drop = statistics.median(times["dropout"])
    lines.append(f"| floor (forward + backward, frozen weights) | – | {f_med:.2f} | {f_med / n:.2f} | "
                 f"{statistics.median(cpu['floor']):.2f} | {ratio['floor']:.2f} | {to_drop['floor']:.2f} | "
                 f"{mem_cell('floor')} |")
    for m in CAPTURED:
        s = statistics.median(times[m])
        lines.append(f"| {m} | {comp['k'][m]:,} | {s:.2f} | {s / n:.2f} | {statistics.median(cpu[m]):.2f} | "
                     f"{ratio[m]:.2f} | {to_drop[m]:.2f} | {mem_cell(m)} |")
    none_s = statistics.median(times["none"])
    for m, sub in subsets.items():
        scale = sub["total_units"] / sub["units"]
        whole = none_s + sub["seconds"] * scale
        lines.append(f"| {m} (extrapolated, see below) | {args.k:,} | {whole:.0f} | {whole / n:.1f} | – | "
                     f"{whole / f_med:.0f} | {whole / drop:.0f} | {mem_cell(m)} (layer 0 only) |")
    lines.append("")
    for m, sub in subsets.items():
        what = ("draws its N(0, 1/k_l) blocks from the seed and multiplies" if m == "gaussian"
                else "multiplies by a stored k_l x p_l map (the fit not counted)")
        lines.append(
            f"{m}: {what}; on the {sub['tensors']} tensors of decoder layer 0 (Σ k_l·p_l = {sub['units']:.3g}) it took "
            f"{sub['seconds']:.2f} s per batch; the whole model has Σ k_l·p_l = {sub['total_units']:.3g} "
            f"({sub['total_units'] / sub['units']:.0f}x), so ≈ {sub['seconds'] * sub['total_units'] / sub['units']:.0f} s "
            f"per batch of projection on top of none's {none_s:.2f} s capture "
            f"(≈ {(none_s + sub['seconds'] * sub['total_units'] / sub['units']) / drop:.0f}x dropout).")
    lines.append(
        f"pca cannot run at this size here: its map alone is Σ k_l·p_l·4 bytes = {human_bytes(facts['pca_map'])}, "
        f"and its fit for n = {facts['n_fit']:,} training examples needs {human_bytes(facts['pca_fit'])} in all "
        "(distinf refuses it up front with that estimate). none runs as a compression (its [N, p] output is "
        f"{human_bytes(4 * args.batch * comp['p'])} per batch) but not as an influence computation: its "
        f"gauss_newton blocks (layer) would need {human_bytes(facts['none_blocks'])} besides n·p·4 bytes of "
        "gradients, which distinf checks and refuses with those numbers.")
    lines += [
        "",
        f"Solve (the paper's Table 10: iHVP seconds, e.g. QNLI rank 8: LiSSA 83.76, DataInf 13.38, dropout + "
        f"exact 4.83): n = {args.solve_n} training and m = {args.solve_m} query gradients at k = {args.k} "
        f"in the dropout layout, fit + preconditioning the queries, seconds, median of {args.solve_rounds} rounds:",
        "",
        "| hessian.method | blocks: layer (" + str(solve['layer']['blocks']) + " blocks) | blocks: full (1 block) |",
        "|---|---|---|",
    ]
    for s in SOLVERS:
        note = " (10 iterations, batch 16)" if s == "lissa" else ""
        lines.append(f"| {s}{note} | {solve['layer'][s]:.3f} s | {solve['full'][s]:.3f} s |")
    return "\n".join(lines)


def size_facts(shapes: list[tuple[str, tuple[int, ...]]], k: int, n_fit: int = 1000) -> dict:
    """What pca and none would hold for the whole model: the numbers their refusals quote."""
    gauss = GaussianCompressor(shapes, k)
    return {
        "pca_map": 4 * sum(k_l * math.prod(s) for k_l, s in zip(gauss.layout.sizes, gauss.layout.shapes)),
        "pca_fit": fit_bytes(list(gauss.layout.shapes), list(gauss.layout.sizes), n_fit),
        "n_fit": n_fit,
        "none_blocks": 16 * sum(math.prod(shape) ** 2 for _, shape in shapes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timed compression rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--subset-repeats", type=int, default=3)
    parser.add_argument("--solve-n", type=int, default=64)
    parser.add_argument("--solve-m", type=int, default=8)
    parser.add_argument("--solve-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="append the section to this markdown file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_model()
    facts = size_facts(track_modules(model).param_shapes, args.k)
    batch = batches(1, args.batch, args.tokens)[0]
    comp = compression_rounds(model, batch, args.k, args.rounds, args.warmup)
    subsets = {}
    for method in ("gaussian", "pca"):
        subsets[method] = subset_projection(model, method, args.k, args.batch, args.subset_repeats)
        print(json.dumps({"subset": method, **subsets[method]}), flush=True)
    solve = solve_rounds(model, args.k, args.solve_n, args.solve_m, args.solve_rounds)
    del model
    gc.collect()
    mem = {}
    if not args.no_memory:
        for method in ("floor", *CAPTURED, "gaussian"):
            mem[method] = memory_of(method, args)
            print(json.dumps(mem[method]), flush=True)
    text = report(args, comp, subsets, mem, solve, facts, (time.perf_counter() - started) / 60)
    publish("## Comparison methods (issue 4)\n\n" + text, args.out)


if __name__ == "__main__":
    main()
