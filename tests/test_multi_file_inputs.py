"""Datasets as users hold them: a folder, a glob or a list of Parquet/JSONL/CSV files (local and on S3),
and a Hugging Face `save_to_disk` folder, each read as the one file they were cut from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

import distinf
import job_fixtures
from distinf.config import DatasetConfig
from distinf.inputs import DataError, dataset_files, fingerprint, read_dataset, tokenize


def write(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()), encoding="utf-8")
    return path


def parts(table: pa.Table, bounds=(0, 7, 15)) -> list[pa.Table]:
    edges = [*bounds, table.num_rows]
    return [table.slice(a, b - a) for a, b in zip(edges, edges[1:])]


def read(path, **kw):
    return read_dataset(DatasetConfig(path=path, **kw), "train")


def layouts(root: Path, table: pa.Table) -> dict[str, object]:
    """The same rows as one file, and as a folder, a glob and a list of files of mixed formats."""
    one = write(table, root / "one.parquet")
    folder = root / "folder"
    for i, part in enumerate(parts(table)):
        write(part, folder / f"part-{i:05d}.parquet")
    write(table.slice(0, 0), folder / "part-99999.parquet")  # an empty part, as Spark writes them
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-00000.parquet.crc").write_bytes(b"\0")
    (folder / "README.md").write_text("not data")
    for i, part in enumerate(parts(table)):
        write(part, root / "glob" / f"shard-{i}.jsonl")
    mixed = [write(part, root / "mixed" / f"p{i}{suffix}")
             for i, (part, suffix) in enumerate(zip(parts(table), (".csv", ".jsonl", ".parquet")))]
    return {"one": str(one), "folder": str(folder), "glob": str(root / "glob" / "shard-*.jsonl"),
            "list": [str(p) for p in mixed]}


def test_a_folder_a_glob_and_a_list_give_the_one_files_tokens_and_fingerprint(tmp_path, sources_corpus, gpt2_tokenizer):
    paths = layouts(tmp_path, sources_corpus)
    assert [s.name for s in dataset_files(paths["folder"], "data.train")] == \
        [str(tmp_path / "folder" / f"part-{i:05d}.parquet") for i in (0, 1, 2, 99999)]
    one, _ = read(paths["one"], id_column="id")
    expected = fingerprint(tokenize(one, gpt2_tokenizer, 48, "causal_lm"))
    for layout in ("folder", "glob", "list"):
        table, rejected = read(paths[layout], id_column="id")
        assert rejected == []
        assert table.select(["example_id", "text"]).equals(one.select(["example_id", "text"])), layout
        assert table.column("row").to_pylist() == [*range(7), *range(8), *range(9)]
        assert set(table.column("file").to_pylist()) <= {s.name for s in dataset_files(paths[layout], "data.train")}
        data = tokenize(table, gpt2_tokenizer, 48, "causal_lm")
        assert fingerprint(data) == expected, layout
        assert data.files[7].endswith(("1.parquet", "1.jsonl"))


def test_without_an_id_column_the_ids_count_rows_across_the_files(tmp_path, sources_corpus):
    paths = layouts(tmp_path, sources_corpus)
    table, _ = read(paths["glob"])
    assert table.column("example_id").to_pylist() == [str(i) for i in range(sources_corpus.num_rows)]


def test_the_same_attribution_as_one_file(tmp_path, sources_corpus, gpt2_dir, gpt2_tokenizer):
    paths = layouts(tmp_path, sources_corpus)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    results = {}
    for layout in ("one", "folder", "list"):
        table, _ = read(paths[layout], id_column="id")
        data = tokenize(table, gpt2_tokenizer, 48, "causal_lm")
        results[layout] = distinf.attribute(model, data.examples, data.examples[:3], train_ids=data.ids,
                                            config={"compression": {"k": 256}}, batch_size=4)
    for layout in ("folder", "list"):
        np.testing.assert_array_equal(results[layout].scores, results["one"].scores)
        assert results[layout].top_k.equals(results["one"].top_k)


def test_a_repeated_id_across_files_names_both_files(tmp_path, sources_corpus):
    first = write(sources_corpus.slice(0, 5), tmp_path / "a.jsonl")
    second = write(sources_corpus.slice(4, 5), tmp_path / "b.jsonl")
    repeated = sources_corpus.column("id")[4].as_py()
    with pytest.raises(DataError) as info:
        read([str(first), str(second)], id_column="id")
    assert str(info.value) == (f"data.train: duplicate id '{repeated}' in '{first}' row 4 and '{second}' row 0; "
                               "ids must be unique across the files")
    table, rejected = read_dataset(DatasetConfig(path=[str(first), str(second)], id_column="id"), "train", "skip")
    assert table.num_rows == 9
    assert [(r.row, r.example_id, r.file) for r in rejected] == [(0, repeated, str(second))]
    assert rejected[0].reason == f"in '{second}': duplicate id '{repeated}' (first in '{first}' row 4)"


def test_a_bad_row_names_its_file_and_its_row_in_that_file(tmp_path, sources_corpus):
    rows = sources_corpus.slice(0, 3).to_pylist()
    rows[1]["text"] = "  "
    first = write(sources_corpus.slice(3, 4), tmp_path / "a.jsonl")
    second = write(pa.Table.from_pylist(rows), tmp_path / "b.jsonl")
    with pytest.raises(DataError) as info:
        read(str(tmp_path / "*.jsonl"), id_column="id")
    assert str(info.value) == f"data.train: '{second}' row 1 (id '{rows[1]['id']}'): text is empty"
    _, rejected = read_dataset(DatasetConfig(path=str(tmp_path), id_column="id"), "train", "skip")
    assert [(r.row, r.file, r.reason) for r in rejected] == [(1, str(second), f"in '{second}': text is empty")]


def test_a_completion_cut_away_in_the_second_file_names_that_file(tmp_path, gpt2_tokenizer):
    rows = [{"id": f"r{i}", "prompt": "word " * (3 if i != 4 else 40), "completion": "end"} for i in range(6)]
    table = pa.Table.from_pylist(rows)
    first, second = write(table.slice(0, 3), tmp_path / "a.parquet"), write(table.slice(3), tmp_path / "b.parquet")
    data, _ = read([str(first), str(second)], id_column="id", prompt_column="prompt", completion_column="completion")
    with pytest.raises(DataError, match=rf"data.train: '{second}' row 1 \(id 'r4'\): no token of the completion"):
        tokenize(data, gpt2_tokenizer, 16, "causal_lm")
    skipped = tokenize(data, gpt2_tokenizer, 16, "causal_lm", on_bad_row="skip")
    assert [(r.row, r.file) for r in skipped.rejected] == [(1, str(second))]


def test_names_that_match_nothing_or_twice_are_refused(tmp_path, sources_corpus):
    write(sources_corpus, tmp_path / "t.jsonl")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    cases = {str(tmp_path / "*.parquet"): f"data.train.path: no file matches '{tmp_path / '*.parquet'}'",
             str(tmp_path / "empty"): f"data.train.path: no .parquet, .jsonl or .csv files in the folder",
             str(tmp_path / "none"): f"data.train.path: no such file '{tmp_path / 'none'}'"}
    for path, message in cases.items():
        with pytest.raises(DataError, match=message.replace("*", r"\*").replace(".", r"\.")):
            read(path)
    with pytest.raises(DataError, match="is named twice"):
        read([str(tmp_path / "t.jsonl"), str(tmp_path / "*.jsonl")])


def test_every_part_empty_is_a_dataset_without_rows(tmp_path, sources_corpus):
    write(sources_corpus.slice(0, 0), tmp_path / "d" / "a.parquet")
    write(sources_corpus.slice(0, 0), tmp_path / "d" / "b.parquet")
    with pytest.raises(DataError, match=r"data.train \(2 files\) has no rows"):
        read(str(tmp_path / "d"), id_column="id")


# --- a Hugging Face dataset saved with save_to_disk --------------------------------------------


def save_to_disk(table: pa.Table, folder: Path, shards: int = 2) -> Path:
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC *stream* shards named
    data-0000i-of-0000n.arrow, dataset_info.json and state.json listing the shards in order."""
    folder.mkdir(parents=True)
    names, edges = [], np.linspace(0, table.num_rows, shards + 1).astype(int)
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(a, b - a), max_chunksize=1000)
        names.append(name)
    features = {name: {"dtype": "string", "_type": "Value"} for name in table.column_names}
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": features,
                                                          "homepage": "", "license": ""}))
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": name} for name in names], "_fingerprint": "0123456789abcdef",
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": "train"}))
    return folder


