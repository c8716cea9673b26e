"""The job file: every key documented, defaulted and validated here, once.

`JobConfig` mirrors the YAML in docs/operations.md, "The job file, every key". Unknown keys are rejected and every error names the
dotted key path, e.g. ``compression.k: Input should be greater than 0``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distinf.core.compressors import METHODS as COMPRESSION_METHODS
from distinf.core.curvatures import METHODS as CURVATURE_METHODS


class ConfigError(ValueError):
    """A job file or override that does not validate; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]+):/+([^/]*)@", re.IGNORECASE)
KEY_SCHEMES = ("s3", "gs", "gcs")
"""Schemes whose userinfo can only be a key; elsewhere a bare user is a name (`hdfs://alice@nn`,
`abfs://container@account...`) and only a `:password` part is a secret."""


SECRET_PARAMETERS = re.compile(
    r"[?&;]((?:aws_)?(?:secret_access_key|secret_key|access_key|session_token|security_token)|secret|token|"
    r"access_token|password|passwd|pwd|api_?key|client_secret|credentials?|sig|signature|"
    r"x-amz-(?:signature|credential|security-token))=", re.IGNORECASE)
"""Query-string parameters that carry a secret: pyarrow's S3 URI options (`?secret_key=`), a
presigned URL's signature, an Azure SAS `sig`, a token or password."""


def has_credentials(path: str) -> bool:
    """A URI with a key or password in its user part (`s3://KEY:SECRET@bucket`) or its query string
    (`?secret_key=...`)."""
    match = _USERINFO.match(path)
    if match and (":" in match.group(2) or match.group(1).lower() in KEY_SCHEMES):
        return True
    return bool(SECRET_PARAMETERS.search(path))


def refuse_credentials(path: str | None) -> str | None:
    """`path` unchanged, unless it is a URI with credentials in it (`s3://KEY:SECRET@bucket/x`).

    A path is echoed in messages, manifests and Ray task arguments, so a secret must never be in
    one; the error does not repeat it.
    """
    if path is not None and has_credentials(str(path)):
        raise ValueError("the URI has credentials in it (user:secret@ or ?secret_key=), which would be echoed in "
                         "logs and manifests; leave them out and give them as AWS_ACCESS_KEY_ID/"
                         "AWS_SECRET_ACCESS_KEY, an instance role or a profile (AWS_PROFILE); a Ray token as "
                         "RAY_AUTH_TOKEN")
    return path


class LoraConfig(_Section):
    adapter_path: str | None = None
    """A saved PEFT adapter folder to load on top of the base model."""
    r: int | None = Field(default=None, gt=0)
    alpha: float | None = None
    target_modules: list[str] | None = None

    check_no_credentials = field_validator("adapter_path")(refuse_credentials)

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

    check_no_credentials = field_validator("path")(refuse_credentials)


class DatasetConfig(_Section):
    path: Union[str, list[str]]
    """A Parquet, JSONL or CSV file; a folder of them (read recursively, in name order; files whose
    names start with '.' or '_' skipped); a glob (`data/part-*.parquet`); or a list of any of these.
    Local or on S3/GCS (`s3://bucket/prefix/`). A folder written by a Hugging Face dataset's
    `save_to_disk` (state.json + arrow files) is read as one dataset."""
    text_column: str = "text"
    label_column: str | None = None
    id_column: str | None = None
    """Without an id column the ids are the row numbers, as strings (across several files, the
    position in the files read in order)."""
    prompt_column: str | None = None
    """With completion_column: the text is prompt + completion, and only the completion's tokens
    carry the loss (causal_lm)."""
    completion_column: str | None = None
    messages_column: str | None = None
    """A chat column (a list of {role, content}) rendered with the tokenizer's chat template; only
    the assistant turns' tokens carry the loss (causal_lm)."""

    @field_validator("path")
    @classmethod
    def _paths(cls, path: Any) -> Any:
        paths = path if isinstance(path, list) else [path]
        if not paths:
            raise ValueError("the list of files is empty")
        for item in paths:
            if not str(item).strip():
                raise ValueError("a path is empty")
            refuse_credentials(item)
        return path

    @model_validator(mode="after")
    def _one_text_source(self) -> "DatasetConfig":
        pair = (self.prompt_column, self.completion_column)
        if (pair[0] is None) != (pair[1] is None):
            given, missing = (("prompt_column", "completion_column") if pair[0] is not None
                              else ("completion_column", "prompt_column"))
            raise ValueError(f"{given} needs {missing} (the loss covers the completion of each prompt)")
        masked = [key for key in ("prompt_column", "completion_column", "messages_column")
                  if getattr(self, key) is not None]
        if self.messages_column is not None and len(masked) > 1:
            raise ValueError("messages_column cannot be combined with prompt_column/completion_column; "
                             "use one or the other")
        if masked:
            # Compared with the default, not model_fields_set: a dumped config re-validates.
            if self.text_column != "text":
                raise ValueError(f"text_column is not used with {' and '.join(masked)} (the text is built "
                                 "from them); leave text_column out")
            if self.label_column is not None:
                raise ValueError(f"label_column is not used with {' and '.join(masked)} (they are for "
                                 "causal_lm instruction data); leave label_column out")
        return self

    @property
    def masked(self) -> bool:
        """Whether only part of each text (a completion, the assistant turns) carries the loss."""
        return self.completion_column is not None or self.messages_column is not None


