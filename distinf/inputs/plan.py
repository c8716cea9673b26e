"""A job's inputs: its train and query sets, read and tokenised a batch of rows at a time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from distinf.config import JobConfig
from distinf.inputs.checks import Rejection
from distinf.inputs.readers import read_files
from distinf.inputs.tokenizing import Tokenized, tokenize
from distinf.models import load_tokenizer


@dataclass
class Plan:
    """A job's train and query sets, read and tokenised (None where the job does not read one)."""

    train: Tokenized | None
    queries: Tokenized | None
    pad_token_id: int
    stored_train: int = 0
    """Rows of the training file left out because the run already holds their ids (an append)."""

    def split(self, name: str) -> Tokenized:
        return self.train if name == "train" else self.queries


def plan_job(cfg: JobConfig, splits: tuple[str, ...] = ("train", "queries"),
             stored_train_ids: set[str] | frozenset = frozenset()) -> Plan:
    """Read and tokenise the train and query sets (those in `splits`), a batch of rows at a time
    (`read_files`); ids are checked unique per set.

    With data.on_bad_row: skip, bad rows are left out and listed in each set's `rejected`. Training
    rows whose ids are in `stored_train_ids` (an append: the run holds them already) are left out
    before tokenising, and so are their rejections.
    """
    tokenizer = load_tokenizer(cfg.model)
    num_labels = None
    if cfg.model.task == "sequence_classification":
        from transformers import AutoConfig

        num_labels = AutoConfig.from_pretrained(cfg.model.path, local_files_only=True,
                                                trust_remote_code=cfg.model.trust_remote_code).num_labels
    sets: dict[str, Tokenized | None] = {"train": None, "queries": None}
    stored = [0]
    for role, dataset in (("train", cfg.data.train), ("queries", cfg.data.queries)):
        if role not in splits:
            continue
        read: list[Rejection] = []

        def tables(role=role, dataset=dataset, read=read) -> Iterator[pa.Table]:
            """Each batch's rows as they are read, less those an append's run holds already."""
            for table, rejected in read_files(dataset, role, cfg.data.on_bad_row):
                if role == "train" and stored_train_ids:
                    known = pa.array([i in stored_train_ids for i in table.column("example_id").to_pylist()],
                                     pa.bool_())
                    stored[0] += sum(known.to_pylist())
                    table = table.filter(pc.invert(known))
                    rejected = [r for r in rejected if r.example_id not in stored_train_ids]
                read.extend(rejected)
                yield table

        sets[role] = tokenize(tables(), tokenizer, cfg.data.max_length, cfg.model.task, num_labels=num_labels,
                              role=role, on_bad_row=cfg.data.on_bad_row)
        sets[role].rejected = sorted(read + sets[role].rejected, key=lambda r: (r.file or "", r.row))
    return Plan(sets["train"], sets["queries"], tokenizer.pad_token_id, stored[0])
