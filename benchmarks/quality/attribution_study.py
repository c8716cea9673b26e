"""What makes a ranking right: the attribution-quality study (issue 19, part 1).

Three settings, each scored by what a reader of the answers would check:
  - demo: the demo's corpus (six packaged sources, 30 training texts and 2 queries each) on the base
    SmolLM2-135M-Instruct, as `make demo` runs it: top-1 and top-3 same-source rates;
  - cross-source: a larger, disjoint-seeded sample of the same six sources (--cross-train per
    source, --cross-queries per source), the same measures;
  - mislabeled: all-MiniLM-L6-v2 + LoRA fine-tuned on Rotten Tomatoes with 20% flipped labels
    (benchmarks/quality/mislabeled.py's recipe), AUC of finding the flipped labels by harm (−score_mean).

One gradient capture per (setting, capture variant) with `distinf.attribute`; every scoring
choice is then applied to the same captured gradients, so each row differs from the default only
in what it names. Capture variants: loss aggregation per example (mean / sum over tokens), the
tracked modules (all; embeddings and output head out; attention only; MLP only), the allocation of
k (stratified / uniform). Scoring choices, after the damped per-tensor Gauss-Newton solve:
  none     s = ĝ_qᵀ Ĥ⁻¹ ĝ_i (the paper's influence)
  relatif  s / √(ĝ_iᵀ Ĥ⁻¹ ĝ_i)        (RelatIF's θ-relative influence)
  cosine   s / √(ĝ_iᵀ Ĥ⁻¹ ĝ_i · ĝ_qᵀ Ĥ⁻¹ ĝ_q)  (cosine in the Ĥ⁻¹ metric: same per-query order as
           relatif, different score_mean)
  unit     s / (‖ĝ_i‖ ‖ĝ_q‖)           (unit-norm gradients, as bergson and LESS)
  raw-cos  ĝ_qᵀ ĝ_i / (‖ĝ_q‖ ‖ĝ_i‖)   (no curvature; a reference point)
and the damping as a multiple of each block's mean eigenvalue (0.1 is distinf's auto rule), and
k cut to a quarter by dropping a seeded share of every tensor's kept entries (a random subset of a
random subset: the same law as a smaller draw).

The solve here is a dense one per tensor block written in this file; the auto-damped `none` row is
checked against `distinf.attribute`'s own scores before anything is reported.

    nice -n 5 .venv/bin/python -m benchmarks.quality.attribution_study --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks import _harness  # noqa: E402,F401  (the offline environment, before transformers loads)

import distinf  # noqa: E402
from distinf.assets import demo_corpus, mixed_source_corpus, smollm2_dir  # noqa: E402
from distinf.core.tasks import IGNORE_INDEX, causal_lm_losses  # noqa: E402
from benchmarks.record import publish  # noqa: E402

NORMALISATIONS = ("none", "relatif", "cosine", "unit", "raw-cos")
DAMPING_SCALES = (0.001, 0.01, 0.1, 1.0)  # × each block's mean eigenvalue; 0.1 is distinf's auto rule
SHORT_SOURCES = ("guardian_headlines", "health_tweets")
MAX_LENGTH = 48


def causal_lm_sum_losses(model, batch):
    """Summed next-token cross-entropy: each example weighted by its length."""
    losses = causal_lm_losses(model, batch)
    labels = batch.get("labels", batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX))
    return losses * (labels[:, 1:] != IGNORE_INDEX).sum(1).clamp(min=1)


@dataclass
class Setting:
    name: str
    model: torch.nn.Module
    train: list
    queries: list
    task: object
    embed_and_head: list[str]   # module patterns of the input embeddings and the output head
    attention: list[str]
    mlp: list[str]
    query_source: list[str] | None = None
    train_source: list[str] | None = None
    flipped: np.ndarray | None = None
    k: int = 8192
    batch_size: int = 8


@dataclass
class Captured:
    train: np.ndarray   # [n, k] float64
    queries: np.ndarray  # [m, k]
    blocks: list[slice]
    reference: np.ndarray  # distinf.attribute's own scores [m, n]
    params: list[str]      # the tensor of each column
    seconds: float


def _tokenise(tokenizer, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    out = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, add_special_tokens=False)
    return [{"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
            for ids, mask in zip(out["input_ids"], out["attention_mask"]) if len(ids) > 1]


def _language_setting(name: str, train_table, query_table, k: int) -> Setting:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train_texts, query_texts = train_table.column("text").to_pylist(), query_table.column("text").to_pylist()
    return Setting(
        name, model, _tokenise(tokenizer, train_texts), _tokenise(tokenizer, query_texts), "causal_lm",
        embed_and_head=[r".*embed_tokens", r"lm_head"], attention=[r".*self_attn\..*"], mlp=[r".*mlp\..*"],
        query_source=query_table.column("source").to_pylist(), train_source=train_table.column("source").to_pylist(),
        k=k, batch_size=8)


def demo_setting(k: int) -> Setting:
    train, queries = (pq.read_table(p) for p in demo_corpus())
    return _language_setting("demo", train, queries, k)


def cross_source_setting(k: int, n_train: int, n_queries: int, seed: int) -> Setting:
    train, queries = mixed_source_corpus(n_train, n_queries, seed)
    return _language_setting(f"cross-source (seed {seed})", train, queries, k)


def mislabeled_setting(k: int, seed: int, folder: Path) -> Setting:
    from benchmarks.quality import mislabeled

    prepared = mislabeled.prepare(seed, 8, 1000, 200, 3, 1e-3, folder / f"mislabeled-{seed}")
    return Setting(
        f"mislabeled (seed {seed})", prepared.model, prepared.train, prepared.val, "sequence_classification",
        embed_and_head=[r".*embeddings.*", r".*classifier.*", r".*pooler.*"],
        attention=[r".*attention.*"], mlp=[r".*layer\.\d+\.(intermediate|output)\..*"],
        flipped=prepared.flipped, k=k, batch_size=32)


def capture_variants(setting: Setting) -> dict[str, tuple[dict, object]]:
    """Variant name -> (compression config, task) for one gradient capture each."""
    variants = {
        "default": ({}, setting.task),
        "embeddings and head out": ({"modules": {"exclude": setting.embed_and_head}}, setting.task),
        "attention only": ({"modules": {"include": setting.attention}}, setting.task),
        "MLP only": ({"modules": {"include": setting.mlp}}, setting.task),
        "uniform allocation": ({"allocation": "uniform"}, setting.task),
    }
    if setting.task == "causal_lm":
        variants["sum over tokens"] = ({}, causal_lm_sum_losses)
        variants["sum, embeddings and head out"] = ({"modules": {"exclude": setting.embed_and_head}},
                                                    causal_lm_sum_losses)
    return variants


def capture(setting: Setting, compression: dict, task) -> Captured:
    started = time.perf_counter()
    res = distinf.attribute(setting.model, setting.train, setting.queries, task=task,
                            config={"compression": {"k": setting.k, **compression}, "scoring": {"normalize": "none"}},
                            batch_size=setting.batch_size)
    params = res.index_set.column("param").to_pylist()
    starts = [i for i in range(len(params)) if i == 0 or params[i] != params[i - 1]]
    blocks = [slice(a, b) for a, b in zip(starts, starts[1:] + [len(params)])]
    return Captured(res.train_grads.astype(np.float64), res.query_grads.astype(np.float64), blocks,
                    res.scores.astype(np.float64), params, time.perf_counter() - started)


def solve(train: np.ndarray, queries: np.ndarray, blocks: list[slice], damping_scale: float):
    """(Ĥ⁻¹ĝ_q [m, k], train self-influence [n], query self-influence [m]) with Ĥ per tensor block
    = ĜᵀĜ/n + λI, λ = damping_scale × the block's mean eigenvalue."""
    n = train.shape[0]
    preconditioned = np.zeros_like(queries)
    self_train = np.zeros(n)
    for block in blocks:
        g = train[:, block]
        gram = g.T @ g / n
        damping = damping_scale * np.trace(gram) / gram.shape[0]
        factor = np.linalg.cholesky(gram + max(damping, 1e-30) * np.eye(gram.shape[0]))
        solve_h = lambda x: np.linalg.solve(factor.T, np.linalg.solve(factor, x))  # noqa: E731
        preconditioned[:, block] = solve_h(queries[:, block].T).T
        self_train += np.einsum("nk,kn->n", g, solve_h(g.T))
    self_query = np.einsum("mk,mk->m", queries, preconditioned)
    return preconditioned, self_train, self_query


