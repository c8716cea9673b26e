"""Reducer and scoring memory (issue 15): per-process peak memory of the real Reducer actor and the real
scoring tasks on a 1B-Llama-like block layout, against the bytes of the curvature they hold.

What runs is the job's own curvature-and-scoring stage, nothing mocked:
  1. synthetic gradient chunks committed in the run-directory format by the runtime's own writer
     (`distinf.runtime.ledger.commit_chunk` on `distinf.tables.gradient_table`), a few train chunks and one
     query chunk, k columns split into blocks by the job's own rule (`draw_index_set` with stratified
     allocation over a TinyLlama-shaped parameter list, then `block_slices(..., "layer")`);
  2. a local Ray (`ray.init(num_cpus=2, include_dashboard=False)`), the `Reducer` actor started as
     the driver starts it, `reduce` on those chunks (Gram sums by its tasks, damping, Cholesky,
     curvature/blocks.safetensors, preconditioned queries), then `distinf.runtime.reduce_score.score_outputs`
     (one scoring task per train chunk, top-K and train values written).

A thread samples every process whose /proc/PID/cmdline starts with "ray::" twice a second (only
descendants of this process, so not another Ray running on the machine): VmHWM,
VmRSS, RssAnon (private memory) and RssShmem (pages of Ray's shared-memory object store this process
has mapped and touched; shared, counted once on the machine however many processes map them). Ray
reuses worker processes across tasks, so when a process's title changes (`ray::chunk_gram` ->
`ray::IDLE` -> `ray::score_train_chunk`) the peak VmHWM seen so far is booked to the old title and the
kernel's peak is reset (`/proc/PID/clear_refs` = 5); the first half second of the new title is then
booked to it via its sampled RSS. Rows are per title (the role), the maximum over its processes.

    .venv/bin/python -m benchmarks.memory.reducer_memory --label after --out benchmarks/RESULTS.md

The same script on the code before the change (commit b8c0f65), from a worktree of it:

    git worktree add /tmp/before b8c0f65 && mkdir -p /tmp/before/benchmarks/memory && cp benchmarks/_harness.py /tmp/before/benchmarks/ && cp benchmarks/memory/reducer_memory.py /tmp/before/benchmarks/memory/
    cd /tmp/before && PYTHONPATH=$PWD /work/main/.venv/bin/python -m benchmarks.memory.reducer_memory --label before

The default layout: vocab 49,152, hidden 2,048, intermediate 5,632, 22 layers, 32 heads of which 4
key/value (1.17B parameters, embedding and lm_head untied), k = 65,536: 201 blocks, the two largest
(embedding, lm_head) 5,637 columns each, curvature Σ k_l² × 8 bytes = 714 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import _harness  # noqa: E402,F401  (the offline environment, before transformers loads)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from distinf.config import HessianConfig, ScoringConfig  # noqa: E402
from distinf.core.curvature import block_slices  # noqa: E402
from distinf.core.index_set import draw_index_set  # noqa: E402
from distinf.runtime.ledger import commit_chunk  # noqa: E402
from distinf.runtime.reduce_score import chunk_files, score_outputs  # noqa: E402
from distinf.runtime.reducer import Reducer  # noqa: E402
from distinf.runtime.workers import WORKER_ENV  # noqa: E402
from distinf.store import read_arrays  # noqa: E402
from distinf.tables import gradient_table  # noqa: E402
from benchmarks.record import publish  # noqa: E402

MIB = 1024 * 1024
FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssShmem")


def llama_shapes(vocab: int, hidden: int, intermediate: int, layers: int, heads: int,
                 kv_heads: int) -> list[tuple[str, tuple[int, ...]]]:
    """named_parameters() order and shapes of a Llama decoder with untied embeddings."""
    kv = kv_heads * (hidden // heads)
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                   (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate)),
                   (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


class Sampler(threading.Thread):
    """Peak memory of every ray:: process, booked per (pid, title)."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self.stopped = threading.Event()
        self.title: dict[int, str] = {}
        self.peaks: dict[tuple[int, str], dict[str, int]] = {}
        self.shm_peak = 0
        self.resets = 0
        self.root = os.getpid()
        self.started = time.perf_counter()
        self.trace: list[tuple[float, str, int, int, int]] = []  # (s, title, VmRSS, RssAnon, RssShmem) of the reducer

    @staticmethod
    def _parent(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("PPid:"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return 0

    def _ours(self, pid: int) -> bool:
        """A descendant of this process: our Ray's raylet and its workers, not another user's Ray."""
        while pid > 1:
            if pid == self.root:
                return True
            pid = self._parent(pid)
        return False

    @staticmethod
    def _status(pid: str) -> dict[str, int] | None:
        try:
            values = {}
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    key, _, rest = line.partition(":")
                    if key in FIELDS:
                        values[key] = int(rest.split()[0])  # kB
            return values
        except (OSError, ValueError, IndexError):
            return None

    def sample(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    cmdline = handle.read()
            except OSError:
                continue
            if not cmdline.startswith(b"ray::") or not self._ours(int(pid)):
                continue
            title = cmdline.split(b"\0")[0].decode(errors="replace").strip()
            status = self._status(pid)
            if status is None:
                continue
            key = int(pid)
            old = self.title.get(key)
            if old not in (None, title):
                # A new task in a reused worker: book the HWM so far to the old title, restart the peak.
                booked = self.peaks[(key, old)]
                booked["VmHWM"] = max(booked["VmHWM"], status["VmHWM"])
                try:
                    with open(f"/proc/{pid}/clear_refs", "w") as handle:
                        handle.write("5")
                    self.resets += 1
                    status["VmHWM"] = status["VmRSS"]
                except OSError:
                    pass
            self.title[key] = title
            if "Reducer" in title:
                self.trace.append((round(time.perf_counter() - self.started, 2), title, status["VmRSS"] // 1024,
                                   status["RssAnon"] // 1024, status["RssShmem"] // 1024))
            peak = self.peaks.setdefault((key, title), dict.fromkeys(FIELDS, 0))
            for name, value in status.items():
                peak[name] = max(peak[name], value)
        try:
            self.shm_peak = max(self.shm_peak, shutil.disk_usage("/dev/shm").used)
        except OSError:
            pass

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(self.interval)
        self.sample()

    def stop(self) -> None:
        self.stopped.set()
        self.join()

    def by_title(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        for (pid, title), peak in self.peaks.items():
            row = rows.setdefault(title, {"processes": 0, **dict.fromkeys(FIELDS, 0)})
            row["processes"] += 1
            for name in FIELDS:
                row[name] = max(row[name], peak[name])
        return rows


def write_chunks(run_dir: Path, k: int, train_chunks: int, rows: int, queries: int, seed: int):
    """Committed chunks as the workers commit them: (path, sha256) lists of train and queries."""
    rng = np.random.default_rng(seed)
    records: dict[str, list[dict]] = {"train": [], "queries": []}
    for split, count, n in (("train", train_chunks, rows), ("queries", 1, queries)):
        for c in range(count):
            ids = [f"{split}-{c}-{i}" for i in range(n)]
            grads = rng.standard_normal((n, k), dtype=np.float32) * np.float32(1e-2)
            losses = rng.random(n, dtype=np.float32) + 1
            records[split].append(commit_chunk(run_dir, split, 0, c, ids, gradient_table(ids, losses, grads), []))
    return chunk_files(run_dir, records["train"]), chunk_files(run_dir, records["queries"])


def run(args) -> dict:
    shapes = llama_shapes(args.vocab, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads)
    index_set = draw_index_set(shapes, args.k, seed=0)
    slices = block_slices(index_set, "layer")
    curvature_bytes = 8 * sum((s.stop - s.start) ** 2 for s in slices)
    run_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="reducer_memory-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    train, queries = write_chunks(run_dir, index_set.k, args.train_chunks, args.rows, args.queries, args.seed)
    chunk_bytes = max(os.path.getsize(path) for path, _ in train)
    wrote = time.perf_counter() - clock

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    sampler = Sampler(args.interval)
    sampler.start()
    try:
        clock = time.perf_counter()
        reducer = Reducer.options(runtime_env={"env_vars": WORKER_ENV}).remote(
            slices, HessianConfig(method="gauss_newton", blocks="layer").model_dump())
        reduced = ray.get(reducer.reduce.remote(train, queries, str(run_dir / "curvature"), 0))
        reduce_s = time.perf_counter() - clock
        clock = time.perf_counter()
        cfg = argparse.Namespace(scoring=ScoringConfig(top_k=10, dense=False, self_influence=True))
        query_ids = reduced["query_ids"]
        score_outputs(cfg, run_dir, train, reduced["queries"][0], reduced["curvature"][0], query_ids, query_ids)
        score_s = time.perf_counter() - clock
        ray.kill(reducer)
        time.sleep(1.0)
    finally:
        sampler.stop()
        ray.shutdown()

    arrays = read_arrays(run_dir / "curvature" / "blocks.safetensors")
    result = {
        "label": args.label,
        "k": index_set.k, "blocks": len(slices), "largest_block": max(s.stop - s.start for s in slices),
        "params": sum(int(np.prod(shape)) for _, shape in shapes),
        "curvature_bytes": curvature_bytes, "train_chunks": args.train_chunks, "rows": args.rows,
        "queries": args.queries, "chunk_bytes": chunk_bytes,
        "write_s": round(wrote, 1), "reduce_s": round(reduce_s, 1), "score_s": round(score_s, 1),
        "shm_peak": sampler.shm_peak, "clear_refs_resets": sampler.resets,
        "titles": sampler.by_title(),
        "reducer_trace_mib": sampler.trace,
        "blocks_file": {"names": len(arrays), "bytes": os.path.getsize(run_dir / "curvature" / "blocks.safetensors")},
        "run_dir": str(run_dir) if args.keep else None,
    }
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def table(result: dict) -> str:
    curvature = result["curvature_bytes"] / MIB
    lines = [
        f"**{result['label']}**: curvature Σ k_l² × 8 = {curvature:,.0f} MiB ({result['blocks']} blocks, largest "
        f"{result['largest_block']:,} columns); train chunk {result['chunk_bytes'] / MIB:,.0f} MiB "
        f"({result['train_chunks']} × {result['rows']} rows), Q [k, {result['queries']}] "
        f"{8 * result['k'] * result['queries'] / MIB:,.0f} MiB; reduce {result['reduce_s']} s, scoring "
        f"{result['score_s']} s; object store (/dev/shm used) peak {result['shm_peak'] / MIB:,.0f} MiB.",
        "",
        "| process (title) | processes | peak VmHWM MiB | × curvature | peak VmRSS | peak RssAnon | peak RssShmem |",
        "|---|---|---|---|---|---|---|",
    ]
    for title, row in sorted(result["titles"].items()):
        hwm = row["VmHWM"] / 1024
        lines.append(f"| `{title}` | {row['processes']} | {hwm:,.0f} | {hwm / curvature:.1f} | "
                     f"{row['VmRSS'] / 1024:,.0f} | {row['RssAnon'] / 1024:,.0f} | {row['RssShmem'] / 1024:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="run")
    parser.add_argument("--k", type=int, default=65536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--train-chunks", type=int, default=4)
    parser.add_argument("--rows", type=int, default=128, help="examples per train chunk")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--keep", default=None, help="write the run here and keep it (to compare outputs)")
    parser.add_argument("--json", default=None, help="also write the raw result here")
    parser.add_argument("--out", default=None, help="append the table to this file (benchmarks/RESULTS.md)")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({key: value for key, value in result.items() if key not in ("titles", "reducer_trace_mib")},
                     indent=2))
    publish(table(result), args.out)


if __name__ == "__main__":
    main()
