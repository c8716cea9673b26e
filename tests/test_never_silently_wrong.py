"""Answers that are never silently wrong (issue 16): float16 storage that would overflow, non-finite
curvature, queries or scores, a curvature that cannot be factorised, and curvature blocks whose
gradient is zero. Real jobs on real Ray actors and real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import job_fixtures
from distinf.cli import main, summary
from distinf.config import load_job
from distinf.config import HessianConfig
from distinf.core.curvature import GramSums, factorize, precondition, self_influence, zero_blocks
from distinf.core.curvatures import METHODS
from distinf.core.solvers import block_traces
from distinf.core.numerics import NumericalError
from distinf.runtime.errors import JobError
from distinf.runtime.failures import fatal as fatal_error
from distinf.runtime.curvature_files import read_solver
from distinf.runtime.reduce_score import curvature_slices
from distinf.runtime.reducer import Reducer
from distinf.store import file_sha256
from distinf.tables import gradient_schema, gradients_of, top_k_table

GOOD = ["the cat sat on the mat", "stocks fell sharply today", "a storm is coming in from the west",
        "the film was a quiet delight", "rain again in the city", "the team won the final at home"]
HUGE_WORD = "zebra"  # a token whose output embedding gives any example predicting it float16-sized gradients


@pytest.fixture(scope="module")
def huge_gradient_model_dir(tmp_path_factory):
    """A tiny untied GPT-2 whose output row for one token is hugely negative (along ln_f's bias):
    the token is never predicted, so an example with it as a target has a finite float32 loss
    (~1e9) and gradients of ~1e7, beyond float16's 65504; every other example is untouched."""
    folder = tmp_path_factory.mktemp("huge_model") / "model"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=30522, n_positions=64,
                                       tie_word_embeddings=False, pad_token_id=0))
    token = AutoTokenizer.from_pretrained(job_fixtures._tokenizer_dir())(HUGE_WORD, add_special_tokens=False)
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[token["input_ids"][0]] = -1e8 + 1e6 * torch.randn(32)
    model.save_pretrained(folder, safe_serialization=True)
    for name in job_fixtures.TOKENIZER_FILES:
        if (job_fixtures._tokenizer_dir() / name).exists():
            shutil.copy(job_fixtures._tokenizer_dir() / name, folder / name)
    return folder


def job(tmp_path: Path, model_path: Path, train_texts: list[str], **sections) -> Path:
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"id": f"t{i}", "text": t} for i, t in enumerate(train_texts)]),
                   data / "train.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": f"q{i}", "text": t} for i, t in enumerate(GOOD[:3])]),
                   data / "queries.parquet")
    sections.setdefault("runtime", {"num_workers": 1, "zero_stage": 0, "batch_size": 4, "chunk_examples": 4})
    return job_fixtures.job_file(tmp_path, model_path, data / "train.parquet", data / "queries.parquet", **sections)


def stored_gradients(run_dir: Path, split: str = "train") -> np.ndarray:
    return gradients_of(pq.read_table(run_dir / "gradients" / split))


# --- float16 storage ---------------------------------------------------------------------------------


def test_float16_overflow_rows_are_rejected_naming_float16s_range(shared_ray, tmp_path, huge_gradient_model_dir):
    texts = GOOD + [f"a {HUGE_WORD} in the rain", f"one {HUGE_WORD} too many"]
    path = job(tmp_path, huge_gradient_model_dir, texts, data={"on_bad_row": "skip"},
               output={"gradient_dtype": "float16"})
    assert main(["run", str(path)]) == 0

    run_dir = tmp_path / "run"
    rejected = pq.read_table(run_dir / "rejected.parquet").to_pylist()
    assert [r["example_id"] for r in rejected] == ["t6", "t7"]
    assert all("beyond float16's range" in r["reason"] and "gradient_dtype: float32" in r["reason"]
               for r in rejected), rejected
    assert np.isfinite(stored_gradients(run_dir)).all()  # no inf behind a checksum that verifies
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rejected_train"] == 2
    values = pq.read_table(run_dir / "scores" / "train_values.parquet")
    assert values.column("train_id").to_pylist() == [f"t{i}" for i in range(6)]


