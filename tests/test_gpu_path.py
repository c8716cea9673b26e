"""What a `device: cuda` job builds, checked on a machine without a GPU; and that a CPU job keeps its own."""

import os

import torch

from distinf.config import JobConfig
from distinf.core.tasks import move_batch
from distinf.runtime.workers import worker_bundle, worker_env
from distinf.runtime.shard import GradientShard, distributed_env, process_group_backend, shard_device


def _job(device: str, dtype: str = "float32") -> JobConfig:
    return JobConfig.model_validate({
        "name": "gpu", "model": {"path": "m", "dtype": dtype},
        "data": {"train": {"path": "t.parquet"}, "queries": {"path": "q.parquet"}},
        "runtime": {"num_workers": 4, "device": device},
    })


def test_a_cuda_job_names_cuda_to_deepspeed_even_on_a_node_that_says_cpu(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # as this test machine (and its Makefile) sets it
    assert worker_env("cuda")["DS_ACCELERATOR"] == "cuda"
    assert worker_env("cpu")["DS_ACCELERATOR"] == "cpu"
    for env in (worker_env("cuda"), worker_env("cpu")):
        assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"


def test_a_cuda_rank_gets_one_gpu_its_device_zero_and_nccl():
    assert worker_bundle("cuda") == {"CPU": 1, "GPU": 1}
    assert worker_bundle("cpu") == {"CPU": 1}
    device = shard_device("cuda")
    assert device == torch.device("cuda", 0)  # Ray leaves an actor its one GPU, visible as index 0
    assert process_group_backend(device) == "nccl"
    assert process_group_backend(shard_device("cpu")) == "gloo"
    assert GradientShard(_job("cuda", "bfloat16"), 3, 4).device == torch.device("cuda", 0)
    assert GradientShard(_job("cpu"), 3, 4).device == torch.device("cpu")


def test_every_rank_is_local_rank_zero_of_its_own_visible_devices():
    env = distributed_env(3, 4, "10.0.0.1", 29500)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert "DS_ACCELERATOR" not in os.environ or os.environ["DS_ACCELERATOR"] == "cpu"  # the test process untouched


def test_a_cpu_batch_moves_unchanged_and_shares_no_pinned_memory():
    batch = {"input_ids": torch.arange(6).view(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    moved = move_batch(batch, torch.device("cpu"))
    assert all(torch.equal(moved[k], batch[k]) and not moved[k].is_pinned() for k in batch)


def test_the_zero3_build_runs_on_a_transformers_without_the_arange_guard(monkeypatch):
    # transformers 5.17 (the GPU machine's) has no prevent_arange_dtype_change; its import used to
    # fail every rank's setup there.
    import transformers.integrations.deepspeed as hf_deepspeed

    from distinf.runtime.zero3 import arange_dtype_guard

    monkeypatch.delattr(hf_deepspeed, "prevent_arange_dtype_change", raising=False)
    with arange_dtype_guard():
        assert torch.arange(3, dtype=torch.float32).dtype == torch.float32


def test_a_trimmed_wheel_lists_exactly_what_it_keeps(tmp_path):
    import base64
    import hashlib
    import zipfile

    from benchmarks.speed.trim_wheel import trim_wheel

    files = {"ray/__init__.py": b"x = 1\n", "ray/jars/a.jar": b"j" * 100, "ray/serve/api.py": b"s\n",
             "ray/dashboard/client/build/index.html": b"<html>", "ray/dashboard/agent.py": b"a\n",
             "ray/_private/thirdparty_files/pkg-1.dist-info/RECORD": b"pkg/x.py,,\n"}
    wheel = tmp_path / "ray-1.0-cp312-cp312-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("ray-1.0.dist-info/RECORD", "".join(f"{n},,\n" for n in files))
    out = trim_wheel(wheel, tmp_path / "out")
    with zipfile.ZipFile(out) as archive:
        names = set(archive.namelist())
        record = archive.read("ray-1.0.dist-info/RECORD").decode().splitlines()
        vendored = archive.read("ray/_private/thirdparty_files/pkg-1.dist-info/RECORD")
    kept = {"ray/__init__.py", "ray/dashboard/agent.py", "ray/_private/thirdparty_files/pkg-1.dist-info/RECORD"}
    assert names == kept | {"ray-1.0.dist-info/RECORD"}
    assert vendored == b"pkg/x.py,,\n"  # a vendored package's RECORD is an ordinary file, left as it was
    digest = base64.urlsafe_b64encode(hashlib.sha256(files["ray/__init__.py"]).digest()).rstrip(b"=").decode()
    assert f"ray/__init__.py,sha256={digest},6" in record
    assert {line.split(",")[0] for line in record} == kept | {"ray-1.0.dist-info/RECORD"}
