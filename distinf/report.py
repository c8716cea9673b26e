"""`distinf report RUN_DIR`: one self-contained report.html with the plots embedded as images.

What a data team asks of a nightly run: its health (state, timings, restarts, rejected rows, zero
blocks), the most helpful and most harmful training rows by value (score_mean), a breakdown by any
column of the training files (`--by source`), the trend across the committed versions (the score
history), and, for a few queries, their strongest proponents and opponents (stored in
scores/top_k.parquet; recomputed for runs written before opponents were stored, one training chunk
at a time). Nothing holds the training gradients or texts whole: chunks are streamed, texts are
read a batch at a time and only for the rows shown. Every file is read through the run's manifest,
checked against its sha256, locally or on an object store.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import torch

from distinf.config import DatasetConfig, HessianConfig
from distinf.core.curvature import precondition
from distinf.core.scoring import TopK, score_chunk
from distinf.inputs import dataset_files, read_files
from distinf.runtime.curvature_files import read_solver
from distinf.runtime.history import HISTORY
from distinf.runtime.layout import MANIFEST, TOP_K, TRAIN_VALUES, run_file
from distinf.runtime.ledger import input_order
from distinf.runtime.run_dir import RunDir
from distinf.runtime.versions import committed_root
from distinf.status import run_status
from distinf.store import atomic_write_text, display, list_files, read_bytes, read_verified_table
from distinf.tables import gradients_of

SHOWN_QUERIES = 4
SHOWN_EXAMPLES = 3
SHOWN_VALUES = 10


def _texts(dataset: dict, role: str, wanted: set[str]) -> dict[str, str]:
    """The texts of the `wanted` ids, read a batch at a time."""
    texts: dict[str, str] = {}
    try:
        for table, _ in read_files(DatasetConfig.model_validate(dataset), role, on_bad_row="skip"):
            for example_id, text in zip(table.column("example_id").to_pylist(), table.column("text").to_pylist()):
                if example_id in wanted:
                    texts[example_id] = text
    except (OSError, ValueError):  # the source moved since the run: show ids only
        pass
    return texts


def _read_source_table(source, columns: list[str]) -> pa.Table:
    """One training file's `columns`, whatever its format."""
    if source.filesystem is None:
        stream = pa.input_stream(source.path, compression="detect")
    else:
        stream = source.filesystem.open_input_stream(source.path, compression="detect")
    with stream:
        if source.fmt == "parquet":
            return pq.read_table(stream, columns=columns)
        if source.fmt == "json":
            return pajson.read_json(stream).select(columns)
        if source.fmt == "csv":
            return pacsv.read_csv(stream).select(columns)
        return pa.ipc.open_stream(stream).read_all().select(columns)


def train_column(dataset: dict, column: str) -> dict[str, object]:
    """{example id: value of `column`} over every file of the training path (one file, a folder, a
    glob or a list), ids as the run made them; ValueError naming the column and the file lacking it."""
    cfg = DatasetConfig.model_validate(dataset)
    values: dict[str, object] = {}
    offset = 0
    for source in dataset_files(cfg.path, "data.train"):
        wanted = [column] + ([cfg.id_column] if cfg.id_column else [])
        try:
            table = _read_source_table(source, wanted)
        except (KeyError, pa.ArrowInvalid) as error:
            raise ValueError(f"no column {column!r} in {source.name} ({error})") from None
        ids = (table.column(cfg.id_column).cast(pa.string()).to_pylist() if cfg.id_column
               else [str(offset + i) for i in range(table.num_rows)])
        values.update(zip(ids, table.column(column).to_pylist()))
        offset += table.num_rows
    return values


def _chunks(run_dir: Path, manifest: dict, split: str) -> Iterator[pa.Table]:
    """The split's gradient chunks in input order, one at a time."""
    for c in sorted(manifest["chunks"][split], key=input_order):
        yield read_verified_table(run_file(run_dir, c["file"], f"{MANIFEST}'s chunk list"), c["sha256"])


def extremes(run_dir: Path, manifest: dict, query_ids: list[str], count: int) -> dict[str, tuple[list, list]]:
    """For each query: ([(train_id, score)] strongest proponents, [...] strongest opponents),
    recomputed from the stored gradients and curvature, one training chunk at a time."""
    ids, grads = [], []
    for table in _chunks(run_dir, manifest, "queries"):
        keep = [i for i, q in enumerate(table.column("example_id").to_pylist()) if q in query_ids]
        ids += [table.column("example_id")[i].as_py() for i in keep]
        grads.append(gradients_of(table)[keep])
    grads = np.concatenate(grads)
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


