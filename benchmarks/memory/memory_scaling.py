"""Memory per worker and W = 2 scaling under ZeRO-3, through the real gradient worker, on SmolLM2-135M.

Each configuration starts W `distinf.runtime.worker.GradientWorker` Ray actors with 1 CPU each
(as the driver does: one placement-group bundle per rank) and calls their real `setup` (DeepSpeed
ZeRO-3 over gloo, the index set, the capture hooks). It then runs, inside every actor at once
(Ray's `__ray_call__`, so the same process and model), one batch of B × T real tokens per rank:

  floor    forward + backward of the ZeRO-3 model with frozen weights and the capture hooks
           removed: what any gradient method must pay, ZeRO-3 gathers included
  capture  `capture.batch(batch, loss_fn)`, the step `GradientWorker.compress` runs per batch
  plain    the floor on an ordinary (non-DeepSpeed) copy of the model loaded into the same
           process afterwards: plain vs floor is the ZeRO-3 gather overhead

This machine has 2 cores, so W = 2 is two 1-thread processes side by side against one 1-thread
process at W = 1: the scaling ratio says how well ranks run in parallel, with their gathers.

Memory per worker, from /proc/self/status (malloc_trim first, so heap freed by the last step goes
back to the kernel; then /proc/self/clear_refs resets the peak VmHWM to the current RSS):
  parameters   elements this rank holds (its ZeRO-3 partitions) × bytes per element, and the RSS
               that setup left (RSS after setup − RSS before)
  activations  floor peak − RSS after setup (ZeRO-3's transiently gathered layers are in here)
  distinf      capture peak − floor peak (hooks' kept inputs, gathered output-gradient columns,
               the [B, k] buffer)

Timing alternates floor and capture (and plain and floor) in pairs after a warm-up, as
compress_overhead.py does; the group's step time is the slowest rank's (ZeRO-3 ranks run in
lockstep); medians of the pairs.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.memory.memory_scaling --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._harness import machine  # noqa: E402  (the offline environment, before transformers loads)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray.util.placement_group import placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

from benchmarks.speed.compress_overhead import make_batch  # noqa: E402
from distinf.assets import demo_corpus, smollm2_dir  # noqa: E402
from distinf.runtime.workers import WORKER_ENV  # noqa: E402
from distinf.runtime.worker import GradientWorker  # noqa: E402
from benchmarks.record import publish  # noqa: E402

MIB = 1024 * 1024

# ---------------------------------------------------------------------------------------------
# Run inside the actors (via __ray_call__): defined in __main__, so Ray ships them by value.


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _settle_and_reset_peak() -> int:
    """Return freed heap to the kernel, reset VmHWM to the current RSS; the RSS in KiB."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def probe_before(worker) -> dict:
    import torch

    return {"pid": os.getpid(), "threads": torch.get_num_threads(), "rss_kib": _settle_and_reset_peak()}


def override_zero_config(worker, overrides: dict) -> None:
    """Merge overrides into the worker's `zero_optimization` section before its setup builds the model.

    Patches the module function `setup` looks up, in this actor's process only: a what-if for
    DeepSpeed's knobs without changing distinf/runtime/zero3.py.
    """
    import distinf.runtime.shard as shard_module

    original = shard_module.deepspeed_config

    def patched(cfg, world_size, largest_module=None):
        config = original(cfg, world_size, largest_module)
        config["zero_optimization"].update(overrides)
        return config

    shard_module.deepspeed_config = patched


def probe_after_setup(worker) -> dict:
    """The peak while setup loaded the model (VmHWM since probe_before), then the settled RSS."""
    load_peak = _status_kib("VmHWM")
    model = worker.shard.capture.model
    held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
               for p in model.parameters())
    return {"load_peak_kib": load_peak, "rss_kib": _settle_and_reset_peak(), "param_bytes": held,
            "param_dtype": str(next(model.parameters()).dtype)}


def _floor_pass(model, batch) -> None:
    from distinf.core.tasks import causal_lm_losses

    for param in model.parameters():
        param.requires_grad_(False)
    # Frozen weights leave nothing upstream needing grad: make the embedding output require it
    # so backward still runs through every layer (activation gradients only), as capture does.
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        causal_lm_losses(model, batch).sum().backward()
    finally:
        handle.remove()