def scores_for(c: Captured, normalisation: str, damping_scale: float = 0.1, columns: np.ndarray | None = None):
    train, queries, blocks = c.train, c.queries, c.blocks
    if columns is not None:
        train, queries = train[:, columns], queries[:, columns]
        params = [c.params[i] for i in columns]
        starts = [i for i in range(len(params)) if i == 0 or params[i] != params[i - 1]]
        blocks = [slice(a, b) for a, b in zip(starts, starts[1:] + [len(params)])]
    if normalisation == "raw-cos":
        unit_q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-30)
        unit_t = train / np.linalg.norm(train, axis=1, keepdims=True).clip(1e-30)
        return unit_q @ unit_t.T
    preconditioned, self_train, self_query = solve(train, queries, blocks, damping_scale)
    scores = preconditioned @ train.T  # [m, n]
    if normalisation == "relatif":
        return scores / np.sqrt(self_train.clip(1e-30))[None, :]
    if normalisation == "cosine":
        return scores / np.sqrt(np.outer(self_query.clip(1e-30), self_train.clip(1e-30)))
    if normalisation == "unit":
        return scores / np.outer(np.linalg.norm(queries, axis=1), np.linalg.norm(train, axis=1)).clip(1e-30)
    return scores


def subset_columns(c: Captured, fraction: float, seed: int = 0) -> np.ndarray:
    """A seeded `fraction` of every tensor's kept entries (at least one each), in index-set order."""
    rng = np.random.default_rng(seed)
    keep = []
    for block in c.blocks:
        width = block.stop - block.start
        keep.extend(sorted(block.start + rng.choice(width, max(1, round(width * fraction)), replace=False)))
    return np.array(keep)


