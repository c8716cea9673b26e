"""`make demo`: prepare the offline assets once, run jobs/demo.yaml, show what it found."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq

from distinf.assets import prepare_all
from distinf.cli import main as cli_main

JOB = Path("jobs/demo.yaml")
RUN_DIR = Path("runs/demo")


def show_proponents(run_dir: Path, train_path: Path, query_path: Path, queries: int = 4, top: int = 3) -> None:
    texts = {}
    for path in (train_path, query_path):
        table = pq.read_table(path, columns=["id", "text", "source"]).to_pylist()
        texts.update({row["id"]: (row["source"], row["text"]) for row in table})
    rows = [r for r in pq.read_table(run_dir / "scores" / "top_k.parquet").to_pylist() if r["kind"] == "proponent"]
    query_ids = list(dict.fromkeys(row["query_id"] for row in rows))
    shown = query_ids[:: max(1, len(query_ids) // queries)][:queries]
    short = lambda text: textwrap.shorten(text, 110)  # noqa: E731
    for query_id in shown:
        source, text = texts[query_id]
        print(f"\nquery {query_id} [{source}]: {short(text)}")
        for row in [r for r in rows if r["query_id"] == query_id][:top]:
            train_source, train_text = texts[row["train_id"]]
            print(f"  #{row['rank']} score {row['score']:+.3g} [{train_source}] {short(train_text)}")


def main() -> int:
    assets = prepare_all()
    if RUN_DIR.exists():  # the demo's own folder: each `make demo` is a fresh run
        shutil.rmtree(RUN_DIR)
    code = cli_main(["run", str(JOB), "--output", str(RUN_DIR),  # where prepare_all put the assets
                     "--set", f"model.path={assets['smollm2']}", "--set", f"data.train.path={assets['train']}",
                     "--set", f"data.queries.path={assets['query']}"])
    if code == 0:
        show_proponents(RUN_DIR, assets["train"], assets["query"])
        print(f"\nRead the outputs in DuckDB: SELECT * FROM '{RUN_DIR}/scores/top_k.parquet' LIMIT 10;")
    return code


if __name__ == "__main__":
    sys.exit(main())
