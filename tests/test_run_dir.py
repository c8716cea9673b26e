"""The run directory without Ray: the manifest's round trip, the "same job?" check of each mode,
the chunk ledger, stale chunks of a failed append, and damaged files. Seconds, no workers."""

import copy
import hashlib
import json

import pyarrow as pa
import pytest

from distinf.config import RuntimeConfig
from distinf.runtime.errors import JobError
from distinf.runtime.lease import LeaseLost, acquire, write_manifest
from distinf.runtime.ledger import commit_chunk, pending_chunks
from distinf.runtime.manifest import CARRIED, Manifest
from distinf.runtime.run import Run
from distinf.runtime.run_dir import RunDir, check_appendable, check_queryable, check_resumable

CONFIG = {
    "name": "night",
    "model": {"path": "/models/a", "task": "causal_lm"},
    "data": {"train": {"path": "train.parquet", "text_column": "text"},
             "queries": {"path": "queries.parquet", "text_column": "text"}, "max_length": 64},
    "compression": {"method": "random", "k": 256, "seed": 0},
    "hessian": {"method": "gauss_newton", "blocks": "layer"},
    "scoring": {"top_k": 10, "dense": False},
    "runtime": {"address": None, "num_workers": 2, "max_restarts": 2, "stall_timeout": 600.0,
                "lease_seconds": 120.0, "placement_timeout": 600.0},
    "output": {"path": "run", "keep_versions": 7, "gradient_dtype": "float16"},
}


def changed(config: dict, dotted: str) -> dict:
    """`config` with the value at `dotted` replaced by one it cannot equal."""
    config = copy.deepcopy(config)
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = ["changed", node.get(last)]
    return config


def leaves(config: dict, prefix: str = "") -> list[str]:
    return [key for name, value in config.items()
            for key in (leaves(value, f"{prefix}{name}.") if isinstance(value, dict) else [f"{prefix}{name}"])]


RUNTIME = {f"runtime.{key}" for key in CONFIG["runtime"]}
MAY_CHANGE = {
    # Where and how patiently it runs; moved model and data files are checked by fingerprint.
    "resume": RUNTIME - {"runtime.num_workers"} | {"output.path", "output.keep_versions", "model.path",
                                                   "data.train.path", "data.queries.path"},
    # Also the name and the workers: an append's chunks are a segment of their own.
    "append": RUNTIME | {"name", "output.path", "output.keep_versions", "model.path", "data.train.path",
                         "data.queries.path"},
    # Also how the query file reads and how many scores are written; never the run's numbers.
    "query": RUNTIME | {"name", "output.path", "model.path", "data.queries.path", "data.queries.text_column",
                        "scoring.top_k", "scoring.dense", "scoring.normalize"},
}
"""What each mode may change among the job's keys, written out here rather than read from the lists."""


def stored(config: dict = CONFIG) -> Manifest:
    return Manifest(status="complete", name=config["name"], config=config, model_fingerprint="model-a",
                    data_fingerprint={"train": "train-a", "queries": "queries-a"})


# ---------------------------------------------------------------------------------------------
# Same job? Every key of the job, against each mode's allow-list


@pytest.mark.parametrize("key", leaves(CONFIG))
def test_resume_allows_exactly_its_keys_and_names_a_refused_one(tmp_path, key):
    new = changed(CONFIG, key)
    data = {"train": "train-a", "queries": "queries-a"}
    if key in MAY_CHANGE["resume"]:
        check_resumable(stored(), new, "model-a", data, RunDir(tmp_path))
    else:
        with pytest.raises(JobError, match=f"--resume: .* holds a different job: {key} "):
            check_resumable(stored(), new, "model-a", data, RunDir(tmp_path))


@pytest.mark.parametrize("key", leaves(CONFIG))
def test_append_allows_exactly_its_keys_and_names_a_refused_one(tmp_path, key):
    new = changed(CONFIG, key)
    if key in MAY_CHANGE["append"]:
        check_appendable(stored(), new, "model-a", "queries-a", RunDir(tmp_path))
    else:
        with pytest.raises(JobError, match=f"--append-to: .* different settings: {key} "):
            check_appendable(stored(), new, "model-a", "queries-a", RunDir(tmp_path))


@pytest.mark.parametrize("key", leaves(CONFIG))
def test_query_allows_exactly_its_keys_and_names_a_refused_one(key):
    new = changed(CONFIG, key)
    if key in MAY_CHANGE["query"]:
        check_queryable(stored(), new)
    else:
        with pytest.raises(JobError, match=f"--set {key} would score against a different run"):
            check_queryable(stored(), new)


