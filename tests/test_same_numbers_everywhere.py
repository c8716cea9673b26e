"""The job computes in model.dtype on every machine, whatever its accelerator says it supports.

DeepSpeed's CPU accelerator answers `is_fp16_supported()` with True or None depending on the CPU
(None on AMD EPYC), and `is_bf16_supported` differs between accelerators. Each combination is
emulated in this process and in every Ray worker (tests/accelerator_emulation.py); the 2-worker
ZeRO-3 job must then give the scores of the one-process core, which DeepSpeed never touches.
A loading library that builds other weights than asked must fail the run, never complete it.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import ray
from transformers import AutoModelForCausalLM

import accelerator_emulation
import distinf
import job_fixtures
from distinf.config import load_job
from distinf.inputs import plan_job
from distinf.models import ModelError
from distinf.runtime.driver import run_job
from distinf.runtime.workers import WORKER_ENV

pytestmark = pytest.mark.distributed

TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def emulating_ray():
    """One local Ray whose every worker process runs the emulation hook before anything else."""
    path = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**WORKER_ENV, "PYTHONPATH": path},
                          "worker_process_setup_hook": "accelerator_emulation.from_environment"})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("same_numbers")
    model_dir = job_fixtures.tiny_model_dir(root, "gpt2")
    cfg = load_job(job_fixtures.job_file(root, model_dir, *job_fixtures.corpus_files(root / "data"),
                                         runtime={"chunk_examples": 12}))
    plan = plan_job(cfg)
    reference = distinf.attribute(
        AutoModelForCausalLM.from_pretrained(cfg.model.path), plan.train.examples, plan.queries.examples,
        config=cfg.model_dump(include={"compression", "hessian", "scoring"}), train_ids=plan.train.ids,
        query_ids=plan.queries.ids, batch_size=4, pad_token_id=plan.pad_token_id)
    return cfg, plan, reference


@pytest.mark.parametrize("answers", ["fp16=true,bf16=true", "fp16=none,bf16=true",
                                     "fp16=true,bf16=false", "fp16=none,bf16=false"])
def test_two_worker_job_equals_the_one_process_core_whatever_the_accelerator_supports(
        answers, emulating_ray, job_and_reference, tmp_path, monkeypatch):
    cfg, plan, reference = job_and_reference
    monkeypatch.setenv(accelerator_emulation.VARIABLE, answers)
    accelerator_emulation.emulate(answers, monkeypatch.setattr)  # this process too, undone after
    manifest = run_job(cfg, run_dir=tmp_path / "run")
    assert manifest["status"] == "complete"
    assert [w["dtype"] for w in manifest["workers"]] == ["float32", "float32"]
    assert all(w["weight_check"]["params_compared"] > 0 for w in manifest["workers"])
    scores = job_fixtures.dense_scores(tmp_path / "run", plan.queries.ids, plan.train.ids)
    np.testing.assert_allclose(scores, reference.scores, rtol=1e-4, atol=1e-4 * np.abs(reference.scores).max())


def test_a_loader_that_builds_another_dtype_fails_the_run_naming_a_parameter(
        emulating_ray, job_and_reference, tmp_path, monkeypatch):
    cfg, _, _ = job_and_reference
    monkeypatch.setenv(accelerator_emulation.VARIABLE, "zero_init=bfloat16")
    with pytest.raises(ModelError, match=r"model.dtype is float32 but \d+ parameter\(s\) were built in another "
                                        r"dtype .*transformer\.wte\.weight \(bfloat16\)"):
        run_job(cfg, run_dir=tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "transformer.wte.weight" in manifest["error"]
