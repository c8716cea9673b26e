"""Paired differences of LDS rows, from the per-test-example files `benchmarks/quality/lds.py --per-query` saves.

For a method A against a baseline B at each k: per test example q, d(q) = LDS_A(q) − LDS_B(q) under the
same index seed, averaged over the index seeds both have; reported as mean d ± its standard error
(std of d over test examples / √n), next to the unpaired error of the baseline row (std over test
examples of LDS_B, averaged over the same seeds, / √n), the yardstick the LDS tables use. Rows are the .npz keys 'SPEC|k=K|seed=S' (peers: 'peer:NAME').

    .venv/bin/python -m benchmarks.quality.lds_paired /tmp/rows-image.npz --baseline dropout:gauss_newton \
        --methods dropout:kfac dropout:kfac_mix
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def rows_of(saved: dict[str, np.ndarray], spec: str) -> dict[str, dict[int, np.ndarray]]:
    """{k: {index seed: per-query LDS}} of one method spec."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for key, values in saved.items():
        name, _, rest = key.partition("|")
        if name != spec or not rest:
            continue
        k, seed = (part.split("=", 1)[1] for part in rest.split("|"))
        out.setdefault(k, {})[int(seed)] = values
    return out


def paired(saved: dict[str, np.ndarray], method: str, baseline: str) -> list[tuple[str, float, float, float, int]]:
    """(k, mean difference, its standard error, the baseline's unpaired error, seeds) per k both have."""
    a, b = rows_of(saved, method), rows_of(saved, baseline)
    out = []
    for k in a:
        seeds = sorted(set(a[k]) & set(b.get(k, {})))
        if not seeds:
            continue
        d = np.mean([a[k][s] - b[k][s] for s in seeds], axis=0)
        base = np.mean([b[k][s] for s in seeds], axis=0)
        d, base = d[~np.isnan(d)], base[~np.isnan(base)]
        out.append((k, float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))),
                    float(base.std(ddof=1) / np.sqrt(len(base))), len(seeds)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--baseline", default="dropout:gauss_newton")
    parser.add_argument("--methods", nargs="+", required=True)
    args = parser.parse_args(argv)
    print("| setting | method − baseline | k | mean difference ± s.e. (paired) | unpaired s.e. of one row | index seeds |")
    print("|---|---|---|---|---|---|")
    for path in args.files:
        saved = dict(np.load(path))
        for method in args.methods:
            for k, mean, se, unpaired, seeds in paired(saved, method, args.baseline):
                print(f"| {path.stem} | {method} − {args.baseline} | {k} | {mean:+.3f} ± {se:.3f} | {unpaired:.3f} | {seeds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