def _table(header: list[str], rows: list[list]) -> str:
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows) + "</table>")


def stored_extremes(top: dict, query_ids: list[str], count: int) -> dict[str, tuple[list, list]]:
    """The proponents and opponents top_k.parquet holds (its `kind` column), per query."""
    out = {q: ([], []) for q in query_ids}
    for q, rank, train_id, score, kind in zip(top["query_id"], top["rank"], top["train_id"], top["score"], top["kind"]):
        if q in out and rank <= count:
            out[q][0 if kind == "proponent" else 1].append((rank, train_id, score))
    return {q: tuple([(t, s) for _, t, s in sorted(part)] for part in parts) for q, parts in out.items()}


def breakdown(values: dict, top: dict, column: dict[str, object]) -> list[list]:
    """Per value of a training column: rows, mean score_mean, mean self-influence, and the rows'
    appearances among the proponents and opponents of top_k.parquet."""
    groups: dict[str, list[int]] = {}
    for i, train_id in enumerate(values["train_id"]):
        groups.setdefault(str(column.get(train_id)), []).append(i)
    kinds = top.get("kind") or ["proponent"] * len(top["train_id"])
    appear: dict[tuple[str, str], int] = {}
    for train_id, kind in zip(top["train_id"], kinds):
        key = (str(column.get(train_id)), kind)
        appear[key] = appear.get(key, 0) + 1
    mean_score = np.asarray(values["score_mean"], dtype=float)
    self_inf = np.asarray(values["self_influence"], dtype=float)
    return [[value, len(rows), float(mean_score[rows].mean()), float(np.nanmean(self_inf[rows])) if
             np.isfinite(self_inf[rows]).any() else float("nan"),
             appear.get((value, "proponent"), 0), appear.get((value, "opponent"), 0)]
            for value, rows in sorted(groups.items(), key=lambda item: -len(item[1]))]


def trends(run_dir: Path) -> list[list]:
    """Per committed version in history/train_values (oldest first): date, run_id, rows, mean
    score_mean, mean self-influence; read one version's file at a time."""
    rows = []
    for path in sorted(list_files(Path(run_dir) / HISTORY / "train_values", recursive=True)):
        if path.suffix != ".parquet":
            continue
        table = pq.read_table(io.BytesIO(read_bytes(path)), columns=["score_mean", "self_influence", "as_of"])
        self_inf = table.column("self_influence").to_numpy(zero_copy_only=False).astype(float)
        as_of = table.column("as_of")[0].as_py() if table.num_rows else None
        rows.append([str(as_of)[:19] if as_of else path.parent.name, path.stem, table.num_rows,
                     float(np.mean(table.column("score_mean").to_numpy(zero_copy_only=False))) if table.num_rows else 0.0,
                     float(np.nanmean(self_inf)) if np.isfinite(self_inf).any() else float("nan")])
    return sorted(rows)


def health(run_dir: Path) -> str:
    """State, version, timings, restarts, rejected rows and zero blocks, as `distinf status` reads them."""
    status = run_status(display(run_dir))
    counts = status["counts"] or {}
    rows = [["state", status["state"]], ["version", f"{status['version']} (as of {status['as_of']})"],
            ["versions kept", len(status["versions_kept"])], ["appends", status["appends"]],
            ["timings", ", ".join(f"{k} {v:.1f} s" for k, v in status["timings"].items())],
            ["restarts", "; ".join(f"{r.get('stage')}: {r.get('error', '')}" for r in status["restarts"]) or "none"],
            ["rejected rows", f"{status['rejected']['count']} (train {counts.get('rejected_train', 0)}, "
                              f"queries {counts.get('rejected_queries', 0)})"],
            ["zero blocks", status["zero_blocks"]]]
    rejected = [[r["split"], r["row"], r.get("file") or "", r["example_id"] or "", r["reason"]]
                for r in status["rejected"]["rows"][:SHOWN_VALUES]]
    return (_table(["", ""], rows)
            + (f"<h3>rejected rows (first {len(rejected)})</h3>"
               + _table(["split", "row", "file", "id", "reason"], rejected) if rejected else ""))


