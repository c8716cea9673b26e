"""Where a ZeRO-3 rank's peak memory is reached: VmHWM per layer phase, two ranks, no Ray.

Two processes over gloo each set up a `GradientShard` (the worker's own code, with the job's
allocator settings) on a model folder and run 3 capture steps of 4 × 32 random tokens; a forward
pre-hook and a backward pre-hook on every decoder layer, the embedding, the final norm and the
output layer reset VmHWM (/proc/self/clear_refs) and record the peak of the phase just ended and
the RSS at its end. Rank 0 prints the ten highest phases and the RSS at each step's start.

    .venv/bin/python -m benchmarks.memory.layer_memory_probe .assets/scale/llama-1b   # after scale.py wrote it
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from benchmarks import _harness  # noqa: F401  (the offline environment, before transformers loads)
from distinf.runtime.process_memory import HOST_ALLOCATOR_ENV

os.environ.update(HOST_ALLOCATOR_ENV)  # read by each spawned rank's allocator at its start

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from distinf.config import JobConfig  # noqa: E402


def _status_mib(key: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) // 1024


def rank_main(rank: int, port: int, model: str) -> None:
    from distinf.batching import collate
    from distinf.runtime.shard import GradientShard

    cfg = JobConfig.model_validate({
        "name": "probe", "model": {"path": model},
        "data": {"train": {"path": "unused"}, "queries": {"path": "unused"}},
        "runtime": {"num_workers": 2, "batch_size": 4}, "compression": {"k": 65536}})
    shard = GradientShard(cfg, rank, 2)
    shard.setup("127.0.0.1", port)
    phases, current = [], ["setup"]

    def mark(label: str) -> None:
        phases.append((_status_mib("VmHWM"), current[0], _status_mib("VmRSS")))
        Path("/proc/self/clear_refs").write_text("5")
        current[0] = label

    for name, module in shard.capture.model.named_modules():
        if (name.count(".") == 2 and ".layers." in name) or name.endswith(("lm_head", "embed_tokens", "model.norm")):
            module.register_forward_pre_hook(lambda m, a, n=name: mark(f"forward {n}"))
            module.register_full_backward_pre_hook(lambda m, g, n=name: mark(f"backward {n}"))
    generator = torch.Generator().manual_seed(rank)
    examples = [{"input_ids": torch.randint(0, 49000, (32,), generator=generator),
                 "attention_mask": torch.ones(32, dtype=torch.long)} for _ in range(4)]
    for step in range(3):
        mark(f"step {step} start")
        next(shard.capture.run([collate(examples, 0)], shard.loss_fn, shard.device))
        mark(f"step {step} end")
    if rank == 0:
        print("peak MiB, phase, RSS MiB at its end")
        for peak in sorted(phases, reverse=True)[:10]:
            print(peak)
        print("at each step's start:", [p for p in phases if "start" in p[1]])
    shard.close()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.spawn(rank_main, args=(free_port, sys.argv[1]), nprocs=2)
