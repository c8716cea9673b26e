"""The driver of `distinf run`: plan, gradient workers, reducer, scoring tasks, manifest last.

Scheduling only: the math lives in distinf.core and is reached through the worker, reducer and
scoring modules.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm

from distinf.config import JobConfig
from distinf.core.curvature import block_slices
from distinf.core.index_set import IndexSet
from distinf.core.scoring import TopK
from distinf.data import Tokenized, partition, read_table, tokenize
from distinf.models import load_tokenizer, model_fingerprint
from distinf.runtime.reducer import Reducer
from distinf.runtime.scoring import score_train_chunk
from distinf.runtime.worker import GradientWorker
from distinf.store import MANIFEST, atomic_write_json, atomic_write_table, list_chunks
from distinf.tables import top_k_table, train_values_table

WORKER_ENV = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false"}


class JobError(RuntimeError):
    pass


@dataclass
class Plan:
    train: Tokenized
    queries: Tokenized
    pad_token_id: int


def plan_job(cfg: JobConfig) -> Plan:
    """Read and tokenise the train and query sets; ids are checked unique per set."""
    tokenizer = load_tokenizer(cfg.model)
    num_labels = None
    if cfg.model.task == "sequence_classification":
        from transformers import AutoConfig

        num_labels = AutoConfig.from_pretrained(cfg.model.path, local_files_only=True,
                                                trust_remote_code=cfg.model.trust_remote_code).num_labels
    sets = {}
    for role, dataset in (("train", cfg.data.train), ("queries", cfg.data.queries)):
        sets[role] = tokenize(read_table(dataset, role), tokenizer, cfg.data.max_length, cfg.model.task,
                              num_labels=num_labels, role=role)
    return Plan(sets["train"], sets["queries"], tokenizer.pad_token_id)


@ray.remote(num_cpus=0)
class Progress:
    def __init__(self) -> None:
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n

    def value(self) -> int:
        return self.done


def _connect(cfg: JobConfig) -> bool:
    """Join runtime.address, or start a local Ray; True if this job started it (and stops it)."""
    if ray.is_initialized():
        return False
    if cfg.runtime.address:
        ray.init(address=cfg.runtime.address, log_to_driver=False)
        return False
    ray.init(include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": WORKER_ENV})
    return True


def _start_workers(cfg: JobConfig, run_dir: Path):
    world = cfg.runtime.num_workers
    gpu = cfg.runtime.device == "cuda"
    bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
    group = placement_group([bundle] * world, strategy="PACK")
    ray.get(group.ready(), timeout=600)
    workers = [
        GradientWorker.options(
            num_cpus=1, num_gpus=1 if gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
            runtime_env={"env_vars": WORKER_ENV},
        ).remote(rank, world, cfg.model_dump(), str(run_dir))
        for rank in range(world)
    ]
    addresses = ray.get([w.address.remote() for w in workers])
    # One machine (one node, or several nodes sharing an IP): rendezvous on loopback, since Ray
    # may report an address that is not bindable here; across machines, on rank 0's node.
    host = "127.0.0.1" if len({a["ip"] for a in addresses}) == 1 else addresses[0]["ip"]
    port = ray.get(workers[0].free_port.remote(host))
    infos = ray.get([w.setup.remote(host, port) for w in workers])
    if len({info["index_set_hash"] for info in infos}) != 1:
        raise JobError("workers derived different index sets; the job cannot continue")
    return group, workers, infos


def _compress(workers, split: str, data: Tokenized, pad_token_id: int, batch_size: int) -> list[str]:
    examples, ids = ray.put(data.examples), ray.put(data.ids)
    parts = partition(len(data.ids), len(workers), batch_size)
    progress = Progress.remote()
    futures = [w.compress.remote(split, examples, ids, part, pad_token_id, progress)
               for w, part in zip(workers, parts)]
    with tqdm(total=len(data.ids), desc=f"gradients/{split}", unit="ex", mininterval=1.0) as bar:
        pending = list(futures)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            done = ray.get(progress.value.remote())
            if done > bar.n:
                bar.update(done - bar.n)
    return [path for chunks in ray.get(futures) for path in chunks]


def run_job(cfg: JobConfig, run_dir: str | Path | None = None) -> dict:
    """Run the whole job; returns the manifest written last to run_dir/manifest.json."""
    run_dir = Path(run_dir or cfg.output.path).resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise JobError(f"output.path: '{run_dir}' is not empty; choose a new output folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"status": "running", "config": cfg.model_dump()}, run_dir / MANIFEST)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    plan = plan_job(cfg)
    lap("plan")
    started_ray = _connect(cfg)
    try:
        group, workers, infos = _start_workers(cfg, run_dir)
        index_table: pa.Table = infos[0]["index_set"]
        atomic_write_table(index_table, run_dir / "index_set.parquet")
        lap("workers_setup")
        batch = cfg.runtime.batch_size
        train_chunks = _compress(workers, "train", plan.train, plan.pad_token_id, batch)
        query_chunks = _compress(workers, "queries", plan.queries, plan.pad_token_id, batch)
        ray.get([w.shutdown.remote() for w in workers])
        for worker in workers:
            ray.kill(worker)
        remove_placement_group(group)
        lap("gradients")

        index_set = IndexSet.from_table(index_table, _shapes_from(index_table))
        reducer = Reducer.remote(block_slices(index_set, cfg.hessian.blocks), cfg.hessian.damping)
        reduced = ray.get(reducer.reduce.remote(train_chunks, query_chunks, str(run_dir / "curvature")))
        ray.kill(reducer)
        lap("curvature")

        outputs = _score(cfg, run_dir, plan, train_chunks, reduced)
        lap("scoring")
    finally:
        if started_ray:
            ray.shutdown()

    manifest = {
        "status": "complete",
        "name": cfg.name,
        "config": cfg.model_dump(),
        "versions": _versions(),
        "model_fingerprint": model_fingerprint(cfg.model),
        "index_set_hash": infos[0]["index_set_hash"],
        "k": index_table.num_rows,
        "counts": {"train": len(plan.train.ids), "queries": len(plan.queries.ids),
                   "truncated_train": plan.train.truncated, "truncated_queries": plan.queries.truncated,
                   "train_chunks": len(train_chunks), "query_chunks": len(query_chunks)},
        "params": {"total": infos[0]["total_params"], "tracked": infos[0]["tracked_params"],
                   "tracked_fraction": infos[0]["tracked_params"] / infos[0]["total_params"]},
        "damping": reduced["damping"],
        "timings": timings,
        "workers": [{"rank": i["rank"], "host": i["host"], "node_ip": i["node_ip"],
                     "local_params": i["local_params"]} for i in infos],
        "outputs": outputs,
    }
    atomic_write_json(manifest, run_dir / MANIFEST)
    return manifest


def _shapes_from(index_table: pa.Table) -> list[tuple[str, tuple[int, ...]]]:
    # Scoring needs only the block layout, which the table's param runs give; shapes are unused.
    names = list(dict.fromkeys(index_table.column("param").to_pylist()))
    return [(name, (0,)) for name in names]


def _score(cfg: JobConfig, run_dir: Path, plan: Plan, train_chunks: list[str], reduced: dict) -> dict:
    query_ids = reduced["query_ids"]
    dense_dir = run_dir / "scores" / "dense"
    futures = [
        score_train_chunk.remote(path, reduced["queries"][0], reduced["curvature"][0], cfg.scoring.top_k,
                                 cfg.scoring.self_influence, query_ids,
                                 str(dense_dir / Path(path).name) if cfg.scoring.dense else None)
        for path in train_chunks
    ]
    position = {train_id: i for i, train_id in enumerate(plan.train.ids)}
    n = len(plan.train.ids)
    losses, score_mean, self_inf = np.zeros(n), np.zeros(n), np.full(n, np.nan)
    top = TopK(len(query_ids), cfg.scoring.top_k)
    for chunk in ray.get(futures):
        rows = np.array([position[i] for i in chunk.ids])
        losses[rows], score_mean[rows] = chunk.losses, chunk.score_mean
        if chunk.self_influence is not None:
            self_inf[rows] = chunk.self_influence
        top.update(chunk.top_scores, np.vectorize(position.get, otypes=[np.int64])(chunk.top_ids))

    # Rows of the outputs follow the input files' order, whatever the partitioning.
    query_order = np.argsort([plan.queries.ids.index(q) for q in query_ids], kind="stable")
    top_table = top_k_table([query_ids[i] for i in query_order], plan.train.ids,
                            top.scores[query_order], top.positions[query_order])
    atomic_write_table(top_table, run_dir / "scores" / "top_k.parquet")
    values = train_values_table(plan.train.ids, losses, score_mean,
                                self_inf if cfg.scoring.self_influence else None)
    atomic_write_table(values, run_dir / "scores" / "train_values.parquet")
    return {"top_k": "scores/top_k.parquet", "train_values": "scores/train_values.parquet",
            "dense": "scores/dense/" if cfg.scoring.dense else None,
            "gradients": ["gradients/train/", "gradients/queries/"], "curvature": "curvature/"}


def _versions() -> dict:
    import deepspeed
    import torch
    import transformers

    import distinf

    return {"distinf": distinf.__version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "ray": ray.__version__, "transformers": transformers.__version__, "pyarrow": pa.__version__,
            "python": platform.python_version()}


def summary(manifest: dict, run_dir: Path) -> str:
    """The one-screen summary printed at the end of a run."""
    counts, damping = manifest["counts"], manifest["damping"]
    lines = [
        f"distinf run '{manifest['name']}' complete: {run_dir}",
        f"  examples   train {counts['train']} ({counts['truncated_train']} truncated), "
        f"queries {counts['queries']} ({counts['truncated_queries']} truncated)",
        f"  index set  k = {manifest['k']} of {manifest['params']['tracked']:,} tracked entries "
        f"({manifest['params']['tracked_fraction']:.1%} of {manifest['params']['total']:,} parameters)",
        f"  damping    {len(damping)} block(s), min {min(damping):.3g}, median {float(np.median(damping)):.3g}, "
        f"max {max(damping):.3g}",
        "  workers    " + ", ".join(f"rank {w['rank']} on {w['host']}: {w['local_params']:,} params"
                                  for w in manifest["workers"]),
        "  time       " + ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings"].items()),
        f"  outputs    {run_dir}/scores/top_k.parquet, scores/train_values.parquet, gradients/, curvature/",
    ]
    return "\n".join(lines)
