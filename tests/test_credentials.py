"""Credentials embedded in a URI (`s3://KEY:SECRET@bucket/x`) are refused wherever a path is given,
without the secret being repeated, and `store.display` never shows them (issue 16)."""

from __future__ import annotations

import pytest
import yaml

from distinf.cli import main
from distinf.config import ConfigError, load_job
from distinf.store import display

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
URI = f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs/x"
JOB = {"model": {"path": "m"}, "data": {"train": {"path": "t.parquet"}, "queries": {"path": "q.parquet"}}}


def write_job(tmp_path, key: str) -> str:
    job = yaml.safe_load(yaml.safe_dump(JOB))
    *parents, leaf = key.split(".")
    node = job
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = URI
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


@pytest.mark.parametrize("key", ["output.path", "data.train.path", "data.queries.path", "model.path",
                                 "model.lora.adapter_path"])
def test_a_job_file_with_credentials_in_a_uri_is_refused_naming_the_key_not_the_secret(tmp_path, capsys, key):
    path = write_job(tmp_path, key)
    with pytest.raises(ConfigError) as error:
        load_job(path)
    message = str(error.value)
    assert f"{key}: the URI has credentials in it" in message and "AWS_ACCESS_KEY_ID" in message
    assert SECRET not in message and "AKIAEXAMPLE" not in message
    for command in ("validate", "run"):
        assert main([command, path]) == 2
        captured = capsys.readouterr()
        assert key in captured.err and SECRET not in captured.out + captured.err


@pytest.mark.parametrize("argv, flag", [
    (["run", "JOB", "--output", URI], "--output"),
    (["run", "JOB", "--append-to", URI], "--append-to"),
    (["run", "JOB", "--set", f"output.path={URI}"], "output.path"),
    (["query", URI, "--queries", "q.parquet"], "RUN_DIR"),
    (["query", "s3://bucket/run", "--queries", URI], "--queries"),
    (["query", "s3://bucket/run", "--queries", "q.parquet", "--output", URI], "--output"),
])
def test_command_line_paths_with_credentials_are_refused_without_echoing_them(tmp_path, capsys, argv, flag):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    assert main([str(job) if a == "JOB" else a for a in argv]) == 2
    captured = capsys.readouterr()
    assert f"{flag}: the URI has credentials in it" in captured.err
    assert SECRET not in captured.out + captured.err


@pytest.mark.parametrize("path, shown", [
    (URI, "s3://***@bucket/runs/x"),
    (f"s3:/AKIAEXAMPLE:{SECRET}@bucket/runs/x", "s3://***@bucket/runs/x"),  # as a pathlib.Path folds it
    ("s3://AKIAEXAMPLE@bucket/runs/x", "s3://***@bucket/runs/x"),  # on S3 any userinfo is a key
    (f"abfs://container:{SECRET}@account.dfs.core.windows.net/x", "abfs://container:***@account.dfs.core.windows.net/x"),
    (f"hdfs://alice:{SECRET}@namenode:8020/runs/x", "hdfs://alice:***@namenode:8020/runs/x"),
    ("s3://bucket/runs/x@night", "s3://bucket/runs/x@night"),  # an @ in a key is no credential
    ("hdfs://alice@namenode:8020/runs/x", "hdfs://alice@namenode:8020/runs/x"),  # a user name, no secret
    ("abfs://container@account.dfs.core.windows.net/x", "abfs://container@account.dfs.core.windows.net/x"),
    ("/data/user@host/run", "/data/user@host/run"),
])
def test_display_redacts_credentials_of_any_uri(path, shown):
    from distinf.config import has_credentials

    assert display(path) == shown
    assert has_credentials(path) == ("***" in shown)


@pytest.mark.parametrize("path", ["s3://AKIAEXAMPLE@bucket/x", f"gs://{SECRET}@bucket/x",
                                  f"abfs://container:{SECRET}@account.dfs.core.windows.net/x",
                                  f"hdfs://alice:{SECRET}@namenode:8020/x"])
def test_every_scheme_with_a_secret_in_its_uri_is_refused(tmp_path, path):
    job = yaml.safe_load(yaml.safe_dump(JOB))
    job["output"] = {"path": path}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match="output.path: the URI has credentials in it") as error:
        load_job(tmp_path / "job.yaml")
    assert SECRET not in str(error.value)


@pytest.mark.parametrize("path", ["hdfs://alice@namenode:8020/runs/x", "abfs://container@account.dfs.core.windows.net/x",
                                  "s3://bucket/runs/x@night"])
def test_a_user_name_or_an_at_sign_in_a_key_is_no_credential(tmp_path, path):
    job = yaml.safe_load(yaml.safe_dump(JOB))
    job["output"] = {"path": path}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert load_job(tmp_path / "job.yaml").output.path == path


def test_the_python_api_refuses_a_run_directory_with_credentials(tmp_path):
    from distinf.runtime.driver import run_job
    from distinf.runtime.query import query_run
    from distinf.store import run_path

    cfg = load_job(write_job(tmp_path, "name"))  # any valid job: the run directory is refused first
    for call in (lambda: run_path(URI), lambda: run_job(cfg, URI), lambda: query_run(URI, tmp_path / "q.parquet")):
        with pytest.raises(ConfigError) as error:
            call()
        assert "run directory: the URI has credentials in it" in str(error.value)
        assert SECRET not in str(error.value)