def step(worker, mode: str, batch: dict, measure: bool) -> dict:
    """One batch of `mode` (floor | capture | plain); wall and CPU seconds, and peak RSS if measure."""
    capture = worker.shard.capture
    hooked = getattr(worker, "_bench_hooked", True)  # setup leaves the capture entered
    if mode == "capture" and not hooked:
        capture.__enter__()
    elif mode != "capture" and hooked:
        capture.__exit__(None, None, None)
    worker._bench_hooked = mode == "capture"
    base = _settle_and_reset_peak() if measure else 0
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "capture":
        capture.batch(batch, worker.shard.loss_fn)
    else:
        _floor_pass(worker._bench_plain if mode == "plain" else capture.model, batch)
    out = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    if measure:
        out.update(base_kib=base, peak_kib=_status_kib("VmHWM"))
    return out


def load_plain(worker) -> dict:
    """An ordinary copy of the model in this process, for the plain floor (after every memory reading)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    from distinf.models import load_model

    keep = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()  # else from_pretrained would partition this copy too
    try:
        worker._bench_plain = load_model(worker.cfg.model)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = keep
    return {"rss_kib": _status_kib("VmRSS")}


# ---------------------------------------------------------------------------------------------
# Driver side


def job_config(world: int, k: int, batch: int, run_dir: str) -> dict:
    train, queries = demo_corpus()
    return {
        "name": "memory_scaling",
        "model": {"path": str(smollm2_dir()), "task": "causal_lm", "dtype": "float32"},
        "data": {"train": {"path": str(train), "text_column": "text", "id_column": "id"},
                 "queries": {"path": str(queries), "text_column": "text", "id_column": "id"}},
        "compression": {"method": "dropout", "k": k, "seed": 0},
        "runtime": {"num_workers": world, "device": "cpu", "batch_size": batch, "zero_stage": 3},
        "output": {"path": run_dir},
    }


def on_all(actors: list, fn, *args) -> list:
    return ray.get([actor.__ray_call__.remote(fn, *args) for actor in actors])


def group_step(actors: list, mode: str, batch: dict, measure: bool = False) -> dict:
    per_rank = on_all(actors, step, mode, batch, measure)
    return {"wall": max(r["wall"] for r in per_rank), "cpu": max(r["cpu"] for r in per_rank), "ranks": per_rank}


def alternate(actors: list, first: str, second: str, batch: dict, pairs: int) -> dict:
    """first, second, first, second, ...: the median of per-pair ratios second/first resists drift."""
    load = os.getloadavg()[0]
    runs = [(group_step(actors, first, batch), group_step(actors, second, batch)) for _ in range(pairs)]
    return {
        first: statistics.median(a["wall"] for a, _ in runs),
        second: statistics.median(b["wall"] for _, b in runs),
        f"{first}_cpu": statistics.median(a["cpu"] for a, _ in runs),
        f"{second}_cpu": statistics.median(b["cpu"] for _, b in runs),
        "load": [round(load, 1), round(os.getloadavg()[0], 1)],
        "ratio": statistics.median(b["wall"] / a["wall"] for a, b in runs),
        "ratio_min": min(b["wall"] / a["wall"] for a, b in runs),
        "ratio_max": max(b["wall"] / a["wall"] for a, b in runs),
        "cpu_ratio": statistics.median(b["cpu"] / a["cpu"] for a, b in runs),
        "raw": [[round(a["wall"], 3), round(b["wall"], 3)] for a, b in runs],
    }


def measure_group(world: int, args: argparse.Namespace, batch: dict, zero_overrides: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="distinf-memscale-") as run_dir:
        job = job_config(world, args.k, args.batch, run_dir)
        pg = placement_group([{"CPU": 1}] * world, strategy="PACK")
        ray.get(pg.ready(), timeout=600)
        actors = [
            GradientWorker.options(
                num_cpus=1, runtime_env={"env_vars": WORKER_ENV},
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote(rank, world, job, run_dir)
            for rank in range(world)
        ]
        try:
            if zero_overrides:
                on_all(actors, override_zero_config, zero_overrides)
            before = on_all(actors, probe_before)
            port = ray.get(actors[0].free_port.remote("127.0.0.1"))
            started = time.perf_counter()
            infos = ray.get([a.setup.remote("127.0.0.1", port) for a in actors])
            setup_s = time.perf_counter() - started
            after = on_all(actors, probe_after_setup)
            print(f"W={world}: setup {setup_s:.1f} s, threads {[b['threads'] for b in before]}", flush=True)

            # Memory: each step measured alone; the first of each also warms it up.
            memory = {"floor": [], "capture": []}
            for _ in range(args.memory_reps):
                for mode in ("floor", "capture"):
                    memory[mode].append(group_step(actors, mode, batch, measure=True)["ranks"])
            print(f"W={world}: memory {json.dumps(memory)}", flush=True)

            capture = alternate(actors, "floor", "capture", batch, args.pairs)
            print(f"W={world}: floor/capture {json.dumps(capture)}", flush=True)
            plain = {}
            if not args.no_plain:
                try:  # the extra model copy is the likeliest to meet a full machine: keep what was measured
                    on_all(actors, load_plain)
                    group_step(actors, "plain", batch)  # warm-up
                    plain = alternate(actors, "plain", "floor", batch, args.pairs)
                    print(f"W={world}: plain/floor {json.dumps(plain)}", flush=True)
                except ray.exceptions.RayError as error:
                    print(f"W={world}: plain-model comparison failed: {error!r}"[:500], flush=True)
        finally:
            for actor in actors:
                ray.kill(actor)
            remove_placement_group(pg)
    return {"world": world, "zero_overrides": zero_overrides or {}, "setup_s": setup_s, "before": before, "after": after, "memory": memory,
            "capture": capture, "plain": plain,
            "local_params": [i["local_params"] for i in infos], "total_params": infos[0]["total_params"]}


# ---------------------------------------------------------------------------------------------
# Report


def label(result: dict) -> str:
    extra = ", ".join(f"`{key}: {value}`" for key, value in result["zero_overrides"].items())
    return f"{result['world']}" + (f" with {extra}" if extra else "")


def per_rank_memory(result: dict) -> list[dict]:
    """Per rank, MiB: the memory split of the module docstring, from the medians of the reps."""
    rows = []
    for rank in range(result["world"]):
        before, after = result["before"][rank]["rss_kib"], result["after"][rank]["rss_kib"]
        floor_peak = statistics.median(rep[rank]["peak_kib"] for rep in result["memory"]["floor"])
        capture_peak = statistics.median(rep[rank]["peak_kib"] for rep in result["memory"]["capture"])
        rows.append({
            "rank": rank, "before": before / 1024, "after": after / 1024,
            "load_peak": result["after"][rank]["load_peak_kib"] / 1024,
            "param_bytes": result["after"][rank]["param_bytes"] / MIB, "setup_left": (after - before) / 1024,
            "activations": (floor_peak - after) / 1024, "distinf": (capture_peak - floor_peak) / 1024,
            "floor_peak": floor_peak / 1024, "capture_peak": capture_peak / 1024,
            "peak_ratio": capture_peak / floor_peak,
        })
    return rows


def memory_table(results: list[dict]) -> str:
    lines = [
        "| W | rank | RSS before setup | peak during setup | RSS after setup | parameters held (elements × 4 B) "
        "| RSS setup left | activations (floor peak − after setup) | floor peak | capture peak "
        "| distinf buffers (capture − floor peak) | capture peak / floor peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for r in per_rank_memory(result):
            lines.append(
                f"| {label(result)} | {r['rank']} | {r['before']:.0f} MiB | {r['load_peak']:.0f} MiB | {r['after']:.0f} MiB "
                f"| {r['param_bytes']:.0f} MiB | {r['setup_left']:.0f} MiB | {r['activations']:.0f} MiB "
                f"| {r['floor_peak']:.0f} MiB | {r['capture_peak']:.0f} MiB | {r['distinf']:+.0f} MiB "
                f"| {r['peak_ratio']:.3f} |"
            )
    return "\n".join(lines)


def scaling_table(results: list[dict], batch: int) -> str:
    lines = [
        "| W | examples per group step | floor s/step | capture s/step | capture / floor (min–max) "
        "| capture examples/s | throughput vs W = 1 | capture CPU s/step (slowest rank) | examples per CPU-s "
        "| vs W = 1, from CPU time | plain floor s/step | ZeRO-3 floor / plain floor (min–max) "
        "| same, CPU time | load average (start, end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = cpu_base = None
    for result in results:
        c, p, world = result["capture"], result["plain"], result["world"]
        throughput = world * batch / c["capture"]
        cpu_throughput = world * batch / c["capture_cpu"]  # what idle cores would give, if waits were free
        if world == 1 and not result["zero_overrides"]:
            base, cpu_base = base or throughput, cpu_base or cpu_throughput
        scale = f"{throughput / base:.2f}×" if base else "–"
        cpu_scale = f"{cpu_throughput / cpu_base:.2f}×" if cpu_base else "–"
        gather = (f"{p['plain']:.2f} | {p['ratio']:.3f} ({p['ratio_min']:.2f}–{p['ratio_max']:.2f}) "
                  f"| {p['cpu_ratio']:.3f}" if p else "– | – | –")
        loads = ", ".join(f"{a}–{b}" for a, b in [c["load"]] + ([p["load"]] if p else []))
        lines.append(
            f"| {label(result)} | {world * batch} | {c['floor']:.2f} | {c['capture']:.2f} "
            f"| {c['ratio']:.3f} ({c['ratio_min']:.2f}–{c['ratio_max']:.2f}) | {throughput:.3f} | {scale} "
            f"| {c['capture_cpu']:.2f} | {cpu_throughput:.3f} | {cpu_scale} | {gather} | {loads} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated world sizes W")
    parser.add_argument("--batch", type=int, default=4, help="examples per rank per step (runtime.batch_size)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--pairs", type=int, default=5, help="timed pairs per comparison")
    parser.add_argument("--memory-reps", type=int, default=2, help="measured floor and capture steps each")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-model floor (gather overhead)")
    parser.add_argument("--zero-overrides", default=None,
                        help="JSON merged into zero_optimization for an extra run at the largest W, "
                             'e.g. \'{"stage3_max_reuse_distance": 0}\'')
    parser.add_argument("--out", type=Path, default=None, help="append the markdown tables to this file")
    args = parser.parse_args()

    worlds = [int(w) for w in args.workers.split(",") if w]
    started = time.perf_counter()
    batch = make_batch(args.batch, args.tokens)
    info = machine()
    ray.init(num_cpus=max(worlds), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": WORKER_ENV})
    try:
        results = []
        for world in worlds:
            try:
                results.append(measure_group(world, args, batch))
            except ray.exceptions.RayError as error:
                print(f"W={world} failed: {error!r}"[:500], flush=True)
        if args.zero_overrides:
            try:
                results.append(measure_group(max(worlds), args, batch, json.loads(args.zero_overrides)))
            except Exception as error:  # the what-if must not cost the measured configurations
                print(f"run with --zero-overrides failed: {error!r}", flush=True)
    finally:
        ray.shutdown()
    total = time.perf_counter() - started

    held = {label(r): r["local_params"] for r in results}
    text = [
        f"machine: nproc={info['nproc']}, CPU {info['cpu']} ({info['capability']}), torch {info['torch']}, "
        f"Python {info['python']}; Ray actors with 1 CPU each (torch threads per actor: "
        f"{sorted({b['threads'] for r in results for b in r['before']})}); SmolLM2-135M-Instruct float32, "
        f"ZeRO-3 over gloo; per rank {args.batch} × {args.tokens} tokens a step; k = {args.k}; "
        f"{args.pairs} timed pairs, {args.memory_reps} measured steps for memory. Total {total / 60:.1f} min.",
        "",
        memory_table(results),
        "",
        scaling_table(results, args.batch),
        "",
        "Parameter elements held per rank (manifest `workers[].local_params`): "
        + "; ".join(f"W={w}: {', '.join(f'{n:,}' for n in ns)}" for w, ns in held.items())
        + f" of {results[0]['total_params']:,}. Setup (model load under ZeRO-3): "
        + ", ".join(f"W={r['world']} {r['setup_s']:.1f} s" for r in results) + ".",
    ]
    report = "\n".join(text)
    print(json.dumps({"results": results}), file=sys.stderr)
    publish(report, args.out)


if __name__ == "__main__":
    main()