def test_float16_overflow_stops_the_job_naming_the_example(shared_ray, tmp_path, huge_gradient_model_dir, capsys):
    texts = GOOD[:3] + [f"a {HUGE_WORD} in the rain"]
    path = job(tmp_path, huge_gradient_model_dir, texts, output={"gradient_dtype": "float16"})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "example id(s) 't3' (gradient entry" in err and "beyond float16's range" in err
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "failed"


def test_the_same_rows_are_kept_under_float32_storage(shared_ray, tmp_path, huge_gradient_model_dir):
    # The rows are finite in float32: only their float16 copy would not be.
    path = job(tmp_path, huge_gradient_model_dir, GOOD[:3] + [f"a {HUGE_WORD} in the rain"],
               hessian={"damping": 1.0})
    assert main(["run", str(path)]) == 0
    assert pq.read_table(tmp_path / "run" / "rejected.parquet").num_rows == 0


# --- non-finite curvature, queries and scores; a curvature that cannot be factorised ---------------------


def test_a_cholesky_failure_is_fatal_at_once_naming_the_block_and_the_damping(shared_ray, tmp_path, capsys):
    # damping 0 and fewer examples than a block's columns: a singular block, the same on every restart.
    model_dir = job_fixtures.tiny_model_dir(tmp_path, "gpt2")
    assert main(["run", str(job(tmp_path, model_dir, GOOD, hessian={"damping": 0.0}))]) == 1
    err = capsys.readouterr().err
    assert "curvature block at columns 0:" in err and "not positive definite with damping 0" in err
    assert "raise hessian.damping" in err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["restarts"] == []


def _write_chunk(path: Path, grads: np.ndarray, dtype: str = "float16") -> tuple[str, str]:
    """A gradient chunk written as a worker would, but holding whatever grads hold (inf included)."""
    k = grads.shape[1]
    value = pa.float16() if dtype == "float16" else pa.float32()
    with np.errstate(over="ignore"):  # the overflow is the point
        flat = pa.array(grads.astype(np.float16 if dtype == "float16" else np.float32).ravel(), value)
    table = pa.table([pa.array([f"x{i}" for i in range(len(grads))]), pa.array(np.ones(len(grads), np.float32)),
                      pa.FixedSizeListArray.from_arrays(flat, k)], schema=gradient_schema(k, dtype))
    pq.write_table(table, path)
    return str(path), file_sha256(path)


@pytest.mark.parametrize("bad_split", ["train", "queries"])
def test_a_non_finite_chunk_is_refused_naming_the_file_and_the_block(shared_ray, tmp_path, bad_split):
    rng = np.random.default_rng(0)
    slices = [slice(0, 4), slice(4, 8)]
    train = rng.normal(size=(12, 8))
    queries = rng.normal(size=(2, 8))
    (train if bad_split == "train" else queries)[1, 5] = 1e6  # inf once stored as float16
    chunks = {"train": [_write_chunk(tmp_path / "train.parquet", train)],
              "queries": [_write_chunk(tmp_path / "queries.parquet", queries)]}
    reducer = Reducer.remote(slices, {"damping": "auto"})
    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(reducer.reduce.remote(chunks["train"], chunks["queries"], str(tmp_path / "curvature")))
    fatal = fatal_error(caught.value, tmp_path)
    assert fatal is not None and isinstance(fatal, JobError)  # no restart is tried
    assert f"{bad_split}.parquet" in str(fatal) and "columns 4:8" in str(fatal), str(fatal)
    ray.kill(reducer)