def quarter_columns(c: Captured, seed: int = 0) -> np.ndarray:
    return subset_columns(c, 0.25, seed)


K_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)


def k_curve(setting: Setting, index_seeds: list[int]) -> list[str]:
    """Top-1 / top-3 same-source against k: one capture at setting.k per index seed
    (compression.seed), cut to each fraction of K_FRACTIONS (a random subset of a random subset is
    a smaller draw); mean ± std over the index seeds, for none and cosine."""
    values: dict[tuple[str, float], list[dict]] = {}
    sizes: dict[float, int] = {}
    for seed in index_seeds:
        captured = capture(setting, {"seed": seed}, setting.task)
        for fraction in K_FRACTIONS:
            columns = None if fraction == 1.0 else subset_columns(captured, fraction, seed)
            sizes[fraction] = captured.train.shape[1] if columns is None else len(columns)
            for normalisation in ("none", "cosine"):
                values.setdefault((normalisation, fraction), []).append(
                    measures(setting, scores_for(captured, normalisation, columns=columns)))
        print(f"{setting.name} / index seed {seed}: {captured.seconds:.0f} s", flush=True)
        del captured
        gc.collect()

    def cell(rows: list[dict], key: str) -> str:
        xs = [r[key] for r in rows]
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"

    lines = [f"### {setting.name}: same-source rates against k (index seeds {', '.join(map(str, index_seeds))})", "",
             "| k | scoring | top-1 | top-3 | short in top-3 |", "|---|---|---|---|---|"]
    for fraction in K_FRACTIONS:
        for normalisation in ("none", "cosine"):
            rows = values[(normalisation, fraction)]
            lines.append(f"| {sizes[fraction]} | {normalisation} | {cell(rows, 'top-1')} | {cell(rows, 'top-3')} | "
                         f"{cell(rows, 'short in top-3')} |")
    return lines + [""]


def measures(setting: Setting, scores: np.ndarray) -> dict[str, float]:
    if setting.flipped is not None:
        from benchmarks.quality.mislabeled import auc

        return {"AUC": auc(setting.flipped, -scores.mean(0))}
    order = np.argsort(-scores, axis=1, kind="stable")
    own = np.array([[setting.train_source[j] == setting.query_source[q] for j in row[:3]]
                    for q, row in enumerate(order)])
    short = np.array([[setting.train_source[j] in SHORT_SOURCES for j in row[:3]] for row in order])
    return {"top-1": own[:, 0].mean(), "top-3": own.mean(), "short in top-3": short.mean()}


