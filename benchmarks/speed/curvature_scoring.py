"""Curvature and scoring: factorisation time against k, scoring throughput, bytes per training example.

1. Factorisation. SmolLM2-135M's tracked tensors (shapes from its config, no weights loaded) give
   the stratified index set at each k; `blocks: layer` is one block per tensor (each tensor's
   share of k), `blocks: full` one k × k block. `GramSums.add` of n random gradient rows, then
   `factorize` (damping auto, float64 Cholesky), timed several times; the values do not change
   the work. One `blocks: full` factorisation holds about 4 k × k float64 matrices at once (the
   Gram sum, Gram / n, the damped identity, their sum or the factor), so above --max-full-k only
   the Cholesky itself is timed on a matrix formed in place (2 k × k matrices), and sizes that
   would pass --memory-gib are estimated from the measured k³ scaling instead.
2. Scoring. n training × m query gradients at k (random, float32) written as Parquet chunks of
   --chunk rows by the run-directory writer; the queries preconditioned by a `blocks: layer`
   curvature (timed), then every chunk scored by the body of the Ray scoring task
   (`distinf.runtime.scoring.score_train_chunk`: verified read, scores, top-K, mean, self-influence)
   in this process with the threads of one task; train × query pairs per second.
3. Bytes per training example. The demo job (SmolLM2-135M, 2 workers, ZeRO-3) at k run for real
   with `output.gradient_dtype` float32 and float16: the train gradient files' bytes / rows.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.speed.curvature_scoring --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._harness import machine  # noqa: E402  (the offline environment, before transformers loads)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from distinf.assets import smollm2_dir  # noqa: E402
from distinf.core.curvature import GramSums, block_slices, factorize, precondition  # noqa: E402
from distinf.core.index_set import draw_index_set  # noqa: E402
from distinf.core.tracking import track_modules  # noqa: E402
from distinf.runtime.scoring import score_train_chunk  # noqa: E402
from distinf.store import commit_table  # noqa: E402
from distinf.tables import gradient_table  # noqa: E402
from benchmarks.record import publish  # noqa: E402

GIB = 1024**3


def smollm2_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of SmolLM2-135M's tracked tensors, from a weightless (meta) model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_dir()))
    return track_modules(model).param_shapes


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def timed_both(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds: CPU time is the less disturbed when others share the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


# ---------------------------------------------------------------------------------------------
# 1. Factorisation


def factorisation_row(shapes, k: int, blocks: str, rows: int, reps: int) -> dict:
    slices = block_slices(draw_index_set(shapes, k, 0), blocks)
    grads = torch.randn(rows, k, generator=torch.Generator().manual_seed(k))
    sums = GramSums(slices)
    gram_s = timed(lambda: sums.add(grads))
    both = [timed_both(lambda: factorize(sums)) for _ in range(reps)]
    times = [w for w, _ in both]
    return {"k": k, "blocks": blocks, "num_blocks": len(slices), "largest": max(s.stop - s.start for s in slices),
            "how": "factorize", "gram_s": gram_s, "rows": rows, "times": times, "median": statistics.median(times),
            "cpu": statistics.median(c for _, c in both)}


def cholesky_only_row(k: int, rows: int, reps: int) -> dict:
    """One damped k × k Gram formed in place and factorised: what factorize would spend in LAPACK."""
    times, cpu = [], []
    for _ in range(reps):
        g = torch.randn(rows, k, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        hessian = g.T @ g / rows
        hessian.diagonal().add_(0.1 * float(hessian.diagonal().mean()))
        del g
        wall, used = timed_both(lambda: torch.linalg.cholesky_ex(hessian))
        times.append(wall)
        cpu.append(used)
        del hessian
    return {"k": k, "blocks": "full", "num_blocks": 1, "largest": k, "how": "Cholesky only (2 k × k in memory)",
            "gram_s": None, "rows": rows, "times": times, "median": statistics.median(times),
            "cpu": statistics.median(cpu)}


def factorisation(args: argparse.Namespace, shapes) -> list[dict]:
    out = []
    budget = args.memory_gib * GIB
    for blocks in ("layer", "full"):
        for k in args.ks:
            matrix = k * k * 8  # one k x k float64
            if blocks == "layer" or (k <= args.max_full_k and 4 * matrix <= budget):
                row = factorisation_row(shapes, k, blocks, args.gram_rows, args.reps)
            elif 2 * matrix <= budget:
                row = cholesky_only_row(k, args.gram_rows, args.reps)
            else:
                ref = next((r for r in reversed(out) if r["blocks"] == "full" and r["times"]), None)
                if ref is None:
                    continue
                # Cholesky is k³/3 flops: scale the largest measured size.
                row = {"k": k, "blocks": "full", "num_blocks": 1, "largest": k,
                       "how": f"estimated from k={ref['k']:,} × (k/{ref['k']:,})³; needs {2 * matrix / GIB:.0f} GiB",
                       "gram_s": None, "rows": args.gram_rows, "times": [],
                       "median": ref["median"] * (k / ref["k"]) ** 3, "cpu": ref["cpu"] * (k / ref["k"]) ** 3}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def factorisation_table(rows: list[dict]) -> str:
    lines = ["| blocks | k | blocks (largest) | what was timed | factorisation wall s, median (min–max) "
             "| CPU s, median | Gram accumulation, examples/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" ({min(r['times']):.3f}–{max(r['times']):.3f})" if r["times"] else ""
        gram = f"{r['rows'] / r['gram_s']:,.0f}" if r["gram_s"] else "–"
        lines.append(f"| {r['blocks']} | {r['k']:,} | {r['num_blocks']} ({r['largest']:,}) | {r['how']} "
                     f"| {r['median']:.3f}{spread} | {r['cpu']:.3f} | {gram} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 2. Scoring


def scoring(args: argparse.Namespace, shapes) -> dict:
    k, n, m = args.score_k, args.train, args.queries
    index_set = draw_index_set(shapes, k, 0)
    slices = block_slices(index_set, "layer")
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="distinf-scoring-") as folder:
        chunks, write_s = [], 0.0
        for c, start in enumerate(range(0, n, args.chunk)):
            rows = min(args.chunk, n - start)
            grads = torch.randn(rows, k, generator=gen).numpy()
            table = gradient_table([f"t{start + i}" for i in range(rows)], grads[:, 0] ** 2, grads)
            path = Path(folder) / f"part-00000-{c:05d}.parquet"
            began = time.perf_counter()
            record = commit_table(table, path)
            write_s += time.perf_counter() - began
            chunks.append((str(path), record["sha256"]))
        sums = GramSums(slices).add(torch.randn(args.gram_rows, k, generator=gen))
        curvature = factorize(sums)
        queries = torch.randn(m, k, generator=gen)
        query_ids = [f"q{j}" for j in range(m)]
        precondition_s = timed(lambda: precondition(curvature, queries))
        preconditioned = precondition(curvature, queries).T.contiguous().numpy()  # Q [k, m]
        body = score_train_chunk._function  # the Ray task's body, run here with one task's threads
        def score_all() -> None:
            for path, sha256 in chunks:
                body(path, sha256, preconditioned, curvature, args.top_k, True, query_ids, None)

        both = [timed_both(score_all) for _ in range(args.reps)]
        passes = [w for w, _ in both]
        matmul = torch.randn(args.chunk, k, generator=gen).double()
        q64 = torch.from_numpy(preconditioned).double()
        matmul_s = statistics.median(timed(lambda: matmul @ q64) for _ in range(5))
    total = statistics.median(passes)
    return {"k": k, "train": n, "queries": m, "chunk": args.chunk, "chunks": len(chunks), "threads": torch.get_num_threads(),
            "write_s": write_s, "precondition_s": precondition_s, "passes": passes, "total_s": total,
            "cpu_s": statistics.median(c for _, c in both), "cpu_pairs_per_s": n * m / statistics.median(c for _, c in both),
            "pairs_per_s": n * m / total, "matmul_pairs_per_s": args.chunk * m / matmul_s}


# ---------------------------------------------------------------------------------------------
# 3. Bytes per example, from real runs of the demo job


def bytes_per_example(args: argparse.Namespace) -> list[dict]:
    from distinf.cli import main as distinf_main
    from distinf.config import load_job

    out = []
    for dtype in args.dtypes.split(","):
        with tempfile.TemporaryDirectory(prefix="distinf-bytes-") as folder:
            run = Path(folder) / "run"
            overrides = ["--set", f"compression.k={args.score_k}", "--set", f"output.gradient_dtype={dtype}"]
            if args.train_rows:  # the job's first rows only: bytes per row hardly depend on the count
                subset = Path(folder) / "train.parquet"
                pq.write_table(pq.read_table(load_job(args.job).data.train.path).slice(0, args.train_rows), subset)
                overrides += ["--set", f"data.train.path={subset}"]
            began = time.perf_counter()
            distinf_main(["run", str(args.job), "--output", str(run), *overrides])
            seconds = time.perf_counter() - began
            files = sorted((run / "gradients" / "train").glob("*.parquet"))
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
            size = sum(f.stat().st_size for f in files)
            meta = pq.ParquetFile(files[0]).metadata
            codecs = sorted({meta.row_group(g).column(c).compression for g in range(meta.num_row_groups)
                             for c in range(meta.num_columns)})
            width = 4 if dtype == "float32" else 2
            out.append({"dtype": dtype, "k": args.score_k, "rows": rows, "files": len(files), "bytes": size,
                        "per_example": size / rows, "raw_grad": args.score_k * width,
                        "codecs": codecs, "run_s": seconds, "what_if": rewritten_sizes(files, Path(folder))})
            print(json.dumps(out[-1]), flush=True)
    return out


# pyarrow's defaults (dictionary on, snappy) against writer options for the same rows.
WRITER_OPTIONS = {
    "no dictionary, snappy": dict(use_dictionary=False),
    "no dictionary, zstd": dict(use_dictionary=False, compression="zstd"),
    "byte_stream_split, zstd": dict(use_dictionary=False, compression="zstd",
                                    column_encoding={"grad.list.element": "BYTE_STREAM_SPLIT"}),
}


def rewritten_sizes(files: list[Path], folder: Path) -> dict[str, int]:
    """Total bytes of the same gradient files rewritten with each of WRITER_OPTIONS."""
    sizes = {}
    for name, options in WRITER_OPTIONS.items():
        total = 0
        for i, file in enumerate(files):
            target = folder / f"rewrite-{i}.parquet"
            pq.write_table(pq.read_table(file), target, **options)
            total += target.stat().st_size
        sizes[name] = total
    return sizes


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1024,4096,8192,16384,32768", help="k values for the factorisation")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (medians reported)")
    parser.add_argument("--gram-rows", type=int, default=256, help="random gradient rows in each Gram sum")
    parser.add_argument("--max-full-k", type=int, default=8192, help="largest k for a whole `factorize` of one full block")
    parser.add_argument("--memory-gib", type=float, default=5.0, help="no single step may need more than this")
    parser.add_argument("--score-k", type=int, default=8192, help="k for scoring and the bytes per example")
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--chunk", type=int, default=256, help="rows per gradient chunk (runtime.chunk_examples)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the factorisation (the reducer actor has 1)")
    parser.add_argument("--score-threads", type=int, default=1, help="torch threads for scoring (a Ray task has 1)")
    parser.add_argument("--job", type=Path, default=Path("jobs/demo.yaml"), help="job run for the bytes per example")
    parser.add_argument("--dtypes", default="float32,float16", help="output.gradient_dtype values for the bytes")
    parser.add_argument("--train-rows", type=int, default=None, help="run the job on its first N training rows")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: factorisation,scoring,bytes")
    parser.add_argument("--out", type=Path, default=None, help="append the markdown tables to this file")
    args = parser.parse_args()
    args.ks = [int(k) for k in args.ks.split(",") if k]
    skip = set(args.skip.split(","))

    started = time.perf_counter()
    info = machine()
    shapes = smollm2_shapes()
    text = [f"machine: nproc={info['nproc']}, CPU {info['cpu']} ({info['capability']}), torch {info['torch']}, "
            f"Python {info['python']}; SmolLM2-135M-Instruct's {len(shapes)} tracked tensors "
            f"({sum(torch.Size(s).numel() for _, s in shapes):,} parameters)."]
    if "factorisation" not in skip:
        torch.set_num_threads(args.threads)
        rows = factorisation(args, shapes)
        text += ["", f"Factorisation ({args.threads} torch threads; Gram of {args.gram_rows} random rows; "
                 f"{args.reps} repetitions):", "", factorisation_table(rows)]
    if "scoring" not in skip:
        torch.set_num_threads(args.score_threads)
        s = scoring(args, shapes)
        print(json.dumps(s), flush=True)
        text += ["", f"Scoring ({s['threads']} torch thread, as one Ray scoring task; k = {s['k']:,}, `blocks: layer`; "
                 f"{s['chunks']} chunks of {s['chunk']} rows; {args.reps} passes):", "",
                 "| train × queries | pairs | precondition the queries | score every chunk, median (min–max) "
                 "| train × query pairs/s (wall) | pairs per CPU second | the matmul alone, pairs/s | writing the chunks |",
                 "|---|---|---|---|---|---|---|---|",
                 f"| {s['train']:,} × {s['queries']:,} | {s['train'] * s['queries']:,} | {s['precondition_s']:.2f} s "
                 f"| {s['total_s']:.1f} s ({min(s['passes']):.1f}–{max(s['passes']):.1f}) | {s['pairs_per_s']:,.0f} "
                 f"| {s['cpu_pairs_per_s']:,.0f} | {s['matmul_pairs_per_s']:,.0f} | {s['write_s']:.1f} s |"]
    if "bytes" not in skip:
        b = bytes_per_example(args)
        text += ["", f"Bytes per training example (`{args.job}` run for real, 2 workers, k = {args.score_k:,}):", "",
                 "| output.gradient_dtype | train rows | files | bytes in gradients/train | bytes per example "
                 "| raw k × width | ratio | Parquet codec | run s | "
                 + " | ".join(f"rewritten: {name}, bytes per example (ratio)" for name in WRITER_OPTIONS) + " |",
                 "|---|---|---|---|---|---|---|---|---|" + "---|" * len(WRITER_OPTIONS)]
        for r in b:
            text.append(f"| {r['dtype']} | {r['rows']} | {r['files']} | {r['bytes']:,} | {r['per_example']:,.0f} "
                        f"| {r['raw_grad']:,} | {r['per_example'] / r['raw_grad']:.3f} | {', '.join(r['codecs'])} "
                        f"| {r['run_s']:.0f} | " + " | ".join(
                            f"{size / r['rows']:,.0f} ({size / r['rows'] / r['raw_grad']:.3f})"
                            for size in r["what_if"].values()) + " |")
    text += ["", f"Total {(time.perf_counter() - started) / 60:.1f} min."]
    report = "\n".join(text)
    publish(report, args.out)


if __name__ == "__main__":
    main()
