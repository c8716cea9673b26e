"""One real 2-worker ZeRO-3 job on instruction data split over several files: its fingerprints and
scores equal distinf.attribute on the same data read from one file each."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

import distinf
import job_fixtures
from distinf.assets import mixed_source_corpus
from distinf.config import load_job
from distinf.inputs import fingerprint, plan_job
from distinf.runtime.driver import run_job

pytestmark = pytest.mark.distributed


def instructions(table: pa.Table) -> pa.Table:
    """Each text cut into a prompt (its first third of words, at least two) and a completion (the rest)."""
    prompts, completions = [], []
    for text in table.column("text").to_pylist():
        words = text.split(" ")
        cut = max(2, len(words) // 3)
        prompts.append(" ".join(words[:cut]))
        completions.append(" " + " ".join(words[cut:]))
    return pa.table({"id": table.column("id"), "prompt": prompts, "completion": completions})


def test_a_multi_file_instruction_job_equals_the_one_file_core(tmp_path):
    train, queries = (instructions(t) for t in mixed_source_corpus(4, 1, seed=0))
    one = tmp_path / "one"
    one.mkdir()
    pq.write_table(train, one / "train.parquet")
    pq.write_table(queries, one / "queries.parquet")
    for i, (a, b) in enumerate([(0, 9), (9, 17), (17, train.num_rows)]):
        (tmp_path / "train").mkdir(exist_ok=True)
        pq.write_table(train.slice(a, b - a), tmp_path / "train" / f"part-{i}.parquet")
    query_files = []
    for i, (a, b) in enumerate([(0, 2), (2, queries.num_rows)]):
        path = tmp_path / f"queries-{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in queries.slice(a, b - a).to_pylist()))
        query_files.append(str(path))

    model_dir = job_fixtures.tiny_model_dir(tmp_path, "gpt2")
    columns = {"id_column": "id", "prompt_column": "prompt", "completion_column": "completion"}
    job = job_fixtures.job_file(tmp_path, model_dir, tmp_path / "train", tmp_path / "q",
                                data={"train": {"path": str(tmp_path / "train"), **columns},
                                      "queries": {"path": query_files, **columns}, "max_length": 48})
    cfg = load_job(job)
    single = cfg.model_copy(deep=True)
    single.data.train.path, single.data.queries.path = str(one / "train.parquet"), str(one / "queries.parquet")
    plan = plan_job(single)
    assert all((ex["labels"][:3] == -100).all() for ex in plan.train.examples)  # the prompt carries no loss

    manifest = run_job(cfg)
    assert manifest["status"] == "complete"
    assert manifest["data_fingerprint"] == {"train": fingerprint(plan.train), "queries": fingerprint(plan.queries)}

    reference = distinf.attribute(
        AutoModelForCausalLM.from_pretrained(model_dir), plan.train.examples, plan.queries.examples,
        config=cfg.model_dump(include={"compression", "hessian", "scoring"}), train_ids=plan.train.ids,
        query_ids=plan.queries.ids, batch_size=3, pad_token_id=plan.pad_token_id)
    dense = pq.read_table(tmp_path / "run" / "scores" / "dense").to_pydict()
    q = {x: i for i, x in enumerate(plan.queries.ids)}
    t = {x: i for i, x in enumerate(plan.train.ids)}
    scores = np.full((len(q), len(t)), np.nan)
    for qid, tid, s in zip(dense["query_id"], dense["train_id"], dense["score"]):
        scores[q[qid], t[tid]] = s
    assert not np.isnan(scores).any()
    np.testing.assert_allclose(scores, reference.scores, rtol=1e-4, atol=1e-4 * np.abs(reference.scores).max())
    values = pq.read_table(tmp_path / "run" / "scores" / "train_values.parquet")
    np.testing.assert_allclose(values.column("loss").to_numpy(), reference.train_losses, rtol=1e-4)
