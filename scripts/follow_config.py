"""Follow a job's config and its run directory through the code, as a new maintainer would read it.

Runs a tiny real job (1 worker, a 2-layer GPT-2, the mixed-source corpus) through
`distinf.runtime.driver.run_job` and records, in the driver process, every call into distinf that
is handed the job config (or one of its sections), the run directory object, or the run
directory's path. Each function is read once, at its first such call. The reading path is then the
sequence of files: the caller's file, then the callee's, for each call in order, with consecutive
repeats merged. It reports:

- stays: the length of that path (each stretch spent in one file counts once);
- files: how many different files it visits;
- climbs: steps from a file back up to a file that imports it (a return from a call below);
- returns: steps to a file the path had already left.

    .venv/bin/python scripts/follow_config.py [--path]

Ray workers and tasks run in other processes and are not followed; what the driver hands them is.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
from pathlib import Path

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "distinf"
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """{module: the distinf modules it imports}, read from the source."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distinf"):
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith("distinf"))
        graph[module_of(path)] = imported
    return graph


def sub_models(model: BaseModel) -> list[BaseModel]:
    found = [model]
    for value in model.__dict__.values():
        if isinstance(value, BaseModel):
            found += sub_models(value)
    return found


def trace(cfg, run_root: Path) -> list[tuple[str, str]]:
    """(caller file, callee file) of each first call into distinf handed the config or the run."""
    from distinf.runtime.driver import run_job

    tracked_ids = {id(m) for m in sub_models(cfg)}
    root_text = str(run_root)
    owner_types = tuple(t for t in _owner_types())
    seen, calls = set(), []

    def tracked(value) -> bool:
        if id(value) in tracked_ids or isinstance(value, owner_types):
            return True
        return isinstance(value, (str, Path)) and str(value).rstrip("/") == root_text

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if not code.co_filename.startswith(str(PACKAGE)) or code in seen:
            return
        n = code.co_argcount + code.co_kwonlyargcount
        names = list(code.co_varnames[:n])
        if code.co_flags & 0x04:  # *args
            names.append(code.co_varnames[n])
        values = [frame.f_locals.get(name) for name in names]
        values += [v for v in values if isinstance(v, tuple) for v in v]
        if not any(tracked(v) for v in values):
            return
        caller = frame.f_back
        while caller is not None and not caller.f_code.co_filename.startswith(str(PACKAGE)):
            caller = caller.f_back
        seen.add(code)
        calls.append((caller.f_code.co_filename if caller else code.co_filename, code.co_filename))

    sys.setprofile(profile)
    try:
        run_job(cfg, run_root)
    finally:
        sys.setprofile(None)
    return calls


def _owner_types() -> list[type]:
    """The classes that stand for a run directory, whichever of them this version has."""
    import importlib

    found = []
    for module, name in (("distinf.runtime.run_dir", "RunDir"), ("distinf.runtime.run", "Run"),
                         ("distinf.runtime.run", "RunView")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return found


def reading_path(calls: list[tuple[str, str]]) -> list[str]:
    path: list[str] = []
    for caller, callee in calls:
        for file in (caller, callee):
            if not path or path[-1] != file:
                path.append(file)
    return path


def measure(path: list[str], graph: dict[str, set[str]]) -> dict:
    modules = [module_of(Path(p)) for p in path]
    climbs = sum(a in graph.get(b, ()) for a, b in zip(modules, modules[1:]))
    returns = sum(m in modules[:i - 1] for i, m in enumerate(modules) if i > 0)
    stays: dict[str, int] = {}
    for m in modules:
        stays[m] = stays.get(m, 0) + 1
    return {"stays": len(path), "files": len(set(path)), "climbs": climbs, "returns": returns,
            "stays_by_file": dict(sorted(stays.items(), key=lambda item: -item[1]))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", action="store_true", help="print the reading path, one file a line")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from job_fixtures import corpus_files, job_file, tiny_model_dir

    from distinf.config import load_job

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, queries = corpus_files(root / "data", 2, 1)
        job = job_file(root, tiny_model_dir(root), train, queries,
                       runtime={"num_workers": 1, "batch_size": 4, "chunk_examples": 8})
        cfg = load_job(job)
        calls = trace(cfg, Path(cfg.output.path))
    path = reading_path(calls)
    result = measure(path, import_graph())
    if args.path:
        for file in path:
            print(Path(file).relative_to(REPO))
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