def test_a_non_finite_curvature_block_is_refused_naming_its_columns():
    grads = torch.ones(3, 4, dtype=torch.float64)
    sums = GramSums([slice(0, 2), slice(2, 4)]).add(grads)
    sums.blocks[1][0, 0] = float("nan")
    with pytest.raises(NumericalError, match="columns 2:4 holds non-finite values"):
        factorize(sums)


def test_top_k_refuses_a_non_finite_score_instead_of_dropping_it():
    scores = np.array([[3.0, 2.0], [np.nan, 1.0]])
    with pytest.raises(NumericalError, match="query 'q1'"):
        top_k_table(["q0", "q1"], ["a", "b"], scores, np.array([[0, 1], [0, 1]]), scores)


# --- curvature blocks whose gradient is zero -------------------------------------------------------------


def test_a_zero_block_contributes_exactly_nothing():
    rng = np.random.default_rng(0)
    grads = torch.from_numpy(rng.normal(size=(20, 6)))
    grads[:, 2:4] = torch.from_numpy(rng.normal(size=(20, 2)) * 1e-12)  # rounding of a zero gradient
    grads[:, 4:6] = 0.0                                                  # a frozen or unused tensor
    curvature = factorize(GramSums([slice(0, 2), slice(2, 4), slice(4, 6)]).add(grads))
    assert curvature.zero_blocks == [1, 2]
    assert curvature.damping[1] == curvature.damping[2] == 1.0  # not a tenth of the rounding's size
    q = precondition(curvature, grads[:3])
    assert (q[:, 2:6] == 0).all()
    without = factorize(GramSums([slice(0, 2)]).add(grads[:, :2]))
    torch.testing.assert_close(self_influence(curvature, grads), self_influence(without, grads[:, :2]))


class InMemoryChunks:
    """The training gradients as one chunk, offered as the reducer offers a run's chunks
    (distinf.core.curvatures.base.TrainChunks)."""

    def __init__(self, grads: torch.Tensor, ids: list[str], slices: list[slice]):
        self.grads, self._ids, self.slices = grads, ids, slices

    def sum(self, empty, start=None):
        total = empty().add(self.grads)
        return total if start is None else start.merge(total)

    def traces(self):
        return block_traces(self.grads, self.slices), len(self._ids)

    def ids(self):
        return list(self._ids)

    def rows(self, positions):
        return self.grads[list(positions)].double()

    def stored_gram_sums(self):
        return None

    def step(self, name):
        pass


@pytest.fixture(scope="module")
def gpt2_dropout_gradients(tmp_path_factory):
    """Dropout-compressed gradients of a tiny GPT-2 on real text, as `distinf.attribute` computes
    them: layer 1's attention bias keeps only key-bias entries, whose gradient is float32 rounding
    of zero (softmax ignores a shift of every key by one vector)."""
    from transformers import AutoModelForCausalLM

    import distinf
    from distinf.inputs import plan_job

    root = tmp_path_factory.mktemp("dropout_gradients")
    model_dir = job_fixtures.tiny_model_dir(root, "gpt2")
    train, queries = job_fixtures.corpus_files(root / "data")
    cfg = load_job(job_fixtures.job_file(root, model_dir, train, queries, compression={"method": "dropout", "k": 256},
                                         hessian={"method": "identity"}))
    plan = plan_job(cfg)
    result = distinf.attribute(AutoModelForCausalLM.from_pretrained(cfg.model.path), plan.train.examples,
                               plan.queries.examples, config=cfg.model_dump(include={"compression", "hessian"}),
                               train_ids=plan.train.ids, query_ids=plan.queries.ids, batch_size=3,
                               pad_token_id=plan.pad_token_id)
    return result, plan.train.ids


