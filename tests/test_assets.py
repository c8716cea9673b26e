"""distinf.assets: the mixed-source corpus built from packaged files, and the SmolLM2 conversion
from its GGUF to a plain safetensors folder."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from distinf import assets
from distinf.assets import CORPUS_SCHEMA, MAX_CHARS, demo_corpus, mixed_source_corpus, shorten


def test_corpus_is_deterministic_mixed_unique_and_disjoint():
    train, query = mixed_source_corpus(8, 2, seed=3)
    assets.source_texts.cache_clear()  # rebuild from the packaged files, not the cache
    again_train, again_query = mixed_source_corpus(8, 2, seed=3)
    assert train.equals(again_train) and query.equals(again_query)

    assert train.schema == CORPUS_SCHEMA and query.schema == CORPUS_SCHEMA
    sources = set(train.column("source").to_pylist())
    assert len(sources) >= 5 and sources == set(query.column("source").to_pylist())
    assert train.num_rows == 8 * len(sources) and query.num_rows == 2 * len(sources)

    train_ids, query_ids = train.column("id").to_pylist(), query.column("id").to_pylist()
    assert len(set(train_ids)) == len(train_ids) and len(set(query_ids)) == len(query_ids)
    assert not set(train_ids) & set(query_ids)
    assert not set(train.column("text").to_pylist()) & set(query.column("text").to_pylist())
    for text in train.column("text").to_pylist() + query.column("text").to_pylist():
        assert text == text.strip() and 0 < len(text) <= MAX_CHARS


def test_other_seed_gives_other_sample_and_larger_sample_extends_smaller():
    small_train, small_query = mixed_source_corpus(4, 2, seed=0)
    big_train, big_query = mixed_source_corpus(10, 2, seed=0)
    assert set(small_train.column("id").to_pylist()) < set(big_train.column("id").to_pylist())
    assert set(small_query.column("id").to_pylist()) == set(big_query.column("id").to_pylist())
    other_train, _ = mixed_source_corpus(4, 2, seed=1)
    assert set(other_train.column("id").to_pylist()) != set(small_train.column("id").to_pylist())


def test_shorten_cuts_at_sentence_end_or_word_boundary():
    assert shorten("  a  b\n c ") == "a b c"
    sentence = "word " * 50 + "end. "
    assert shorten(sentence + "tail " * 100, max_chars=400) == sentence.strip()
    assert shorten("x" * 10 + " y" * 300, max_chars=50) == "x" * 10 + " y" * 20
    assert shorten("x" * 60, max_chars=50) == "x" * 50


def test_demo_corpus_writes_parquet_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTINF_ASSETS", str(tmp_path))
    train_path, query_path = demo_corpus()
    assert train_path.parent == tmp_path / "corpus"
    train, query = pq.read_table(train_path), pq.read_table(query_path)
    assert train.num_rows == assets.DEMO_TRAIN_PER_SOURCE * len(assets.SOURCES)
    assert query.num_rows == assets.DEMO_QUERY_PER_SOURCE * len(assets.SOURCES)
    assert not [p for p in (tmp_path / "corpus").iterdir() if p.name.startswith(".")]
    mtime = train_path.stat().st_mtime_ns
    assert demo_corpus() == (train_path, query_path)
    assert train_path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_smollm2_converts_to_tied_safetensors_that_load_offline(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("DISTINF_ASSETS", str(tmp_path))
    path = assets.smollm2_dir()
    names = {p.name for p in path.iterdir()}
    assert "model.safetensors" in names and not [n for n in names if n.endswith(".bin")]
    assert "tokenizer.json" in names
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary folder left

    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert assets.smollm2_dir() == path
