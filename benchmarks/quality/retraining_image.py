"""Retraining check of influence (issue 5 §2, the paper's removal experiment), image half.

A small CNN is trained on a seeded 10,000-example Fashion-MNIST subset (Debian package
`dataset-fashion-mnist`; the paper used 10,000 CIFAR-10 examples and ResNet-9). Every training
example is scored against a fixed set of test images with `distinf.attribute`; the x% with the
highest score_mean (the strongest proponents: upweighting them lowers the test loss most) are
removed, the model is retrained from the same initialisation with the same seed and schedule, and
the change in test loss and accuracy is compared with removing x% chosen at random. One more
retraining of the full set with another data order measures the retraining noise.

    .venv/bin/python -m benchmarks.quality.retraining_image --seeds 0 1 2 --out /tmp/image.md
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import _harness  # noqa: E402,F401  (the offline environment, before transformers loads)

import distinf  # noqa: E402
from benchmarks.quality.lds_models import FashionCNN as SmallCNN  # noqa: E402  (one CNN for both benchmarks)
from benchmarks.record import publish  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TEST_SEED = 12345  # the test images are the same for every seed

METHODS = {  # name: compression method for distinf.attribute (k is added from --k)
    "dropout": "dropout",
    "gaussian": "gaussian",
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): big-endian header (0, 0, dtype 0x08 = uint8, ndim, dims), then the data."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str, folder: Path = FASHION_MNIST) -> tuple[Tensor, Tensor]:
    """(images [N, 1, 28, 28] float32 in [0, 1], labels [N] int64) of split "train" or "t10k"."""
    images = folder / f"{split}-images-idx3-ubyte.gz"
    if not images.is_file():
        raise FileNotFoundError(f"no '{images}': apt-get install dataset-fashion-mnist")
    x = torch.from_numpy(read_idx(images).astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(read_idx(folder / f"{split}-labels-idx1-ubyte.gz").astype(np.int64))
    return x, y


def per_example_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The task for distinf.attribute: cross-entropy of each image's label, [N]."""
    return F.cross_entropy(model(batch["pixel_values"]), batch["labels"], reduction="none")


def train(init: dict[str, Tensor], x: Tensor, y: Tensor, seed: int, epochs: int, batch_size: int,
          lr: float) -> SmallCNN:
    """Adam from the initial weights `init`; the data order comes from `seed` alone, so the same
    arguments give the same model."""
    model = SmallCNN()
    model.load_state_dict(init)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=order).split(batch_size):
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on (x, y)."""
    with torch.no_grad():
        logits = torch.cat([model(part) for part in x.split(1000)])
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def removal_sets(score_mean: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(the round(fraction·n) training positions with the highest score_mean, as many drawn at
    random); ties are broken by position so the choice is reproducible."""
    n = len(score_mean)
    m = int(round(fraction * n))
    top = np.lexsort((np.arange(n), -score_mean))[:m]
    return np.sort(top), np.sort(rng.choice(n, m, replace=False))


def kept(n: int, removed: np.ndarray) -> Tensor:
    mask = np.ones(n, dtype=bool)
    mask[removed] = False
    return torch.from_numpy(np.flatnonzero(mask))


def data_for_seed(seed: int, n_train: int, n_test: int, folder: Path = FASHION_MNIST):
    """(train x, train y, test x, test y): a seeded training subset; the test images are fixed."""
    x, y = fashion_mnist("train", folder)
    tx, ty = fashion_mnist("t10k", folder)
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n_train]
    test = torch.randperm(len(tx), generator=torch.Generator().manual_seed(TEST_SEED))[:n_test]
    return x[pick], y[pick], tx[test], ty[test]


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """One seed: {row name: {"loss": Δ test loss, "accuracy": Δ accuracy, ...}} against the model
    trained on the full subset."""
    x, y, tx, ty = data_for_seed(seed, args.n_train, args.n_test, args.data)
    torch.manual_seed(seed)
    init = SmallCNN().state_dict()
    schedule = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
    base = train(init, x, y, seed, **schedule)
    base_loss, base_acc = evaluate(base, tx, ty)
    out: dict[str, dict[str, float]] = {"full set": {"loss": base_loss, "accuracy": base_acc}}

    def delta(removed: np.ndarray | None, order_seed: int = seed) -> dict[str, float]:
        index = torch.arange(len(x)) if removed is None else kept(len(x), removed)
        loss, acc = evaluate(train(init, x[index], y[index], order_seed, **schedule), tx, ty)
        return {"loss": loss - base_loss, "accuracy": acc - base_acc}

    out["noise: full set, other data order"] = delta(None, order_seed=seed + 10_000)
    train_examples = [{"pixel_values": x[i], "labels": y[i]} for i in range(len(x))]
    test_examples = [{"pixel_values": tx[i], "labels": ty[i]} for i in range(len(tx))]
    for fraction in args.fractions:
        rng = np.random.default_rng([seed, int(fraction * 1000)])
        _, random_removed = removal_sets(np.zeros(len(x)), fraction, rng)
        out[f"{fraction:.0%} random"] = delta(random_removed)
    for method in args.methods:
        config = {"compression": {"method": METHODS[method], "k": args.k}, "scoring": {"self_influence": False, "normalize": "none"}}
        started = time.perf_counter()
        res = distinf.attribute(base, train_examples, test_examples, task=per_example_losses, config=config,
                                batch_size=256)
        out[f"{method}: attribution seconds"] = {"seconds": time.perf_counter() - started}
        for ranking, score_mean in rankings(method, res).items():
            for fraction in args.fractions:
                top, _ = removal_sets(score_mean, fraction, np.random.default_rng(0))
                out[f"{fraction:.0%} top by {ranking}"] = delta(top)
    return out