class DataConfig(_Section):
    train: DatasetConfig
    queries: DatasetConfig
    max_length: int = Field(default=128, gt=0)
    """Longer texts are truncated (and counted in the run's summary)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """error: the first bad row (empty or non-UTF-8 text, missing or out-of-range label,
    repeated id, non-finite loss or gradient) stops the job, naming it; skip: such rows are left
    out and listed with their reason in the run's rejected.parquet."""


class ModuleFilter(_Section):
    include: list[str] = Field(default_factory=lambda: [".*"])
    """Regexes matched (re.fullmatch) against module names; a module is tracked if one matches."""
    exclude: list[str] = Field(default_factory=list)

    @field_validator("include", "exclude")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:  # refused here, before any worker loads a model
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({error})") from None
        return patterns


class OptimizerStateConfig(_Section):
    path: str
    """A saved Adam state: a torch optimizer state_dict (.pt) built from `model.named_parameters()`
    (its param_groups carry param_names), or safetensors of exp_avg_sq by parameter name, one file
    or a folder of shards."""
    eps: float = Field(default=1e-8, gt=0)
    """Adam's ε: each kept entry is divided by √v + eps."""


def _keeping_entries() -> str:
    return " or ".join(name for name, cls in COMPRESSION_METHODS.items() if cls.keeps_entries)


class CompressionConfig(_Section):
    method: Literal[tuple(COMPRESSION_METHODS)] = "dropout"  # type: ignore[valid-type]
    """One of distinf.core.compressors.METHODS. dropout: k random entries; none: all p (exact, small models); gaussian: dense random
    projection; fjlt: subsampled randomised Hadamard; pca: top principal directions of the training
    gradients; logra: Kronecker projection of layer inputs and output gradients. Each maps every
    tracked tensor to its own k_l columns, k_l as the allocation gives it."""
    k: int = Field(default=8192, gt=0)
    """Columns per example (kept entries for dropout); capped at the number of tracked entries."""
    seed: int = 0
    allocation: Literal["stratified", "uniform"] = "stratified"
    """stratified: each parameter gets a share of k proportional to its size; uniform: the
    paper's literal draw of k of all p entries."""
    modules: ModuleFilter = Field(default_factory=ModuleFilter)
    optimizer_state: Union[OptimizerStateConfig, None] = None
    """Optimizer-aware scores (TrackStar): every kept entry j of every gradient, training and
    query, is divided by √v_j + eps, v being Adam's exp_avg_sq at the attributed checkpoint. The
    curvature and scores are then those of the scaled gradients. dropout only (other methods mix
    entries before they could be scaled)."""

    @model_validator(mode="after")
    def _optimizer_state_needs_dropout(self) -> "CompressionConfig":
        if self.optimizer_state is not None and not COMPRESSION_METHODS[self.method].keeps_entries:
            raise ValueError(f"optimizer_state scales kept entries: it needs method: {_keeping_entries()} "
                             f"(method is {self.method!r})")
        return self