def write_report(run_dir: str | Path, noisy_column: str | None = None, by: list[str] = ()) -> Path:
    """Write RUN_DIR/report.html and return its path; `by` names training columns to break down by."""
    folder = RunDir.at(run_dir)
    stored = folder.read_manifest()
    if stored is None or stored.status != "complete":
        raise ValueError(f"{folder}: not a complete distinf run (manifest.json missing or not complete)")
    run_dir, manifest = folder.root, stored.to_dict()
    data = manifest["config"]["data"]
    files = manifest["files"]
    source = committed_root(run_dir, manifest)  # the committed version, whole even while root copies lag
    values = read_verified_table(source / TRAIN_VALUES, files[TRAIN_VALUES]).to_pydict()
    top = read_verified_table(source / TOP_K, files[TOP_K]).to_pydict()
    query_ids = list(dict.fromkeys(top["query_id"]))
    shown = query_ids[:: max(1, len(query_ids) // SHOWN_QUERIES)][:SHOWN_QUERIES]
    columns = {}
    for name in [*by, *([noisy_column] if noisy_column else [])]:
        try:
            columns[name] = train_column(data["train"], name)
        except ValueError as error:
            flag = "--noisy-column" if name == noisy_column else "--by"
            raise ValueError(f"{flag}: {error}") from None
    noisy = np.array([bool(columns[noisy_column].get(i)) for i in values["train_id"]]) if noisy_column else None

    examples = (stored_extremes(top, shown, SHOWN_EXAMPLES) if "kind" in top
                else extremes(run_dir, manifest, shown, SHOWN_EXAMPLES))
    score_mean = np.nan_to_num(np.asarray(values["score_mean"], dtype=float))
    self_inf = np.nan_to_num(np.asarray(values["self_influence"], dtype=float))
    helpful = [(values["train_id"][i], score_mean[i]) for i in np.argsort(-score_mean, kind="stable")[:SHOWN_VALUES]]
    harmful = [(values["train_id"][i], score_mean[i]) for i in np.argsort(score_mean, kind="stable")[:SHOWN_VALUES]]
    most_self = [(values["train_id"][i], self_inf[i]) for i in np.argsort(-self_inf, kind="stable")[:SHOWN_VALUES]]
    wanted = {i for pairs in examples.values() for part in pairs for i, _ in part}
    wanted |= {i for i, _ in helpful + harmful + most_self}
    train_texts = _texts(data["train"], "train", wanted)
    query_texts = _texts(data["queries"], "queries", set(shown))

    sections = []
    for query_id, (best, worst) in examples.items():
        sections.append(
            f"<h3>query {html.escape(query_id)}</h3><p class=q>{html.escape(query_texts.get(query_id, ''))}</p>"
            f"<table><tr><th colspan=3>strongest proponents (upweighting lowers the query loss)</th></tr>"
            f"{_rows(best, train_texts)}<tr><th colspan=3>strongest opponents</th></tr>{_rows(worst, train_texts)}</table>"
        )
    header = "<tr><th>train_id</th><th>{}</th><th>text</th></tr>"
    by_sections = "".join(
        f"<h3>by {html.escape(name)}</h3>" + _table([name, "rows", "mean score_mean", "mean self-influence",
                                                     "as proponent", "as opponent"], breakdown(values, top, columns[name]))
        for name in by)
    history = trends(run_dir)
    trend_html = (_table(["as of", "version", "rows", "mean score_mean", "mean self-influence"], history)
                  if history else "<p>No score history yet (history/train_values/ is written by each complete version).</p>")
    proponent_scores = np.asarray([s for s, k in zip(top["score"], top.get("kind") or ["proponent"] * len(top["score"]))
                                   if k == "proponent"])
    counts = manifest["counts"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>distinf report: {html.escape(manifest['name'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em;width:100%}}td,th{{border:1px solid #ddd;padding:4px 8px;
font-size:13px;vertical-align:top;text-align:left}}th{{background:#f3f3f3}}p.q{{font-style:italic}}img{{max-width:100%}}</style>
</head><body><h1>distinf report: {html.escape(manifest['name'])}</h1>
<p>{counts['train']} training examples, {counts['queries']} queries, k = {manifest['k']},
{len(manifest['damping'])} curvature block(s) ({html.escape(manifest['config']['hessian']['method'])}). Run directory: {html.escape(display(run_dir))}</p>
<h2>Run health</h2>{health(run_dir)}
<h2>Distributions</h2>{''.join(_plots(values, proponent_scores, noisy))}
<h2>Most helpful training rows (highest mean score over the queries)</h2><table>{header.format('score_mean')}{_rows(helpful, train_texts)}</table>
<h2>Most harmful training rows (lowest mean score)</h2><table>{header.format('score_mean')}{_rows(harmful, train_texts)}</table>
{f'<h2>Breakdown</h2>{by_sections}' if by else ''}
<h2>Trend across committed versions</h2>{trend_html}
<h2>Queries</h2>{''.join(sections)}
<h2>Most self-influential training examples</h2><table>{header.format('self-influence')}{_rows(most_self, train_texts)}</table>
</body></html>"""
    return atomic_write_text(page, run_dir / "report.html")
