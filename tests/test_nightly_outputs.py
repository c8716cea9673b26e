"""What a nightly run leaves for analytics, on a real two-night run: a 2-worker ZeRO-3 run of a tiny
GPT-2 over a training path that is a list of two files (one with a bad row, skipped), then an
append of a third file with output.keep_versions: 1.

Checked: opponents next to proponents in top_k.parquet (against the dense scores), score tables
without BYTE_STREAM_SPLIT, the append-only score history across both nights (pruning never touches
it), `distinf status --json`, the tables read by pandas, Polars and DuckDB (Spark: the slow test),
and the report on the multi-file run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import browser
import job_fixtures
from distinf.cli import main
from distinf.config import load_job
from distinf.runtime.driver import run_job

pytestmark = pytest.mark.distributed
TOP_K = 3


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, shared_ray):
    root = tmp_path_factory.mktemp("nightly")
    train, queries = job_fixtures.corpus_files(root / "data")
    table = pq.read_table(train)
    flipped = np.random.default_rng(0).random(table.num_rows) < 0.3
    table = table.append_column("flipped", pa.array(flipped))
    texts = table.column("text").to_pylist()
    texts[14] = "   "  # a bad row in the second file: skipped, listed in rejected.parquet
    table = table.set_column(1, "text", pa.array(texts))
    files = [root / "data" / name for name in ("a.parquet", "b.parquet", "c.parquet")]
    for path, (start, stop) in zip(files, [(0, 12), (12, 18), (18, table.num_rows)]):
        pq.write_table(table.slice(start, stop - start), path)
    model = job_fixtures.tiny_model_dir(root, "gpt2")
    recorded = pytest.MonkeyPatch()
    made = job_fixtures.recording_metrics(recorded)
    first = job_fixtures.job_file(root, model, train, queries,
                                  data={"train": {"path": [str(f) for f in files[:2]], "id_column": "id"},
                                        "on_bad_row": "skip"},
                                  scoring={"top_k": TOP_K, "dense": True}, output={"keep_versions": 1})
    run_dir = root / "run"
    try:
        v1 = run_job(load_job(first))
        v1_train_values = pq.read_table(run_dir / "scores" / "train_values.parquet")
        v2 = run_job(load_job(first, [f"data.train.path={json.dumps([str(f) for f in files])}"]), run_dir,
                     append=True)
    finally:
        recorded.undo()
    return {"run": run_dir, "v1": v1, "v2": v2, "v1_train_values": v1_train_values, "n": table.num_rows,
            "files": files, "metrics": made}


def test_the_metrics_tell_progress_and_the_last_success(nightly):
    """On a job that joins a running Ray (as on a cluster): examples planned and committed, the
    scoring tasks, and the time of the last success, set when the append completed."""
    from datetime import datetime

    made, v2 = nightly["metrics"], nightly["v2"]
    assert made["distinf_examples_planned"].values[("test", "train")] == 6      # the append's new rows
    assert made["distinf_examples_committed"].values[("test", "train")] == 6
    scoring = v2["counts"]["train_chunks"]
    assert made["distinf_stage_tasks"].values[("test", "scoring")] == scoring
    assert made["distinf_stage_tasks_done"].values[("test", "scoring")] == scoring
    [last] = made["distinf_last_success_timestamp_seconds"].values.values()
    assert 0 <= last - datetime.fromisoformat(v2["as_of"]).timestamp() < 600


def test_top_k_holds_the_k_lowest_scores_as_opponents_beside_the_proponents(nightly):
    top = pq.read_table(nightly["run"] / "scores" / "top_k.parquet").to_pylist()
    dense = pq.read_table(nightly["run"] / "scores" / "dense").to_pylist()
    by_query: dict[str, list[tuple[float, str]]] = {}
    for row in dense:
        by_query.setdefault(row["query_id"], []).append((row["score"], row["train_id"]))
    assert len(by_query) == nightly["v2"]["counts"]["queries"]
    for query, pairs in by_query.items():
        scores = np.array([s for s, _ in pairs])
        ids = [i for _, i in pairs]
        for kind, order in (("proponent", np.argsort(-scores, kind="stable")), ("opponent", np.argsort(scores, kind="stable"))):
            rows = [r for r in top if r["query_id"] == query and r["kind"] == kind]
            assert [r["rank"] for r in rows] == list(range(1, TOP_K + 1))
            np.testing.assert_allclose([r["score"] for r in rows], scores[order[:TOP_K]], rtol=1e-5, atol=1e-12)
            assert {r["train_id"] for r in rows} == {ids[i] for i in order[:TOP_K]}
    assert {r["kind"] for r in top} == {"proponent", "opponent"}


def encodings(path):
    meta = pq.ParquetFile(path).metadata.row_group(0)
    return {meta.column(i).path_in_schema: set(meta.column(i).encodings) for i in range(meta.num_columns)}


def test_score_tables_are_written_without_byte_stream_split_and_gradients_with_it(nightly):
    run = nightly["run"]
    score_files = [run / "scores" / "top_k.parquet", run / "scores" / "train_values.parquet",
                   *sorted((run / "scores" / "dense").glob("*.parquet")), *sorted((run / "history").rglob("*.parquet"))]
    for path in score_files:
        for column, found in encodings(path).items():
            assert "BYTE_STREAM_SPLIT" not in found, (path, column)
    chunk = next((run / "gradients" / "train").glob("*.parquet"))
    assert "BYTE_STREAM_SPLIT" in encodings(chunk)["grad.list.element"]


def test_the_score_history_keeps_every_night_partitioned_by_date_after_pruning(nightly):
    import duckdb

    run, v1, v2 = nightly["run"], nightly["v1"], nightly["v2"]
    assert sorted(p.name for p in (run / "versions").iterdir()) == [v2["run_id"]]  # keep_versions: 1
    history = duckdb.sql(f"""SELECT run_id, CAST(date AS VARCHAR) AS date, CAST(as_of AS DATE) AS day, count(*) AS n
                             FROM read_parquet('{run}/history/train_values/*/*.parquet', hive_partitioning = true)
                             GROUP BY ALL ORDER BY run_id""").fetchall()
    assert [(r[0], r[3]) for r in history] == [(v1["run_id"], v1["counts"]["train"]), (v2["run_id"], v2["counts"]["train"])]
    assert all(r[1] == str(r[2]) for r in history)  # the partition is the UTC date of as_of
    first = pq.read_table(run / "history" / "train_values" / f"date={history[0][1]}" / f"{v1['run_id']}.parquet")
    assert first.equals(nightly["v1_train_values"])
    assert v2["counts"]["train"] == nightly["n"] - 1 and v1["counts"]["train"] == 17
    top = duckdb.sql(f"SELECT DISTINCT run_id FROM read_parquet('{run}/history/top_k/*/*.parquet')").fetchall()
    assert sorted(r[0] for r in top) == sorted([v1["run_id"], v2["run_id"]])


def test_status_json_reports_state_version_counts_and_rejected_rows(nightly, capsys):
    assert main(["status", str(nightly["run"]), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    v2 = nightly["v2"]
    assert (status["state"], status["version"], status["as_of"]) == ("complete", v2["run_id"], v2["as_of"])
    assert status["counts"] == v2["counts"] and status["counts"]["train"] == nightly["n"] - 1
    assert status["versions_kept"] == [v2["run_id"]] and status["appends"] == 1
    assert status["last_append"]["new_rows"] == 6
    assert set(status["timings"]) >= {"gradients", "curvature", "scoring"} and status["restarts"] == []
    [row] = status["rejected"]["rows"]
    assert status["rejected"]["count"] == 1 and row["split"] == "train" and row["example_id"] is not None
    assert "text is empty" in row["reason"] and row["file"].endswith("b.parquet")
    assert main(["status", str(nightly["run"])]) == 0
    text = capsys.readouterr().out
    assert "complete" in text and v2["run_id"] in text and "text is empty" in text


def test_the_score_tables_read_in_pandas_polars_and_duckdb(nightly):
    import duckdb
    import pandas
    import polars

    run = nightly["run"]
    expected = pq.read_table(run / "scores" / "top_k.parquet").to_pylist()
    frame = pandas.read_parquet(run / "scores" / "top_k.parquet")
    assert frame.to_dict("records")[0]["kind"] == expected[0]["kind"] and len(frame) == len(expected)
    assert polars.read_parquet(run / "scores" / "top_k.parquet")["score"].to_list() == \
        pytest.approx([r["score"] for r in expected])
    history = polars.read_parquet(run / "history" / "train_values", hive_partitioning=True)
    assert "date" in history.columns and history.height == nightly["v1"]["counts"]["train"] + nightly["v2"]["counts"]["train"]
    # The README's join of string ids to an integer key.
    n = duckdb.sql(f"""SELECT count(*) FROM read_parquet('{run}/scores/train_values.parquet') v
                       JOIN (SELECT row_number() OVER () - 1 AS row_id, id FROM read_parquet('{nightly['files'][0]}')) d
                       ON v.train_id = d.id""").fetchall()[0][0]
    assert n == 12


@pytest.mark.slow
def test_the_score_tables_read_in_spark(nightly):
    pyspark = pytest.importorskip("pyspark")  # `pip install pyspark` and a JDK (Debian: default-jre-headless)
    from pyspark.sql import SparkSession

    run = nightly["run"]
    spark = (SparkSession.builder.master("local[1]").appName("distinf-read")
             .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", "UTC").getOrCreate())
    try:
        top = spark.read.parquet(str(run / "scores" / "top_k.parquet")).orderBy("query_id", "kind", "rank").collect()
        expected = sorted(pq.read_table(run / "scores" / "top_k.parquet").to_pylist(),
                          key=lambda r: (r["query_id"], r["kind"], r["rank"]))
        assert [(r["query_id"], r["kind"], r["rank"], r["train_id"]) for r in top] == \
            [(r["query_id"], r["kind"], r["rank"], r["train_id"]) for r in expected]
        np.testing.assert_allclose([r["score"] for r in top], [r["score"] for r in expected], rtol=1e-7)
        history = spark.read.parquet(str(run / "history" / "train_values"))
        assert "date" in history.columns
        assert history.count() == nightly["v1"]["counts"]["train"] + nightly["v2"]["counts"]["train"]
        assert history.select("run_id").distinct().count() == 2
        values = spark.read.parquet(str(run / "scores" / "train_values.parquet")).collect()
        assert len(values) == nightly["v2"]["counts"]["train"]
        assert pyspark.__version__
    finally:
        spark.stop()


def test_the_report_on_a_multi_file_run_shows_values_breakdown_trend_and_health(nightly, tmp_path):
    import os
    import shutil

    run = nightly["run"]
    # --noisy-column on a training path that is a list of files (it crashed before).
    assert main(["report", str(run), "--noisy-column", "flipped", "--by", "source"]) == 0
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # distributions + ROC of the flipped rows
    values = pq.read_table(run / "scores" / "train_values.parquet").to_pydict()
    order = np.argsort(values["score_mean"], kind="stable")
    helpful = page.split("Most helpful training rows")[1].split("</table>")[0]
    harmful = page.split("Most harmful training rows")[1].split("</table>")[0]
    assert values["train_id"][order[-1]] in helpful and values["train_id"][order[0]] in harmful
    # The breakdown by source counts each source's rows as the training files have them.
    sources = pq.read_table(nightly["files"][0]).to_pylist() + pq.read_table(nightly["files"][1]).to_pylist() + \
        pq.read_table(nightly["files"][2]).to_pylist()
    kept = set(values["train_id"])
    breakdown = page.split("<h3>by source</h3>")[1].split("</table>")[0]
    for source in {r["source"] for r in sources}:
        n = sum(r["source"] == source and r["id"] in kept for r in sources)
        assert f"<td>{source}</td><td>{n}</td>" in breakdown
    trend = page.split("Trend across committed versions")[1].split("</table>")[0]
    assert nightly["v1"]["run_id"] in trend and nightly["v2"]["run_id"] in trend
    health = page.split("Run health")[1].split("Distributions")[0]
    assert "text is empty" in health and "b.parquet" in health and "gradients" in health
    assert "strongest opponents" in page

    shot, pixels = browser.screenshot(run / "report.html", tmp_path, 1300, 2400)
    assert browser.blue_pixels(pixels) > 2000  # the histograms rendered, not just the text
    shutil.copy(shot, run / "report_screenshot.png")
    if os.environ.get("DISTINF_KEEP_SCREENSHOT"):  # to look at it
        shutil.copy(shot, os.environ["DISTINF_KEEP_SCREENSHOT"])
