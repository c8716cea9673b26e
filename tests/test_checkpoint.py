"""Reading flat ranges of safetensors tensors by byte offset, against safetensors' own loader."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from distinf.checkpoint import Checkpoint, CheckpointError


@pytest.fixture
def sharded(tmp_path):
    """Two shard files with tensors of several dtypes and shapes, as save_pretrained splits them."""
    torch.manual_seed(0)
    first = {"a.weight": torch.randn(7, 5), "a.bias": torch.randn(7), "scalar": torch.tensor(3.5)}
    second = {"b.weight": torch.randn(3, 4, 6).to(torch.bfloat16), "c.weight": torch.randn(11, 2).half(),
              "ids": torch.arange(9)}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    return tmp_path


def test_every_range_equals_the_slice_of_safetensors_own_load(sharded):
    checkpoint = Checkpoint(sharded)
    expected = {**load_file(sharded / "model-00001-of-00002.safetensors"),
                **load_file(sharded / "model-00002-of-00002.safetensors")}
    assert set(checkpoint.tensors) == set(expected)
    for name, tensor in expected.items():
        flat = tensor.flatten()
        stored = checkpoint.tensors[name]
        assert stored.shape == tuple(tensor.shape) and stored.dtype == tensor.dtype
        n = flat.numel()
        for start, stop in [(0, n), (0, 0), (n // 3, n - 1), (n - 1, n), (1, 2)]:
            if start <= stop <= n:
                assert torch.equal(checkpoint.read(name, start, stop), flat[start:stop]), (name, start, stop)


def test_a_range_outside_the_tensor_is_refused_by_name(sharded):
    with pytest.raises(CheckpointError, match="range 30:36 is outside tensor 'a.weight' of 35 elements"):
        Checkpoint(sharded).read("a.weight", 30, 36)


def test_a_truncated_shard_names_the_file_and_tensor(sharded):
    file = sharded / "model-00002-of-00002.safetensors"
    whole = file.read_bytes()
    file.write_bytes(whole[:-20])
    with pytest.raises(CheckpointError, match="00002-of-00002.safetensors.*truncated"):  # refused at open
        Checkpoint(sharded)
    file.write_bytes(whole)
    checkpoint = Checkpoint(sharded)
    file.write_bytes(whole[:-20])  # truncated while it is read
    last = max(checkpoint.tensors, key=lambda n: checkpoint.tensors[n].offset if checkpoint.tensors[n].file == file else -1)
    with pytest.raises(CheckpointError, match=f"truncated inside tensor '{last}'"):
        checkpoint.read(last)


def test_a_tensor_in_two_shards_and_a_bad_header_are_refused(sharded, tmp_path_factory):
    save_file({"a.bias": torch.zeros(7)}, sharded / "extra.safetensors")
    with pytest.raises(CheckpointError, match="'a.bias' is in both"):
        Checkpoint(sharded)
    broken = tmp_path_factory.mktemp("broken")
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (broken / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match="tensor 'x' spans 8 bytes"):
        Checkpoint(broken)
