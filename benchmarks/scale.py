"""Billion-parameter models through the real job: per-rank memory at setup and during the gradient pass.

Writes a random-initialised Llama-architecture model (SmolLM2's tokenizer and vocabulary, tied
embeddings, float32, safetensors in ~2 GiB shards written one at a time) under .assets/scale/,
a handful of short texts from the demo corpus, and a job file; then runs `distinf run` (Ray
actors, DeepSpeed ZeRO-3 over gloo, Parquet chunks, reducer, scoring tasks) for each W asked.

Per run it records, from the manifest: each rank's `local_params`, setup seconds, peak RSS
during setup (VmHWM at the end of setup) and during the gradient pass (VmHWM after a reset at the
end of setup), and seconds per example of the gradient pass; and, from /proc sampled twice a
second, the peak RSS of every other Ray process of the job (the reducer, the Gram and scoring
tasks). The target of issue 15: a worker's peak under half the model's bytes + 1.5 GiB at W = 2.

    .venv/bin/python benchmarks/scale.py --model llama-1b --workers 2 1 --out benchmarks/RESULTS.md
    .venv/bin/python benchmarks/scale.py --model llama-3b --workers 2 --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from distinf.assets import assets_root, mixed_source_corpus, smollm2_dir  # noqa: E402
from record import publish  # noqa: E402  (benchmarks/ is sys.path[0])

GIB = 1024 ** 3
# TinyLlama's block shape with SmolLM2's 49,152-token vocabulary (1.07B), and a wider, deeper one (2.98B).
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4),
    "llama-3b": dict(hidden_size=2560, intermediate_size=8192, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8),
    "llama-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
}
SHARD_BYTES = 2 * GIB
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def model_folder(name: str) -> Path:
    """A random-initialised shape of SHAPES, or SmolLM2-135M-Instruct itself ("smollm2-135m")."""
    return smollm2_dir() if name == "smollm2-135m" else random_llama(name)


def random_llama(name: str) -> Path:
    """The model folder under .assets/scale/, written once, with SmolLM2's tokenizer."""
    from transformers import LlamaConfig

    folder = assets_root() / "scale" / name
    if not (folder / "model.safetensors.index.json").is_file():
        config = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                             bos_token_id=1, eos_token_id=2, **SHAPES[name])
        write_random_checkpoint(folder, config, tokenizer_dir=smollm2_dir())
    return folder


def write_random_checkpoint(folder: Path, config, dtype: torch.dtype = torch.float32,
                            tokenizer_dir: Path | None = None) -> Path:
    """A causal-LM folder of `config` with weights N(0, 0.02²) (norms 1) drawn tensor by tensor,
    in safetensors shards of SHARD_BYTES, one shard in memory at a time; renamed into place last."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    for file in TOKENIZER_FILES if tokenizer_dir else ():
        if (tokenizer_dir / file).is_file():
            shutil.copy(tokenizer_dir / file, tmp / file)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, total = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, tmp / file, metadata={"format": "pt"})
        weight_map.update({key: file for key in shard})
        shard, shard_bytes = {}, 0

    for key, param in skeleton.named_parameters():
        if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
            value = torch.ones(param.shape, dtype=dtype)
        else:
            value = torch.empty(param.shape).normal_(0.0, 0.02, generator=generator).to(dtype)
        shard[key] = value
        shard_bytes += value.numel() * value.element_size()
        total += value.numel() * value.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def parameters(folder: Path) -> int:
    from distinf.checkpoint import Checkpoint

    return sum(t.numel for t in Checkpoint(folder).tensors.values())


class RayProcessPeaks(threading.Thread):
    """Peak VmHWM / RssAnon of every process whose command line starts with "ray::", by pid."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[str, dict] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                    if not name.startswith("ray::"):
                        continue
                    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                                  if ":" in line)
                except (OSError, ValueError):
                    continue
                kib = lambda key: int(status.get(key, "0 kB").split()[0]) * 1024  # noqa: E731
                peak = self.peaks.setdefault(pid, {"name": name, "hwm": 0, "anon": 0})
                if name != "ray::IDLE":
                    peak["name"] = name
                peak["hwm"], peak["anon"] = max(peak["hwm"], kib("VmHWM")), max(peak["anon"], kib("RssAnon"))
            time.sleep(0.5)

    def stop(self) -> dict[str, dict]:
        self.done.set()
        self.join()
        return self.peaks


