"""Gradient extraction on one GPU: distinf capture against the frozen forward + backward floor.

`--path worker` (the default where DeepSpeed and the job config import): the code the gradient
worker actor runs, without Ray (the GPU machine has none). A random-initialised
Pythia-1.4B-sized GPT-NeoX (24 layers, width 2048, vocabulary 50,304; --size tiny for a check on
any machine) is written as a safetensors folder in --dtype, and `distinf.runtime.shard.GradientShard`
sets up one rank exactly as the actor does (torch.distributed, ZeRO-3 partitions streamed from
the checkpoint, the job's release-after-use limits, the index set, the hooks); a capture step is
the shard's `GradientCapture.run` on a list of examples collated (copy to the GPU, forward,
backward, [N, k] back to the host), as the worker runs it. Its setup time and peak GPU memory are recorded.

`--path core` (where DeepSpeed cannot be imported, or asked for): the model built in memory,
under ZeRO-3 when DeepSpeed imports, else plain on the device (the output says which), and the
capture is `GradientCapture.batch` on a batch already on the device.

For each k the capture alternates with the floor (forward + backward with frozen weights, the
embedding output made to require grad, on a batch already on the device) after warm-up;
tokens/s are medians, the ratio is the median of per-pair ratios. Peak GPU memory is
`torch.cuda.max_memory_allocated` over one step of each, after a reset.

    python -m benchmarks.speed.gpu_extraction --out DIR            # on the GPU machine (benchmarks/speed/gpu.sh)
    python -m benchmarks.speed.gpu_extraction --size tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import types
from pathlib import Path

from benchmarks._harness import ROOT as REPO  # noqa: E402  (the offline environment, before transformers loads)


def import_distinf_core() -> None:
    """Make `distinf.core` importable. distinf/__init__ pulls the job config (pydantic), which the
    GPU machine may lack; the core needs only torch, transformers and pyarrow, so fall back to a
    bare package object that skips __init__."""
    try:
        import distinf  # noqa: F401
    except ImportError as error:
        print(f"note: `import distinf` failed ({error}); importing distinf.core alone", flush=True)
        package = types.ModuleType("distinf")
        package.__path__ = [str(REPO / "distinf")]
        sys.modules["distinf"] = package


import_distinf_core()

import torch  # noqa: E402

from distinf.core.capture import GradientCapture  # noqa: E402
from distinf.core.index_set import draw_index_set  # noqa: E402
from distinf.core.tasks import causal_lm_losses  # noqa: E402
from distinf.core.tracking import track_modules  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZES = {
    # EleutherAI/pythia-1.4b's shape: 1.41e9 parameters, untied input and output embeddings.
    "pythia-1.4b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192,
                        vocab_size=50304, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 vocab_size=1024, max_position_embeddings=256),
}


def model_config(size: str):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**SIZES[size], rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)


def deepspeed_or_reason() -> tuple[object | None, str]:
    try:
        import deepspeed

        return deepspeed, f"deepspeed {deepspeed.__version__}"
    except Exception as error:  # ImportError, or a dependency that fails at import time
        return None, f"deepspeed unavailable ({type(error).__name__}: {error})"


def zero3_model(deepspeed, config, dtype: torch.dtype, device: torch.device, batch: int):
    """A single-rank process group and the model partitioned at construction, as the worker does."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no 1-minute JIT build on CPU
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    ds_config = {
        "train_micro_batch_size_per_gpu": batch, "train_batch_size": batch, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_model_persistence_threshold": 0},
        "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16},
    }
    keep_alive = HfDeepSpeedConfig(ds_config)  # while alive, from_config partitions as it builds
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    del keep_alive
    return engine.module.eval()


def worker_shard(config, args: argparse.Namespace, device: torch.device, k: int):
    """One rank set up by the worker's own code on a checkpoint written to a temporary folder."""
    import tempfile

    from benchmarks.memory.scale import write_random_checkpoint

    from distinf.config import JobConfig
    from distinf.runtime.shard import GradientShard

    folder = Path(tempfile.gettempdir()) / f"distinf-gpu-{args.size}-{args.dtype}"
    if not (folder / "model.safetensors.index.json").is_file():
        write_random_checkpoint(folder, config, DTYPES[args.dtype], generate_on=device.type)
        if device.type == "cuda":  # the setup's peak is the shard's own, not the drawing's
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    cfg = JobConfig.model_validate({
        "name": "gpu", "model": {"path": str(folder), "dtype": args.dtype},
        "data": {"train": {"path": "unused.parquet"}, "queries": {"path": "unused.parquet"}},
        "compression": {"k": k, "seed": 0},
        "runtime": {"num_workers": 1, "device": device.type, "batch_size": args.batch},
    })
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shard = GradientShard(cfg, 0, 1)
    return shard, shard.setup("127.0.0.1", port)