def rankings(method: str, res: distinf.AttributionResult) -> dict[str, np.ndarray]:
    """score_mean per training example under `method`; for dropout also without curvature
    (dot products of the same compressed gradients, what hessian.method identity computes),
    which needs no second gradient pass."""
    out = {method: res.scores.mean(0)}
    if method == "dropout":
        out["dropout, identity hessian"] = res.train_grads @ res.query_grads.mean(0)
    return out


def ranking_names(methods: list[str]) -> list[str]:
    return [name for m in methods for name in ([m, "dropout, identity hessian"] if m == "dropout" else [m])]


def summary(values: list[float], scale: float = 1.0, digits: int = 4) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):+.{digits}f} ± {scale * spread:.{digits}f}"


def table(results: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> list[str]:
    """Markdown rows: per removal, Δ loss and Δ accuracy (mean ± std over seeds), and the gap to
    random removal of the same fraction, seed by seed."""
    lines = ["| removed | Δ test loss | Δ test accuracy (points) | Δ loss − random's | Δ accuracy − random's |",
             "|---|---|---|---|---|"]
    base_loss = [r["full set"]["loss"] for r in results]
    base_acc = [r["full set"]["accuracy"] for r in results]
    lines.append(f"| nothing (test loss, accuracy of the full-set model) | {summary(base_loss)[1:]} | "
                 f"{summary(base_acc, 100, 2)[1:]} | | |")
    noise = "noise: full set, other data order"
    lines.append(f"| nothing, retrained with another data order | {summary([r[noise]['loss'] for r in results])} | "
                 f"{summary([r[noise]['accuracy'] for r in results], 100, 2)} | | |")
    for fraction in args.fractions:
        rand = f"{fraction:.0%} random"
        for name in [rand] + [f"{fraction:.0%} top by {m}" for m in ranking_names(args.methods)]:
            loss = [r[name]["loss"] for r in results]
            acc = [r[name]["accuracy"] for r in results]
            gap = "| | |" if name == rand else (
                f"| {summary([r[name]['loss'] - r[rand]['loss'] for r in results])} | "
                f"{summary([r[name]['accuracy'] - r[rand]['accuracy'] for r in results], 100, 2)} |")
            lines.append(f"| {name} | {summary(loss)} | {summary(acc, 100, 2)} {gap}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    parser.add_argument("--methods", nargs="+", default=["dropout"], choices=list(METHODS))
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--data", type=Path, default=FASHION_MNIST)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--out", type=Path, help="append the markdown section to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    results = []
    for seed in args.seeds:
        seed_started = time.perf_counter()
        result = run_seed(seed, args)
        results.append(result)
        print(f"seed {seed} ({time.perf_counter() - seed_started:.0f} s): " + "; ".join(
            f"{name} " + " ".join(f"{k}={v:+.4f}" for k, v in row.items()) for name, row in result.items()), flush=True)
    minutes = (time.perf_counter() - started) / 60
    seconds = {m: statistics.mean(r[f"{m}: attribution seconds"]["seconds"] for r in results) for m in args.methods}
    command = " ".join(["-m benchmarks.quality.retraining_image"] + (argv if argv is not None else sys.argv[1:]))
    lines = [
        "### Image: small CNN on Fashion-MNIST", "",
        f"Command: `.venv/bin/python {command}` ({minutes:.1f} min; seeds {', '.join(map(str, args.seeds))}).", "",
        f"CNN conv(1→8, 5×5)–ReLU–maxpool–conv(8→16, 5×5)–ReLU–maxpool–linear(784→10), "
        f"{sum(p.numel() for p in SmallCNN().parameters()):,} parameters, trained with Adam (lr {args.lr}, "
        f"batch {args.batch_size}, {args.epochs} epochs) on {args.n_train:,} training images drawn by the seed; "
        f"test set: {args.n_test:,} fixed images of the 10k test split. Influence of every training image on the "
        f"test set (score_mean) with `distinf.attribute`, k = {args.k} "
        f"(attribution seconds per seed: " + ", ".join(f"{m} {s:.0f}" for m, s in seconds.items()) + "; "
        "'dropout, identity hessian' ranks by plain dot products of dropout's gradients). "
        "'top by M' removes the training images with the highest score_mean under method M (the most helpful) "
        "and retrains from the same initial weights with the same seed and schedule; 'random' removes as many "
        "at random. Δ = retrained − full-set model, on the test set; mean ± std over seeds; the last two "
        "columns are the seed-by-seed difference from random removal of the same fraction.", "",
    ] + table(results, args)
    text = "\n".join(lines) + "\n"
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
