"""The fingerprint of a tokenised dataset, which the run directory keeps to tell one job's inputs
from another's."""

from __future__ import annotations

import hashlib

from distinf.inputs.tokenizing import Tokenized


def fingerprint(data: Tokenized) -> str:
    """sha256 over the ids and every example's tensors: equal inputs, equal fingerprints."""
    digest = hashlib.sha256()
    for example_id, example in zip(data.ids, data.examples):
        digest.update(f"{example_id}\0".encode())
        for name in sorted(example):
            digest.update(name.encode())
            digest.update(example[name].numpy().astype("<i8").tobytes())
    return digest.hexdigest()