def study(setting: Setting) -> dict:
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    seconds = {}
    for variant, (compression, task) in capture_variants(setting).items():
        try:
            captured = capture(setting, compression, task)
        except ValueError as error:  # e.g. MLP only under a LoRA of the attention: nothing is trainable there
            print(f"{setting.name} / {variant}: skipped ({error})", flush=True)
            continue
        seconds[variant] = captured.seconds
        check = scores_for(captured, "none")
        error = np.abs(check - captured.reference).max() / np.abs(captured.reference).max()
        if error > 1e-3:
            raise SystemExit(f"{setting.name} / {variant}: the dense solve differs from distinf.attribute "
                             f"by {error:.2e} (relative); not reporting")
        for normalisation in NORMALISATIONS:
            rows[(variant, normalisation, "auto, k")] = measures(setting, scores_for(captured, normalisation))
        if variant == "default":
            for scale in (s for s in DAMPING_SCALES if s != 0.1):
                for normalisation in ("none", "relatif"):
                    rows[(variant, normalisation, f"λ = {scale:g}·mean eig")] = measures(
                        setting, scores_for(captured, normalisation, scale))
            quarter = quarter_columns(captured)
            for normalisation in ("none", "relatif", "cosine", "unit"):
                rows[(variant, normalisation, f"k/4 = {len(quarter)}")] = measures(
                    setting, scores_for(captured, normalisation, columns=quarter))
        print(f"{setting.name} / {variant}: {captured.seconds:.0f} s; " + ", ".join(
            f"{n} {rows[(variant, n, 'auto, k')]}" for n in ("none", "relatif")), flush=True)
        del captured
        gc.collect()
    return {"rows": rows, "seconds": seconds}


def table(setting_name: str, result: dict, k: int) -> list[str]:
    rows = result["rows"]
    keys = list(next(iter(rows.values())))
    lines = [f"### {setting_name} (k = {k})", "",
             "| capture | scoring | damping, k | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for (variant, normalisation, other), values in rows.items():
        lines.append(f"| {variant} | {normalisation} | {other} | " + " | ".join(f"{values[k]:.3f}" for k in keys) + " |")
    lines += ["", "Capture seconds: " + ", ".join(f"{v} {s:.0f}" for v, s in result["seconds"].items()) + ".", ""]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["demo", "cross-source", "mislabeled"],
                        choices=["demo", "cross-source", "mislabeled"])
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--cross-train", type=int, default=50, help="training texts per source")
    parser.add_argument("--cross-queries", type=int, default=10, help="query texts per source")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="cross-source and mislabeled seeds")
    parser.add_argument("--k-curve", type=int, nargs="+", metavar="INDEX_SEED",
                        help="instead of the study: top-1/top-3 against k on the cross-source sample(s), over these "
                             "compression seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.k_curve:
        lines = ["## Same-source rates against k (issue 19 §3)", "",
                 f"Command: `nice -n 10 .venv/bin/python -m benchmarks.quality.attribution_study --k-curve "
                 f"{' '.join(map(str, args.k_curve))} --k {args.k} --cross-train {args.cross_train} "
                 f"--cross-queries {args.cross_queries} --seeds {' '.join(map(str, args.seeds))}`.", ""]
        for seed in args.seeds:
            lines += k_curve(cross_source_setting(args.k, args.cross_train, args.cross_queries, seed), args.k_curve)
        lines.insert(3, f"({(time.perf_counter() - started) / 60:.1f} min on this 2-core CPU, {args.threads} thread(s).)")
        publish("\n".join(lines), args.out)
        return 0
    lines = ["## What makes a ranking right: scoring, loss, modules, k and damping (issue 19, part 1)", "",
             f"Command: `nice -n 5 .venv/bin/python -m benchmarks.quality.attribution_study --settings {' '.join(args.settings)} "
             f"--k {args.k} --cross-train {args.cross_train} --cross-queries {args.cross_queries} "
             f"--seeds {' '.join(map(str, args.seeds))} --threads {args.threads}`.", ""]
    with tempfile.TemporaryDirectory(prefix="study-") as tmp:
        for name in args.settings:
            seeds = [None] if name == "demo" else args.seeds
            for seed in seeds:
                if name == "demo":
                    setting = demo_setting(args.k)
                elif name == "cross-source":
                    setting = cross_source_setting(args.k, args.cross_train, args.cross_queries, seed)
                else:
                    setting = mislabeled_setting(args.k, seed, Path(tmp))
                lines += table(setting.name, study(setting), args.k)
                del setting
                gc.collect()
    lines.insert(3, f"({(time.perf_counter() - started) / 60:.1f} min on this 2-core CPU, {args.threads} thread(s).)")
    publish("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
