"""ZeRO-3 partitions streamed from safetensors (distinf.runtime.zero3), against from_pretrained.

Two real ranks (processes over gloo, DeepSpeed ZeRO-3); each gathers every parameter with
DeepSpeed's own GatheredParameters and compares it with the same checkpoint loaded by
transformers without DeepSpeed.
"""

import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import tiny_models
from distinf.checkpoint import Checkpoint, CheckpointError
from distinf.config import JobConfig
from distinf.runtime.zero3 import deepspeed_config, largest_gather, map_weights

pytestmark = pytest.mark.distributed


def _job(model_dir, task="causal_lm", dtype="float32", device="cpu") -> JobConfig:
    return JobConfig.model_validate({
        "name": "zero3", "model": {"path": str(model_dir), "task": task, "dtype": dtype},
        "data": {"train": {"path": "train.parquet"}, "queries": {"path": "queries.parquet"}},
        "runtime": {"num_workers": 2, "device": device},
    })


def _rank(rank: int, port: int, model_dir: str, task: str, skip: tuple[str, ...], sys_path: list[str]) -> None:
    sys.path[:] = sys_path
    import os

    import deepspeed

    from distinf.runtime.shard import distributed_env
    from distinf.runtime.zero3 import partitioned_model

    os.environ.update(distributed_env(rank, 2, "127.0.0.1", port))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = _job(model_dir, task)
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    reference = dict(auto.from_pretrained(model_dir).named_parameters())  # before any ZeRO-3 config is live
    model = partitioned_model(cfg.model, deepspeed_config(cfg, 2))
    names = [name for name, _ in model.named_parameters()]
    assert names == list(reference), (names, list(reference))
    for name, param in model.named_parameters():
        assert param.ds_tensor.numel() <= (param.ds_numel + 1) // 2 + 1  # this rank holds half, not the whole
        with deepspeed.zero.GatheredParameters([param]):
            if not name.startswith(skip):
                assert torch.equal(param.data, reference[name].detach()), name
    assert not model.training
    # Both ranks done before either tears gloo down: a process leaving with the group alive can
    # abort in its threads' destructors ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _run_two_ranks(model_dir, task="causal_lm", skip=()) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(model_dir), task, skip, list(sys.path)), nprocs=2)


def test_streamed_partitions_gather_to_the_checkpoint_with_tied_weights(tmp_path):
    tiny_models.gpt2().save_pretrained(tmp_path)  # lm_head tied to wte, stored once
    assert "lm_head.weight" not in Checkpoint(tmp_path).tensors
    _run_two_ranks(tmp_path)


def test_streamed_partitions_of_a_bare_backbone_checkpoint_in_bfloat16(tmp_path):
    # A checkpoint of LlamaModel has no "model." prefix; stored in bf16, the job loads it as fp32.
    model = tiny_models.llama(tied=True)
    model.model.to(torch.bfloat16).save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)  # the causal-LM config, as a user's folder would hold
    assert "embed_tokens.weight" in Checkpoint(tmp_path).tensors
    _run_two_ranks(tmp_path)


def test_a_checkpoint_without_the_head_falls_back_to_transformers(tmp_path, capfd):
    tiny_models.llama(tied=False).save_pretrained(tmp_path)  # no classification head in it
    _run_two_ranks(tmp_path, task="sequence_classification", skip=("score.",))
    assert "cannot be streamed per partition: no checkpoint tensor for 1 parameter(s): score.weight" in capfd.readouterr().err


def test_map_weights_names_the_parameters_it_cannot_find(tmp_path):
    tiny_models.llama(tied=False).save_pretrained(tmp_path)
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(tiny_models.llama().config)
    with pytest.raises(CheckpointError, match=r"no checkpoint tensor for 1 parameter\(s\): score.weight"):
        map_weights(classifier, Checkpoint(tmp_path))


