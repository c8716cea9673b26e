"""`distinf run | validate | report`: the command line, a thin edge over the driver."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distinf.config import ConfigError, JobConfig, load_job


def _validate(cfg: JobConfig) -> str:
    """Check everything a run would read before it starts: model folder, tokenizer, both data sets."""
    from distinf.runtime.driver import plan_job

    plan = plan_job(cfg)
    return (f"ok: model '{cfg.model.path}', {len(plan.train.ids)} training examples "
            f"({plan.train.truncated} truncated to {cfg.data.max_length} tokens), "
            f"{len(plan.queries.ids)} queries ({plan.queries.truncated} truncated)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distinf", description="Training-data attribution as a Ray job.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a job file")
    run.add_argument("job", type=Path)
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a job key, e.g. --set compression.k=4096 (repeatable)")
    run.add_argument("--output", type=Path, help="run directory (default: the job's output.path)")
    validate = commands.add_parser("validate", help="check a job file and its data without running")
    validate.add_argument("job", type=Path)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    report = commands.add_parser("report", help="write RUN_DIR/report.html with plots")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--noisy-column", help="a boolean column of the training file marking known-noisy "
                        "rows (e.g. flipped labels): adds their ROC curve")
    args = parser.parse_args(argv)

    if args.command == "report":
        from distinf.report import write_report

        try:
            print(write_report(args.run_dir, args.noisy_column))
        except (OSError, ValueError) as error:
            print(f"distinf: {error}", file=sys.stderr)
            return 2
        return 0

    from distinf.data import DataError
    from distinf.models import ModelError

    try:
        cfg = load_job(args.job, args.overrides)
        if args.command == "validate":
            print(_validate(cfg))
            return 0
        from distinf.runtime.driver import JobError, run_job, summary

        run_dir = (args.output or Path(cfg.output.path)).resolve()
        try:
            manifest = run_job(cfg, run_dir)
        except JobError as error:
            print(f"distinf: {error}", file=sys.stderr)
            return 1
        print(summary(manifest, run_dir))
        return 0
    except (ConfigError, DataError, ModelError) as error:
        print(f"distinf: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
