"""Peer attribution tools against the floor: per-example gradient extraction + compression to k dims.

Runs in the separate environment made by benchmarks/peers/setup.sh (.venv-peers). No peer path
imports distinf; the `distinf` configuration imports it from this checkout (pure Python over torch,
no install needed), so distinf and the peers are timed against the same floor in one process. One
batch of N x T real tokens (default 8 x 128) packed as benchmarks/speed/compress_overhead.py packs it
(both through benchmarks/_harness.py): the demo training texts tokenised without special tokens,
joined by EOS, cut into T-token rows, attention mask all ones.

  floor        forward + backward with every weight frozen (the input embedding's output made to
               require grad so backward crosses every layer); loss = sum of per-example mean
               token cross-entropies. No gradient method can be cheaper.
  bergson      its GradientCollector (per-module double-sided random projection, p x p per Linear,
               so k = modules * p^2) through its own fwd_bwd; no on-disk index (skip_index).
  logix        LoGra: add_lora (random init) adds r x r bottlenecks to every Linear, logs the
               bottleneck's per-example gradient (k = modules * r^2); its own model copy.
  dattri       AttributionTask vmap(grad) over the flattened parameters, then random_project with
               proj_type "random_mask" (its CPU projector that keeps k random entries; its dense
               CPU projectors need a p x 100 matrix, 54 GB here). Sub-batches of --vmap-batch.
  trak         FunctionalGradientComputer (vmap(grad)) + BasicProjector (its CPU projector).
               The projector regenerates a p x block matrix k/block times per call, ~1e12 random
               draws per batch at k=8192: its projection is timed on a few blocks and extrapolated.
  kronfluence  no compression to k (EK-FAC per module); see README.md.
  distinf      dropout capture (GradientCapture, k kept entries over every Linear and the
               embedding, computed from layer inputs and output gradients), the job's worker path.

Timing: each candidate alternates with the floor in one process (floor, candidate, ...), median
of per-pair ratios; floor vs floor is the calibration. Memory: each configuration alone in a
fresh subprocess, peak RSS (VmHWM after clear_refs) against the floor's.

    nice -n 5 .venv-peers/bin/python -m benchmarks.peers.peers --model DIR --corpus FILE.parquet
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile

# Run from the checkout's root (`python -m benchmarks.peers.peers`): benchmarks._harness (which
# imports nothing from distinf), and distinf for the `distinf` configuration alone.
from benchmarks._harness import (  # noqa: E402  (sets the offline environment before transformers loads)
    Clock, Runner, alternate, load_causal_lm, packed_batch, reset_peak_rss, status_kib,
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

Batch = dict[str, Tensor]


# ---------------------------------------------------------------------------------------------
# Model, batch and the per-example loss every runner shares


def load_model(model_dir: str) -> nn.Module:
    return load_causal_lm(model_dir).requires_grad_(False)


def make_batch(model_dir: str, corpus: str, batch_size: int, tokens: int) -> Batch:
    """N rows of exactly T tokens of packed real text (as in benchmarks/speed/compress_overhead.py)."""
    return packed_batch(model_dir, corpus, batch_size, tokens)


def per_example_losses(logits: Tensor, input_ids: Tensor) -> Tensor:
    """[N, T, V], [N, T] -> [N]: mean next-token cross-entropy of each row."""
    token_losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
    return token_losses.view(len(input_ids), -1).mean(1)


def tracked_linears(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def side_for(k: int, modules: int) -> int:
    """Largest p with modules * p^2 <= k: the per-module p x p (or r x r) grid of bergson and
    LoGra that comes closest to k from below."""
    return max(1, math.isqrt(k // modules))


# ---------------------------------------------------------------------------------------------
# Runners: each processes the whole batch and leaves its [N, k'] result in sink["grads"]


def floor_runner(model: nn.Module, batch: Batch) -> Runner:
    embedding = model.get_input_embeddings()

    def run() -> tuple[float, float]:
        handle = embedding.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        try:
            with Clock() as clock:
                logits = model(**batch).logits
                per_example_losses(logits, batch["input_ids"]).sum().backward()
            return clock.times
        finally:
            handle.remove()

    return run


def bergson_runner(model: nn.Module, batch: Batch, k: int, sink: dict) -> tuple[Runner, str]:
    from datasets import Dataset

    from bergson.collector.collector import fwd_bwd_factory
    from bergson.collector.gradient_collectors import GradientCollector
    from bergson.config import IndexConfig
    from bergson.gradients import GradientProcessor

    modules = len(tracked_linears(model))
    side = side_for(k, modules)
    n = len(batch["input_ids"])
    cfg = IndexConfig(tempfile.mkdtemp(prefix="bergson-"), projection_dim=side, loss_reduction="mean")
    processor = GradientProcessor(projection_dim=side, projection_seed=0)
    embedding_weight = model.get_input_embeddings().weight
    embedding_weight.requires_grad_(True)  # bergson's model setup; it reads the gradient dtype from it
    try:
        collector = GradientCollector(model=model, processor=processor, cfg=cfg, skip_index=True,
                                      data=Dataset.from_dict({"row": list(range(n))}))
    finally:
        embedding_weight.requires_grad_(False)
    fwd_bwd = fwd_bwd_factory(cfg)
    x = batch["input_ids"]

    def run() -> tuple[float, float]:
        # bergson's own model setup: frozen weights except the input embedding's
        embedding_weight.requires_grad_(True)
        try:
            with Clock() as clock:
                with collector.with_batch(None):
                    losses = fwd_bwd(model, x, x.clone(), {})
                grads = torch.cat([collector.mod_grads[name] for name in collector.shapes()], dim=1)
                collector.process_batch(list(range(n)), losses=losses)
        finally:
            embedding_weight.requires_grad_(False)
            embedding_weight.grad = None
        sink["grads"] = grads
        return clock.times

    return run, f"per-module rademacher projection {side}x{side} on {modules} Linear modules"


def logix_runner(model: nn.Module, batch: Batch, k: int, sink: dict) -> tuple[Runner, str]:
    import logix
    from logix.config import LoRAConfig

    modules = len(tracked_linears(model))
    rank = side_for(k, modules)
    own = copy.deepcopy(model)  # add_lora rewrites the model; the floor keeps the original
    own.requires_grad_(True)
    workdir = tempfile.mkdtemp(prefix="logix-")
    cwd = os.getcwd()
    os.chdir(workdir)  # LogIX writes its lora state and logs under the working directory
    try:
        run_ = logix.LogIX(project="peers")
        run_.watch(own)
        run_.add_lora(lora_config=LoRAConfig(init="random", rank=rank))
        run_.setup({"grad": ["log"]})
        run_.save(False)
    finally:
        os.chdir(cwd)
    own.eval()
    n = len(batch["input_ids"])

    def run() -> tuple[float, float]:
        with Clock() as clock:
            with run_(data_id=list(range(n)), mask=batch["attention_mask"]):
                own.zero_grad(set_to_none=True)
                logits = own(**batch).logits
                per_example_losses(logits, batch["input_ids"]).sum().backward()
            _, log = run_.get_log()
            grads = torch.cat([entry["grad"].reshape(n, -1) for entry in log.values()], dim=1)
        own.zero_grad(set_to_none=True)
        sink["grads"] = grads
        return clock.times

    return run, f"LoGra random init, rank {rank} on {modules} Linear modules"


def distinf_runner(model: nn.Module, batch: Batch, k: int, sink: dict) -> tuple[Runner, str]:
    from distinf.core.capture import GradientCapture
    from distinf.core.compressors import build_compressor
    from distinf.core.tasks import causal_lm_losses
    from distinf.core.tracking import track_modules

    model.requires_grad_(True)  # distinf tracks what requires grad; the floor's model stays frozen after
    tracked = track_modules(model)
    model.requires_grad_(False)
    capture = GradientCapture(model, tracked, build_compressor(tracked, "dropout", k))

    def run() -> tuple[float, float]:
        with capture:  # hooks are registered once per real run, outside the timing
            with Clock() as clock:
                sink["grads"], _ = capture.batch(batch, causal_lm_losses)
        return clock.times

    return run, f"dropout capture, {k} entries kept of {tracked.tracked_numel:,} tracked"


def functional_loss(model: nn.Module):
    """(params, buffers, input_ids [T], attention_mask [T]) -> scalar loss of one example.
    The mask is not passed on: HF's mask preparation branches on its values, which vmap refuses,
    and the benchmark's rows are all real tokens (mask all ones), so the result is the same."""

    def loss(params: dict, buffers: dict, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        ids = input_ids.unsqueeze(0)
        logits = torch.func.functional_call(model, (params, buffers), (ids,)).logits
        return per_example_losses(logits, ids)[0]

    return loss


def dattri_runner(model: nn.Module, batch: Batch, k: int, sink: dict, vmap_batch: int) -> tuple[Runner, str]:
    from dattri.func.projection import random_project
    from dattri.task import AttributionTask

    buffers = dict(model.named_buffers())
    one_loss = functional_loss(model)

    def loss_func(params: dict, data: tuple[Tensor, Tensor]) -> Tensor:
        return one_loss(params, buffers, *data)

    model.requires_grad_(True)  # dattri tracks the parameters that require grad
    try:
        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict(),
                               checkpoints_load_func=lambda m, ckpt: m)
        params, _ = task.get_param()
        grad_fn = task.get_grad_loss_func(in_dims=(None, 0))
    finally:
        model.requires_grad_(False)
    projector = None
    n = len(batch["input_ids"])

    def run() -> tuple[float, float]:
        nonlocal projector
        with Clock() as clock:
            parts = []
            for start in range(0, n, vmap_batch):
                data = (batch["input_ids"][start:start + vmap_batch], batch["attention_mask"][start:start + vmap_batch])
                full = grad_fn(params, data)  # [n_sub, p]
                if projector is None:  # its projector is built once (the random index draw)
                    projector = random_project(full, len(full), proj_dim=k, proj_max_batch_size=8,
                                               proj_seed=0, proj_type="random_mask", device="cpu")
                parts.append(projector(full).clone())
                del full
            grads = torch.cat(parts)
        sink["grads"] = grads
        return clock.times

    return run, f"vmap(grad) over {params.numel():,} flat params in sub-batches of {vmap_batch} + random_mask"