def worker_capture_step(shard, examples: list[dict]) -> "callable":
    from distinf.batching import collate

    def run(_batch: dict) -> None:
        with shard.capture:
            next(shard.capture.run([collate(examples, 0)], shard.loss_fn, shard.device))

    return run


def plain_model(config, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_step(model) -> "callable":
    def run(batch: dict) -> None:
        for param in model.parameters():
            param.requires_grad_(False)
        handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        try:
            causal_lm_losses(model, batch).sum().backward()
        finally:
            handle.remove()

    return run


def capture_step(capture: GradientCapture) -> "callable":
    def run(batch: dict) -> None:
        with capture:
            capture.batch(batch, causal_lm_losses)

    return run


def timed(run, batch: dict, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    run(batch)
    sync(device)
    return time.perf_counter() - started


def peak_memory(run, batch: dict, device: torch.device) -> int | None:
    """Bytes: the most allocated on the GPU during one step (None on CPU)."""
    if device.type != "cuda":
        run(batch)
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run(batch)
    sync(device)
    return torch.cuda.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default=os.environ.get("DISTINF_GPU_SIZE", "pythia-1.4b"), choices=sorted(SIZES))
    parser.add_argument("--device", default=os.environ.get("DISTINF_GPU_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--ks", default="8192,65536", help="comma-separated k values")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--zero3", default="auto", choices=["auto", "on", "off"],
                        help="auto: ZeRO-3 when deepspeed imports, else a plain model (and say so)")
    parser.add_argument("--path", default="auto", choices=["auto", "worker", "core"],
                        help="worker: GradientShard on a checkpoint, as the actor runs; core: the model in memory")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the chip's dense peak at --dtype, for the percentage (default: known chips' bfloat16 peak)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    args = parser.parse_args()

    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:  # "cuda" alone: set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    deepspeed, ds_note = (None, "ZeRO-3 off (--zero3 off)") if args.zero3 == "off" else deepspeed_or_reason()
    if deepspeed is None and args.zero3 == "on":
        raise SystemExit(ds_note)
    path = args.path
    if path == "auto":
        path = "worker" if deepspeed is not None and worker_path_importable() else "core"
    config = model_config(args.size)
    ks = [int(k) for k in args.ks.split(",") if k]
    torch.manual_seed(0)
    shard, setup = None, None
    if path == "worker":
        shard, setup = worker_shard(config, args, device, ks[0])
        model = shard.capture.model
        shard.capture.__exit__(None, None, None)  # entered per step below, so the floor runs without hooks
        ds_note += "; the worker's own setup (GradientShard, checkpoint streamed per partition)"
    elif deepspeed:
        model = zero3_model(deepspeed, config, dtype, device, args.batch)
    else:
        model = plain_model(config, dtype, device)
    sync(device)
    load_s = time.perf_counter() - started
    tracked = track_modules(model)
    after_load = torch.cuda.memory_allocated() if device.type == "cuda" else None
    ids = torch.randint(0, config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    examples = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    print(json.dumps({"size": args.size, "device": str(device), "dtype": args.dtype, "zero3": deepspeed is not None,
                      "path": path, "note": ds_note, "params": tracked.total_numel, "tracked": tracked.tracked_numel,
                      "load_s": round(load_s, 1), "setup": setup and {k: v for k, v in setup.items()
                                                                       if k != "index_set_hash"}}), flush=True)

    floor = floor_step(model)
    for _ in range(args.warmup):
        floor(batch)
    rows = [{"config": "floor", "peak_bytes": peak_memory(floor, batch, device)}]
    for k in ks:
        if shard is not None:
            if k != ks[0]:  # the same shard and model, the index set of this k
                shard.capture = GradientCapture(model, tracked, draw_index_set(tracked.param_shapes, k, 0))
            capture = worker_capture_step(shard, examples)
        else:
            capture = capture_step(GradientCapture(model, tracked, draw_index_set(tracked.param_shapes, k, 0)))
        for _ in range(args.warmup):
            capture(batch)
        pairs = [(timed(floor, batch, device), timed(capture, batch, device)) for _ in range(args.pairs)]
        rows.append({"config": f"k={k}", "peak_bytes": peak_memory(capture, batch, device),
                     "floor_s": statistics.median(f for f, _ in pairs),
                     "capture_s": statistics.median(c for _, c in pairs),
                     "ratio": statistics.median(c / f for f, c in pairs),
                     "ratio_min": min(c / f for f, c in pairs), "ratio_max": max(c / f for f, c in pairs)})
        print(json.dumps(rows[-1]), flush=True)

    tokens = args.batch * args.tokens
    peak = args.peak_tflops or known_peak_tflops(device)
    # With frozen weights a step is the forward (2 FLOPs per parameter and token) and the
    # activation gradients (2 more); no weight gradient is formed.
    flops_per_token = 4 * tracked.total_numel
    for r in rows[1:]:
        r["floor_tflops"] = flops_per_token * tokens / r["floor_s"] / 1e12
        r["capture_tflops"] = flops_per_token * tokens / r["capture_s"] / 1e12
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b is not None else "– (CPU)"  # noqa: E731
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"device: {name}; torch {torch.__version__}; {args.size} GPT-NeoX, random init, {tracked.total_numel:,} "
        f"parameters ({tracked.tracked_numel:,} tracked), {args.dtype}; "
        f"{'ZeRO-3 on one rank (' + ds_note + ')' if deepspeed else 'NO ZeRO-3: ' + ds_note}; "
        f"{_setup_line(setup, gib)}"
        f"batch {args.batch} × {args.tokens} tokens; {args.pairs} pairs after {args.warmup} warm-ups; "
        f"memory after load {gib(after_load)}; total {time.perf_counter() - started:.0f} s.",
        "",
        f"TFLOP/s count 4 × parameters per token (forward and activation gradients, weights frozen)"
        f"{f'; % of a {peak:g} TFLOP/s peak' if peak else ''}.",
        "",
        "| configuration | floor tokens/s | capture tokens/s | floor TFLOP/s (% peak) | capture TFLOP/s (% peak) "
        "| capture / floor time, median (min–max) | peak GPU memory |",
        "|---|---|---|---|---|---|---|",
        f"| floor (frozen forward + backward) | – | – | – | – | – | {gib(rows[0]['peak_bytes'])} |",
    ]
    share = lambda t: f"{t:,.1f}" + (f" ({t / peak:.1%})" if peak else "")  # noqa: E731
    for r in rows[1:]:
        lines.append(f"| distinf capture {r['config']} | {tokens / r['floor_s']:,.0f} | {tokens / r['capture_s']:,.0f} "
                     f"| {share(r['floor_tflops'])} | {share(r['capture_tflops'])} "
                     f"| {r['ratio']:.3f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | {gib(r['peak_bytes'])} |")
    report = "\n".join(lines)
    print("\n" + report, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(report + "\n")
        (args.out / "results.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "note": ds_note,
                                                          "zero3": deepspeed is not None, "path": path,
                                                          "setup": setup, "rows": rows}, indent=1, default=str))


# Dense bfloat16 peaks (TFLOP/s, without sparsity) of the chips a device machine may have.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}


def known_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for chip, peak in PEAK_BF16_TFLOPS.items() if chip in name), None)


def worker_path_importable() -> bool:
    try:
        import distinf.runtime.shard  # noqa: F401  (needs pydantic for the job config)
        return True
    except Exception as error:
        print(f"note: the worker path cannot be imported ({type(error).__name__}: {error}); using --path core",
              flush=True)
        return False


def _setup_line(setup: dict | None, gib) -> str:
    if not setup:
        return ""
    memory = setup["memory"]
    return (f"worker setup {setup['setup_seconds']:.0f} s, {setup['local_params']:,} parameters held, setup peak RSS "
            f"{gib(memory.get('setup_peak_rss'))}, setup peak GPU {gib(memory.get('setup_peak_gpu_allocated'))}; ")


if __name__ == "__main__":
    main()
