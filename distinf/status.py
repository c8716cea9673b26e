"""`distinf status RUN_DIR [--json]`: what a run directory holds, read from its manifest, lease and
rejected.parquet, so that nobody has to read manifest.json by hand."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq

from distinf.runtime.layout import LEASE, REJECTED
from distinf.runtime.run_dir import RunDir
from distinf.store import display, read_bytes

REJECTED_SHOWN = 20
"""Rejected rows listed in full; the rest are counted."""


def run_status(run_dir: str) -> dict:
    """The run's state, version, counts, restarts, timings and rejected rows. ValueError if the
    folder holds no readable manifest.json (not a distinf run directory)."""
    folder = RunDir.at(run_dir)
    manifest = folder.read_manifest()
    if manifest is None:
        raise ValueError(f"'{folder}' has no manifest.json: not a distinf run directory (or nothing written yet)")
    complete = manifest.last_complete()
    rejected = _rejected_rows(folder, complete.outputs if complete else None)
    appends = manifest.appends or []
    return {
        "run_dir": display(folder.root),
        "name": manifest.name,
        "state": manifest.status,
        "error": manifest.error,
        "appending": manifest.append is not None,
        "writer": _lease(folder),
        "version": complete.run_id if complete else None,
        "as_of": complete.as_of if complete else None,
        "versions_kept": list(manifest.history or []),
        "counts": complete.counts if complete else manifest.counts,
        "restarts": manifest.restarts or [],
        "timings": manifest.timings or {},
        "zero_blocks": len(complete.zero_blocks or []) if complete else 0,
        "appends": len(appends),
        "last_append": appends[-1] if appends else None,
        "rejected": rejected,
        "software": manifest.versions,
    }


def _lease(folder: RunDir) -> dict | None:
    """Who holds the folder's lease now (a run, append or query in progress), if anyone."""
    try:
        return json.loads(read_bytes(folder.path(LEASE)).decode("utf-8"))
    except (FileNotFoundError, IsADirectoryError, ValueError):
        return None


def _rejected_rows(folder: RunDir, outputs: dict | None) -> dict:
    name = (outputs or {}).get("rejected") or REJECTED
    try:
        table = pq.read_table(io.BytesIO(read_bytes(folder.path(name))))
    except (FileNotFoundError, IsADirectoryError):
        return {"count": 0, "rows": []}
    rows = table.slice(0, REJECTED_SHOWN).to_pylist()
    for row in rows:
        row.pop("run_id", None)
        if row.get("as_of") is not None:
            row["as_of"] = row["as_of"].isoformat()
    by_split = {}
    for split in table.column("split").to_pylist():
        by_split[split] = by_split.get(split, 0) + 1
    return {"count": table.num_rows, "by_split": by_split, "rows": rows}


def status_text(status: dict) -> str:
    """The status as a few lines for people."""
    counts = status["counts"] or {}
    lines = [f"distinf run '{status['name']}' at {status['run_dir']}: {status['state']}"
             + (" (an append is in progress or failed; the last complete version is still served)"
                if status["appending"] else "")]
    if status["error"]:
        lines.append(f"  error      {status['error']}")
    if status["writer"]:
        w = status["writer"]
        lines.append(f"  writer     {w.get('purpose', '?')} by run {w.get('run_id', '?')} (pid {w.get('pid', '?')} "
                     f"on {w.get('host', '?')})")
    lines.append(f"  version    {status['version'] or 'none complete'}"
                 + (f" as of {status['as_of']}" if status["as_of"] else "")
                 + (f"; {len(status['versions_kept'])} kept under versions/" if status["versions_kept"] else ""))
    if counts:
        lines.append(f"  examples   train {counts.get('train', 0)}, queries {counts.get('queries', 0)}; "
                     f"rejected train {counts.get('rejected_train', 0)}, queries {counts.get('rejected_queries', 0)}")
    if status["last_append"]:
        last = status["last_append"]
        lines.append(f"  appends    {status['appends']}; the last added {last.get('new_rows', '?')} rows")
    if status["timings"]:
        lines.append("  time       " + ", ".join(f"{k} {v:.1f}s" for k, v in status["timings"].items()))
    lines.append(f"  restarts   {len(status['restarts'])}" + "".join(
        f"\n             {r.get('stage', '?')}: {r.get('error', '')}" for r in status["restarts"]))
    if status["zero_blocks"]:
        lines.append(f"  zero       {status['zero_blocks']} block(s) with a zero gradient, left out of every score")
    rejected = status["rejected"]
    if rejected["count"]:
        lines.append(f"  rejected   {rejected['count']} row(s) in rejected.parquet; the first:")
        lines += [f"             {r['split']} row {r['row']}" + (f" of {r['file']}" if r.get("file") else "")
                  + f": {r['reason']}" for r in rejected["rows"][:5]]
    return "\n".join(lines)
