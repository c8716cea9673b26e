"""Deterministic mistakes that no restart can fix, found by `distinf validate` in a second and
refused by `distinf run` before any worker loads the model (issue 16, fail fast)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

import job_fixtures
from distinf.cli import main
from distinf.core.tracking import track_modules


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fail_fast")
    train, queries = job_fixtures.corpus_files(root / "data")
    return job_fixtures.tiny_model_dir(root, "gpt2"), train, queries


def unreadable_weights(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the model folder whose weights are garbage: loading them would fail, so a check
    that passes or names a compression key read none of them."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors" * 64)
    return folder


def validate(job: Path, capsys, *overrides: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    code = main(["validate", str(job)] + [x for o in overrides for x in ("--set", o)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err, time.perf_counter() - start


@pytest.mark.parametrize("overrides, message", [
    (("compression.k=3",), "compression: compression.k=3 is smaller than the 18 tracked parameter tensors"),
    (("compression.modules.include=[no_such_module]",), "compression: no tracked parameters: check compression.modules"),
    (("compression.modules.exclude=['.*']",), "compression: no tracked parameters: check compression.modules"),
])
def test_validate_finds_compression_that_cannot_run_without_reading_weights(inputs, tmp_path, capsys, overrides,
                                                                            message):
    model_dir, train, queries = inputs
    job = job_fixtures.job_file(tmp_path, unreadable_weights(model_dir, tmp_path), train, queries)
    code, out, seconds = validate(job, capsys, *overrides)
    assert code == 2 and message in out, out
    assert seconds < 30  # no model load, no Ray: the meta model's shapes only


def test_validate_passes_a_good_compression_without_reading_weights(inputs, tmp_path, capsys):
    model_dir, train, queries = inputs
    job = job_fixtures.job_file(tmp_path, unreadable_weights(model_dir, tmp_path), train, queries)
    code, out, _ = validate(job, capsys, "compression.k=18")
    assert code == 0 and "ok:" in out, out


@pytest.mark.parametrize("lora", [None, {"r": 2, "target_modules": ["c_attn"]}])
def test_the_meta_model_tracks_the_parameters_the_loaded_model_does(inputs, lora):
    """What validate checks is what a worker would find: names, shapes and ties."""
    from distinf.config import ModelConfig
    from distinf.models import load_model, meta_model

    cfg = ModelConfig(path=str(inputs[0]), lora=lora)
    meta, real = meta_model(cfg), load_model(cfg)
    assert all(p.is_meta for p in meta.parameters())
    assert track_modules(meta).param_shapes == track_modules(real).param_shapes


def without_pad_or_eos(model_dir: Path, tmp_path: Path) -> Path:
    """The model folder with a tokenizer that has neither a pad nor an eos token."""
    folder = tmp_path / "no-pad-model"
    shutil.copytree(model_dir, folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        settings = json.loads((folder / name).read_text())
        settings.update(pad_token=None, eos_token=None)
        (folder / name).write_text(json.dumps(settings))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["padding"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


def test_a_tokenizer_without_pad_or_eos_is_refused_by_validate_naming_the_model(inputs, tmp_path, capsys):
    model_dir, train, queries = inputs
    folder = without_pad_or_eos(model_dir, tmp_path)
    code, out, _ = validate(job_fixtures.job_file(tmp_path, folder, train, queries), capsys)
    assert code == 2, out
    assert f"model.path: the tokenizer in '{folder}' has neither a pad nor an eos token" in out


def test_a_tokenizer_without_pad_or_eos_stops_run_before_any_worker_starts(inputs, tmp_path, capsys):
    model_dir, train, queries = inputs
    folder = without_pad_or_eos(model_dir, tmp_path)
    job = job_fixtures.job_file(tmp_path, folder, train, queries)
    start = time.perf_counter()
    assert main(["run", str(job)]) == 2
    assert "has neither a pad nor an eos token" in capsys.readouterr().err
    assert time.perf_counter() - start < 30  # refused in the driver's plan: no Ray, no model load
    assert not (tmp_path / "run" / "manifest.json").exists()