def test_a_save_to_disk_folder_reads_as_the_one_file(tmp_path, sources_corpus, gpt2_tokenizer):
    folder = save_to_disk(sources_corpus, tmp_path / "saved" / "train", shards=3)
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    one, _ = read(str(write(sources_corpus, tmp_path / "one.parquet")), id_column="id")
    table, _ = read(str(folder), id_column="id")
    assert table.select(["example_id", "text"]).equals(one.select(["example_id", "text"]))
    tokenized = [tokenize(t, gpt2_tokenizer, 48, "causal_lm") for t in (table, one)]
    assert fingerprint(tokenized[0]) == fingerprint(tokenized[1])
    with pytest.raises(DataError, match=r"holds a DatasetDict saved with save_to_disk; name one split's folder, "
                                        r"e.g. '.*saved/train'"):
        read(str(tmp_path / "saved"), id_column="id")


def test_a_save_to_disk_folder_written_by_datasets_if_installed(tmp_path, sources_corpus):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset(sources_corpus).save_to_disk(str(tmp_path / "hf"), num_shards=2)
    table, _ = read(str(tmp_path / "hf"), id_column="id")
    assert table.column("example_id").to_pylist() == sources_corpus.column("id").to_pylist()


# --- on S3 (moto) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with job_fixtures.moto_s3(tmp_path_factory.mktemp("moto"), "inputs") as filesystem:
        yield filesystem