class HessianConfig(_Section):
    method: Literal[tuple(CURVATURE_METHODS)] = "gauss_newton"  # type: ignore[valid-type]
    """One of distinf.core.curvatures.METHODS. gauss_newton: exact damped solve; identity: plain dot products (TracIn-style); datainf:
    DataInf's closed form; lissa: the stochastic LiSSA recursion; kfac: the Kronecker factors
    restricted to the kept entries, damped, Cholesky; kfac_mix: (1 - mix)·kfac + mix·Gram; ekfac:
    kfac's eigenbasis with the Gram's variances along it as eigenvalues."""
    blocks: Literal["layer", "full"] = "layer"
    """layer: one block per parameter tensor; full: one k x k block."""
    damping: Union[Literal["auto"], float] = "auto"
    """auto: a tenth of each block's mean eigenvalue; a float sets it absolutely."""
    lissa_iterations: int = Field(default=10, ge=0)
    """lissa: recursion steps, one sampled batch each."""
    lissa_scale: Union[Literal["auto"], float] = "auto"
    """lissa: s in h_j = v + h_{j-1} - (H_j + λ) h_{j-1}/s; auto: λ + the largest batch eigenvalue."""
    lissa_batch_size: int = Field(default=16, gt=0)
    """lissa: training examples per step (all of them when larger than the training set)."""
    lissa_seed: int = 0
    """lissa: seed of the batch sampling (by example id, independent of order)."""
    mix: Union[float, None] = Field(default=None, ge=0.0, le=1.0)
    """kfac_mix: β, the Gram's share of the curvature (1 - β)·K_S + β·Gram_S; unset: 0.5. (None
    rather than 0.5 as the default, so the configs of runs stored before the key compare equal.)"""

    @field_validator("damping")
    @classmethod
    def _non_negative(cls, value: Any) -> Any:
        if value != "auto" and not (math.isfinite(float(value)) and float(value) >= 0):
            raise ValueError(f"damping must be 'auto' or a finite float >= 0, not {value}")
        return value

    @field_validator("lissa_scale")
    @classmethod
    def _positive_scale(cls, value: Any) -> Any:
        if value != "auto" and float(value) <= 0:
            raise ValueError("lissa_scale must be 'auto' or a float > 0")
        return value

    @model_validator(mode="after")
    def _method_keys_need_their_method(self) -> "HessianConfig":
        own = CURVATURE_METHODS[self.method].keys
        for key in type(self).model_fields:
            users = [name for name, cls in CURVATURE_METHODS.items() if key in cls.keys]
            # Compared with the default, not model_fields_set: a dumped config re-validates.
            if users and key not in own and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"{key} is only used with method: {' or '.join(users)} (method is {self.method!r})")
        return self


class ScoringConfig(_Section):
    top_k: int = Field(default=10, gt=0)
    dense: bool = False
    self_influence: bool = True
    normalize: Literal["none", "relatif", "cosine", "unit"] = "cosine"
    """What each score is divided by, so that examples with large gradients do not top every
    query: none (the paper's influence ĝ_qᵀĤ⁻¹ĝ_i); relatif (by √ of the example's
    self-influence); cosine (by √ of both self-influences: the cosine in the Ĥ⁻¹ metric); unit (by
    both gradient norms). top_k.score, score_mean and the dense score carry the normalised score;
    top_k.influence, influence_mean and the dense influence the raw one, whatever this says;
    self_influence stays the raw ĝ_iᵀĤ⁻¹ĝ_i."""


