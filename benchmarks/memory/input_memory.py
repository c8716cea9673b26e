"""The driver's memory for reading and tokenising a split, and the bytes a rank is sent, for two
checkouts side by side: `plan_job` on a training set of many files, in a fresh process each time.

The texts are the shipped corpora (`distinf.assets.SOURCES`, every text of every source), repeated
with new ids until the set has `--rows` rows, cut into `--files` Parquet files: the size of a
nightly increment, not of a test. Each run reports the process's peak RSS (VmHWM) over its RSS
after the imports, the seconds `plan_job` took, the tokens, and the pickled bytes of one rank's
share at W = 2 (what the driver puts in the object store for it).

    .venv/bin/python -m benchmarks.memory.input_memory --trees /tmp/wt-before . --rows 200000 --files 40 --repeats 2

A tree is a distinf checkout; it is put first on PYTHONPATH so its `distinf` is the one imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmarks._harness import ROOT

PROBE = r"""
import json, pickle, sys, time
from benchmarks._harness import status_kib
import distinf
from distinf.config import load_job
from distinf.inputs import plan_job
base = status_kib("VmRSS")
start = time.perf_counter()
plan = plan_job(load_job(sys.argv[1]), ("train",))
seconds = time.perf_counter() - start
examples = plan.train.examples
mine = range(0, len(plan.train.ids), 2)  # rank 0's half at W = 2
share = examples.take(list(mine)) if hasattr(examples, "take") else [examples[i] for i in mine]
print(json.dumps({"distinf": distinf.__file__, "rows": len(plan.train.ids),
                  "tokens": sum(len(examples[i]["input_ids"]) for i in range(len(examples))),
                  "seconds": seconds, "base_mib": base / 1024, "peak_mib": status_kib("VmHWM") / 1024,
                  "share_mib": len(pickle.dumps(share, protocol=5)) / 2**20}))
"""


def write_input(folder: Path, rows: int, files: int, model_dir: str, max_length: int) -> Path:
    """The shipped texts repeated to `rows` rows in `files` Parquet files, and a job file reading them."""
    from distinf.assets import SOURCES, source_texts

    texts = [text for source in SOURCES for _, text in source_texts(source)]
    table = pa.table({"id": [f"r{i}" for i in range(rows)], "text": [texts[i % len(texts)] for i in range(rows)]})
    data = folder / "train"
    data.mkdir(parents=True)
    per_file = -(-rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * per_file, per_file), data / f"part-{i:05d}.parquet")
    pq.write_table(table.slice(0, 4), folder / "queries.parquet")
    job = {"name": "input-memory", "model": {"path": model_dir, "task": "causal_lm"},
           "data": {"train": {"path": str(data), "id_column": "id"},
                    "queries": {"path": str(folder / "queries.parquet"), "id_column": "id"},
                    "max_length": max_length},
           "compression": {"k": 1024}, "output": {"path": str(folder / "run")}}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def probe(tree: Path, job: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree.resolve()}{os.pathsep}{ROOT}"}
    # From inside the tree: `python -c` puts the working folder first on sys.path.
    out = subprocess.run([sys.executable, "-c", PROBE, str(job)], env=env, cwd=tree, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", type=Path, nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tree, alternating")
    parser.add_argument("--model", default=None, help="default: the shipped SmolLM2-135M-Instruct")
    args = parser.parse_args()
    from distinf.assets import smollm2_dir

    model_dir = args.model or str(smollm2_dir())
    with tempfile.TemporaryDirectory() as tmp:
        job = write_input(Path(tmp), args.rows, args.files, model_dir, args.max_length)
        runs: dict[str, list[dict]] = {str(t): [] for t in args.trees}
        for _ in range(args.repeats):
            for tree in args.trees:
                runs[str(tree)].append(probe(tree, job))
                print(json.dumps({"tree": str(tree), **runs[str(tree)][-1]}), flush=True)
    assert len({r["distinf"] for results in runs.values() for r in results}) == 2, "both trees imported one distinf"
    for tree, results in runs.items():
        grown = statistics.median(r["peak_mib"] - r["base_mib"] for r in results)
        print(f"{tree}: rows {results[0]['rows']}, tokens {results[0]['tokens']}, peak over base "
              f"{grown:.0f} MiB, plan_job {statistics.median(r['seconds'] for r in results):.1f} s, "
              f"rank share {results[0]['share_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
