"""The manifest of a run directory, typed: what `manifest.json` holds, field by field.

A run, an append and a `distinf query` output each write one, through their `Run` (runtime.run)
only (under the folder's lease). On disk it is plain JSON with exactly these keys; a field that is
None is left out, so a key appears only once it means something ("resumed" after a resume,
"error" on a failed run, "append" while an append runs). Keys this version does not know are kept
in `extra` and written back as they were.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from distinf.runtime.layout import safe_name

CARRIED = ("index_set_hash", "index_set_sha256", "params", "workers")
"""What a later job in the same folder (a resume, an append, a query run again) takes over from
the manifest before it: the index set drawn and the worker layout that drew it. The rest is
computed again, or checked equal first (config, fingerprints)."""


@dataclass
class AppendPending:
    """An unfinished append (key "append"): the complete run it started from, and where its chunks go."""

    base: Manifest
    rejected: list[list]
    """The stored run's rejected.parquet rows: example_id, split, row, reason, file."""
    first_chunk: int
    segment: int
    data_fingerprint: str
    """Of the appended rows alone."""
    stored_ids: int

    def to_dict(self) -> dict:
        return {"base": self.base.to_dict(), "rejected": self.rejected, "first_chunk": self.first_chunk,
                "segment": self.segment, "data_fingerprint": self.data_fingerprint, "stored_ids": self.stored_ids}

    @classmethod
    def from_dict(cls, data: dict) -> AppendPending:
        return cls(Manifest.from_dict(data["base"]), [_rejected_row(r) for r in data["rejected"]],
                   data["first_chunk"], data["segment"], data["data_fingerprint"], data["stored_ids"])


def _rejected_row(row: list) -> list:
    """[example_id, split, row, reason, file]. An append begun by an earlier version wrote the first
    four alone, or those with the run's run_id and as_of after them: its file is unknown."""
    return list(row[:4]) + [row[4] if len(row) == 5 else None]


@dataclass
class Manifest:
    status: str
    """"running", "failed" or "complete"; only a complete manifest vouches for the outputs."""
    name: str
    config: dict
    """The job, every key, as validated (JobConfig.model_dump)."""
    run_id: str | None = None
    """The lease holder that wrote it, and the version of the outputs it describes."""
    as_of: str | None = None
    model_fingerprint: str | None = None
    data_fingerprint: dict | None = None
    index_set_hash: str | None = None
    index_set_sha256: str | None = None
    params: dict | None = None
    workers: list[dict] | None = None
    restarts: list[dict] | None = None
    resumed: int | None = None
    query_of: dict | None = None
    """A `distinf query` output: the run it scores against (its path and checksums)."""
    curvature_input: dict | None = None
    append: AppendPending | None = None
    error: str | None = None
    versions: dict | None = None
    k: int | None = None
    counts: dict | None = None
    damping: list[float] | None = None
    zero_blocks: list[dict] | None = None
    timings: dict | None = None
    chunks: dict | None = None
    outputs: dict | None = None
    appends: list[dict] | None = None
    version: str | None = None
    history: list[str] | None = None
    files: dict | None = None
    """Output name -> sha256, of every output but the gradient chunks (listed under chunks)."""
    extra: dict = field(default_factory=dict)
    """Keys this version does not know, kept as they were."""

    def to_dict(self) -> dict:
        data = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            data[f.name] = value.to_dict() if isinstance(value, AppendPending) else value
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """Raises ValueError naming a missing key (status, name or config)."""
        missing = [key for key in ("status", "name", "config") if key not in data]
        if missing:
            raise ValueError(f"manifest.json has no key {missing[0]!r}")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {key: value for key, value in data.items() if key in known}
        for name in values.get("files") or {}:
            safe_name(name, "manifest.json's files")
        for split, chunks in (values.get("chunks") or {}).items():
            for chunk in chunks or []:
                if chunk.get("file") is not None:
                    safe_name(chunk["file"], f"manifest.json's {split} chunks")
        if values.get("append") is not None:
            values["append"] = AppendPending.from_dict(values["append"])
        return cls(**values, extra={key: value for key, value in data.items() if key not in known})

    def carry_from(self, previous: Manifest) -> None:
        """Take over the CARRIED fields that `previous` has."""
        for key in CARRIED:
            if getattr(previous, key) is not None:
                setattr(self, key, getattr(previous, key))

    def last_complete(self) -> Manifest | None:
        """The complete version the folder vouches for: this one, or, while an append runs or after
        one failed, the version it started from."""
        if self.status == "complete":
            return self
        return self.append.base if self.append is not None else None

    def version_stamp(self) -> tuple[str, datetime]:
        """(run_id, as_of): what every output row of this version carries."""
        return self.run_id, datetime.fromisoformat(self.as_of)


def software_versions() -> dict[str, Any]:
    """The versions of the libraries that computed a result, for the manifest."""
    import deepspeed
    import pyarrow
    import ray
    import torch
    import transformers

    import distinf

    return {"distinf": distinf.__version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "ray": ray.__version__, "transformers": transformers.__version__, "pyarrow": pyarrow.__version__,
            "python": platform.python_version()}
