"""The job file: defaults, unknown keys rejected, errors that name the key, --set overrides, validate."""

import pytest
import yaml

import job_fixtures
from distinf.cli import main
from distinf.config import AttributionConfig, ConfigError, load_job, parse_config

MINIMAL = {"model": {"path": "m"}, "data": {"train": {"path": "t.parquet"}, "queries": {"path": "q.parquet"}}}


def write(tmp_path, data):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_fill_every_section_as_documented(tmp_path):
    cfg = load_job(write(tmp_path, MINIMAL))
    assert (cfg.compression.method, cfg.compression.k, cfg.compression.seed) == ("dropout", 8192, 0)
    assert cfg.compression.modules.include == [".*"] and cfg.compression.modules.exclude == []
    assert (cfg.hessian.method, cfg.hessian.blocks, cfg.hessian.damping) == ("gauss_newton", "layer", "auto")
    assert (cfg.scoring.top_k, cfg.scoring.dense, cfg.scoring.self_influence) == (10, False, True)
    assert (cfg.runtime.num_workers, cfg.runtime.device, cfg.runtime.zero_stage) == (2, "cpu", 3)
    assert cfg.model.trust_remote_code is False and cfg.model.task == "causal_lm"
    assert cfg.data.train.text_column == "text" and cfg.data.train.id_column is None


@pytest.mark.parametrize("patch, message", [
    ({"compression": {"k": 0}}, "compression.k: Input should be greater than 0"),
    ({"compression": {"kk": 5}}, "compression.kk: unknown key"),
    ({"hessian": {"blocks": "diag"}}, "hessian.blocks: Input should be 'layer' or 'full'"),
    ({"hessian": {"damping": -1.0}}, "hessian.damping"),
    ({"hessian": {"damping": float("nan")}}, "hessian.damping: damping must be 'auto' or a finite float"),
    ({"hessian": {"damping": float("inf")}}, "hessian.damping: damping must be 'auto' or a finite float"),
    ({"compression": {"modules": {"include": ["("]}}},
     "compression.modules.include: '(' is not a valid regular expression"),
    ({"compression": {"modules": {"exclude": ["lm_head", "[a-"]}}},
     "compression.modules.exclude: '[a-' is not a valid regular expression"),
    ({"runtime": {"zero_stage": 4}}, "runtime.zero_stage"),
    ({"model": {"path": "m", "lora": {"alpha": 2}}}, "model.lora"),
    ({"extra_section": {}}, "extra_section: unknown key"),
])
def test_errors_name_the_file_and_the_key(tmp_path, patch, message):
    data = {**MINIMAL, **patch}
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as error:
        load_job(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_missing_required_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.queries: Field required"):
        load_job(write(tmp_path, {"model": {"path": "m"}, "data": {"train": {"path": "t"}}}))


def test_set_overrides_parse_values_and_are_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_job(path, ["compression.k=4096", "hessian.damping=0.01", "scoring.dense=true",
                          "compression.modules.exclude=[lm_head]"])
    assert cfg.compression.k == 4096 and cfg.hessian.damping == 0.01 and cfg.scoring.dense is True
    assert cfg.compression.modules.exclude == ["lm_head"]
    with pytest.raises(ConfigError, match="compression.k: Input should be greater than 0"):
        load_job(path, ["compression.k=-3"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_job(path, ["compression.k"])


def test_job_file_is_data_never_code(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(path)


def test_attribute_sections_reject_job_only_keys():
    with pytest.raises(ConfigError, match="runtime: unknown key"):
        parse_config({"runtime": {}}, AttributionConfig)


def test_validate_accepts_a_good_job_and_names_a_missing_column(tmp_path, capsys):
    model_dir = job_fixtures.tiny_model_dir(tmp_path, "gpt2")
    train, queries = job_fixtures.corpus_files(tmp_path / "data")
    job = job_fixtures.job_file(tmp_path, model_dir, train, queries)
    assert main(["validate", str(job)]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["validate", str(job), "--set", "data.train.text_column=body"]) == 2
    err = capsys.readouterr().err
    assert "data.train.text_column" in err and "body" in err and "train.parquet" in err


def test_validate_refuses_pickle_weights_unless_allowed(tmp_path, capsys):
    model_dir = job_fixtures.tiny_model_dir(tmp_path, "gpt2")
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    train, queries = job_fixtures.corpus_files(tmp_path / "data")
    assert main(["validate", str(job_fixtures.job_file(tmp_path, model_dir, train, queries))]) == 2
    assert "allow_pickle" in capsys.readouterr().err
