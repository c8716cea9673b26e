"""Bytes and write/read time of one real gradient chunk under the Parquet writer options, float32 and float16.

SmolLM2-135M's compressed gradients of real text (distinf.attribute, dropout k) become one chunk
through the job's `gradient_table`, written with pyarrow's defaults, with the writer distinf used
before (dictionary for strings only, snappy), zstd alone, and distinf's writer now
(`store.write_parquet`: zstd, BYTE_STREAM_SPLIT on float32/float64 columns). Each file is read back
with pyarrow (`gradients_of`), DuckDB and, when importable, pandas, and compared with the chunk.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.memory.parquet_encoding --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import _harness  # noqa: E402,F401  (the offline environment, before transformers loads)

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402


import distinf  # noqa: E402
from distinf.assets import mixed_source_corpus, smollm2_dir  # noqa: E402
from distinf.store import write_parquet  # noqa: E402
from distinf.tables import gradient_table, gradients_of  # noqa: E402
from benchmarks.record import publish  # noqa: E402


def _strings(table: pa.Table) -> list[str]:
    return [f.name for f in table.schema if pa.types.is_string(f.type)]


WRITERS = {
    "pyarrow defaults (dictionary, snappy)": lambda t, p: pq.write_table(t, p),
    "before: dictionary for strings, snappy": lambda t, p: pq.write_table(t, p, use_dictionary=_strings(t)),
    "zstd, dictionary for strings": lambda t, p: pq.write_table(t, p, use_dictionary=_strings(t), compression="zstd"),
    "now: store.write_parquet": write_parquet,
    "what-if: BYTE_STREAM_SPLIT on float16 too, zstd": lambda t, p: pq.write_table(
        t, p, use_dictionary=_strings(t), compression="zstd", use_byte_stream_split=["loss", "grad.list.element"]),
}


def timed(fn, reps: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(reps):
        began = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-per-source", type=int, default=10)
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        import pandas
    except ImportError:
        pandas = None

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), torch_dtype=torch.float32)
    train_table, query_table = mixed_source_corpus(args.train_per_source, 1, seed=0)
    encode = lambda texts: [{key: value[0] for key, value in  # noqa: E731
                             tokenizer(t, return_tensors="pt", truncation=True, max_length=args.max_length).items()}
                            for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = distinf.attribute(model, encode(train_table.column("text").to_pylist()),
                               encode(query_table.column("text").to_pylist()),
                               config={"compression": {"k": args.k}}, batch_size=8, pad_token_id=pad)
    grads, ids = result.train_grads, train_table.column("id").to_pylist()
    losses = np.zeros(len(ids), np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dtype in ("float32", "float16"):
            table = gradient_table(ids, losses, grads, dtype)
            expected = gradients_of(table)
            raw = table.column("grad").combine_chunks().flatten().nbytes
            for name, write in WRITERS.items():
                path = Path(folder) / f"{dtype}-{len(rows)}.parquet"
                write_s, _ = timed(lambda: write(table, path), args.reps)
                read_s, back = timed(lambda: gradients_of(pq.read_table(path)), args.reps)
                assert np.array_equal(back, expected)
                try:
                    duck_s, got = timed(lambda: duckdb.sql(f"SELECT grad FROM '{path}'").to_arrow_table(), args.reps)
                    flat = got.column("grad").combine_chunks().flatten().to_numpy(zero_copy_only=False)  # FLOAT[]
                    same = np.array_equal(flat.astype(np.float32).reshape(got.num_rows, -1), expected)
                    duck = f"{duck_s * 1e3:.1f}" if same else "differs"
                except duckdb.Error as error:
                    duck = f"fails: {str(error).splitlines()[0][:60]}"
                panda = "–"
                if pandas is not None:
                    frame = pandas.read_parquet(path)
                    panda = "ok" if np.array_equal(np.stack(frame["grad"].to_numpy()).astype(np.float32), expected) \
                        else "differs"
                size = path.stat().st_size
                rows.append(f"| {dtype} | {name} | {size:,} | {size / raw:.3f} | {write_s * 1e3:.1f} | "
                            f"{read_s * 1e3:.1f} | {duck} | {panda} |")
    minutes = (time.perf_counter() - started) / 60
    versions = f"pyarrow {pa.__version__}, DuckDB {duckdb.__version__}" + (
        f", pandas {pandas.__version__}" if pandas else "")
    section = f"""## Parquet encoding of gradient chunks: zstd and BYTE_STREAM_SPLIT (issue 18 §4)

**Command.** `HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.memory.parquet_encoding --out benchmarks/RESULTS.md`
({minutes:.1f} min; {versions}; nproc {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end).

**Setup.** One chunk of {len(ids)} real rows: SmolLM2-135M-Instruct (float32) gradients of the packaged corpus
(`mixed_source_corpus({args.train_per_source}, 1, seed=0)`, at most {args.max_length} tokens), dropout k = {args.k},
built by the job's `gradient_table` as float32 and as float16. "raw" is the grad column's Arrow bytes
(rows × k × width). Times are the median of {args.reps}, in ms: write, read back to a float32 array with
pyarrow (`gradients_of(pq.read_table)`), and `SELECT grad` in DuckDB to Arrow; pandas: `read_parquet`
equal to the chunk.

| dtype | writer | bytes | of raw | write ms | pyarrow read ms | DuckDB read ms | pandas |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + """

float16 is written without BYTE_STREAM_SPLIT: DuckDB refuses that encoding on float16's
FIXED_LEN_BYTE_ARRAY pages (checked in `tests/test_store.py`), so distinf gives float16 zstd alone.
"""
    publish(section, args.out)


if __name__ == "__main__":
    main()
