"""LDS of distinf against its peers under one tuning protocol (issue 32): every method tuned on a
validation half of the test examples, reported on the other half, paired.

The test examples of a setting (benchmarks/quality/lds.py) are split once, by a fixed seed, into a
validation half and a report half. Each method family has a grid of settings; the setting with the
highest mean LDS on the validation half is the family's choice, and only the report half's LDS of
that choice is reported, so no reported number picked itself. The grids:
- distinf gauss_newton: k and the damping multiple (λ_l = multiple × block l's mean eigenvalue;
  `damping: auto` is 0.1);
- distinf kfac_mix: k, the damping multiple and β (`hessian.mix`);
- distinf ekfac (with --ekfac): k and the damping multiple;
- distinf gauss_newton, Adam-scaled: as gauss_newton, with `compression.optimizer_state` the
  attributed model's final Adam state (TrackStar's 1/(√v + ε) per kept entry);
- kronfluence EK-FAC: the damping, as `lds_peer.py --ekfac-damping` wrote it (`heuristic=X`: X ×
  each module's mean eigenvalue, kronfluence's own heuristic with X in place of its 0.1);
- TRAK: k and λ's multiple of ΦᵀΦ's mean eigenvalue.
The peers' scores are files in `--peer-dir` (`{seed}` in it is the training seed) named
`<family>-<setting>.npy`, e.g. `ekfac-heuristic=0.01.npy`, `trak-k512-d0.1.npy`. Rows marked
"untuned" are a fixed setting (the authors' or distinf's default) on the same report half.

Every row's LDS is Spearman over the same M retrained subsets, with `scoring.normalize: none`
(the raw influence, the `influence` column of distinf's outputs). "paired" is, per report-half test
example, the row's LDS minus the tuned gauss_newton row's, mean ± std/√n. With several `--seeds`
(training seed: training subset, initial weights, data order and subsets, benchmarks/quality/lds.py
--seed) each seed gets its own table, and a last table averages the paired differences over seeds
(s.e. √(Σ s.e.²)/seeds).

distinf's damping multiple is set through distinf.core.curvature.AUTO_DAMPING_SCALE, the constant
`damping: auto` reads (0.1), for the call only.

    nice -n 5 .venv/bin/python -m benchmarks.quality.lds_fair --setting mlp --seeds 0 1 --peer-dir /tmp/fair/s{seed}
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks._harness import ROOT  # noqa: E402,F401  (the offline environment, before transformers loads)

import distinf.core.curvature as curvature  # noqa: E402
from benchmarks.quality.lds import attribution, lds_per_query, prepare  # noqa: E402
from benchmarks.record import publish  # noqa: E402
from benchmarks.quality.retraining_image import FASHION_MNIST  # noqa: E402

SPLIT_SEED = 2026  # the validation / report split of the test examples, the same for every method and seed
BASELINE = "distinf gauss_newton"


@contextlib.contextmanager
def auto_damping_scale(multiple: float):
    saved = curvature.AUTO_DAMPING_SCALE
    curvature.AUTO_DAMPING_SCALE = multiple
    try:
        yield
    finally:
        curvature.AUTO_DAMPING_SCALE = saved


def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


@dataclass
class Candidate:
    family: str
    setting: str
    per_query: np.ndarray   # LDS of every test example


def distinf_candidates(prepared, ks: list[int], dampings: list[float], mixes: list[float],
                       ekfac: bool = False) -> list[Candidate]:
    out = []
    grid = [("gauss_newton", None, False)] + [("kfac_mix", m, False) for m in mixes] + [("gauss_newton", None, True)]
    grid += [("ekfac", None, False)] if ekfac else []
    for (hessian, mix, adam), k, damping in itertools.product(grid, ks, dampings):
        with auto_damping_scale(damping):
            scores, seconds = attribution(prepared.model, prepared.setting, "dropout", hessian, k, 0, "none", mix,
                                          prepared.optimizer_state if adam else None)
        lds = lds_per_query(scores, prepared.masks, prepared.losses)
        label = f"k {k}, damping {damping:g}×mean eig." + (f", β {mix:g}" if mix is not None else "")
        out.append(Candidate(f"distinf {hessian}" + (", Adam-scaled" if adam else ""), label, lds))
        print(f"{hessian} {label}: LDS {np.nanmean(lds):.3f} ({seconds:.0f} s)", flush=True)
    return out


def peer_candidates(prepared, directory: Path) -> list[Candidate]:
    names = {"ekfac": "kronfluence EK-FAC", "trak": "TRAK"}
    out = []
    for path in sorted(directory.glob("*.npy")):
        family, _, setting = path.stem.partition("-")
        if family in names:
            out.append(Candidate(names[family], setting, lds_per_query(np.load(path), prepared.masks, prepared.losses)))
    if not out:
        raise FileNotFoundError(f"--peer-dir {directory}: no ekfac-*.npy or trak-*.npy files")
    return out


def mean_se(values: np.ndarray) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def choose(candidates: list[Candidate], validation: np.ndarray) -> dict[str, Candidate]:
    """Each family's candidate with the highest mean validation LDS."""
    best: dict[str, Candidate] = {}
    for c in candidates:
        score = float(np.nanmean(c.per_query[validation]))
        if c.family not in best or score > float(np.nanmean(best[c.family].per_query[validation])):
            best[c.family] = c
    return best


