"""A peer tool's scores for benchmarks/quality/lds.py: kronfluence EK-FAC, or TRAK (traker) at a projection dimension k.

Runs in .venv-peers (benchmarks/peers/setup.sh) and imports no distinf. It reads the file that
`benchmarks/quality/lds.py --export DIR` writes (<setting>.pt: model class and state dict, training and
test tensors), rebuilds the model from benchmarks/quality/lds_models.py (plain torch), and writes the
pairwise influence scores [test, train] as .npy for `lds.py --peer "kronfluence EK-FAC=FILE"`.

The task is the recipe's: cross-entropy of the label, summed over the batch (kronfluence's
contract); the curvature is fitted with labels sampled from the model (the true Fisher, its
default) or, with --empirical-fisher, with the true labels. kronfluence's pairwise score is
positive when upweighting the training example lowers the measurement (here the test example's
loss), the same sign as distinf's scores.

`--ekfac-damping` takes one or more of: `default` (ScoreArguments' own damping_factor, 1e-8),
`heuristic` (damping_factor=None: kronfluence's documented heuristic, 0.1 × each module's mean
eigenvalue, the rule of distinf's `damping: auto`), or `heuristic=X` (the same heuristic with X in
place of 0.1, kronfluence's HEURISTIC_DAMPING_SCALE). The factors are fitted once; with several
values, each one's scores go to `<out stem>-<value>.npy`.

`--method trak --k K`: TRAK (traker 0.3.2, one checkpoint, no ensemble) with its CPU Rademacher
projection (BasicProjector, seed `--seed`) of every parameter's gradient to K dimensions, the
compressed peer at distinf's k. Its model output is the correct-class margin and its score
φ_q (ΦᵀΦ + λI)⁻¹ φ_i · (1 − p_i), positive when training on i raises q's margin: the same sign.
traker's λ defaults to 0, which is singular whenever K exceeds the training set (K = 2,048 and
8,192 here); λ is set, after featurising, to `--damping` times the mean eigenvalue of ΦᵀΦ
(tr(ΦᵀΦ)/K), the rule of distinf's `damping: auto` (0.1); `--damping 0` keeps traker's default.

    .venv-peers/bin/python -m benchmarks.peers.lds_peer /tmp/lds-export/image.pt --out /tmp/lds-export/image-ekfac.npy
    .venv-peers/bin/python -m benchmarks.peers.lds_peer /tmp/lds-export/image.pt --method trak --k 2048 --out X.npy

Where the export names the parameters distinf attributes (`tracked_parameters`: a LoRA model's
adapters and head, or only the Linear layers of a model whose embeddings and LayerNorms train),
both peers attribute exactly those: EK-FAC tracks the modules that own them (it supports Linear
and Conv2d only, and refuses a tracked parameter of another kind), TRAK takes and projects the
gradient of those parameters only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch.utils.data import TensorDataset

# Run from the checkout's root (`python -m benchmarks.peers.lds_peer`): lds_models is plain torch, nothing from distinf.
from benchmarks.quality.lds_models import build  # noqa: E402


class ClassificationTask(Task):
    def __init__(self, tracked_modules: list[str] | None = None):
        super().__init__()
        self.tracked_modules = tracked_modules

    def get_influence_tracked_modules(self):
        return self.tracked_modules

    def compute_train_loss(self, batch, model, sample: bool = False):
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model):
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels, reduction="sum")


def score_arguments(damping: str) -> tuple[ScoreArguments, float]:
    """kronfluence's ScoreArguments and heuristic multiple for one --ekfac-damping value."""
    if damping == "default":
        return ScoreArguments(), 0.1
    name, _, scale = damping.partition("=")
    if name != "heuristic":
        raise ValueError(f"--ekfac-damping: {damping!r} is not default, heuristic or heuristic=X")
    return ScoreArguments(damping_factor=None), float(scale) if scale else 0.1


def tracked_modules(model: torch.nn.Module, parameters: list[str] | None) -> list[str] | None:
    """The modules that own the tracked parameters (None: kronfluence's default, every Linear and
    Conv2d); a parameter of a module kind kronfluence cannot track is an error, not a silent gap."""
    if parameters is None:
        return None
    modules = dict(model.named_modules())
    owners = sorted({name.rpartition(".")[0] for name in parameters})
    unsupported = [o for o in owners if not isinstance(modules[o], (torch.nn.Linear, torch.nn.Conv2d))]
    if unsupported:
        raise ValueError(f"kronfluence tracks Linear and Conv2d modules only; tracked parameters live in {unsupported}")
    return owners


def restricted_gradients(names: list[str]):
    """traker's vmap'd per-example gradients over the named parameters only. traker's own
    `grad_wrt` still differentiates every parameter and drops the others afterwards: for a LoRA
    model that is the frozen 22.7M-parameter encoder, per example."""
    from trak.gradient_computers import FunctionalGradientComputer

    class Restricted(FunctionalGradientComputer):
        def load_model_params(self, model):
            super().load_model_params(model)
            self.func_weights = {n: p for n, p in self.func_weights.items() if n in names}

    return Restricted


