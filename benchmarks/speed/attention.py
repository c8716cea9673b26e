"""Issue 31: the attention implementation and the dtype the gradient workers run, on the CPU.

SmolLM2-135M (Llama) captures a padded batch of demo-corpus texts (the mask the workers pass) at
k = 8,192 with `eager` against `sdpa` attention (what transformers gives a model built from its
config here), and with the model in bfloat16 against float32 (sdpa both). Alternating pairs in
one process; each row also gives the largest relative difference of an example's kept entries
from the float32 eager capture (tests/test_long_documents.py proves eager and sdpa exact against
torch.func on tiny models; this shows it at 135M).

    .venv/bin/python -m benchmarks.speed.attention --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks._harness import Clock, alternate, load_causal_lm

import torch  # noqa: E402

from benchmarks.record import publish  # noqa: E402
from distinf.assets import demo_corpus, smollm2_dir  # noqa: E402
from distinf.batching import collate  # noqa: E402
from distinf.core.capture import GradientCapture  # noqa: E402
from distinf.core.index_set import draw_index_set  # noqa: E402
from distinf.core.tasks import causal_lm_losses  # noqa: E402
from distinf.core.tracking import track_modules  # noqa: E402


def padded_batch(model_dir, batch: int, max_length: int) -> dict:
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = pq.read_table(demo_corpus()[0], columns=["text"]).column("text").to_pylist()[:batch]
    rows = []
    for text in texts:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:max_length])
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return collate(rows, tokenizer.pad_token_id or 0)


def capture_runner(model, k: int, batch: dict):
    tracked = track_modules(model)
    capture = GradientCapture(model, tracked, draw_index_set(tracked.param_shapes, k, 0))

    def run() -> tuple[float, float]:
        with Clock() as clock, capture:
            run.last = capture.batch(batch, causal_lm_losses)[0]
        return clock.times

    run.last = None
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--bf16-pairs", type=int, default=2, help="pairs for bfloat16 (slow on CPUs without it)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_dir = smollm2_dir()
    batch = padded_batch(model_dir, args.batch, args.max_length)
    models = {}
    for name, attention, dtype in (("eager float32", "eager", torch.float32), ("sdpa float32", "sdpa", torch.float32),
                                   ("sdpa bfloat16", "sdpa", torch.bfloat16)):
        model = load_causal_lm(model_dir).to(dtype)
        model.set_attn_implementation(attention)
        models[name] = capture_runner(model, args.k, batch)
    base = models["eager float32"]
    base()
    reference = base.last
    rows = []
    for name in ("sdpa float32", "sdpa bfloat16"):
        result = alternate(base, models[name], args.bf16_pairs if "bfloat16" in name else args.pairs, args.warmup)
        diff = ((models[name].last.float() - reference).norm(dim=1) / reference.norm(dim=1)).max().item()
        rows.append((name, result, diff))
        print(name, result["ratio"], diff, flush=True)
    tokens = int(batch["attention_mask"].sum())
    padded = batch["attention_mask"].numel()
    lines = ["## Attention implementation and dtype of the capture on the CPU (issue 31)", "",
             f"Command: `.venv/bin/python -m benchmarks.speed.attention --batch {args.batch} --max-length {args.max_length} "
             f"--k {args.k} --pairs {args.pairs} --bf16-pairs {args.bf16_pairs} --threads {args.threads}` ({(time.perf_counter() - started) / 60:.1f} "
             f"min, torch {torch.__version__}, {args.threads} thread(s), nproc {os.cpu_count()}, load average "
             f"{os.getloadavg()[0]:.1f} at the end). SmolLM2-135M, {args.batch} demo texts padded to "
             f"{batch['input_ids'].shape[1]} tokens ({tokens} of {padded} real), k = {args.k}; "
             "transformers gives a model built from its config `sdpa` here.", "",
             "| capture with | time / eager float32 time, median (min–max) | s per batch | "
             "max relative difference of an example's kept entries from eager float32 |",
             "|---|---|---|---|",
             f"| eager float32 | 1 | {rows[0][1]['floor_s']:.3f} | 0 |"]
    for name, r, diff in rows:
        lines.append(f"| {name} | {r['ratio']:.3f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | {r['cand_s']:.3f} | "
                     f"{diff:.2e} |")
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