class CausalLMOutput:
    """TRAK model-output function for a causal LM: the example's mean token cross-entropy."""

    def __init__(self, model: nn.Module):
        self.loss = functional_loss(model)

    def get_output(self, model, weights, buffers, input_ids, attention_mask) -> Tensor:
        return self.loss(weights, buffers, input_ids, attention_mask)


def trak_per_example_runner(model: nn.Module, batch: Batch, sink: dict, vmap_batch: int) -> Runner:
    from trak.gradient_computers import FunctionalGradientComputer
    from trak.utils import get_num_params

    computer = FunctionalGradientComputer(model, CausalLMOutput(model), grad_dim=get_num_params(model),
                                          dtype=torch.float32, device="cpu")
    computer.modelout_fn = CausalLMOutput(model)
    n = len(batch["input_ids"])

    def run() -> tuple[float, float]:
        with Clock() as clock:
            for start in range(0, n, vmap_batch):
                grads = computer.compute_per_sample_grad(
                    [batch["input_ids"][start:start + vmap_batch], batch["attention_mask"][start:start + vmap_batch]])
                del grads
        return clock.times

    return run


def trak_projection_seconds(p: int, n_sub: int, block: int, blocks: int, proj_type: str) -> float:
    """Seconds per block of TRAK's BasicProjector on an [n_sub, p] gradient: it regenerates a
    p x block matrix for each block of columns on every project call, so a call at k costs
    ceil(k / block) blocks. Timed on `blocks` blocks."""
    from trak.projectors import BasicProjector, ProjectionType

    grads = torch.randn(n_sub, p)
    projector = BasicProjector(grad_dim=p, proj_dim=block * blocks, seed=0, proj_type=ProjectionType(proj_type),
                               device=torch.device("cpu"), block_size=block)
    with Clock() as clock:
        projector.project(grads, model_id=0)
    return clock.times[0] / blocks


