"""Bad input through `distinf validate` and `distinf run`: every case gets an error that names the
file, row, id or key, or, with data.on_bad_row: skip, a line in rejected.parquet while the run
goes on. (Reading each file format is covered in test_data.py.)"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import job_fixtures
from distinf.cli import main
from distinf.runtime import workers
from distinf.runtime.errors import write_error

GOOD = ["the cat sat on the mat", "stocks fell sharply today", "a storm is coming in from the west",
        "the film was a quiet delight", "rain again in the city", "the team won the final at home"]
NAN_WORD = "zebra"  # a single token whose embedding the poisoned model holds as NaN


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return job_fixtures.tiny_model_dir(tmp_path_factory.mktemp("bad_input_model"), "gpt2")


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    """A tiny untied GPT-2 whose embedding of one token is NaN: any example using it has a NaN loss,
    as an fp16 overflow would give, and no other example is touched."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("nan_model") / "model"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=30522, n_positions=64,
                                       tie_word_embeddings=False, pad_token_id=0))
    token = AutoTokenizer.from_pretrained(job_fixtures._tokenizer_dir())(NAN_WORD, add_special_tokens=False)
    with torch.no_grad():
        model.transformer.wte.weight[token["input_ids"][0]] = float("nan")
    model.save_pretrained(folder, safe_serialization=True)
    for name in job_fixtures.TOKENIZER_FILES:
        if (job_fixtures._tokenizer_dir() / name).exists():
            shutil.copy(job_fixtures._tokenizer_dir() / name, folder / name)
    return folder


def write_rows(path: Path, rows: list[dict], binary_text: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    if binary_text:  # bytes, so that a row can hold text that is not UTF-8
        table = table.set_column(table.schema.get_field_index("text"), "text",
                                 pa.array([r["text"] for r in rows], pa.binary()))
    pq.write_table(table, path)
    return path


def job(tmp_path: Path, model_path: Path, train_rows: list[dict], query_rows: list[dict] | None = None,
        binary_text: bool = False, **sections) -> Path:
    train = write_rows(tmp_path / "data" / "train.parquet", train_rows, binary_text)
    queries = write_rows(tmp_path / "data" / "queries.parquet",
                         query_rows or [{"id": f"q{i}", "text": t} for i, t in enumerate(GOOD[:3])])
    sections.setdefault("runtime", {"num_workers": 1, "zero_stage": 0, "batch_size": 4, "chunk_examples": 4})
    return job_fixtures.job_file(tmp_path, model_path, train, queries, **sections)


def good_rows() -> list[dict]:
    return [{"id": f"t{i}", "text": text, "label": i % 2} for i, text in enumerate(GOOD)]


def validate(path: Path, capsys, *overrides: str) -> tuple[int, str]:
    args = ["validate", str(path)] + [x for o in overrides for x in ("--set", o)]
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --- errors that name the culprit, before anything runs -------------------------------------------


def test_missing_file_names_the_key_and_the_path(tmp_path, model_dir, capsys):
    path = job(tmp_path, model_dir, good_rows())
    code, out = validate(path, capsys, f"data.train.path={tmp_path / 'nope.parquet'}")
    assert code == 2 and f"data.train.path: no such file '{tmp_path / 'nope.parquet'}'" in out


@pytest.mark.parametrize("key", ["data.train.text_column", "data.queries.id_column", "data.train.label_column"])
def test_missing_column_names_the_key_the_column_and_the_file(tmp_path, model_dir, capsys, key):
    code, out = validate(job(tmp_path, model_dir, good_rows()), capsys, f"{key}=body")
    assert code == 2 and f"{key}: no column 'body'" in out and ".parquet" in out


def test_empty_dataset_names_the_file(tmp_path, model_dir, capsys):
    path = job(tmp_path, model_dir, good_rows())
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                   tmp_path / "data" / "train.parquet")
    code, out = validate(path, capsys)
    assert code == 2 and "data.train:" in out and "train.parquet" in out and "has no rows" in out


def test_empty_text_names_the_row_and_the_id(tmp_path, model_dir, capsys):
    rows = good_rows()
    rows[3]["text"] = "   "
    code, out = validate(job(tmp_path, model_dir, rows), capsys)
    assert code == 2 and "train.parquet' row 3 (id 't3'): text is empty" in out


def test_non_utf8_text_names_the_row(tmp_path, model_dir, capsys):
    rows = [{"id": r["id"], "text": r["text"].encode()} for r in good_rows()]
    rows[2]["text"] = "café".encode("latin-1")
    code, out = validate(job(tmp_path, model_dir, rows, binary_text=True), capsys)
    assert code == 2 and "train.parquet' row 2" in out and "not valid UTF-8" in out


def test_over_long_text_is_truncated_and_counted(tmp_path, model_dir, capsys):
    rows = good_rows()
    rows[0]["text"] = " ".join(["word"] * 500)
    code, out = validate(job(tmp_path, model_dir, rows), capsys)
    assert code == 0 and f"{len(rows)} training examples (1 truncated to 48 tokens)" in out


@pytest.mark.parametrize("label, message", [(None, "row 4 (id 't4'): the label is missing"),
                                            (7, "row 4 (id 't4'): label 7 is outside 0..1"),
                                            (-1, "row 4 (id 't4'): label -1 is outside 0..1")])
def test_missing_or_out_of_range_label_names_the_row_and_the_id(tmp_path, model_dir, capsys, label, message):
    rows = good_rows()
    rows[4]["label"] = label
    path = job(tmp_path, model_dir, rows, model={"path": str(model_dir), "task": "sequence_classification"},
               data={"train": {"path": str(tmp_path / "data" / "train.parquet"), "id_column": "id",
                               "label_column": "label"},
                     "queries": {"path": str(tmp_path / "data" / "train.parquet"), "id_column": "id",
                                 "label_column": "label"}})
    code, out = validate(path, capsys)
    assert code == 2 and message in out