def ekfac_scores(exported: dict, batch_size: int, work: Path, empirical_fisher: bool,
                 dampings: list[str]) -> dict[str, np.ndarray]:
    """{damping: [test, train] EK-FAC influence of every training example on every test example}."""
    import kronfluence.factor.config as factor_config

    model = build(exported["model"], exported["model_kwargs"], exported["state_dict"]).eval()
    task = ClassificationTask(tracked_modules(model, exported.get("tracked_parameters")))
    model = prepare_model(model, task)
    train = TensorDataset(exported["x"], exported["y"])
    test = TensorDataset(exported["tx"], exported["ty"])
    analyzer = Analyzer(analysis_name="lds", model=model, task=task, cpu=True, output_dir=str(work),
                        disable_tqdm=True)
    torch.manual_seed(0)  # the Fisher's sampled labels
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=empirical_fisher)
    analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=batch_size,
                             factor_args=factor_args, overwrite_output_dir=True)
    out = {}
    for damping in dampings:
        score_args, scale = score_arguments(damping)
        # The heuristic's multiple is a module constant of kronfluence, read when the scores are computed.
        factor_config.HEURISTIC_DAMPING_SCALE = scale
        analyzer.compute_pairwise_scores(scores_name="ekfac", factors_name="ekfac", query_dataset=test,
                                         train_dataset=train, per_device_query_batch_size=batch_size,
                                         per_device_train_batch_size=batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        out[damping] = analyzer.load_pairwise_scores("ekfac")["all_modules"].numpy()
    factor_config.HEURISTIC_DAMPING_SCALE = 0.1
    return out


def trak_scores(exported: dict, k: int, batch_size: int, work: Path, seed: int, damping: float) -> np.ndarray:
    """[test, train] TRAK scores of one checkpoint with a k-dimensional Rademacher projection."""
    import logging

    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = build(exported["model"], exported["model_kwargs"], exported["state_dict"]).eval()
    x, y, tx, ty = exported["x"], exported["y"], exported["tx"], exported["ty"]
    tracked = exported.get("tracked_parameters")
    grad_dim = sum(p.numel() for n, p in model.named_parameters() if tracked is None or n in tracked)
    projector = BasicProjector(grad_dim=grad_dim, proj_dim=k, seed=seed, proj_type=ProjectionType.rademacher,
                               device="cpu", block_size=max(1, min(k // 2, 512)))
    # ≥ 2 blocks: with one, traker 0.3.2's finalize_features frees the projection matrix (free_memory)
    # and scoring then projects with the freed one (AttributeError: no attribute 'proj_matrix').
    restricted = {} if tracked is None else {"grad_wrt": tracked, "gradient_computer": restricted_gradients(tracked)}
    traker = TRAKer(model=model, task="image_classification", train_set_size=len(x), save_dir=str(work),
                    device="cpu", projector=projector, use_half_precision=False, logging_level=logging.WARNING,
                    **restricted)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for start in range(0, len(x), batch_size):
        part = slice(start, start + batch_size)
        traker.featurize(batch=(x[part], y[part]), num_samples=len(x[part]))
    if damping > 0:
        features = torch.as_tensor(np.asarray(traker.saver.current_store["grads"]), dtype=torch.float64)
        traker.score_computer.lambda_reg = damping * float((features * features).sum()) / k
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="lds", checkpoint=model.state_dict(), model_id=0, num_targets=len(tx))
    for start in range(0, len(tx), batch_size):
        part = slice(start, start + batch_size)
        traker.score(batch=(tx[part], ty[part]), num_samples=len(tx[part]))
    return np.asarray(traker.finalize_scores(exp_name="lds")).T  # traker's are [train, test]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exported", type=Path, help="<setting>.pt from benchmarks/quality/lds.py --export")
    parser.add_argument("--out", type=Path, required=True, help="scores .npy [test, train]")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--empirical-fisher", action="store_true",
                        help="ekfac: fit the factors on the true labels (what distinf's gauss_newton Gram uses)")
    parser.add_argument("--method", choices=["ekfac", "trak"], default="ekfac")
    parser.add_argument("--k", type=int, default=2048, help="trak: projection dimension")
    parser.add_argument("--seed", type=int, default=0, help="trak: projection seed")
    parser.add_argument("--damping", type=float, default=0.1,
                        help="trak: λ as a multiple of ΦᵀΦ's mean eigenvalue; 0: traker's default (none)")
    parser.add_argument("--ekfac-damping", nargs="+", default=["default"],
                        help="ekfac: default (1e-8), heuristic (None: 0.1 × mean eigenvalue), heuristic=X")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    exported = torch.load(args.exported)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        if args.method == "trak":
            outputs = {args.out: trak_scores(exported, args.k, args.batch_size, Path(work), args.seed, args.damping)}
        else:
            scores = ekfac_scores(exported, args.batch_size, Path(work), args.empirical_fisher, args.ekfac_damping)
            single = len(scores) == 1
            outputs = {args.out if single else args.out.with_name(f"{args.out.stem}-{d}.npy"): v
                       for d, v in scores.items()}
    expected = (len(exported["tx"]), len(exported["x"]))
    for path, scores in outputs.items():
        if scores.shape != expected:
            raise ValueError(f"{args.exported}: the peer returned scores {scores.shape}, expected {expected}")
        np.save(path, scores.astype(np.float32))
    name = f"TRAK k={args.k}" if args.method == "trak" else "kronfluence EK-FAC"
    print(f"{name} scores {expected} -> {', '.join(map(str, outputs))} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
