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

    .venv/bin/python -m benchmarks.memory.scale --model llama-1b --workers 2 1 --out benchmarks/RESULTS.md
    .venv/bin/python -m benchmarks.memory.scale --model llama-3b --workers 2 --out benchmarks/RESULTS.md

Long documents: `--long-texts N --tokens T` replaces the training texts by N texts of at least T
tokens, each the demo corpus's training texts joined end to end from a different starting text
(real text, cut to T by `data.max_length`; the queries stay the short demo ones), and
`--checkpointing` sets `runtime.activation_checkpointing: true`:

    .venv/bin/python -m benchmarks.memory.scale --model llama-1b --workers 2 --long-texts 2 --tokens 2048 --batch 1 --checkpointing

`--device cuda` runs the same job with `runtime.device: cuda` (one GPU per worker, NCCL) on a
bfloat16 checkpoint, and adds each rank's peak GPU allocation. For a machine without the packages
the texts come from, or without SmolLM2's folder (the GPU machine), `--export-inputs DIR` writes
the tokenizer files and the sampled texts under DIR/scale/ here, and `--assets DIR` there reads
them (benchmarks/speed/gpu_job.sh copies .gpu_assets/scale into a work folder first, so the carried
folder holds only the inputs):

    .venv/bin/python -m benchmarks.memory.scale --export-inputs .gpu_assets --train-per-source 64
    python3 -m benchmarks.memory.scale --assets WORK --device cuda --model llama-1b --workers 1 --train-per-source 64
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import _harness  # noqa: E402,F401  (the offline environment, before transformers loads)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


from distinf.assets import assets_root, mixed_source_corpus, smollm2_dir  # noqa: E402
from benchmarks.record import publish  # noqa: E402

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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUERIES_PER_SOURCE = 1


def model_folder(name: str, dtype: str = "float32", generate_on: str = "cpu") -> Path:
    """A random-initialised shape of SHAPES, or SmolLM2-135M-Instruct itself ("smollm2-135m")."""
    return smollm2_dir() if name == "smollm2-135m" else random_llama(name, dtype, generate_on)


def random_llama(name: str, dtype: str = "float32", generate_on: str = "cpu") -> Path:
    """The model folder under .assets/scale/ (`<name>` in float32, `<name>-<dtype>` otherwise),
    written once, with SmolLM2's tokenizer."""
    from transformers import LlamaConfig

    folder = assets_root() / "scale" / (name if dtype == "float32" else f"{name}-{dtype}")
    if not (folder / "model.safetensors.index.json").is_file():
        config = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                             bos_token_id=1, eos_token_id=2, **SHAPES[name])
        write_random_checkpoint(folder, config, DTYPES[dtype], tokenizer_dir=tokenizer_dir(), generate_on=generate_on)
    return folder


def tokenizer_dir() -> Path:
    """SmolLM2's tokenizer files: the copy `--export-inputs` wrote, else SmolLM2's own folder."""
    exported = assets_root() / "scale" / "tokenizer"
    return exported if (exported / "tokenizer.json").is_file() else smollm2_dir()


def corpus(train_per_source: int) -> tuple[pa.Table, pa.Table]:
    """(train, queries) of the demo corpus's sources: the copy `--export-inputs` wrote for this
    size, else sampled from the installed packages (the same rows: the sample is seeded)."""
    folder = assets_root() / "scale" / "corpus"
    paths = [folder / f"{split}-{train_per_source}x{QUERIES_PER_SOURCE}.parquet" for split in ("train", "queries")]
    if all(path.is_file() for path in paths):
        return pq.read_table(paths[0]), pq.read_table(paths[1])
    return mixed_source_corpus(train_per_source, QUERIES_PER_SOURCE, seed=0)


def long_texts(train: pa.Table, count: int, tokens: int) -> pa.Table:
    """`count` texts of at least `tokens` tokens (SmolLM2's tokenizer): text i joins the training
    texts end to end from text i * len(train) // count on, wrapping round."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    texts = train.column("text").to_pylist()
    rows = []
    for i in range(count):
        start, parts, length = i * len(texts) // count, [], 0
        while length < tokens:
            if len(parts) == len(texts):
                raise SystemExit(f"the {len(texts)} training texts hold {length} tokens, under {tokens}: "
                                 "raise --train-per-source")
            parts.append(texts[(start + len(parts)) % len(texts)])
            length = len(tokenizer("\n\n".join(parts))["input_ids"])
        rows.append({"id": f"long-{i}", "text": "\n\n".join(parts), "source": "long"})
    return pa.Table.from_pylist(rows, schema=train.schema)


def export_inputs(dest: Path, train_per_source: int) -> None:
    """SmolLM2's tokenizer files and the sampled texts under dest/scale/, for a machine that has
    neither the packages the texts come from nor SmolLM2's folder (the GPU machine)."""
    source, tables = tokenizer_dir(), corpus(train_per_source)
    (dest / "scale" / "tokenizer").mkdir(parents=True, exist_ok=True)
    (dest / "scale" / "corpus").mkdir(parents=True, exist_ok=True)
    for file in TOKENIZER_FILES:
        if (source / file).is_file():
            shutil.copy(source / file, dest / "scale" / "tokenizer" / file)
    for split, table in zip(("train", "queries"), tables):
        pq.write_table(table, dest / "scale" / "corpus" / f"{split}-{train_per_source}x{QUERIES_PER_SOURCE}.parquet")
    print(f"{dest / 'scale'}: tokenizer from {source}, {tables[0].num_rows} training and {tables[1].num_rows} "
          "query texts")