def test_duplicate_ids_name_the_id_and_its_rows(tmp_path, model_dir, capsys):
    rows = good_rows()
    rows[5]["id"] = "t1"
    code, out = validate(job(tmp_path, model_dir, rows), capsys)
    assert code == 2 and "duplicate id 't1' in rows 1, 5" in out


def test_skip_mode_lists_what_validate_would_leave_out(tmp_path, model_dir, capsys):
    rows = good_rows()
    rows[1]["text"], rows[5]["id"] = "", "t0"
    code, out = validate(job(tmp_path, model_dir, rows), capsys, "data.on_bad_row=skip")
    assert code == 0 and "4 training examples" in out
    assert "data.train: 2 row(s) will be skipped" in out and "row 1: text is empty" in out


# --- the output folder ------------------------------------------------------------------------------


def test_output_folder_that_cannot_be_created_is_named(tmp_path, model_dir, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = job(tmp_path, model_dir, good_rows(), output={"path": str(blocker / "run")})
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"output.path: cannot write to '{blocker / 'run'}'" in err


def test_output_folder_without_room_is_refused_before_anything_runs(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 4096))
    path = job(tmp_path, model_dir, good_rows(), compression={"k": 4096})
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "output.path:" in err and "4.0 KiB free" in err and "free some space" in err
    assert not ray.is_initialized()


def test_a_full_disk_mid_run_names_the_file_and_says_how_to_go_on(tmp_path):
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "gradients/train/part-00001-00002.parquet"))
    message = str(write_error(error, tmp_path))
    assert "part-00001-00002.parquet" in message and "No space left on device" in message and "--resume" in message


# --- non-finite losses, found by the workers ----------------------------------------------------------


def test_nan_loss_stops_the_job_naming_the_example(shared_ray, tmp_path, nan_model_dir, capsys):
    rows = good_rows()
    rows[2]["text"] = f"a {NAN_WORD} in the rain"
    assert main(["run", str(job(tmp_path, nan_model_dir, rows))]) == 2
    err = capsys.readouterr().err
    assert "data.train: non-finite loss or gradient for example id(s) 't2' (loss is nan)" in err
    assert "data.on_bad_row: skip" in err
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "failed"


def test_modules_that_track_nothing_fail_at_once_without_restarts(shared_ray, tmp_path, model_dir, capsys):
    path = job(tmp_path, model_dir, good_rows(), compression={"modules": {"include": ["no_such_module"]}})
    assert main(["run", str(path)]) == 2
    assert "compression: no tracked parameters: check compression.modules" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["restarts"] == []


def test_skip_mode_writes_every_bad_row_to_rejected_parquet_and_finishes(shared_ray, tmp_path, nan_model_dir):
    rows = [{"id": r["id"], "text": r["text"].encode()} for r in good_rows()]
    rows += [{"id": "blank", "text": b" "},                        # row 6
             {"id": "t0", "text": b"a repeated id"},               # row 7
             {"id": "latin1", "text": "café".encode("latin-1")},   # row 8
             {"id": "nan", "text": f"one {NAN_WORD} too many".encode()},  # row 9
             {"id": "../../escape", "text": b"an id that looks like a path"}]  # row 10, a good row
    path = job(tmp_path, nan_model_dir, rows, binary_text=True, data={"on_bad_row": "skip"})
    assert main(["run", str(path)]) == 0

    run_dir = tmp_path / "run"
    rejected = pq.read_table(run_dir / "rejected.parquet").to_pylist()
    assert [(r["example_id"], r["split"], r["row"]) for r in rejected] == [
        ("blank", "train", 6), ("t0", "train", 7), ("latin1", "train", 8), ("nan", "train", 9)]
    reasons = [r["reason"] for r in rejected]
    assert reasons[:2] == ["text is empty", "duplicate id 't0' (first at row 0)"]
    assert "not valid UTF-8" in reasons[2] and reasons[3] == "loss is nan"

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rejected_train"] == 4
    kept = [r["id"] for r in rows[:6]] + ["../../escape"]
    values = pq.read_table(run_dir / "scores" / "train_values.parquet")
    assert values.column("train_id").to_pylist() == kept
    assert all(v == v for v in values.column("score_mean").to_pylist())  # no NaN leaked into any score
    assert not list(tmp_path.rglob("escape*"))  # ids never become file names


# --- safe defaults --------------------------------------------------------------------------------


def test_a_local_ray_has_no_dashboard_and_would_bind_it_to_loopback(monkeypatch, tmp_path, model_dir):
    from distinf.config import load_job

    calls = []
    monkeypatch.setattr(workers.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(workers.ray, "init", lambda **kw: calls.append(kw))
    assert workers.connect(load_job(job(tmp_path, model_dir, good_rows()))) is True
    [kwargs] = calls
    assert kwargs["include_dashboard"] is False and kwargs["dashboard_host"] == "127.0.0.1"


def test_a_ray_that_does_not_start_is_retried_once_then_failed_in_the_manifest(monkeypatch, tmp_path, model_dir,
                                                                               capsys):
    calls = []

    def no_raylet(**kwargs):  # what ray.init raises when its raylet misses the start-up window
        calls.append(kwargs)
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(workers.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(workers.ray, "init", no_raylet)
    monkeypatch.setattr(workers.ray, "shutdown", lambda: None)
    path = job(tmp_path, model_dir, good_rows())
    assert main(["run", str(path)]) != 0
    assert len(calls) == 2
    assert "timed out during startup" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "--resume" in manifest["error"]
