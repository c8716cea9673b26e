"""Markdown table from the JSON lines that benchmarks/peers/peers.py prints (one or more files).

    python3 -m benchmarks.peers.report runA.jsonl runB.jsonl ...

TRAK's row is the measured per-example gradient pass plus its projector extrapolated to k (the
faster of its two projection types); every other row is measured as is.
"""

from __future__ import annotations

import json
import sys

PEERS = {"floor": ("floor", None), "bergson": ("bergson", "bergson"), "logix": ("LogIX", "logix-ai"),
         "dattri": ("dattri", "dattri"), "trak": ("TRAK", "traker"), "kronfluence": ("kronfluence", "kronfluence"),
         "distinf": ("distinf (this checkout, dropout)", None)}


def read(paths: list[str]) -> tuple[dict, list[dict], dict, list[dict]]:
    header, timings, memory, projections = {}, [], {}, []
    for path in paths:
        with open(path) as f:
            for line in f:
                if not line.startswith("{"):
                    continue
                row = json.loads(line)
                if "versions" in row or "linear_modules" in row:
                    header.update(row)
                elif "memory" in row:
                    memory[row["memory"]["config"]] = row["memory"]
                elif row.get("config", "").startswith("trak-projection"):
                    projections.append(row)
                else:
                    timings.append(row)
    return header, timings, memory, projections


def actual_k(row: dict) -> str:
    shape = row.get("output_shape")
    return f"{shape[1]:,}" if shape and row["config"].split(":")[0] != "kronfluence" else "–"


def memory_cell(config: str, memory: dict) -> str:
    mem, floor = memory.get(config), memory.get("floor")
    if not mem:
        return "–"
    if "error" in mem:
        return "failed: " + mem["error"].strip().splitlines()[-1][:120]
    over = (mem["peak_kib"] - floor["peak_kib"]) / 1024 if floor and "peak_kib" in floor else None
    rel = (mem["peak_kib"] / floor["peak_kib"] - 1) * 100 if over is not None else None
    text = f"{mem['peak_kib'] / 1024:,.0f} MiB"
    return text + (f" ({over:+,.0f} MiB, {rel:+.0f}%)" if over is not None else "")


def main(paths: list[str]) -> None:
    header, timings, memory, projections = read(paths)
    versions = header.get("versions", {})
    batch = header.get("batch", ["?", "?"])
    print(f"batch {batch[0]} x {batch[1]} tokens, torch {header.get('torch')} with {header.get('threads')} threads, "
          f"{header.get('linear_modules')} Linear modules\n")
    print("| peer | version | setting | k asked | k delivered | pairs | wall ratio to floor, median (min–max) "
          "| CPU-time ratio | examples/s (floor's, same pairs) | peak RSS (vs floor's peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in timings:
        name, _, k = row["config"].partition(":")
        label, dist = PEERS.get(name.split("-")[0], (name, None))
        version = versions.get(dist, "–") if dist else "–"
        if "error" in row:
            print(f"| {label} | {version} | could not run: {row['error'][:300]} | {k or '–'} | – | – | – | – | – | – |")
            continue
        ratio = f"**{row['ratio']:.2f}** ({row['ratio_min']:.2f}–{row['ratio_max']:.2f})"
        speed = f"{row['examples_per_s']:.3f} ({row['floor_examples_per_s']:.3f})"
        setting = row["setting"] if name != "trak-grads" else row["setting"] + " (per-example gradients only)"
        print(f"| {label} | {version} | {setting} | {k or '–'} | {actual_k(row)} | {row['pairs']} | {ratio} "
              f"| {row['cpu_ratio']:.2f} | {speed} | {memory_cell(row['config'], memory)} |")
    grads = next((r for r in timings if r["config"] == "trak-grads" and "error" not in r), None)
    if grads and projections:
        batch_size = batch[0]
        for k in sorted({p["config"].split(":")[1] for p in projections}, key=int):
            best = min((p for p in projections if p["config"].endswith(f":{k}")), key=lambda p: p["s_per_batch"])
            total = grads["cand_s"] + best["s_per_batch"]
            print(f"| TRAK | {versions.get('traker', '–')} | gradients as above + BasicProjector {best['proj_type']}, "
                  f"block {best['block']} ({best['s_per_block']:.2f} s a block, {best['blocks_timed']} timed, "
                  f"{best['calls_per_batch']} calls a batch): **extrapolated** | {k} | {int(k):,} | – "
                  f"| **{total / grads['floor_s']:.0f}** (extrapolated) | – | {batch_size / total:.5f} "
                  f"({grads['floor_examples_per_s']:.3f}) | as the gradients row (one p x {best['block']} block) |")


if __name__ == "__main__":
    main(sys.argv[1:])