def test_zero3_limits_release_each_module_and_prefetch_only_on_a_gpu(tmp_path):
    cpu, gpu = _job(tmp_path), _job(tmp_path, dtype="bfloat16", device="cuda")
    model = tiny_models.llama(tied=False)
    largest = largest_gather(model)
    assert largest == model.model.embed_tokens.weight.numel()  # the embedding (= lm_head) is the biggest gather
    zero = deepspeed_config(cpu, 2, largest)["zero_optimization"]
    assert zero["stage3_max_reuse_distance"] == 0 and zero["stage3_prefetch_bucket_size"] == 0
    assert zero["stage3_max_live_parameters"] == largest
    config = deepspeed_config(gpu, 2, largest)
    assert config["zero_optimization"]["stage3_prefetch_bucket_size"] == largest
    assert config["zero_optimization"]["stage3_max_live_parameters"] == 2 * largest
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert "stage3_max_reuse_distance" not in deepspeed_config(cpu, 2)["zero_optimization"]
    kept = cpu.model_copy(update={"runtime": cpu.runtime.model_copy(update={"release_after_use": False})})
    assert "stage3_max_reuse_distance" not in deepspeed_config(kept, 2, largest)["zero_optimization"]


def _corrupt_rank(rank: int, port: int, model_dir: str, setting: str, task: str, sys_path: list[str]) -> None:
    """Rank body for the setup check: load under an emulated accelerator (or with one weight
    altered after loading), then run the check every worker runs."""
    sys.path[:] = sys_path
    import os

    import deepspeed

    import accelerator_emulation
    from distinf.models import ModelError
    from distinf.runtime.shard import distributed_env
    from distinf.runtime.weight_check import verify_loaded_weights
    from distinf.runtime.zero3 import partitioned_model

    os.environ.update(distributed_env(rank, 2, "127.0.0.1", port))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    if setting != "altered":
        accelerator_emulation.emulate(setting)
    cfg = _job(model_dir, task)
    model = partitioned_model(cfg.model, deepspeed_config(cfg, 2))
    if setting == "altered":  # one element of rank 1's partition of the last layer's MLP, as a misplaced copy would
        part = dict(model.named_parameters())["transformer.h.1.mlp.c_fc.weight"].ds_tensor
        if rank == 1:
            part.view(-1)[:].copy_(part.view(-1).roll(1))
    if setting == "fp16=none,bf16=true" or (setting == "altered" and rank == 0):  # fp16=none: where
        # DeepSpeed 0.19.8 built bfloat16; rank 0 of "altered" holds only unaltered elements
        report = verify_loaded_weights(model, cfg.model)
        unmapped = 1 if task == "sequence_classification" else 0  # the head the checkpoint lacks
        assert report["dtype"] == "float32"
        assert report["params_compared"] == len(list(model.parameters())) - unmapped
    else:
        with pytest.raises(ModelError, match=EXPECTED[setting]):
            verify_loaded_weights(model, cfg.model)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


EXPECTED = {
    "zero_init=bfloat16": r"model.dtype is float32 but .* transformer.wte.weight \(bfloat16\)",
    "altered": r"parameter 'transformer.h.1.mlp.c_fc.weight' differs from checkpoint tensor",
}


@pytest.mark.parametrize("setting", ["fp16=none,bf16=true", "zero_init=bfloat16", "altered"])
def test_every_rank_checks_its_partitions_against_the_checkpoint(tmp_path, setting):
    tiny_models.gpt2().save_pretrained(tmp_path)
    _spawn_check(tmp_path, setting, "causal_lm")


def test_transformers_own_zero3_loading_keeps_float32_where_fp16_is_unsupported(tmp_path, capfd):
    # No head in the checkpoint: the fallback, transformers' from_pretrained under ZeRO-3, whose
    # zero.Init gets no dtype, so the config's bf16/fp16 flags decide and DeepSpeed's misread is not hit.
    tiny_models.llama(tied=False).save_pretrained(tmp_path)
    _spawn_check(tmp_path, "fp16=none,bf16=true", "sequence_classification")
    assert "through transformers' ZeRO-3 path" in capfd.readouterr().err


def _spawn_check(model_dir, setting: str, task: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_corrupt_rank, args=(port, str(model_dir), setting, task, list(sys.path)), nprocs=2)
