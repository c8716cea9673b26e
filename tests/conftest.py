import os
import signal
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# Every process this suite starts inherits this mark, Ray's head, raylets and workers included
# (and the driver forwards DISTINF_TEST_* to its actors), so the suite can find its own leftovers
# without touching another suite's Ray on the same machine.
SESSION_MARK = f"DISTINF_TEST_SESSION={uuid.uuid4().hex}"
os.environ["DISTINF_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]


def processes_of_this_session() -> dict[int, str]:
    """pid -> command line of every live process carrying this session's mark: Ray's, and any other
    that outlives this one (not its multiprocessing helpers, which exit with it)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if SESSION_MARK.encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        if parent != os.getpid() or "ray" in command:
            found[int(entry.name)] = command
    return found


def pytest_sessionfinish(session, exitstatus):
    """End with no Ray process of the suite's own alive: give them a moment to exit after the last
    shutdown, then kill what is left and say which, so a leak is seen and fixed."""
    import ray

    ray.shutdown()
    deadline = time.monotonic() + 15
    while (left := processes_of_this_session()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    session.config.stash[LEFTOVERS] = left


LEFTOVERS = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    left = config.stash.get(LEFTOVERS, {})
    if left:
        terminalreporter.write_line(f"killed {len(left)} process(es) the suite left running: "
                                    + "; ".join(f"{pid} {cmd[:80]}" for pid, cmd in left.items()), red=True)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DISTINF_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="benchmark-sized; run with DISTINF_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def sources_corpus():
    """id and text of 4 training texts from each shipped source (the demo's corpus, seed 0)."""
    from distinf.assets import mixed_source_corpus

    return mixed_source_corpus(4, 1, seed=0)[0].select(["id", "text"])


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 with a real fast tokenizer, saved as a local model folder."""
    import job_fixtures

    return job_fixtures.tiny_model_dir(tmp_path_factory.mktemp("model"), "gpt2")


@pytest.fixture(scope="module")
def gpt2_tokenizer(gpt2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_dir)


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray for the in-process jobs of a test module: run_job joins it, as on a cluster,
    instead of starting and stopping a Ray of its own for each job.

    Per module, not per session: test_observe and test_bad_input check that a job leaves no Ray
    running, and test_cluster_checks and test_ray_cluster start Rays of their own.
    """
    import ray

    from distinf.runtime.workers import WORKER_ENV

    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished 2-worker ZeRO-3 run of a tiny GPT-2 on real text, shared by read-only tests.

    The training file carries a seeded boolean `flipped` column, standing in for known-noisy rows.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    import job_fixtures
    from distinf.config import load_job
    from distinf.runtime.driver import run_job

    root = tmp_path_factory.mktemp("tiny_run")
    train, queries = job_fixtures.corpus_files(root / "data")
    table = pq.read_table(train)
    flipped = np.random.default_rng(0).random(table.num_rows) < 0.25
    pq.write_table(table.append_column("flipped", pa.array(flipped)), train)
    job = job_fixtures.job_file(root, job_fixtures.tiny_model_dir(root, "gpt2"), train, queries,
                                scoring={"dense": False})
    run_job(load_job(job))
    return root / "run", job
