"""`distinf run | query | validate | report | status`: the command line, a thin edge over the driver."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import distinf
from distinf.config import ConfigError, JobConfig, load_job, refuse_credentials
from distinf.store import display, run_path

EPILOG = """exit codes:
  0  done: the run, append, query, report or check is complete
  1  runtime failure (a worker group out of restarts, a stall, a lost node, a lease held by another
     writer, SIGTERM): run the same command again; --append-to and --resume continue it
  2  configuration, data or model error, or bad arguments: fix them first, do not retry

environment:
  DISTINF_LOG_LEVEL   log level of the stderr lines (default INFO)
  DISTINF_LOG_FORMAT  json: JSON lines instead of key=value
  RAY_ADDRESS         the Ray cluster to join when runtime.address is auto or unset
  DS_ACCELERATOR      DeepSpeed's accelerator (distinf sets cuda or cpu for its workers)
  HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE  set them to 1: models are read from disk only
"""

JOB_HELP = "the job file (YAML; docs/operations.md, 'The job file, every key')"
SET_HELP = "override a job key, e.g. --set compression.k=4096 (repeatable)"


def _check_compression(cfg: JobConfig) -> str | None:
    """What each worker checks once its model is loaded (runtime.shard), found here from the meta
    model's shapes in a second: a module pattern that tracks nothing, k below the tracked tensors.
    Returns a note when the model cannot be built without its weights (then the run checks)."""
    from distinf.core.compressors import build_compressor
    from distinf.core.tracking import track_modules
    from distinf.models import meta_model

    try:
        model = meta_model(cfg.model)
    except Exception as error:  # custom model code that needs real tensors: not a fault of the job file
        return f"  compression: not checked before the run (no meta-device model: {type(error).__name__})"
    comp = cfg.compression
    try:  # compressors draw their projections lazily: building one costs no more than the index set
        build_compressor(track_modules(model, comp.modules.include, comp.modules.exclude),
                         comp.method, comp.k, comp.seed, comp.allocation)
    except ValueError as error:
        raise ConfigError(f"compression: {error}") from None
    return None


def _check_space(cfg: JobConfig, n_train: int, n_queries: int, output: str | None = None,
                 append_to: str | None = None) -> str:
    """The output folder's disk (--output, --append-to or output.path, as `run` would choose) against
    what the run writes (run_dir.estimated_bytes); object storage has no such limit. An append
    writes the rows its run directory lacks, counted from the stored manifest. A folder not made
    yet is measured on its nearest existing parent."""
    from distinf.runtime.errors import JobError
    from distinf.runtime.run_dir import RunDir, check_free_space, estimated_bytes
    from distinf.store import is_remote

    run_dir = run_path(append_to or output or cfg.output.path)
    label = "--append-to" if append_to else "--output" if output else "output.path"
    note = ""
    if append_to:
        try:  # object storage is not read here: it has no free-space limit to check
            stored = None if is_remote(run_dir) else RunDir.at(run_dir).read_manifest()
        except (OSError, ValueError):
            stored = None
        base = stored.last_complete() if stored else None
        if base is not None and base.counts:
            n_train = max(0, n_train - base.counts["train"])
            note = f" ({n_train} rows more than the {base.counts['train']} stored)"
        elif not is_remote(run_dir):
            note = " (no complete run there yet: the first night starts it)"
    need = estimated_bytes(cfg.compression.k, n_train, n_queries, cfg.output.gradient_dtype, cfg.scoring.dense,
                           cfg.hessian.blocks == "full")
    if is_remote(run_dir):
        return (f"  {label}: object storage, about {need / 2**20:,.1f} MiB to write{note} "
                "(no free-space check)")
    folder = Path(run_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        check_free_space(folder, need)
    except JobError as error:
        raise ConfigError(str(error).replace("output.path:", f"{label}:", 1)) from None
    return f"  {label}: about {need / 2**20:,.1f} MiB to write{note}, room for it"


def _check_capacity(cfg: JobConfig) -> str | None:
    """With runtime.address: the cluster's total CPUs/GPUs against runtime.num_workers bundles.
    A shortfall is a warning, not an error: an autoscaler may add the nodes once the job asks."""
    if not cfg.runtime.address:
        return None
    from distinf.runtime.workers import capacity_shortfall, cluster_resources

    resources = cluster_resources(cfg.runtime.address)
    short = capacity_shortfall(resources, cfg.runtime.num_workers, cfg.runtime.device)
    if short is None:
        have = ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
        return f"  runtime.address: the cluster has {have} for {cfg.runtime.num_workers} worker(s)"
    return (f"  warning: {short} now; unless an autoscaler adds nodes the run fails after "
            f"runtime.placement_timeout = {cfg.runtime.placement_timeout:g} s")


def _validate(cfg: JobConfig, output: str | None = None, append_to: str | None = None) -> str:
    """Check everything a run would read before it starts: model folder, tokenizer, both data sets,
    and the compression setting against the model's shapes (no weights read); then the output
    folder's free space and, with runtime.address, the cluster's capacity."""
    from distinf.inputs import plan_job

    plan = plan_job(cfg)
    unchecked = _check_compression(cfg)
    lines = [f"ok: model '{cfg.model.path}', {len(plan.train.ids)} training examples "
             f"({plan.train.truncated} truncated to {cfg.data.max_length} tokens), "
             f"{len(plan.queries.ids)} queries ({plan.queries.truncated} truncated)"]
    if unchecked:
        lines.append(unchecked)
    lines.append(_check_space(cfg, len(plan.train.ids), len(plan.queries.ids), output, append_to))
    capacity = _check_capacity(cfg)
    if capacity:
        lines.append(capacity)
    for role, data in (("train", plan.train), ("queries", plan.queries)):
        if data.rejected:
            first = data.rejected[0]
            lines.append(f"  data.{role}: {len(data.rejected)} row(s) will be skipped (data.on_bad_row: skip); "
                         f"the first, row {first.row}: {first.reason}")
    return "\n".join(lines)


def _refuse_credentials(args: argparse.Namespace) -> None:
    """The command line's own paths, checked as the job file's are (config.refuse_credentials)."""
    for flag, attribute in (("RUN_DIR", "run_dir"), ("--queries", "queries"), ("--output", "output"),
                            ("--append-to", "append_to")):
        try:
            refuse_credentials(getattr(args, attribute, None))
        except ValueError as error:
            raise ConfigError(f"{flag}: {error}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distinf", description="Training-data attribution as a Ray job.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"distinf {distinf.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    run = command("run", "run a job file")
    run.add_argument("job", type=Path, help=JOB_HELP)
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=SET_HELP)
    run.add_argument("--output", help="run directory, a path or a URI such as s3://bucket/run "
                     "(default: the job's output.path)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in a non-empty output folder (after a killed driver or a failure); "
                          "committed chunks are kept, the job must be the same")
    run.add_argument("--append-to", metavar="RUN_DIR",
                     help="add the training rows whose ids RUN_DIR lacks to that stored run, in place: only "
                          "their gradients are computed, then curvature and scores again (nightly runs)")
    run.add_argument("--discard-pending", action="store_true",
                     help="with --append-to: delete the rows an unfinished append of another training file "
                          "committed (refused otherwise, naming them)")
    query = command("query", "score new queries against a stored run, without recomputing the training gradients")
    query.add_argument("run_dir", help="a complete run directory (path or URI)")
    query.add_argument("--queries", required=True, help="Parquet, JSONL or CSV file of queries (the run's "
                       "data.queries columns, unless --set data.queries.text_column=... etc.)")
    query.add_argument("--output", help="output folder (default: RUN_DIR/queries/<file stem>)")
    query.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override runtime.*, data.queries.*, scoring.top_k or scoring.dense")
    validate = command("validate", "check a job file and its data without running")
    validate.add_argument("job", type=Path, help=JOB_HELP)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                          help=SET_HELP + "; give the same ones as to `run`")
    validate.add_argument("--output", help="check the run directory `run --output` would write (default: the "
                          "job's output.path)")
    validate.add_argument("--append-to", metavar="RUN_DIR", help="check an append to RUN_DIR, as `run --append-to` "
                          "would write it: room for the rows it lacks")
    report = command("report", "write RUN_DIR/report.html with plots")
    report.add_argument("run_dir", type=Path, help="a complete run directory")
    report.add_argument("--noisy-column", help="a boolean column of the training file marking known-noisy "
                        "rows (e.g. flipped labels): adds their ROC curve")
    report.add_argument("--by", action="append", default=[], metavar="COLUMN",
                        help="a column of the training files (e.g. source, label, shard) to break the values "
                             "down by (repeatable)")
    status = command("status", "show a run directory's state, version, counts, restarts, timings and rejected rows")
    status.add_argument("run_dir", help="a run directory (path or URI)")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    from distinf.log import configure

    configure()  # structured log lines on stderr; stdout is the command's result
    try:
        _refuse_credentials(args)
    except ConfigError as error:
        print(f"distinf: {error}", file=sys.stderr)
        return 2

    if args.command == "status":
        from distinf.status import run_status, status_text

        try:
            state = run_status(args.run_dir)
        except (OSError, ValueError) as error:
            print(f"distinf: {error}", file=sys.stderr)
            return 2
        print(json.dumps(state, indent=2, default=str) if args.json else status_text(state))
        return 0

    if args.command == "report":
        from distinf.report import write_report

        try:
            print(write_report(args.run_dir, args.noisy_column, args.by))
        except (OSError, ValueError) as error:
            print(f"distinf: {error}", file=sys.stderr)
            return 2
        return 0

    from distinf.inputs import DataError
    from distinf.models import ModelError

    if args.command == "query":
        from distinf.runtime.errors import JobError
        from distinf.runtime.query import query_run

        try:
            manifest, out = query_run(args.run_dir, args.queries, args.output, args.overrides)
        except JobError as error:
            print(f"distinf: {error}", file=sys.stderr)
            return 1
        except (ConfigError, DataError, ModelError) as error:
            print(f"distinf: {error}", file=sys.stderr)
            return 2
        print(query_summary(manifest, out))
        return 0

    try:
        cfg = load_job(args.job, args.overrides)
        if args.command == "validate":
            if args.append_to and args.output:
                print("distinf: give --append-to or --output, not both (as `run`)", file=sys.stderr)
                return 2
            print(_validate(cfg, args.output, args.append_to))
            return 0
        from distinf.runtime.driver import run_job
        from distinf.runtime.errors import JobError, Refused

        if args.append_to and (args.output or args.resume):
            print("distinf: --append-to works in RUN_DIR itself (and finishes an interrupted append); "
                  "leave out --output and --resume", file=sys.stderr)
            return 2
        run_dir = run_path(args.append_to or args.output or cfg.output.path)
        try:
            manifest = run_job(cfg, run_dir, resume=args.resume, append=bool(args.append_to),
                               discard_pending=args.discard_pending)
        except Refused as error:  # retrying the same command cannot help
            print(f"distinf: {error}", file=sys.stderr)
            return 2
        except JobError as error:
            print(f"distinf: {error}", file=sys.stderr)
            return 1
        print(summary(manifest, run_dir))
        return 0
    except (ConfigError, DataError, ModelError) as error:
        print(f"distinf: {error}", file=sys.stderr)
        return 2


def summary(manifest: dict, run_dir: Path) -> str:
    """The one-screen summary printed at the end of a run."""
    import numpy as np

    counts, damping = manifest["counts"], manifest["damping"]
    lines = [
        f"distinf run '{manifest['name']}' complete: {display(run_dir)}",
        f"  examples   train {counts['train']} ({counts['truncated_train']} truncated), "
        f"queries {counts['queries']} ({counts['truncated_queries']} truncated)",
        f"  index set  k = {manifest['k']} of {manifest['params']['tracked']:,} tracked entries "
        f"({manifest['params']['tracked_fraction']:.1%} of {manifest['params']['total']:,} parameters)",
        f"  damping    {len(damping)} block(s), min {min(damping):.3g}, median {float(np.median(damping)):.3g}, "
        f"max {max(damping):.3g}",
        *([f"  zero       {len(manifest['zero_blocks'])} block(s) with a zero gradient, left out of every score: "
           + "; ".join(f"columns {z['columns']} ({', '.join(z['params'])})" for z in manifest["zero_blocks"][:5])
           + (" ..." if len(manifest["zero_blocks"]) > 5 else "")] if manifest.get("zero_blocks") else []),
        "  workers    " + ", ".join(f"rank {w['rank']} on {w['host']}: {w['local_params']:,} params"
                                  for w in manifest["workers"]),
        "  time       " + ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings"].items()),
        f"  outputs    {display(run_dir)}/scores/top_k.parquet, scores/train_values.parquet, gradients/, curvature/",
    ]
    if manifest.get("appends"):
        last = manifest["appends"][-1]
        lines.insert(2, f"  appended   {last['new_rows']} new training rows ({last['rows_already_stored']} of the file "
                        f"stored already, {last['stored_rows_not_in_file']} stored rows not in it, kept)")
    rejected = counts.get("rejected_train", 0) + counts.get("rejected_queries", 0)
    if rejected:
        lines.insert(2, f"  rejected   train {counts['rejected_train']}, queries {counts['rejected_queries']}: "
                        f"{display(run_dir)}/rejected.parquet (data.on_bad_row: skip)")
    if manifest.get("restarts"):
        lines.append("  restarts   " + "; ".join(f"{r['stage']}: {r.get('worker', '')} {r['error']}".replace("  ", " ")
                                               for r in manifest["restarts"]))
    return "\n".join(lines)


def query_summary(manifest: dict, out: Path) -> str:
    """The one-screen summary printed at the end of `distinf query`."""
    counts = manifest["counts"]
    return "\n".join([
        f"distinf query complete: {display(out)}",
        f"  run        {manifest['query_of']['path']} ({counts['train']} training examples, stored gradients "
        "and curvature)",
        f"  queries    {counts['queries']} scored ({counts['truncated_queries']} truncated, "
        f"{counts['rejected_queries']} rejected)",
        "  time       " + ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings"].items()),
        f"  outputs    {display(out)}/scores/top_k.parquet, scores/train_values.parquet, gradients/queries/",
    ])

if __name__ == "__main__":
    sys.exit(main())