def test_a_changed_model_or_data_is_refused_even_with_the_same_config(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(JobError, match="--resume: the model at model.path has changed"):
        check_resumable(stored(), CONFIG, "model-b", {"train": "train-a", "queries": "queries-a"}, run)
    with pytest.raises(JobError, match="--resume: data.train has changed"):
        check_resumable(stored(), CONFIG, "model-a", {"train": "train-b", "queries": "queries-a"}, run)
    with pytest.raises(JobError, match="--append-to: the model at model.path is not the one"):
        check_appendable(stored(), CONFIG, "model-b", "queries-a", run)
    with pytest.raises(JobError, match="--append-to: data.queries differs"):
        check_appendable(stored(), CONFIG, "model-a", "queries-b", run)


# ---------------------------------------------------------------------------------------------
# The manifest


def full_manifest() -> dict:
    base = {"status": "complete", "run_id": "r1", "name": "night", "config": CONFIG, "model_fingerprint": "m",
            "data_fingerprint": {"train": "t", "queries": "q"}, "index_set_hash": "h", "index_set_sha256": "s",
            "params": {"total": 10, "tracked": 5, "tracked_fraction": 0.5}, "workers": [{"rank": 0}],
            "restarts": [], "k": 4, "counts": {"train": 3}, "damping": [0.1], "zero_blocks": [], "timings": {},
            "chunks": {"train": [], "queries": []}, "outputs": {"dense": None}, "version": "r1",
            "history": ["r1"], "files": {"index_set.parquet": "abc"}, "as_of": "2026-01-01T00:00:00+00:00"}
    return {"status": "running", "run_id": "r2", "name": "night", "config": CONFIG, "model_fingerprint": "m",
            "data_fingerprint": {"train": "t2", "queries": "q"}, "restarts": [{"stage": "gradients"}],
            "append": {"base": base, "rejected": [["x", "train", 3, "empty", None]], "first_chunk": 4, "segment": 1,
                       "data_fingerprint": "new", "stored_ids": 3},
            "a_key_from_a_newer_distinf": {"kept": True}}


def test_a_manifest_reads_back_as_it_was_written_with_unknown_keys_kept(tmp_path):
    written = full_manifest()
    run = RunDir(tmp_path)
    with acquire(tmp_path, "test", ttl=60) as lease:
        lease.write_manifest(Manifest.from_dict(written).to_dict())
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == {**written, "run_id": lease.run_id}  # the lease holder signs it
    again = run.read_manifest()
    assert again.to_dict() == on_disk
    assert again.append.base.status == "complete" and again.last_complete() is again.append.base
    assert again.extra == {"a_key_from_a_newer_distinf": {"kept": True}}


def test_an_append_begun_before_rejected_rows_had_a_file_reads_with_the_file_unknown():
    for old_row in (["x", "train", 3, "empty"], ["x", "train", 3, "empty", "r0", "2026-01-01T00:00:00+00:00"]):
        written = full_manifest()
        written["append"]["rejected"] = [old_row, ["y", "train", 1, "empty", "part-1.jsonl"]]
        assert Manifest.from_dict(written).append.rejected == [["x", "train", 3, "empty", None],
                                                                ["y", "train", 1, "empty", "part-1.jsonl"]]


def test_a_manifest_leaves_out_what_is_not_known_yet():
    assert Manifest(status="running", name="n", config={}).to_dict() == {"status": "running", "name": "n",
                                                                          "config": {}}


@pytest.mark.parametrize("missing", ["status", "name", "config"])
def test_a_manifest_without_a_required_key_is_refused_naming_it(tmp_path, missing):
    data = {key: value for key, value in full_manifest().items() if key != missing}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"no key '{missing}'"):
        RunDir(tmp_path).read_manifest()
    with pytest.raises(JobError, match="--resume: .* has no readable manifest.json"):
        RunDir(tmp_path).stored_manifest("--resume")


def test_only_the_lease_holder_writes_a_manifest(tmp_path):
    with pytest.raises(LeaseLost, match="holds no lease"):
        write_manifest(tmp_path, Manifest(status="running", name="n", config={}).to_dict())
    assert not (tmp_path / "manifest.json").exists()


def test_a_later_job_carries_the_index_set_and_worker_layout_only():
    previous = Manifest.from_dict(full_manifest()["append"]["base"])
    later = Manifest(status="running", name="night", config=CONFIG, model_fingerprint="new-model")
    later.carry_from(previous)
    assert {key: getattr(later, key) for key in CARRIED} == {key: getattr(previous, key) for key in CARRIED}
    assert later.model_fingerprint == "new-model" and later.counts is None and later.restarts is None


def test_a_failed_job_leaves_a_failed_manifest_with_its_error(tmp_path):
    with Run.open(tmp_path, "new", "n", "test", RuntimeConfig()) as run:
        running = Manifest(status="running", name="n", config={}, restarts=[])
        run.begin(running)
        run.fail(RuntimeError("disk on fire"))
    assert RunDir(tmp_path).read_manifest().to_dict() == {**running.to_dict(), "status": "failed",
                                                          "error": "disk on fire"}
    assert running.status == "running"


