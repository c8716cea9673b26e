"""`distinf report RUN_DIR`: one self-contained report.html with the plots embedded as images.

Proponents come from scores/top_k.parquet. Opponents (the most negative scores) are not stored,
so they are recomputed here for the few queries shown, from the stored query gradients, the
stored curvature (any hessian.method) and one pass over the training chunks: no model is loaded.
Every file is read through the run's manifest, checked against its sha256, locally or on an
object store.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distinf.config import DatasetConfig, HessianConfig
from distinf.core.curvature import precondition
from distinf.core.scoring import TopK, score_chunk
from distinf.data import read_table
from distinf.ledger import input_order
from distinf.runtime.curvature_files import read_solver
from distinf.runtime.layout import MANIFEST, TOP_K, TRAIN_VALUES, run_file
from distinf.runtime.run_dir import RunDir
from distinf.runtime.versions import committed_root
from distinf.store import atomic_write_text, display, read_verified_table
from distinf.tables import gradients_of

SHOWN_QUERIES = 4
SHOWN_EXAMPLES = 3


def _texts(dataset: dict, role: str) -> dict[str, str]:
    try:
        table = read_table(DatasetConfig.model_validate(dataset), role)
    except (OSError, ValueError):  # the source moved since the run: show ids only
        return {}
    return dict(zip(table.column("example_id").to_pylist(), table.column("text").to_pylist()))


def _chunks(run_dir: Path, manifest: dict, split: str) -> list[pa.Table]:
    return [read_verified_table(run_file(run_dir, c["file"], f"{MANIFEST}'s chunk list"), c["sha256"])
            for c in sorted(manifest["chunks"][split], key=input_order)]


def extremes(run_dir: Path, manifest: dict, query_ids: list[str], count: int) -> dict[str, tuple[list, list]]:
    """For each query: ([(train_id, score)] strongest proponents, [...] strongest opponents)."""
    tables = _chunks(run_dir, manifest, "queries")
    ids = [i for t in tables for i in t.column("example_id").to_pylist()]
    grads = np.concatenate([gradients_of(t) for t in tables])
    rows = [ids.index(q) for q in query_ids]
    solver = read_solver(committed_root(run_dir, manifest), manifest["files"], HessianConfig.model_validate(manifest["config"]["hessian"]))
    preconditioned = precondition(solver, torch.from_numpy(grads[rows])).T
    best, worst = TopK(len(rows), count), TopK(len(rows), count)
    train_ids: list[str] = []
    for table in _chunks(run_dir, manifest, "train"):
        scores = score_chunk(preconditioned, torch.from_numpy(gradients_of(table))).numpy()
        positions = np.arange(len(train_ids), len(train_ids) + table.num_rows)
        best.update(scores, positions)
        worst.update(-scores, positions)
        train_ids += table.column("example_id").to_pylist()
    return {
        q: ([(train_ids[p], s) for p, s in zip(best.positions[i], best.scores[i])],
            [(train_ids[p], -s) for p, s in zip(worst.positions[i], worst.scores[i])])
        for i, q in enumerate(query_ids)
    }


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False- and true-positive rates over all thresholds of `scores` (higher = more positive), AUC."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order].astype(bool)
    tpr = np.concatenate([[0], np.cumsum(hits) / max(1, hits.sum())])
    fpr = np.concatenate([[0], np.cumsum(~hits) / max(1, (~hits).sum())])
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _plots(values: dict, top_scores: np.ndarray, noisy: np.ndarray | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].hist(values["score_mean"], bins=40, color="#3b6ea5")
    axes[0].set(title="mean score over queries, per training example", xlabel="score_mean", ylabel="examples")
    axes[1].hist(top_scores, bins=40, color="#5a9e6f")
    axes[1].set(title="top-k scores, all queries", xlabel="score")
    self_inf = np.asarray(values["self_influence"], dtype=float)
    finite = self_inf[np.isfinite(self_inf) & (self_inf > 0)]
    if len(finite):
        axes[2].hist(np.log10(finite), bins=40, color="#b5651d")
    axes[2].set(title="self-influence", xlabel="log10 self-influence")
    images.append(_png(figure))
    plt.close(figure)

    if noisy is not None and 0 < noisy.sum() < len(noisy):
        figure, axis = plt.subplots(figsize=(4.6, 4.2))
        for name, score in (("self-influence", self_inf), ("harm (−score_mean)", -np.asarray(values["score_mean"]))):
            fpr, tpr, auc = roc_curve(noisy, np.nan_to_num(score))
            axis.plot(fpr, tpr, label=f"{name}: AUC {auc:.3f}")
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random")
        axis.set(title="detecting noisy labels", xlabel="false-positive rate", ylabel="true-positive rate")
        axis.legend(loc="lower right", fontsize=8)
        images.append(_png(figure))
        plt.close(figure)
    return images


def _rows(pairs: list[tuple[str, float]], texts: dict[str, str]) -> str:
    return "".join(
        f"<tr><td>{html.escape(i)}</td><td>{s:+.4g}</td><td>{html.escape(texts.get(i, '')[:300])}</td></tr>"
        for i, s in pairs
    )


def write_report(run_dir: str | Path, noisy_column: str | None = None) -> Path:
    """Write RUN_DIR/report.html and return its path."""
    folder = RunDir.at(run_dir)
    stored = folder.read_manifest()
    if stored is None or stored.status != "complete":
        raise ValueError(f"{folder}: not a complete distinf run (manifest.json missing or not complete)")
    run_dir, manifest = folder.root, stored.to_dict()
    data = manifest["config"]["data"]
    train_texts, query_texts = _texts(data["train"], "train"), _texts(data["queries"], "queries")
    files = manifest["files"]
    source = committed_root(run_dir, manifest)  # the committed version, whole even while root copies lag
    values = read_verified_table(source / TRAIN_VALUES, files[TRAIN_VALUES]).to_pydict()
    top = read_verified_table(source / TOP_K, files[TOP_K]).to_pydict()
    query_ids = list(dict.fromkeys(top["query_id"]))
    shown = query_ids[:: max(1, len(query_ids) // SHOWN_QUERIES)][:SHOWN_QUERIES]

    noisy = None
    if noisy_column:
        source = pq.read_table(data["train"]["path"]) if data["train"]["path"].endswith(".parquet") else None
        if source is None or noisy_column not in source.column_names:
            raise ValueError(f"--noisy-column: no column {noisy_column!r} in {data['train']['path']}")
        id_column = data["train"].get("id_column")
        flags = dict(zip(source.column(id_column).cast("string").to_pylist() if id_column
                         else [str(i) for i in range(source.num_rows)], source.column(noisy_column).to_pylist()))
        noisy = np.array([bool(flags.get(i)) for i in values["train_id"]])

    sections = []
    for query_id, (best, worst) in extremes(run_dir, manifest, shown, SHOWN_EXAMPLES).items():
        sections.append(
            f"<h3>query {html.escape(query_id)}</h3><p class=q>{html.escape(query_texts.get(query_id, ''))}</p>"
            f"<table><tr><th colspan=3>strongest proponents (upweighting lowers the query loss)</th></tr>"
            f"{_rows(best, train_texts)}<tr><th colspan=3>strongest opponents</th></tr>{_rows(worst, train_texts)}</table>"
        )
    order = np.argsort(-np.nan_to_num(np.asarray(values["self_influence"], dtype=float)))[:10]
    self_rows = _rows([(values["train_id"][i], values["self_influence"][i]) for i in order], train_texts)
    counts = manifest["counts"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>distinf report: {html.escape(manifest['name'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em;width:100%}}td,th{{border:1px solid #ddd;padding:4px 8px;
font-size:13px;vertical-align:top;text-align:left}}th{{background:#f3f3f3}}p.q{{font-style:italic}}img{{max-width:100%}}</style>
</head><body><h1>distinf report: {html.escape(manifest['name'])}</h1>
<p>{counts['train']} training examples, {counts['queries']} queries, k = {manifest['k']},
{len(manifest['damping'])} curvature block(s) ({html.escape(manifest['config']['hessian']['method'])}). Run directory: {html.escape(display(run_dir))}</p>
<h2>Distributions</h2>{''.join(_plots(values, np.asarray(top['score']), noisy))}
<h2>Queries</h2>{''.join(sections)}
<h2>Most self-influential training examples</h2><table><tr><th>train_id</th><th>self-influence</th><th>text</th></tr>{self_rows}</table>
</body></html>"""
    return atomic_write_text(page, run_dir / "report.html")
