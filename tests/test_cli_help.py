"""The command line explains itself: --version, help for every argument, exit codes and logging
variables in --help, and `validate` checking the folder that `run --output/--append-to` would write."""

import argparse

import pytest

import distinf
from distinf import cli


def parsers():
    """The top-level parser and each command's, as `main` builds them."""
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["top"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            cli.main(["--help"])
    finally:
        argparse.ArgumentParser.parse_args = original
    top = captured["top"]
    [commands] = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return top, commands.choices


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"distinf {distinf.__version__}"


def test_every_argument_of_every_command_has_help():
    _, commands = parsers()
    assert set(commands) == {"run", "query", "validate", "report", "status"}
    for name, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)


def test_help_lists_exit_codes_and_logging_variables(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for needle in ("exit codes:", "  0 ", "  1 ", "  2 ", "DISTINF_LOG_LEVEL", "DISTINF_LOG_FORMAT"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        cli.main(["validate", "--help"])
    text = capsys.readouterr().out
    assert "override a job key" in text and "--append-to RUN_DIR" in text and "exit codes:" in text


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    import job_fixtures

    root = tmp_path_factory.mktemp("cli_help")
    model = job_fixtures.tiny_model_dir(root, "gpt2")
    (root / "full").mkdir()
    return job_fixtures.job_file(root, model, *job_fixtures.corpus_files(root / "data", 2, 1),
                                 output={"path": str(root / "full" / "run")})


def test_validate_checks_the_folder_that_output_or_append_to_names(job, tmp_path, monkeypatch, capsys):
    # The job's own output.path is on a full disk; the folder given on the command line is not.
    (tmp_path / "full").mkdir()
    monkeypatch.setattr("distinf.runtime.run_dir.free_bytes", lambda folder: 1024 if "full" in str(folder) else 1 << 50)
    assert cli.main(["validate", str(job)]) == 2
    assert "output.path: " in capsys.readouterr().err
    assert cli.main(["validate", str(job), "--output", str(tmp_path / "roomy")]) == 0
    assert "--output: about" in capsys.readouterr().out
    assert cli.main(["validate", str(job), "--append-to", str(tmp_path / "roomy")]) == 0
    assert "no complete run there yet" in capsys.readouterr().out
    assert cli.main(["validate", str(job), "--append-to", "s3://bucket/distinf/nightly"]) == 0
    assert "--append-to: object storage" in capsys.readouterr().out
    assert cli.main(["validate", str(job), "--append-to", str(tmp_path / "full")]) == 2
    assert "--append-to: " in capsys.readouterr().err
    assert cli.main(["validate", str(job), "--output", "x", "--append-to", "y"]) == 2


def test_status_of_a_folder_without_a_manifest_is_exit_2(tmp_path, capsys):
    assert cli.main(["status", str(tmp_path)]) == 2
    assert "not a distinf run directory" in capsys.readouterr().err