# ---------------------------------------------------------------------------------------------
# The ledger, stale chunks and damaged files


def rows(ids: list[str]) -> pa.Table:
    return pa.table({"example_id": ids, "value": [float(len(i)) for i in ids]})


def test_the_ledger_counts_a_part_done_only_when_its_record_and_file_are_intact(tmp_path):
    run = RunDir(tmp_path)
    planned = {0: [["a", "b"], ["c"]], 1: [["d"], []]}
    for chunk, parts in planned.items():
        for rank, ids in enumerate(parts):
            commit_chunk(tmp_path, "train", rank, chunk, ids, rows(ids) if ids else None, [])
    records = run.verified_records("train", planned)
    assert set(records) == {(0, 0), (0, 1), (1, 0), (1, 1)} and pending_chunks(planned, records) == []
    assert records[(1, 1)]["file"] is None and records[(1, 1)]["rows"] == 0  # a part that kept no row

    damaged = run.chunk_path("train", 1, 0)
    damaged.write_bytes(damaged.read_bytes()[:-8])  # truncated after its commit
    replanned = {**planned, 1: [["d", "e"], []]}  # chunk 1 of rank 0 now holds other ids
    records = run.verified_records("train", replanned)
    assert set(records) == {(0, 0), (1, 1)}
    assert pending_chunks(replanned, records) == [0, 1]
    assert sorted(run.chunk_numbers("train")) == [0, 0, 1, 1]


def test_stale_chunks_are_those_from_first_chunk_that_the_plan_does_not_hold(tmp_path):
    run = RunDir(tmp_path)
    commit_chunk(tmp_path, "train", 0, 2, ["old"], rows(["old"]), [])  # the stored run's: below first_chunk
    commit_chunk(tmp_path, "train", 0, 3, ["x"], rows(["x"]), [])  # a failed append of another file
    commit_chunk(tmp_path, "train", 1, 3, ["y"], rows(["y"]), [])
    commit_chunk(tmp_path, "train", 0, 4, ["z"], rows(["z"]), [])  # this append's own, kept
    stale = run.stale_chunks("train", 3, {3: [["x"], ["other"]], 4: [["z"]]})
    assert sorted(p.name for p in stale) == ["part-00001-00003.json", "part-00001-00003.parquet"]
    stale = run.stale_chunks("train", 3, {4: [["z"]]})
    assert sorted(p.name for p in stale) == sorted(f"part-0000{r}-00003.{e}" for r in (0, 1)
                                                   for e in ("json", "parquet"))


def test_damaged_files_are_those_missing_or_not_matching_their_sha256(tmp_path):
    for name in ("a.parquet", "scores/b.parquet", "gradients/train/c.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    sha = {name: hashlib.sha256(name.encode()).hexdigest()
           for name in ("a.parquet", "scores/b.parquet", "gradients/train/c.parquet", "gone.parquet")}
    manifest = {"files": {n: sha[n] for n in ("a.parquet", "scores/b.parquet", "gone.parquet")},
                "chunks": {"train": [{"file": "gradients/train/c.parquet", "sha256": sha["gradients/train/c.parquet"]}]}}
    run = RunDir(tmp_path)
    assert run.damaged_files(manifest) == ["gone.parquet"]
    (tmp_path / "scores/b.parquet").write_bytes(b"changed")
    assert run.damaged_files(Manifest.from_dict({"status": "complete", "name": "n", "config": {}, **manifest})) \
        == ["gone.parquet", "scores/b.parquet"]


def test_a_folder_that_holds_something_is_not_resumed_without_resume(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match="output.path: .* is not empty; .* --resume"):
        with Run.open(tmp_path, "new", "n", "test", RuntimeConfig()):
            pass
    with pytest.raises(JobError, match="--resume: .* has no readable manifest.json"):
        with Run.open(tmp_path, "resume", "n", "test", RuntimeConfig()):
            pass
    with Run.open(tmp_path / "new", "resume", "n", "test", RuntimeConfig()) as run:  # an empty folder: a fresh run
        assert run.stored is None and run.mode == "resume"


@pytest.mark.parametrize("blocks", ["layer", "full"])
def test_the_curvature_blocks_of_a_stored_index_set_are_those_of_the_index_set(blocks):
    from distinf.core.curvature import block_slices
    from distinf.core.index_set import draw_index_set
    from distinf.runtime.reduce_score import curvature_slices

    index_set = draw_index_set([("a.weight", (8, 4)), ("a.bias", (8,)), ("b.weight", (3, 8))], k=20, seed=1)
    assert curvature_slices(index_set.to_table(), blocks) == block_slices(index_set, blocks)
