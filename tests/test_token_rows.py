"""TokenRows, the flat store of a tokenised split, against the per-example dicts it replaces:
the same tensors, the same fingerprints, the same selections; and plan_job reading a split one
file at a time gives what reading it whole gave."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import job_fixtures
from distinf.batching import collate
from distinf.config import DatasetConfig, load_job
from distinf.inputs import DataError, Tokenized, fingerprint, plan_job, read_dataset, tokenize
from distinf.token_rows import TokenRows, TokenRowsBuilder


def as_dicts(tokenizer, texts, max_length, prompts=None, labels=None) -> list[dict[str, torch.Tensor]]:
    """The per-example dicts straight from the tokenizer: what tokenize returned before TokenRows."""
    out = []
    for i, text in enumerate(texts):
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
        ids = torch.tensor(encoded["input_ids"], dtype=torch.int64)
        example = {"input_ids": ids, "attention_mask": torch.tensor(encoded["attention_mask"], dtype=torch.int64)}
        if prompts is not None:  # completion tokens: those past the prompt, and added ones (EOS) after them
            keep = []
            for start, end in encoded["offset_mapping"]:
                keep.append(any(keep) if start == end else end > len(prompts[i]))
            example["labels"] = ids.masked_fill(~torch.tensor(keep), -100)
        if labels is not None:
            example["labels"] = torch.tensor(labels[i], dtype=torch.int64)
        out.append(example)
    return out


def assert_same(rows, dicts) -> None:
    assert len(rows) == len(dicts)
    for got, want in zip(rows, dicts):
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def old_fingerprint(ids, dicts) -> str:
    return fingerprint(Tokenized(examples=dicts, ids=ids, truncated=0))


def test_plain_masked_and_labelled_splits_hold_the_tokenizers_tensors_and_fingerprints(sources_corpus, gpt2_tokenizer):
    texts, ids = sources_corpus.column("text").to_pylist(), sources_corpus.column("id").to_pylist()
    rows = list(range(len(ids)))
    plain = tokenize(pa.table({"example_id": ids, "text": texts, "row": rows}), gpt2_tokenizer, 24, "causal_lm")
    reference = as_dicts(gpt2_tokenizer, texts, 24)
    assert isinstance(plain.examples, TokenRows)
    assert_same(plain.examples, reference)
    assert plain.examples.tokens.dtype == np.int32
    assert plain.examples.nbytes < 5 * sum(len(d["input_ids"]) for d in reference)
    assert fingerprint(plain) == old_fingerprint(ids, reference)  # stored runs' fingerprints still match

    prompts = [" ".join(t.split(" ")[:3]) for t in texts]
    completions = [t[len(p):] for t, p in zip(texts, prompts)]
    masked = tokenize(pa.table({"example_id": ids, "text": texts, "prompt": prompts, "completion": completions,
                                "row": rows}), gpt2_tokenizer, 24, "causal_lm")
    assert_same(masked.examples, as_dicts(gpt2_tokenizer, texts, 24, prompts=prompts))

    labels = [i % 3 for i in range(len(ids))]
    labelled = tokenize(pa.table({"example_id": ids, "text": texts, "label": labels, "row": rows}), gpt2_tokenizer, 24,
                        "sequence_classification", num_labels=3)
    assert_same(labelled.examples, as_dicts(gpt2_tokenizer, texts, 24, labels=labels))
    assert fingerprint(labelled) == old_fingerprint(ids, as_dicts(gpt2_tokenizer, texts, 24, labels=labels))


def test_take_slice_and_concat_select_what_list_indexing_selects(sources_corpus, gpt2_tokenizer):
    texts = sources_corpus.column("text").to_pylist()
    dicts = as_dicts(gpt2_tokenizer, texts, 16, prompts=[t[:10] for t in texts])
    builder = TokenRowsBuilder()
    for d in dicts:
        builder.add(d["input_ids"].tolist(), (d["labels"] != -100).tolist())
    rows = builder.build()
    assert_same(rows, dicts)
    picks = [5, 0, 5, len(dicts) - 1, 2]
    assert_same(rows.take(picks), [dicts[i] for i in picks])
    assert_same(rows[3:9:2], dicts[3:9:2])
    assert_same(rows[-1:], dicts[-1:])
    assert_same(TokenRows.concat([rows[:4], TokenRows.empty(), rows[4:]]), dicts)
    torch.testing.assert_close(collate(list(rows.take(picks)), 7), collate([dicts[i] for i in picks], 7))
    with pytest.raises(IndexError):
        rows[len(dicts)]


def test_a_split_read_file_by_file_plans_what_the_one_file_planned(tmp_path, sources_corpus, gpt2_dir):
    """The same ids, tokens and fingerprints from a folder of parts as from the one file, and the
    rows an append already holds are left out file by file."""
    one = tmp_path / "one.parquet"
    pq.write_table(sources_corpus, one)
    (tmp_path / "parts").mkdir()
    for i, start in enumerate(range(0, sources_corpus.num_rows, 5)):
        pq.write_table(sources_corpus.slice(start, 5), tmp_path / "parts" / f"part-{i:03d}.parquet")
    job = load_job(job_fixtures.job_file(tmp_path, gpt2_dir, one, one))
    parts = job.model_copy(deep=True)
    parts.data.train.path = str(tmp_path / "parts")
    whole, split = plan_job(job, ("train",)), plan_job(parts, ("train",))
    assert split.train.ids == whole.train.ids and fingerprint(split.train) == fingerprint(whole.train)
    assert split.train.files[0].endswith("part-000.parquet") and split.train.rows[5] == 0

    stored = set(whole.train.ids[3:12])
    appended = plan_job(parts, ("train",), stored_train_ids=stored)
    assert appended.stored_train == len(stored)
    assert appended.train.ids == [i for i in whole.train.ids if i not in stored]
    assert_same(appended.train.examples, [e for i, e in zip(whole.train.ids, whole.train.examples) if i not in stored])

    everything = plan_job(parts, ("train",), stored_train_ids=set(whole.train.ids))
    assert everything.train.ids == [] and len(everything.train.examples) == 0


def test_a_bad_file_after_good_ones_still_fails_the_read(tmp_path, sources_corpus, gpt2_dir):
    (tmp_path / "parts").mkdir()
    pq.write_table(sources_corpus.slice(0, 5), tmp_path / "parts" / "a.parquet")
    pq.write_table(sources_corpus.slice(5, 5).rename_columns(["id", "body"]), tmp_path / "parts" / "b.parquet")
    job = load_job(job_fixtures.job_file(tmp_path, gpt2_dir, tmp_path / "parts", tmp_path / "parts"))
    with pytest.raises(DataError, match=r"data.train.text_column: no column 'text' in '.*b.parquet'"):
        plan_job(job, ("train",))


def test_every_row_of_every_file_rejected_is_an_error_once_all_are_read(tmp_path, gpt2_dir, sources_corpus):
    (tmp_path / "bad").mkdir()
    for name in ("a", "b"):
        (tmp_path / "bad" / f"{name}.jsonl").write_text('{"id": "%s0", "text": ""}\n{"id": "%s1", "text": " "}\n'
                                                        % (name, name))
    pq.write_table(sources_corpus.slice(0, 2), tmp_path / "q.parquet")
    job = load_job(job_fixtures.job_file(tmp_path, gpt2_dir, tmp_path / "bad", tmp_path / "q.parquet",
                                         data={"on_bad_row": "skip"}))
    with pytest.raises(DataError, match=r"data.train \(2 files\): every row was rejected \(4 in all\)"):
        plan_job(job, ("train",))


def test_only_the_columns_the_job_reads_are_read_from_a_wide_file(tmp_path, sources_corpus):
    from distinf.inputs import dataset_files
    from distinf.inputs.readers import read_raw

    vectors = pa.array([[0.5] * 256] * sources_corpus.num_rows, pa.list_(pa.float32()))
    wide = sources_corpus.append_column("embedding", vectors)
    pq.write_table(wide, tmp_path / "wide.parquet")
    (source,) = dataset_files(str(tmp_path / "wide.parquet"), "data.train")
    (only,) = read_raw(source, "data.train", ["text"], columns=["id", "text"])
    assert only.column_names == ["id", "text"]
    (every,) = read_raw(source, "data.train", ["text"], columns=["id", "body"])
    assert every.column_names == ["id", "text", "embedding"]  # one is missing: all read, for the error to list
    table, _ = read_dataset(DatasetConfig(path=str(tmp_path / "wide.parquet"), id_column="id"), "train")
    assert table.column("example_id").to_pylist() == sources_corpus.column("id").to_pylist()


def bad_rows_table() -> pa.Table:
    """Rows with every kind of problem a batch boundary could split: an empty text, a missing id,
    an id repeated within a batch and across batches."""
    ids = [f"r{i}" for i in range(23)]
    texts = [f"text number {i} of the file" for i in range(23)]
    texts[4] = " "
    ids[9] = None
    ids[12] = "r10"   # repeats row 10 of an earlier batch
    ids[15] = "r14"   # repeats row 14 of the same batch
    ids[21] = "r2"    # repeats row 2, several batches earlier
    return pa.table({"id": ids, "text": texts, "label": [i % 2 for i in range(23)]})


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_a_file_read_in_small_batches_gives_what_it_gave_read_whole(tmp_path, monkeypatch, suffix):
    """Every row, id, rejection and error of a file split across many batches equals those of
    the file read in one batch: rows numbered in the file, repeats found across batches."""
    import json

    import pyarrow.csv as pacsv

    from distinf.inputs import readers

    def write(table: pa.Table, path) -> None:
        if suffix == ".parquet":
            pq.write_table(table, path, row_group_size=3)
        elif suffix == ".csv":
            pacsv.write_csv(table, path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))

    path = tmp_path / f"data{suffix}"
    write(bad_rows_table(), path)
    cfg = DatasetConfig(path=str(path), id_column="id", label_column="label")
    whole = read_dataset(cfg, "train", "skip")
    with pytest.raises(DataError) as whole_error:
        read_dataset(cfg, "train")
    monkeypatch.setattr(readers, "READ_BATCH_ROWS", 4)
    pieces = list(readers.read_files(cfg, "train", "skip"))
    assert len(pieces) >= 4  # batches of at least 4 rows (Parquet's row groups of 3 are joined)
    assert pa.concat_tables([p for p, _ in pieces]).equals(whole[0])
    assert [r for _, bad in pieces for r in bad] == whole[1]
    assert [(r.row, r.reason) for r in whole[1]] == [
        (4, "text is empty"), (9, "the id is missing"), (12, "duplicate id 'r10' (first at row 10)"),
        (15, "duplicate id 'r14' (first at row 14)"), (21, "duplicate id 'r2' (first at row 2)")]
    with pytest.raises(DataError) as batched_error:
        read_dataset(cfg, "train")
    # Read whole, the ids are checked before the texts; in batches, the first batch with a bad row stops it.
    assert str(whole_error.value) == f"data.train: '{path}' row 9: the id is missing"
    assert str(batched_error.value) == f"data.train: '{path}' row 4 (id 'r4'): text is empty"
    repeat = tmp_path / f"repeat{suffix}"  # an id of the first batch again in a later one
    ids = [f"r{i}" for i in range(10)]
    ids[8] = "r1"
    write(pa.table({"id": ids, "text": [f"text {i}" for i in range(10)]}), repeat)
    with pytest.raises(DataError, match=rf"data.train: '{repeat}': duplicate id 'r1' in rows 1, 8; ids must be unique"):
        read_dataset(DatasetConfig(path=str(repeat), id_column="id"), "train")
