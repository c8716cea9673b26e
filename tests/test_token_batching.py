"""Token-budget steps in the 2-worker ZeRO-3 job: the same scores as the one-process core, rows in input order."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

import distinf
import job_fixtures
from distinf.config import load_job
from distinf.inputs import plan_job
from distinf.partition import PAD, chunk_plan
from distinf.runtime.driver import run_job
from distinf.runtime.gradient_pass import planned_steps

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_token_budget_steps_give_the_core_scores_with_rows_in_input_order(shared_ray, tmp_path, checkpointing):
    """With activation checkpointing too: ZeRO-3 gathers each block again for its recomputation."""
    model_dir = job_fixtures.tiny_model_dir(tmp_path, "gpt2")
    cfg = load_job(job_fixtures.job_file(tmp_path, model_dir, *job_fixtures.corpus_files(tmp_path / "data"),
                                         runtime={"tokens_per_step": 256, "chunk_examples": 12,
                                                  "activation_checkpointing": checkpointing}))
    plan = plan_job(cfg)
    lengths = np.diff(plan.train.examples.offsets)
    chunks = chunk_plan(len(plan.train.ids), 2, cfg.runtime.batch_size, cfg.runtime.chunk_examples)
    steps = [planned_steps(cfg, plan.train, parts) for parts in chunks]
    # The budget is what shapes the steps here: ranks run steps of different sizes, some beyond batch_size.
    sizes = [[len(s) for s in rank] for chunk in steps for rank in chunk]
    assert max(map(max, sizes)) > cfg.runtime.batch_size and len(lengths) > 1 and lengths.min() < lengths.max()
    assert any(a != b for chunk in steps for a, b in zip(*[[len(s) for s in rank] for rank in chunk]))

    manifest = run_job(cfg)
    assert manifest["status"] == "complete"
    reference = distinf.attribute(
        AutoModelForCausalLM.from_pretrained(cfg.model.path), plan.train.examples, plan.queries.examples,
        config=cfg.model_dump(include={"compression", "hessian", "scoring"}), train_ids=plan.train.ids,
        query_ids=plan.queries.ids, batch_size=3, pad_token_id=plan.pad_token_id)

    run = tmp_path / "run"
    for c, parts in enumerate(chunks):  # each committed part holds its planned rows in input order
        for rank, part in enumerate(parts):
            table = pq.read_table(run / "gradients" / "train" / f"part-{rank:05d}-{c:05d}.parquet")
            assert table.column("example_id").to_pylist() == [plan.train.ids[p] for p in part if p != PAD]
    grads = pq.read_table(run / "gradients" / "train").to_pydict()
    order = {x: i for i, x in enumerate(grads["example_id"])}
    ours = np.array([grads["grad"][order[x]] for x in plan.train.ids], dtype=np.float32)
    np.testing.assert_allclose(ours, reference.train_grads, rtol=1e-4, atol=1e-5 * np.abs(reference.train_grads).max())

    scores = job_fixtures.dense_scores(run, plan.queries.ids, plan.train.ids)
    np.testing.assert_allclose(scores, reference.scores, rtol=1e-4, atol=1e-4 * np.abs(reference.scores).max())
    values = pq.read_table(run / "scores" / "train_values.parquet")
    assert values.column("train_id").to_pylist() == plan.train.ids
