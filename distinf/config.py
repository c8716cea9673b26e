"""The job file: every key documented, defaulted and validated here, once.

`JobConfig` mirrors the YAML of DESIGN.md §3. Unknown keys are rejected and every error names the
dotted key path, e.g. ``compression.k: Input should be greater than 0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A job file or override that does not validate; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    adapter_path: str | None = None
    """A saved PEFT adapter folder to load on top of the base model."""
    r: int | None = Field(default=None, gt=0)
    alpha: float | None = None
    target_modules: list[str] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "LoraConfig":
        if self.adapter_path is None and self.r is None:
            raise ValueError("set either adapter_path or r (a fresh adapter of that rank)")
        return self


class ModelConfig(_Section):
    path: str
    """A local Hugging Face model folder (config.json + safetensors); never fetched from a hub."""
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraConfig | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    """Allow loading `pytorch_model.bin` (pickle) weights when no safetensors exist."""


class DatasetConfig(_Section):
    path: str
    """Parquet, JSONL or CSV file."""
    text_column: str = "text"
    label_column: str | None = None
    id_column: str | None = None
    """Without an id column the ids are the row numbers, as strings."""


class DataConfig(_Section):
    train: DatasetConfig
    queries: DatasetConfig
    max_length: int = Field(default=128, gt=0)


class ModuleFilter(_Section):
    include: list[str] = Field(default_factory=lambda: [".*"])
    """Regexes matched (re.fullmatch) against module names; a module is tracked if one matches."""
    exclude: list[str] = Field(default_factory=list)


class CompressionConfig(_Section):
    method: Literal["dropout"] = "dropout"
    k: int = Field(default=8192, gt=0)
    """Kept gradient entries per example; capped at the number of tracked entries."""
    seed: int = 0
    allocation: Literal["stratified", "uniform"] = "stratified"
    """stratified: each parameter gets a share of k proportional to its size; uniform: the
    paper's literal draw of k of all p entries."""
    modules: ModuleFilter = Field(default_factory=ModuleFilter)


class HessianConfig(_Section):
    method: Literal["gauss_newton"] = "gauss_newton"
    blocks: Literal["layer", "full"] = "layer"
    """layer: one block per parameter tensor; full: one k x k block."""
    damping: Union[Literal["auto"], float] = "auto"
    """auto: a tenth of each block's mean eigenvalue; a float sets it absolutely."""

    @field_validator("damping")
    @classmethod
    def _non_negative(cls, value: Any) -> Any:
        if value != "auto" and float(value) < 0:
            raise ValueError("damping must be 'auto' or a float >= 0")
        return value


class ScoringConfig(_Section):
    top_k: int = Field(default=10, gt=0)
    dense: bool = False
    self_influence: bool = True


class RuntimeConfig(_Section):
    address: str | None = None
    """An existing Ray cluster to join; without it a local Ray starts and stops with the job."""
    num_workers: int = Field(default=2, gt=0)
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: int = Field(default=8, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 3
    """3 shards the parameters over the workers; 0-2 replicate the model (inference has no
    optimiser state or gradients for them to shard)."""
    chunk_examples: int = Field(default=256, gt=0)
    """Rows per committed gradient chunk (rounded up to whole batches)."""


class OutputConfig(_Section):
    path: str = "runs/demo"
    gradient_dtype: Literal["float32", "float16"] = "float32"


class AttributionConfig(_Section):
    """The sections that `distinf.attribute` takes; the job file adds model, data, runtime, output."""

    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    hessian: HessianConfig = Field(default_factory=HessianConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)


class JobConfig(AttributionConfig):
    name: str = "distinf"
    model: ModelConfig
    data: DataConfig
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def parse_config(data: dict, cls: type[BaseModel] = JobConfig, source: str = "config") -> Any:
    """Validate a plain dict into `cls`, raising ConfigError whose lines name each bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 3 is an int)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(raw)


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read a YAML job file (never executed as code), apply overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such job file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the job file must be a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
    return parse_config(data, JobConfig, source=str(path))