def run_job(model: Path, workers: int, args: argparse.Namespace) -> dict:
    root = assets_root() / "scale" / "runs" / f"{model.name}-w{workers}{'-kept' if args.keep_gathered else ''}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    train, queries = mixed_source_corpus(args.train_per_source, 1, seed=0)
    import pyarrow.parquet as pq

    pq.write_table(train, root / "train.parquet")
    pq.write_table(queries, root / "queries.parquet")
    job = {
        "name": f"scale-{model.name}-w{workers}",
        "model": {"path": str(model), "task": "causal_lm", "dtype": "float32"},
        "data": {"train": {"path": str(root / "train.parquet"), "id_column": "id"},
                 "queries": {"path": str(root / "queries.parquet"), "id_column": "id"},
                 "max_length": args.tokens},
        "compression": {"k": args.k, "seed": 0},
        "runtime": {"num_workers": workers, "batch_size": args.batch, "device": "cpu",
                    "release_after_use": not args.keep_gathered},
        "output": {"path": str(root / "run")},
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    sampler = RayProcessPeaks()
    sampler.start()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "distinf", "run", str(root / "job.yaml")], capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    peaks = sampler.stop()
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"distinf run failed for {model.name} at W = {workers}")
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    others = [p for p in peaks.values() if "GradientWorker" not in p["name"] and p["hwm"] > 0]
    examples = manifest["counts"]["train"] + manifest["counts"]["queries"]
    return {"model": args.model + (" (gathered weights kept)" if args.keep_gathered else ""),
            "params": parameters(model), "workers": workers, "wall_seconds": round(wall, 1),
            "gradient_seconds": manifest["timings"]["gradients"], "examples": examples,
            "ranks": manifest["workers"], "timings": manifest["timings"],
            "reducer_peak": max((p["hwm"] for p in others if "Reducer" in p["name"]), default=None),
            "task_peak": max((p["hwm"] for p in others if "Reducer" not in p["name"]), default=None),
            "k": manifest["k"]}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Command: `.venv/bin/python benchmarks/scale.py --model {args.model} --workers "
        f"{' '.join(map(str, args.workers))} --k {args.k} --tokens {args.tokens} --batch {args.batch} "
        f"--train-per-source {args.train_per_source}{' --keep-gathered' if args.keep_gathered else ''}` (torch {torch.__version__}, nproc {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "| model (params, float32 bytes) | W | rank | local_params | setup s | setup peak RSS | gradient-pass peak RSS "
        "| target: bytes/W + 1.5 GiB | gradient pass s/example | reducer peak | Gram/scoring task peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        model_bytes = row["params"] * 4
        for rank in row["ranks"]:
            memory = rank.get("memory", {})
            lines.append(
                f"| {row['model']} ({row['params'] / 1e9:.2f}B, {model_bytes / GIB:.2f} GiB) | {row['workers']} "
                f"| {rank['rank']} | {rank['local_params']:,} | {rank.get('setup_seconds', float('nan')):.0f} "
                f"| {_gib(memory.get('setup_peak_rss'))} | {_gib(memory.get('gradients_peak_rss'))} "
                f"| {_gib(model_bytes / row['workers'] + 1.5 * GIB)} "
                f"| {row['gradient_seconds'] / row['examples']:.2f} | {_gib(row['reducer_peak'])} "
                f"| {_gib(row['task_peak'])} |")
    lines.append("")
    lines.append("Timings (s): " + "; ".join(f"{r['model']} W = {r['workers']}: " + ", ".join(
        f"{k} {v:.0f}" for k, v in r["timings"].items()) + f", wall {r['wall_seconds']:.0f}" for r in rows))
    return "\n".join(lines)


def _gib(value: float | None) -> str:
    return "–" if value is None else f"{value / GIB:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES) + ["smollm2-135m"], default="llama-1b")
    parser.add_argument("--keep-gathered", action="store_true",
                        help="runtime.release_after_use: false (DeepSpeed's defaults), for the comparison")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--k", type=int, default=65536)
    parser.add_argument("--tokens", type=int, default=32, help="data.max_length")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-per-source", type=int, default=3, help="training texts per source (6 sources)")
    parser.add_argument("--out", help="append the section to this file (benchmarks/RESULTS.md)")
    parser.add_argument("--json", help="also write the raw rows here")
    args = parser.parse_args()
    model = model_folder(args.model)
    rows = [run_job(model, w, args) for w in args.workers]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    publish(table(rows, args), args.out)


if __name__ == "__main__":
    main()
