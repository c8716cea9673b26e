"""The model fingerprint covers every byte of the weights, and an unchanged checkpoint is not
read again on the next run (issue 16)."""

from __future__ import annotations

import json
import os
import time

import pytest

from distinf import models
from distinf.config import ModelConfig

MIB = 1 << 20


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTINF_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (folder / "model.safetensors").write_bytes(os.urandom(6 * MIB))  # bytes only: never loaded here
    for file in folder.iterdir():
        saved_a_minute_ago(file)
    return folder


def saved_a_minute_ago(path, plus_ns: int = 0):
    """Files saved just now are hashed but not cached (a second save could share their mtime)."""
    then = time.time_ns() - 60 * 1_000_000_000 + plus_ns
    os.utime(path, ns=(then, then))


@pytest.fixture
def hashed(monkeypatch):
    """The names of the files whose bytes were read and hashed, in order."""
    names, original = [], models._file_sha256

    def counting(path):
        names.append(path.name)
        return original(path)

    monkeypatch.setattr(models, "_file_sha256", counting)
    return names


def resave_middle_byte(path):
    """Change one byte in the middle of the file, keeping its size, as a re-saved fine-tune would."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # the same file, the same size, a new mtime


def test_a_resave_that_changes_only_middle_bytes_changes_the_fingerprint(model_dir):
    cfg = ModelConfig(path=str(model_dir))
    before = models.model_fingerprint(cfg)
    resave_middle_byte(model_dir / "model.safetensors")
    assert models.model_fingerprint(cfg) != before


def test_an_unchanged_checkpoint_is_hashed_once_and_a_touched_one_again(model_dir, hashed):
    cfg = ModelConfig(path=str(model_dir))
    first = models.model_fingerprint(cfg)
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    hashed.clear()
    assert models.model_fingerprint(cfg) == first and hashed == []  # from the cache: nothing read

    saved_a_minute_ago(model_dir / "model.safetensors", plus_ns=1_000_000)  # touched, bytes unchanged
    assert models.model_fingerprint(cfg) == first and hashed == ["model.safetensors"]
    hashed.clear()
    assert models.model_fingerprint(cfg) == first and hashed == []


def test_a_file_saved_just_now_is_hashed_every_time_until_its_mtime_is_safely_past(model_dir, hashed):
    cfg = ModelConfig(path=str(model_dir))
    first = models.model_fingerprint(cfg)
    resave_middle_byte(model_dir / "model.safetensors")  # mtime: now
    hashed.clear()
    second = models.model_fingerprint(cfg)
    assert second != first and hashed == ["model.safetensors"]
    hashed.clear()
    assert models.model_fingerprint(cfg) == second and hashed == ["model.safetensors"]  # not cached yet


def test_the_cache_is_per_user_and_a_broken_or_unwritable_one_only_costs_hashing(model_dir, hashed, monkeypatch,
                                                                                 tmp_path):
    cfg = ModelConfig(path=str(model_dir))
    expected = models.model_fingerprint(cfg)
    for entry in (tmp_path / "cache" / "sha256").iterdir():
        entry.write_text("{not json")  # a damaged entry is hashed again and rewritten
    hashed.clear()
    assert models.model_fingerprint(cfg) == expected and len(hashed) == 2
    assert not [p for p in (tmp_path / "cache" / "sha256").iterdir() if p.name.endswith(".tmp")]

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("DISTINF_CACHE", str(blocked / "cache"))  # cannot be created
    hashed.clear()
    assert models.model_fingerprint(cfg) == expected and len(hashed) == 2

    monkeypatch.delenv("DISTINF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.fingerprint_cache_dir() == tmp_path / "xdg" / "distinf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.fingerprint_cache_dir() == tmp_path / "home" / ".cache" / "distinf"


# ---------------------------------------------------------------------------------------------
# Every file of the folder (issue 28)


@pytest.mark.parametrize("name", ["chat_template.jinja", "vocab.txt", "merges.txt", "tokenizer.model",
                                  "modeling_custom.py", "shards/model-00001-of-00002.safetensors"])
def test_a_change_to_any_file_of_the_folder_changes_the_fingerprint(model_dir, name):
    cfg = ModelConfig(path=str(model_dir))
    file = model_dir / name
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(b"the first version")
    before = models.model_fingerprint(cfg)
    file.write_bytes(b"the second version")
    assert models.model_fingerprint(cfg) != before


def test_version_control_caches_and_locks_are_ignored(model_dir):
    cfg = ModelConfig(path=str(model_dir))
    before = models.model_fingerprint(cfg)
    for name in (".git/index", ".cache/huggingface/download/model.safetensors.metadata", "__pycache__/x.pyc",
                 "model.safetensors.lock", "weights.incomplete"):
        (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / name).write_bytes(os.urandom(16))
    assert models.model_fingerprint(cfg) == before


def test_a_run_stored_with_the_earlier_format_is_compared_with_the_earlier_computation(model_dir):
    import hashlib

    cfg = ModelConfig(path=str(model_dir))
    digest = hashlib.sha256(json.dumps(cfg.model_dump(exclude={"path"}), sort_keys=True).encode())
    for file in sorted(model_dir.iterdir()):  # the earlier format, written out independently
        sha = hashlib.sha256(file.read_bytes()).hexdigest()
        digest.update(f"{file.name}:{file.stat().st_size}:{sha}:".encode())
    stored = digest.hexdigest()
    assert models.model_fingerprint(cfg, like=stored) == stored
    assert models.model_fingerprint(cfg).startswith(models.FINGERPRINT_FORMAT)


def test_a_worker_refuses_model_files_that_differ_from_the_drivers(model_dir):
    cfg = ModelConfig(path=str(model_dir))
    expected = models.model_fingerprint(cfg)
    models.verify_model(cfg, expected)  # the same files: accepted
    (model_dir / "tokenizer.model").write_bytes(b"swapped by the model pipeline mid-run")
    with pytest.raises(models.ModelError, match="differ from those the job started with"):
        models.verify_model(cfg, expected)


def test_a_gradient_worker_checks_the_model_files_before_it_loads_them(model_dir):
    from types import SimpleNamespace

    from distinf.runtime.worker import GradientWorker

    class NeverLoaded:
        def setup(self, *args):
            raise AssertionError("the model was loaded before its files were checked")

    cfg = ModelConfig(path=str(model_dir))
    expected = models.model_fingerprint(cfg)
    (model_dir / "chat_template.jinja").write_text("{{ messages }}")  # changed after the driver's fingerprint
    worker = SimpleNamespace(cfg=SimpleNamespace(model=cfg), shard=NeverLoaded(), rank=0, world_size=1)
    setup = GradientWorker.__ray_metadata__.modified_class.setup  # the actor method, run in this process
    with pytest.raises(models.ModelError, match="differ from those the job started with"):
        setup(worker, "127.0.0.1", 0, expected)