def test_a_folder_a_glob_and_a_saved_dataset_on_s3_read_as_the_local_file(tmp_path, sources_corpus, s3):
    local = layouts(tmp_path, sources_corpus)
    save_to_disk(sources_corpus, tmp_path / "saved")
    for folder in ("folder", "glob", "saved"):
        for path in sorted((tmp_path / folder).iterdir()):
            _upload(s3, path, f"inputs/{folder}/{path.name}")
    one, _ = read(local["one"], id_column="id")
    for path in ("s3://inputs/folder/", "s3://inputs/glob/shard-*.jsonl", "s3://inputs/saved"):
        table, _ = read(path, id_column="id")
        assert table.select(["example_id", "text"]).equals(one.select(["example_id", "text"])), path
    files = {s.name for s in dataset_files("s3://inputs/folder", "data.train")}
    assert files == {f"s3://inputs/folder/part-{i:05d}.parquet" for i in (0, 1, 2, 99999)}
    rows = sources_corpus.slice(0, 1).to_pylist()
    _upload_bytes(s3, "".join(json.dumps(r) + "\n" for r in rows).encode(), "inputs/glob/shard-9.jsonl")
    with pytest.raises(DataError, match=r"duplicate id '.*' in 's3://inputs/glob/shard-0.jsonl' row 0 and "
                                        r"'s3://inputs/glob/shard-9.jsonl' row 0"):
        read("s3://inputs/glob/shard-*.jsonl", id_column="id")


def _upload(s3, path: Path, key: str) -> None:
    _upload_bytes(s3, path.read_bytes(), key)


def _upload_bytes(s3, data: bytes, key: str) -> None:
    with s3.open_output_stream(key) as out:
        out.write(data)


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("path, message", [
    ([], "data.train.path: the list of files is empty"),
    (["a.jsonl", " "], "data.train.path: a path is empty"),
    (["a.jsonl", "s3://AKIAXYZ:s3cr3tvalue@bucket/b.jsonl"], "data.train.path: the URI has credentials in it"),
])
def test_a_bad_list_of_files_is_refused_naming_the_key(path, message):
    from distinf.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"path": "m"}, "data": {"train": {"path": path}, "queries": {"path": "q.jsonl"}}})
    assert message in str(info.value) and "s3cr3tvalue" not in str(info.value)


def test_a_list_of_files_in_a_job_file_validates(tmp_path):
    from distinf.config import load_job

    job = tmp_path / "job.yaml"
    job.write_text("model: {path: m}\ndata:\n  train: {path: [a.parquet, 'b/*.jsonl', s3://bucket/c/]}\n"
                   "  queries: {path: q.jsonl, messages_column: messages}\n")
    cfg = load_job(job)
    assert cfg.data.train.path == ["a.parquet", "b/*.jsonl", "s3://bucket/c/"]
    assert cfg.data.queries.masked and not cfg.data.train.masked


def test_rejected_parquet_names_each_rows_file_sorted_by_file_and_row(tmp_path, sources_corpus, gpt2_dir):
    """Rows left out by the data checks (one per file) and by a worker (a non-finite loss) are
    written with their file and their row in it, in (split, file, row) order, as DuckDB reads them."""
    from datetime import datetime, timezone

    import duckdb

    from distinf.config import load_job
    from distinf.inputs import plan_job
    from distinf.runtime.gradient_pass import Gradients
    from distinf.runtime.outputs import rejected_rows, write_rejected

    rows = sources_corpus.to_pylist()
    rows[9]["text"], rows[2]["text"] = "", " "  # row 1 of b.jsonl, row 2 of a.jsonl
    table = pa.Table.from_pylist(rows)
    first = write(table.slice(0, 8), tmp_path / "data" / "a.jsonl")
    second = write(table.slice(8, 8), tmp_path / "data" / "b.jsonl")
    queries = write(sources_corpus.slice(0, 2), tmp_path / "queries.jsonl")
    job = job_fixtures.job_file(tmp_path, gpt2_dir, tmp_path / "data", queries,
                                data={"train": {"path": str(tmp_path / "data"), "id_column": "id"},
                                      "queries": {"path": str(queries), "id_column": "id"}, "on_bad_row": "skip"})
    plan = plan_job(load_job(job))
    late = plan.train.ids[plan.train.rows.index(5)]  # row 5 of a.jsonl: say a worker met a NaN loss there
    gradients = Gradients(pa.table({}), {"train": [{"rejected": [{"example_id": late, "reason": "loss is nan"}]}],
                                         "queries": []})
    write_rejected(tmp_path, rejected_rows(plan, gradients), ("run-1", datetime.now(timezone.utc)))
    got = duckdb.sql(f"SELECT split, file, row, example_id, reason FROM read_parquet('{tmp_path / 'rejected.parquet'}')"
                     ).fetchall()
    assert got == [("train", str(first), 2, rows[2]["id"], f"in '{first}': text is empty"),
                   ("train", str(first), 5, late, "loss is nan"),
                   ("train", str(second), 1, rows[9]["id"], f"in '{second}': text is empty")]
