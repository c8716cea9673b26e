"""What every benchmark shares: the offline environment, the checkout's root, and for the one-batch
benchmarks wall/CPU clocks, floor-paired timing, peak RSS, the machine, and a causal LM with a batch
of packed real tokens.

Every benchmark runs as a module from the checkout's root (`python -m benchmarks.speed.NAME`), so
the checkout is on sys.path without a script editing it, and imports this module first: importing it
sets the offline environment, so import it before transformers loads. It imports nothing from
distinf, so peers/peers.py (its own environment, which must not import distinf) uses it too; model
and corpus therefore come in as paths.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]  # the checkout: jobs/, tests/, .assets/

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

Runner = Callable[[], tuple[float, float]]  # runs one batch: (wall s, process CPU s)


class Clock:
    """Wall and process CPU seconds (all threads) of a block: `.wall`, `.cpu`, `.times` = both.
    CPU time is the less disturbed by other processes taking turns on the cores; wall time is
    what a user waits."""

    def __enter__(self) -> "Clock":
        self._started = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._started[0]
        self.cpu = time.process_time() - self._started[1]

    @property
    def times(self) -> tuple[float, float]:
        return self.wall, self.cpu


def alternate(floor: Runner, candidate: Runner, pairs: int, warmup: int) -> dict:
    """Floor and candidate alternately in one process; the median of per-pair ratios is robust to
    the machine's drift. Only the candidate is warmed here (the caller warms the floor once)."""
    for _ in range(warmup):
        candidate()
    floor_t, cand_t = [], []
    for _ in range(pairs):
        floor_t.append(floor())
        cand_t.append(candidate())
        gc.collect()
    ratios = [c[0] / f[0] for c, f in zip(cand_t, floor_t)]
    return {
        "pairs": pairs,
        "floor_s": statistics.median(f[0] for f in floor_t),
        "cand_s": statistics.median(c[0] for c in cand_t),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cpu_ratio": statistics.median(c[1] / f[1] for c, f in zip(cand_t, floor_t)),
        "cand_cpu_s": statistics.median(c[1] for c in cand_t),
        "raw": [[round(x, 3) for x in (*f, *c)] for f, c in zip(floor_t, cand_t)],
    }


def import_test_helpers() -> None:
    """Make the test suite's helpers importable (`import job_fixtures`): they import each other by
    bare name, as pytest's rootdir allows, so their folder goes on sys.path rather than a package."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))


def status_kib(field: str) -> int:
    """A KiB field of /proc/self/status: VmRSS (now) or VmHWM (peak since start or reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water RSS (VmHWM) so the model load's peak does not mask the run's;
    False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def load_causal_lm(model_dir: str | os.PathLike) -> nn.Module:
    """The checkpoint in float32, in eval mode (its own dropout off)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def token_stream(model_dir: str | os.PathLike, corpus: str | os.PathLike, count: int) -> list[int]:
    """The first `count` tokens of the corpus's texts, tokenised without special tokens, joined by EOS."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream: list[int] = []
    for text in pq.read_table(corpus, columns=["text"]).column("text").to_pylist():
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= count:
            return stream[:count]
    raise SystemExit(f"the corpus {corpus} holds only {len(stream)} tokens; need {count}")


def packed_batch(model_dir: str | os.PathLike, corpus: str | os.PathLike, batch_size: int,
                 tokens: int) -> dict[str, Tensor]:
    """N rows of exactly T tokens of real text (packing), attention mask all ones."""
    ids = torch.tensor(token_stream(model_dir, corpus, batch_size * tokens), dtype=torch.long)
    ids = ids.view(batch_size, tokens)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