def kronfluence_runner(model: nn.Module, batch: Batch, sink: dict) -> tuple[Runner, str]:
    """EK-FAC pairwise scores of the batch (as training set) against itself (as queries): its
    per-example gradient path. Factors are fitted once on the batch, outside the timing. lm_head
    is left out: its output-gradient covariance would be 49152 x 49152 (9 GiB in fp32) and its
    eigendecomposition O(49152^3)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    tracked = [name for name in tracked_linears(model) if name != "lm_head"]

    class CausalLMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["input_ids"]
            if sample:  # true Fisher: labels drawn from the model's own predictions
                with torch.no_grad():
                    drawn = torch.multinomial(logits[:, :-1].flatten(0, 1).softmax(-1), 1).view(len(targets), -1)
                targets = torch.cat([targets[:, :1], drawn], dim=1)
            return per_example_losses(logits, targets).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(batch["input_ids"])

        def __getitem__(self, i):
            return {key: value[i] for key, value in batch.items()}

    own = copy.deepcopy(model)  # prepare_model wraps its modules; the floor keeps the original
    task = CausalLMTask()
    own = prepare_model(own, task)
    n = len(batch["input_ids"])
    analyzer = Analyzer(analysis_name="peers", model=own, task=task, cpu=True, disable_tqdm=True,
                        output_dir=tempfile.mkdtemp(prefix="kronfluence-"))
    with Clock() as fit:
        analyzer.fit_all_factors(factors_name="ekfac", dataset=Rows(), per_device_batch_size=n,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)

    def run() -> tuple[float, float]:
        with Clock() as clock:
            analyzer.compute_pairwise_scores(scores_name="pairs", factors_name="ekfac", query_dataset=Rows(),
                                             train_dataset=Rows(), per_device_query_batch_size=n,
                                             per_device_train_batch_size=n, overwrite_output_dir=True)
        sink["grads"] = analyzer.load_pairwise_scores("pairs")["all_modules"]
        return clock.times

    return run, (f"EK-FAC on {len(tracked)} Linear modules (no lm_head), pairwise scores {n} queries x {n} train; "
                 f"factor fit (covariance, eigendecomposition, eigenvalue-corrected lambdas) on the batch took "
                 f"{fit.times[0]:.1f} s wall, not in the ratio")


# ---------------------------------------------------------------------------------------------
# Measurement (Clock, alternate and the peak RSS probes: benchmarks/_harness.py)


def build(config: str, model: nn.Module, batch: Batch, args: argparse.Namespace, sink: dict) -> tuple[Runner, str]:
    name, _, k = config.partition(":")
    if name == "floor":
        return floor_runner(model, batch), "frozen weights, no capture"
    if name == "bergson":
        return bergson_runner(model, batch, int(k), sink)
    if name == "logix":
        return logix_runner(model, batch, int(k), sink)
    if name == "dattri":
        return dattri_runner(model, batch, int(k), sink, args.vmap_batch)
    if name == "distinf":
        return distinf_runner(model, batch, int(k), sink)
    if name == "kronfluence":
        return kronfluence_runner(model, batch, sink)
    if name == "trak-grads":
        return trak_per_example_runner(model, batch, sink, args.vmap_batch), \
            f"FunctionalGradientComputer vmap(grad), sub-batches of {args.vmap_batch}"
    raise SystemExit(f"unknown configuration {config!r}")


def child_memory(args: argparse.Namespace) -> None:
    """Subprocess body: one configuration alone, --memory-iters iterations; one JSON line."""
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    batch = make_batch(args.model, args.corpus, args.batch, args.tokens)
    run, _ = build(args.child, model, batch, args, {})
    gc.collect()
    reset_peak_rss()
    base = status_kib("VmRSS")
    for _ in range(args.memory_iters):
        run()
    print(json.dumps({"config": args.child, "base_kib": base, "peak_kib": status_kib("VmHWM")}))


def memory_of(config: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", __spec__.name, "--child", config, "--model", args.model, "--corpus", args.corpus,
           "--batch", str(args.batch), "--tokens", str(args.tokens), "--threads", str(args.threads),
           "--vmap-batch", str(args.vmap_batch), "--memory-iters", str(args.memory_iters)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"config": config, "error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model folder (config.json + safetensors)")
    parser.add_argument("--corpus", required=True, help="Parquet file with a text column")
    parser.add_argument("--configs", default="floor,bergson:4096,bergson:8192,bergson:65536,"
                        "logix:4096,logix:8192,logix:65536,dattri:8192,trak-grads",
                        help="comma-separated name[:k][*pairs]")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--slow-pairs", type=int, default=4, help="pairs for dattri, trak-grads and kronfluence")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vmap-batch", type=int, default=2, help="examples per vmap(grad) call (dattri, TRAK)")
    parser.add_argument("--trak-ks", default="4096,8192,65536")
    parser.add_argument("--trak-block", type=int, default=2, help="BasicProjector block_size (p x block floats)")
    parser.add_argument("--trak-blocks", type=int, default=2, help="blocks actually timed")
    parser.add_argument("--memory", default="floor,bergson:8192,logix:8192,dattri:8192,trak-grads",
                        help="configurations measured for peak RSS in fresh subprocesses ('' for none)")
    parser.add_argument("--memory-iters", type=int, default=2)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_memory(args)

    torch.set_num_threads(args.threads)
    n = args.batch
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "nproc": os.cpu_count(),
                      "batch": [n, args.tokens],
                      "versions": {d: version(d) for d in ("bergson", "logix-ai", "dattri", "traker", "kronfluence",
                                                           "transformers")}}), flush=True)
    if not args.no_timing:  # the memory subprocesses load their own model; the parent stays small
        model = load_model(args.model)
        batch = make_batch(args.model, args.corpus, args.batch, args.tokens)
        print(json.dumps({"linear_modules": len(tracked_linears(model))}), flush=True)
        floor = floor_runner(model, batch)
        for _ in range(args.warmup + 1):
            floor()
        for entry in [c for c in args.configs.split(",") if c]:
            config, _, pairs = entry.partition("*")  # "name:k*pairs" overrides the pair count
            slow = config.startswith(("dattri", "trak", "kronfluence"))
            pairs = int(pairs) if pairs else (args.slow_pairs if slow else args.pairs)
            sink: dict = {}
            try:
                candidate, setting = build(config, model, batch, args, sink)
                result = alternate(floor, candidate, pairs, args.warmup)
                shape = list(sink["grads"].shape) if "grads" in sink else None
                result.update(examples_per_s=n / result["cand_s"], floor_examples_per_s=n / result["floor_s"])
                print(json.dumps({"config": config, "setting": setting, "output_shape": shape, **result}), flush=True)
            except Exception as error:  # a peer that cannot run the case is recorded, not fatal
                print(json.dumps({"config": config, "error": f"{type(error).__name__}: {error}"[:1500]}), flush=True)
            del sink
            gc.collect()
        if "trak-grads" in args.configs:
            p = sum(param.numel() for param in model.parameters())
            calls = math.ceil(n / args.vmap_batch)
            for proj_type in ("rademacher", "normal"):
                per_block = trak_projection_seconds(p, args.vmap_batch, args.trak_block, args.trak_blocks, proj_type)
                gc.collect()
                for k in [int(x) for x in args.trak_ks.split(",") if x]:
                    print(json.dumps({"config": f"trak-projection:{k}", "proj_type": proj_type, "block": args.trak_block,
                                      "blocks_timed": args.trak_blocks, "s_per_block": per_block,
                                      "calls_per_batch": calls,
                                      "s_per_batch": per_block * math.ceil(k / args.trak_block) * calls}), flush=True)
    for config in [c for c in args.memory.split(",") if c]:
        print(json.dumps({"memory": memory_of(config, args)}), flush=True)


if __name__ == "__main__":
    main()