class RuntimeConfig(_Section):
    address: str | None = None
    """An existing Ray cluster to join; without it a local Ray starts and stops with the job. No
    credentials in it: Ray's token goes in RAY_AUTH_TOKEN (or its token file), never the address."""
    num_workers: int = Field(default=2, gt=0)
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: int = Field(default=8, gt=0)
    """Examples per forward/backward step (a chunk's examples grouped by length), unless
    tokens_per_step is set."""
    tokens_per_step: int | None = Field(default=None, gt=0)
    """A token budget per step instead of batch_size: a step holds as many examples, grouped by
    length, as fit with examples × longest ≤ this (an example longer than it runs alone). null:
    batch_size examples a step."""
    activation_checkpointing: bool = False
    """Keep only each repeated block's input from the forward to the backward pass and run the
    block's forward again there (distinf.core.checkpointing): for long documents, whose
    activations outgrow the model's partition. About a third more compute."""
    zero_stage: Literal[0, 1, 2, 3] = 3
    """3 shards the parameters over the workers; 0-2 replicate the model (inference has no
    optimiser state or gradients for them to shard)."""
    release_after_use: bool = True
    """ZeRO-3: free each module's gathered weights after every use, so a rank holds its partition
    plus about one layer (backward gathers again). false keeps DeepSpeed's defaults, which keep
    weights gathered for reuse: fewer gathers, but a rank then holds most of the model."""
    chunk_examples: int = Field(default=256, gt=0)
    """Rows per committed gradient chunk (rounded up to whole batches)."""
    commit_queue: int = Field(default=1, ge=0)
    """Finished chunks that may wait for their commit while one is being committed (Parquet
    encoding, sha256, upload, ledger record: on a writer thread, in order) and the next chunk
    computes; each holds its rows (chunk_examples × k × 4 bytes). 0 commits each chunk before the
    next starts."""
    max_restarts: int = Field(default=2, ge=0)
    """How often a failed stage is restarted before the job fails: the whole gradient worker
    group (ZeRO-3 needs every rank) resuming from its committed chunks, or the reducer and
    scoring tasks."""
    stall_timeout: float | None = Field(default=3600, gt=0)
    """Seconds without progress after which a stage counts as hung and is restarted like a failed
    one: no gradient batch committed by any rank, no reducer result, no scoring chunk done.
    null waits forever."""
    lease_seconds: float = Field(default=120, ge=10)
    """How long the run directory's lease outlives its holder's last heartbeat (renewed every
    quarter of it): a run killed without a chance to release it blocks the folder this long."""
    placement_timeout: float = Field(default=600, gt=0)
    """Seconds to wait for the placement group of runtime.num_workers bundles before the job
    fails: an autoscaling cluster may need longer to bring its GPU nodes up."""

    check_no_credentials = field_validator("address")(refuse_credentials)


class OutputConfig(_Section):
    path: str = "runs/demo"
    gradient_dtype: Literal["float32", "float16"] = "float32"
    keep_versions: int = Field(default=7, ge=1)
    """Complete versions of the outputs kept under versions/ (one per run or append, newest last):
    a week of nightly history by default."""

    check_no_credentials = field_validator("path")(refuse_credentials)


class AttributionConfig(_Section):
    """The sections that `distinf.attribute` takes; the job file adds model, data, runtime, output."""

    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    hessian: HessianConfig = Field(default_factory=HessianConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)

    @model_validator(mode="after")
    def _optimizer_state_not_with_kronecker_factors(self) -> "AttributionConfig":
        # K-FAC's factors come from layer inputs and output gradients, not from the scaled entries.
        if self.compression.optimizer_state is not None and CURVATURE_METHODS[self.hessian.method].needs_factors:
            raise ValueError(f"compression.optimizer_state does not combine with hessian.method: "
                             f"{self.hessian.method} (its Kronecker factors are not scaled); use gauss_newton")
        return self


# What the distributed job runs; the other methods run in distinf.attribute only (README).
JOB_COMPRESSION_METHODS = tuple(name for name, cls in COMPRESSION_METHODS.items() if cls.runs_in_job)
JOB_HESSIAN_METHODS = tuple(name for name, cls in CURVATURE_METHODS.items() if cls.runs_in_job)


class JobConfig(AttributionConfig):
    name: str = "distinf"
    model: ModelConfig
    data: DataConfig
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _masking_needs_causal_lm(self) -> "JobConfig":
        for role in ("train", "queries"):
            dataset = getattr(self.data, role)
            if dataset.masked and self.model.task != "causal_lm":
                key = "messages_column" if dataset.messages_column else "prompt_column"
                raise ValueError(f"data.{role}.{key}: masks the loss of a causal_lm; model.task is "
                                 f"{self.model.task!r}")
        return self

    @model_validator(mode="after")
    def _methods_the_job_runs(self) -> "JobConfig":
        for key, value, allowed in (("compression.method", self.compression.method, JOB_COMPRESSION_METHODS),
                                    ("hessian.method", self.hessian.method, JOB_HESSIAN_METHODS)):
            if value not in allowed:
                raise ValueError(f"{key}: {value} runs in distinf.attribute (one process) only; the "
                                 f"distributed job runs {', '.join(allowed)}")
        if (CURVATURE_METHODS[self.hessian.method].needs_factors
                and not COMPRESSION_METHODS[self.compression.method].keeps_entries):
            raise ValueError(f"hessian.method: {self.hessian.method} needs compression.method: {_keeping_entries()} (the "
                             f"Kronecker factors are of kept gradient entries); got {self.compression.method!r}")
        return self


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {key}: {message}" if key else f"{source}: {message}")
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
