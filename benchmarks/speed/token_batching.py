"""Issue 31: steps grouped by length under a token budget, and chunk commits off the compute's path.

Padding: the fraction of computed tokens that are padding (a stand-in step's tokens count as
padding), for the old layout (consecutive batches of `--batch` examples, padding slots running
a real example) against length-grouped steps of `--batch` examples and against the token budget
`--tokens-per-step`, on the demo corpus (SmolLM2's tokenizer, max_length 48) and on a long-tailed
length mix (lognormal lengths, median 33 tokens, cut to 8..2048; lengths only, no model).

Throughput: the real job (`run_job`: Ray actors, ZeRO-3 over gloo, Parquet, reducer, scoring) on
the demo corpus with SmolLM2-135M, at each W of `--workers`, for each layout in one process (one
Ray). The gradient pass of the train split is timed on the driver from its dispatch to the last
committed chunk (model setup excluded); "before" replaces the driver's step planner by the old
consecutive layout. Each worker reports where its pass went (manifest `workers[].gradient_pass`):
seconds in steps, and seconds the compute waited on chunk commits (`runtime.commit_queue` 0: each
commit inline, as before; 1: on the writer thread).

    .venv/bin/python -m benchmarks.speed.token_batching --out benchmarks/RESULTS.md
    .venv/bin/python -m benchmarks.speed.token_batching --model tiny --train-per-source 8 --workers 2   # a check
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks import _harness  # noqa: E402,F401  (the offline environment, before transformers loads)

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from distinf.batching import chunk_steps, consecutive_steps, padded_tokens  # noqa: E402
from distinf.partition import chunk_plan  # noqa: E402

LAYOUTS = ("before", "by length", "token budget")


def padding_fraction(lengths: np.ndarray, world_size: int, batch: int, chunk_examples: int,
                     layout: str, tokens_per_step: int | None) -> tuple[float, int]:
    """(padding fraction of computed tokens, steps per rank) over a whole pass."""
    useful = computed = steps = 0
    for parts in chunk_plan(len(lengths), world_size, batch, chunk_examples):
        if layout == "before":
            planned = [consecutive_steps(part, batch) for part in parts]
        else:
            planned = chunk_steps(parts, lengths, batch, tokens_per_step if layout == "token budget" else None)
        steps += len(planned[0])
        for rank_steps in planned:
            u, c = padded_tokens(rank_steps, lengths)
            useful, computed = useful + u, computed + c
    return 1 - useful / computed, steps


def long_tailed_lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).lognormal(3.5, 1.0, n), 8, 2048).astype(int)


def consecutive_planner(cfg, data, parts):
    """The layout before length grouping: consecutive batches, padding slots included."""
    return [consecutive_steps(part, cfg.runtime.batch_size) for part in parts]


def job(root: Path, model_dir: Path, train: Path, queries: Path, workers: int, batch: int,
        tokens_per_step: int | None, commit_queue: int, args, k: int | None = None):
    from distinf.config import JobConfig

    return JobConfig.model_validate({
        "name": "token-batching",
        "model": {"path": str(model_dir), "task": "causal_lm", "dtype": args.dtype},
        "data": {"train": {"path": str(train), "id_column": "id"}, "queries": {"path": str(queries), "id_column": "id"},
                 "max_length": args.max_length},
        "compression": {"k": k or args.k, "seed": 0},
        "scoring": {"top_k": 5},
        "runtime": {"num_workers": workers, "batch_size": batch, "chunk_examples": args.chunk_examples,
                    "tokens_per_step": tokens_per_step, "commit_queue": commit_queue, "device": args.device},
        "output": {"path": str(root / "run")},
    })


def timed_pass(cfg, layout: str) -> dict:
    """The job once; seconds of the train split's gradient pass and each worker's timings."""
    import distinf.runtime.gradient_pass as gp
    from distinf.runtime.driver import run_job

    seconds = {}
    began = time.perf_counter()
    compress, planner = gp._compress, gp.planned_steps

    def timed(cfg, group, split, *args, **kwargs):
        began = time.perf_counter()
        out = compress(cfg, group, split, *args, **kwargs)
        seconds[split] = time.perf_counter() - began
        return out

    gp._compress = timed
    if layout == "before":
        gp.planned_steps = consecutive_planner
    try:
        manifest = run_job(cfg)
    finally:
        gp._compress, gp.planned_steps = compress, planner
    grads = pq.read_table(Path(cfg.output.path) / "gradients" / "train", columns=["example_id"]).num_rows
    return {"seconds": seconds["train"], "examples": grads, "job_seconds": time.perf_counter() - began,
            "workers": [w.get("gradient_pass", {}) for w in manifest["workers"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (SmolLM2-135M), tiny (a 2-layer GPT-2), or a shape of benchmarks/memory/scale.py "
                             "(llama-1b, llama-tiny: random weights, written once under the assets folder)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="model.dtype (default: bfloat16 on cuda, else float32)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    parser.add_argument("--train-per-source", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens-per-step", type=int, default=1024)
    parser.add_argument("--chunk-examples", type=int, default=64)
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--io-k", type=int, default=None,
                        help="also time the commits alone: length-grouped steps at this k, commit_queue 0 and 1, "
                             "at the first W")
    parser.add_argument("--assets", type=Path, default=None, help="DISTINF_ASSETS (benchmarks/speed/gpu_job.sh --prepare's copy)")
    parser.add_argument("--skip-jobs", action="store_true", help="padding fractions only")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out", type=Path, help="RESULTS.md to append a section to")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.assets is not None:
        os.environ["DISTINF_ASSETS"] = str(args.assets.resolve())

    from benchmarks.memory import scale

    root = Path(tempfile.mkdtemp(prefix="token-batching-"))
    train_t, query_t = scale.corpus(args.train_per_source)
    train, queries = root / "train.parquet", root / "queries.parquet"
    pq.write_table(train_t, train)
    pq.write_table(query_t, queries)
    if args.model == "smollm2":
        from distinf.assets import smollm2_dir
        model_dir = smollm2_dir()
    elif args.model == "tiny":
        _harness.import_test_helpers()
        import job_fixtures
        model_dir = job_fixtures.tiny_model_dir(root, "gpt2")
    else:
        import torch
        draw_on = "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
        model_dir = scale.random_llama(args.model, args.dtype, draw_on)

    from distinf.inputs import plan_job

    cfg = job(root, model_dir, train, queries, 2, args.batch, None, 2, args)
    demo = np.diff(plan_job(cfg).train.examples.offsets)
    tail = long_tailed_lengths(4096)
    results = {"padding": [], "jobs": []}
    for name, lengths, budget in ((f"demo corpus (max_length {args.max_length})", demo, args.tokens_per_step),
                                  ("long-tailed mix (8..2048)", tail, 2048), ("long-tailed mix (8..2048)", tail, 8192)):
        for world in (1, 2):
            for layout in LAYOUTS if budget != 8192 else LAYOUTS[2:]:
                fraction, steps = padding_fraction(lengths, world, args.batch, 256, layout, budget)
                results["padding"].append({"corpus": name, "W": world, "layout": layout, "n": len(lengths),
                                           "mean_len": float(lengths.mean()), "budget": budget,
                                           "padding": fraction, "steps_per_rank": steps})
                print(results["padding"][-1], flush=True)

    if not args.skip_jobs:
        import ray

        from distinf.runtime.workers import WORKER_ENV

        ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
        try:
            runs = [("before", None, 0), ("by length", None, 1), ("token budget", args.tokens_per_step, 1)]
            wanted = args.layouts.split(",")
            plan = [(world, *run, args.k) for world in args.workers for run in runs if run[0] in wanted]
            if args.io_k:
                plan += [(args.workers[0], "by length", None, queue, args.io_k) for queue in (0, 1)]
            for world, layout, budget, queue, k in plan:
                run_root = root / f"w{world}-{layout.replace(' ', '-')}-q{queue}-k{k}"
                cfg = job(run_root, model_dir, train, queries, world, args.batch, budget, queue, args, k)
                r = timed_pass(cfg, layout)
                r.update(W=world, layout=layout, tokens_per_step=budget, commit_queue=queue, k=k,
                         examples_per_s=r["examples"] / r["seconds"])
                results["jobs"].append(r)
                print(r, flush=True)
        finally:
            ray.shutdown()

    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.out:
        write_section(args, results)


def write_section(args, results: dict) -> None:
    from benchmarks.record import publish

    lines = ["## Token-budget steps and overlapped commits (issue 31)", "",
             f"Command: `.venv/bin/python -m benchmarks.speed.token_batching --model {args.model} --device {args.device} "
             f"--workers {' '.join(map(str, args.workers))} --train-per-source {args.train_per_source} "
             f"--max-length {args.max_length} --batch {args.batch} --tokens-per-step {args.tokens_per_step} "
             f"--chunk-examples {args.chunk_examples} --k {args.k}{f' --io-k {args.io_k}' if args.io_k else ''} "
             "--out benchmarks/RESULTS.md` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, nproc {os.cpu_count()}, "
             f"load average {os.getloadavg()[0]:.1f} at the end).", "",
             "Padding: fraction of computed tokens that are padding (chunks of 256, "
             f"batch {args.batch}; the budget per step in the column).", "",
             "| corpus | examples, mean tokens | W | layout | budget | steps per rank | padding |",
             "|---|---|---|---|---|---|---|"]
    for r in results["padding"]:
        budget = r["budget"] if r["layout"] == "token budget" else f"{args.batch} examples"
        lines.append(f"| {r['corpus']} | {r['n']}, {r['mean_len']:.1f} | {r['W']} | {r['layout']} | {budget} | "
                     f"{r['steps_per_rank']} | {r['padding']:.1%} |")
    if results["jobs"]:
        lines += ["", f"Gradient pass of the train split (the real job, demo corpus, {args.model} {args.dtype} on "
                  f"{args.device}): examples/s from dispatch to the last commit; whole job seconds; per rank, "
                  "seconds in steps and the compute's wait on chunk commits over the whole pass (train and "
                  "queries).", "",
                  "| W | layout | tokens_per_step | commit_queue | k | examples | pass s | examples/s | "
                  "vs before | job s | step s (per rank) | wait on commits s (per rank) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        before = {r["W"]: r["examples_per_s"] for r in results["jobs"] if r["layout"] == "before" and r["k"] == args.k}
        before = {w: before.get(w, float("nan")) for w in args.workers}
        for r in results["jobs"]:
            steps = ", ".join(f"{w.get('step_seconds', float('nan')):.1f}" for w in r["workers"])
            waits = ", ".join(f"{w.get('io_wait_seconds', float('nan')):.2f}" for w in r["workers"])
            lines.append(f"| {r['W']} | {r['layout']} | {r['tokens_per_step'] or '-'} | {r['commit_queue']} | {r['k']} | "
                         f"{r['examples']} | {r['seconds']:.1f} | {r['examples_per_s']:.1f} | "
                         f"{r['examples_per_s'] / before[r['W']]:.2f}x | {r['job_seconds']:.0f} | {steps} | {waits} |")
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