UNTUNED = {  # (family, setting) rows shown as they are, the authors' or distinf's defaults
    ("distinf gauss_newton", "k 2048, damping 0.1×mean eig."): "distinf's default curvature and damping (auto), at k 2048",
    ("distinf kfac_mix", "k 2048, damping 0.1×mean eig., β 0.5"): "kfac_mix's defaults (β 0.5, auto), at k 2048",
    ("kronfluence EK-FAC", "default"): "kronfluence's ScoreArguments() default, damping_factor 1e-8",
    ("kronfluence EK-FAC", "heuristic"): "kronfluence damping_factor=None (0.1 × mean eigenvalue, distinf's rule)",
}


def seed_table(candidates: list[Candidate], validation: np.ndarray, report: np.ndarray) -> tuple[list[str], dict]:
    """Markdown rows and {row name: (report-half per-query LDS, its paired difference against the baseline)}."""
    best = choose(candidates, validation)
    base = best[BASELINE].per_query[report]
    rows = [("tuned", c.family, c.setting, c.per_query) for c in best.values()]
    rows += [("untuned", c.family, c.setting, c.per_query) for c in candidates if (c.family, c.setting) in UNTUNED]
    lines = ["| method | setting used | chosen how | LDS, report half, mean ± s.e. | LDS, validation half | "
             "paired − tuned gauss_newton ± s.e. |", "|---|---|---|---|---|---|"]
    diffs = {}
    for how, family, setting, lds in rows:
        mean, se = mean_se(lds[report])
        d_mean, d_se = mean_se(lds[report] - base)
        how_text = "best on validation" if how == "tuned" else UNTUNED[(family, setting)]
        lines.append(f"| {family} | {setting} | {how_text} | {mean:.3f} ± {se:.3f} | "
                     f"{np.nanmean(lds[validation]):.3f} | {d_mean:+.3f} ± {d_se:.3f} |")
        name = f"{family} (tuned)" if how == "tuned" else f"{family}, {setting} (untuned)"
        diffs[name] = (lds[report], lds[report] - base)
    return lines, diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=["image", "text", "mlp", "lora", "untracked"], default="mlp")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (lds.py --seed)")
    parser.add_argument("--peer-dir", required=True, help="folder of the peers' .npy files; {seed} is the seed")
    parser.add_argument("--ks", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--mixes", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--ekfac", action="store_true", help="also tune distinf's ekfac over --ks × --dampings")
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--data", type=Path, default=FASHION_MNIST)
    parser.add_argument("--work", type=Path, default=Path("/tmp/distinf-lds"))
    parser.add_argument("--export", help="write <setting>.pt for lds_peer.py here ({seed}: the seed) and stop")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sections, all_diffs = [], []
    for seed in args.seeds:
        ns = argparse.Namespace(**vars(args), seed=seed, epochs=None, batch_size=None, lr=None)
        ns.export = Path(args.export.format(seed=seed)) if args.export else None
        prepared = prepare(ns)
        if args.export:
            continue
        validation, report = split(len(prepared.setting.tx))
        candidates = distinf_candidates(prepared, args.ks, args.dampings, args.mixes, args.ekfac)
        candidates += peer_candidates(prepared, Path(args.peer_dir.format(seed=seed)))
        lines, diffs = seed_table(candidates, validation, report)
        all_diffs.append(diffs)
        sections.append(f"#### {args.setting}, training seed {seed} ({len(validation)} validation, {len(report)} "
                        f"report test examples; {prepared.setting.description}; full-set test accuracy "
                        f"{prepared.full_accuracy:.1%})\n\n" + "\n".join(lines))
    if args.export:
        return 0
    if len(all_diffs) > 1:
        lines = ["| method | LDS, report half, mean over seeds | paired − tuned gauss_newton, mean over seeds ± s.e. "
                 "| paired, per seed |", "|---|---|---|---|"]
        for name in all_diffs[0]:
            lds_means = [float(np.nanmean(d[name][0])) for d in all_diffs if name in d]
            stats = [mean_se(d[name][1]) for d in all_diffs if name in d]
            mean = np.mean([m for m, _ in stats])
            se = np.sqrt(sum(s * s for _, s in stats)) / len(stats)
            lines.append(f"| {name} | {np.mean(lds_means):.3f} | {mean:+.3f} ± {se:.3f} | "
                         f"{' / '.join(f'{m:+.3f}' for m, _ in stats)} |")
        sections.append(f"#### {args.setting}, over training seeds {', '.join(map(str, args.seeds))}\n\n" + "\n".join(lines))
    header = (f"### Fair LDS, {args.setting} setting (M = {args.subsets} subsets of {args.fraction:.0%})\n\n"
              f"Command: `nice -n 5 .venv/bin/python -m benchmarks.quality.lds_fair {shlex.join(argv)}` "
              f"({(time.perf_counter() - started) / 60:.1f} min, torch threads {torch.get_num_threads()}).\n")
    publish(header + "\n" + "\n\n".join(sections) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