def write_random_checkpoint(folder: Path, config, dtype: torch.dtype = torch.float32,
                            tokenizer_dir: Path | None = None, generate_on: str = "cpu") -> Path:
    """A causal-LM folder of `config` with weights N(0, 0.02²) (norms 1) drawn tensor by tensor,
    in safetensors shards of SHARD_BYTES, one shard in memory at a time; renamed into place last.
    `generate_on="cuda"` draws on the GPU (other numbers than the CPU's; ~25 s less at 1B)."""
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
    generator = torch.Generator(device=generate_on).manual_seed(0)
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
            value = torch.empty(param.shape, device=generate_on).normal_(0.0, 0.02, generator=generator).to(dtype).cpu()
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
    root = run_root(model, workers, args)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    train, queries = corpus(args.train_per_source)
    if args.long_texts:
        train = long_texts(train, args.long_texts, args.tokens)
    pq.write_table(train, root / "train.parquet")
    pq.write_table(queries, root / "queries.parquet")
    job = {
        "name": f"scale-{model.name}-w{workers}",
        "model": {"path": str(model), "task": "causal_lm", "dtype": args.dtype},
        "data": {"train": {"path": str(root / "train.parquet"), "id_column": "id"},
                 "queries": {"path": str(root / "queries.parquet"), "id_column": "id"},
                 "max_length": args.tokens},
        "compression": {"k": args.k, "seed": 0},
        "hessian": {"method": args.hessian},
        "runtime": {"num_workers": workers, "batch_size": args.batch, "device": args.device,
                    "release_after_use": not args.keep_gathered,
                    "activation_checkpointing": args.checkpointing},
        "output": {"path": str(root / "run")},
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    sampler = RayProcessPeaks()
    sampler.start()
    started = time.perf_counter()
    with (root / "distinf-run.log").open("w") as log:  # the job's whole output, kept beside its run
        proc = subprocess.run([sys.executable, "-m", "distinf", "run", str(root / "job.yaml")], stdout=log,
                              stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    peaks = sampler.stop()
    if proc.returncode != 0:
        print((root / "distinf-run.log").read_text()[-6000:])
        raise SystemExit(f"distinf run failed for {model.name} at W = {workers} (log: {root / 'distinf-run.log'})")
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    others = [p for p in peaks.values() if "GradientWorker" not in p["name"] and p["hwm"] > 0]
    examples = manifest["counts"]["train"] + manifest["counts"]["queries"]
    return {"model": args.model + (" (gathered weights kept)" if args.keep_gathered else "")
            + (f", {args.long_texts} × {args.tokens} tokens, batch {args.batch}" if args.long_texts else "")
            + (", checkpointing" if args.checkpointing else "")
            + (f", {args.hessian}" if args.hessian != "gauss_newton" else ""),
            "params": parameters(model), "dtype": args.dtype, "device": args.device, "workers": workers,
            "wall_seconds": round(wall, 1),
            "gradient_seconds": manifest["timings"]["gradients"], "examples": examples,
            "ranks": manifest["workers"], "timings": manifest["timings"],
            "reducer_peak": max((p["hwm"] for p in others if "Reducer" in p["name"]), default=None),
            "task_peak": max((p["hwm"] for p in others if "Reducer" not in p["name"]), default=None),
            "k": manifest["k"], "versions": manifest.get("versions"), "run_dir": str(root / "run"),
            "progress": progress_seconds((root / "distinf-run.log").read_text(errors="replace"))}


_BAR = re.compile(r"gradients/(\w+):\s+\d+%\|[^|\n]*\| (\d+)/(\d+) \[(\d+(?::\d+)+)<")
_EVENT = re.compile(r"^time=(\S+) .*\blogger=distinf\.driver .*\bevent=(stage_start|stage_done) stage=gradients\b"
                    r".*\bsplit=(\w+).*\btotal=(\d+)", re.M)


def progress_seconds(log: str) -> dict[str, dict]:
    """Per split, examples and seconds of the pass alone (no Ray start, no setup). The driver's
    progress bar is drawn only on a terminal, so a job writing to a file is read through its log's
    `stage_start` / `stage_done` events of the gradients stage (first start to last done, restarts
    included); a terminal capture through the bar's last state (whole seconds)."""
    out, began = {}, {}
    for stamp, event, split, total in _EVENT.findall(log):
        at = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        if event == "stage_start":
            began.setdefault(split, at)
        elif split in began:
            out[split] = {"examples": int(total), "seconds": round(at - began[split], 1)}
    if out:
        return out
    for split, _, total, elapsed in _BAR.findall(log.replace("\r", "\n")):
        seconds = sum(int(v) * 60 ** i for i, v in enumerate(reversed(elapsed.split(":"))))
        out[split] = {"examples": int(total), "seconds": seconds}
    return out


def run_root(model: Path, workers: int, args: argparse.Namespace) -> Path:
    long = f"-long{args.long_texts}x{args.tokens}" if args.long_texts else ""
    return (assets_root() / "scale" / "runs" / f"{model.name}-w{workers}{'-kept' if args.keep_gathered else ''}"
            f"-{args.hessian}{long}{'-ckpt' if args.checkpointing else ''}")


def table(rows: list[dict], args: argparse.Namespace) -> str:
    gpu = args.device == "cuda"
    versions = rows[0].get("versions") or {} if rows else {}
    lines = [
        f"Command: `{os.path.basename(sys.executable)} -m benchmarks.memory.scale {' '.join(sys.argv[1:])}` "
        f"(torch {torch.__version__}, " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "torch")
        + f", nproc {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end"
        + (f", {torch.cuda.get_device_name(0)}" if gpu and torch.cuda.is_available() else "") + ").",
        "",
        f"| model (params, {args.dtype} bytes) | W | rank | local_params | setup s | setup peak RSS "
        "| gradient-pass peak RSS " + ("| setup peak GPU allocated | gradient-pass peak GPU allocated " if gpu else
                                      "| target: bytes/W + 1.5 GiB ")
        + "| gradient pass s/example | reducer peak | Gram/scoring task peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for row in rows:
        model_bytes = row["params"] * DTYPES[row.get("dtype", "float32")].itemsize
        for rank in row["ranks"]:
            memory = rank.get("memory", {})
            if gpu:
                middle = (f"| {_gib(memory.get('setup_peak_gpu_allocated'))} "
                          f"| {_gib(memory.get('gradients_peak_gpu_allocated'))} ")
            else:
                middle = f"| {_gib(model_bytes / row['workers'] + 1.5 * GIB)} "
            lines.append(
                f"| {row['model']} ({row['params'] / 1e9:.2f}B, {model_bytes / GIB:.2f} GiB) | {row['workers']} "
                f"| {rank['rank']} | {rank['local_params']:,} | {rank.get('setup_seconds', float('nan')):.0f} "
                f"| {_gib(memory.get('setup_peak_rss'))} | {_gib(memory.get('gradients_peak_rss'))} "
                + middle +
                f"| {row['gradient_seconds'] / row['examples']:.3f} | {_gib(row['reducer_peak'])} "
                f"| {_gib(row['task_peak'])} |")
    lines.append("")
    lines.append("Gradient pass alone (the driver's gradients events): " + "; ".join(
        f"{r['model']} W = {r['workers']}: " + ", ".join(
            f"{split} {p['examples']} examples in {p['seconds']} s" for split, p in r.get("progress", {}).items())
        for r in rows) + ". \"s/example\" above: the manifest's gradients time (Ray start, worker start, setup "
        "and the pass) per example.")
    lines.append("Timings (s): " + "; ".join(f"{r['model']} W = {r['workers']}: " + ", ".join(
        f"{k} {v:.1f}" for k, v in r["timings"].items()) + f", wall {r['wall_seconds']:.0f}" for r in rows))
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
    parser.add_argument("--hessian", choices=["gauss_newton", "kfac", "kfac_mix"], default="gauss_newton",
                        help="hessian.method (kfac and kfac_mix add the per-rank Kronecker factor sums)")
    parser.add_argument("--tokens", type=int, default=32, help="data.max_length")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--long-texts", type=int, default=0, metavar="N",
                        help="N training texts of at least --tokens tokens each, joined from the demo corpus's")
    parser.add_argument("--checkpointing", action="store_true", help="runtime.activation_checkpointing: true")
    parser.add_argument("--train-per-source", type=int, default=3, help="training texts per source (6 sources)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="runtime.device")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model.dtype and the checkpoint's (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--assets", type=Path, default=None,
                        help="asset folder (DISTINF_ASSETS): the model, the runs and --export-inputs' copy "
                             "go under its scale/")
    parser.add_argument("--export-inputs", type=Path, metavar="DIR", default=None,
                        help="only write the tokenizer files and the texts under DIR/scale/, then stop")
    parser.add_argument("--out", help="append the section to this file (benchmarks/RESULTS.md)")
    parser.add_argument("--json", help="also write the raw rows here")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.export_inputs is not None:
        export_inputs(args.export_inputs, args.train_per_source)
        return
    if args.assets is not None:
        os.environ["DISTINF_ASSETS"] = str(args.assets.resolve())
    started = time.perf_counter()
    draw_on = "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    model = model_folder(args.model, args.dtype, draw_on)
    print(f"model {model} ready in {time.perf_counter() - started:.0f} s", flush=True)
    rows = [run_job(model, w, args) for w in args.workers]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    publish(table(rows, args), args.out)


if __name__ == "__main__":
    main()