@pytest.mark.parametrize("method", [name for name, m in METHODS.items() if not m.needs_factors and name != "identity"])
def test_every_method_leaves_a_real_zero_block_out_of_every_score(gpt2_dropout_gradients, method):
    """datainf and lissa damp each block by its own scale, so a block of rounding noise would be
    amplified to the size of every other block's contribution (before: 81% and 19% of the largest
    score on this model); every damped method leaves it out, as gauss_newton does, in
    `distinf.attribute`, in the job's chunked solve and in the curvature a run stores. (identity is
    undamped: its rounding stays rounding. The Kronecker methods share gauss_newton's rule.)"""
    result, ids = gpt2_dropout_gradients
    train, queries = torch.from_numpy(result.train_grads), torch.from_numpy(result.query_grads)
    slices = curvature_slices(result.index_set, "layer")
    zero = zero_blocks(block_traces(train, slices), len(ids), slices)
    params = result.index_set.column("param").to_pylist()
    assert "transformer.h.1.attn.c_attn.bias" in {params[slices[i].start] for i in zero}
    cleared = train.double().clone()
    for i in zero:
        cleared[:, slices[i]] = 0
    hessian = HessianConfig(method=method, **({"lissa_batch_size": 5} if method == "lissa" else {}))
    chosen = METHODS[method](hessian)
    solvers = {"fit": chosen.fit(slices, train, ids)}
    chunked = chosen.solve_chunks(slices, InMemoryChunks(train, ids, slices))
    arrays = {name: torch.from_numpy(np.array(a, copy=True)) for name, a in chunked.arrays}  # as they are written
    solvers["chunks"] = chunked.solver()
    layout = {"count": len(ids), "zero_blocks": getattr(solvers["chunks"], "zero_blocks", []),
              "blocks": [{"start": s.start, "stop": s.stop, "damping": d}
                         for s, d in zip(slices, solvers["chunks"].damping)]}
    solvers["stored"] = chosen.from_arrays(arrays, layout)
    for how, solver in solvers.items():
        preconditioned = precondition(solver, queries)
        for i in zero:
            assert (preconditioned[:, slices[i]] == 0).all(), (how, i)
        torch.testing.assert_close(preconditioned @ train.double().T, preconditioned @ cleared.T, rtol=0, atol=0)
        torch.testing.assert_close(self_influence(solver, train), self_influence(solver, cleared), rtol=1e-12,
                                   atol=0)


def test_the_job_names_gpt2s_key_bias_as_a_zero_block_and_leaves_it_out(tiny_run):
    run_dir, job_path = tiny_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    zero = {z["columns"]: z["params"] for z in manifest["zero_blocks"]}
    assert ["transformer.h.1.attn.c_attn.bias"] in zero.values(), zero
    index = pq.read_table(run_dir / "index_set.parquet").column("param").to_pylist()
    for columns, params in zero.items():
        a, b = map(int, columns.split(":"))
        assert list(dict.fromkeys(index[a:b])) == params
    text = summary(manifest, run_dir)
    assert "block(s) with a zero gradient, left out of every score" in text
    assert "(transformer.h.1.attn.c_attn.bias)" in text

    # Exactly nothing: the stored scores are those of the gradients with the zero blocks' columns cleared.
    manifest = json.loads((run_dir / "manifest.json").read_text())
    curvature = read_solver(run_dir, manifest["files"], load_job(job_path).hessian)
    assert [(curvature.slices[i].start, curvature.slices[i].stop) for i in curvature.zero_blocks] == \
        [tuple(map(int, c.split(":"))) for c in zero]
    train = torch.from_numpy(stored_gradients(run_dir))
    query = torch.from_numpy(stored_gradients(run_dir, "queries"))
    cleared = train.clone()
    for i in curvature.zero_blocks:
        cleared[:, curvature.slices[i]] = 0
    q = precondition(curvature, query)
    for i in curvature.zero_blocks:
        assert (q[:, curvature.slices[i]] == 0).all()
    torch.testing.assert_close(cleared.double() @ q.T, train.double() @ q.T, rtol=0, atol=0)
    assert load_job(job_path).hessian.damping == "auto"
