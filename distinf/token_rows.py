"""Tokenised examples held as a few flat arrays instead of one dict of tensors per example.

A tokenised split is the largest thing the driver holds and ships to the workers. As per-example
dicts it costs two int64 tensors (input_ids, attention_mask: 16 bytes a token) plus a few hundred
bytes of Python and tensor objects an example, and pickling it for a worker walks every one of
them. Here it is one int32 buffer of every example's tokens with their offsets (4 bytes a token),
a bit mask of the tokens that carry the loss for masked causal_lm, and one label an example for
classification: a rank's share is a handful of numpy arrays that Ray passes without copying.

Indexing gives back exactly the dict the rest of distinf takes (int64 input_ids and an all-ones
attention_mask, labels where there are some), so `collate`, `distinf.attribute` and the worker
read `TokenRows` as they read a list of dicts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from distinf.core.tasks import IGNORE_INDEX


class TokenRows(Sequence):
    """A sequence of tokenised examples stored flat; `rows[i]` is example i's dict of tensors."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, loss_mask: np.ndarray | None = None,
                 labels: np.ndarray | None = None):
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        """len + 1 entries: example i's tokens are tokens[offsets[i]:offsets[i + 1]]."""
        self.loss_mask = None if loss_mask is None else np.ascontiguousarray(loss_mask, dtype=bool)
        """Per token, whether it carries the loss (masked causal_lm: labels = input_ids there, -100 elsewhere)."""
        self.labels = None if labels is None else np.ascontiguousarray(labels, dtype=np.int64)
        """One class label an example (sequence_classification)."""
        if self.offsets.ndim != 1 or len(self.offsets) == 0 or self.offsets[-1] != len(self.tokens):
            raise ValueError("TokenRows: offsets must run from 0 to the number of tokens")

    @classmethod
    def empty(cls) -> TokenRows:
        return cls(np.zeros(0, np.int32), np.zeros(1, np.int64))

    @classmethod
    def concat(cls, parts: Sequence[TokenRows]) -> TokenRows:
        """The examples of `parts`, one after another (all masked, all labelled, or none)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        starts = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, starts)])
        masks = [p.loss_mask for p in parts]
        labels = [p.labels for p in parts]
        return cls(np.concatenate([p.tokens for p in parts]), offsets,
                   None if masks[0] is None else np.concatenate(masks),
                   None if labels[0] is None else np.concatenate(labels))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"TokenRows: example {index} of {len(self)}")
        start, stop = self.offsets[index], self.offsets[index + 1]
        input_ids = torch.from_numpy(self.tokens[start:stop].astype(np.int64))
        example = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if self.loss_mask is not None:
            # torch.tensor copies: a share from the object store is a read-only buffer.
            example["labels"] = input_ids.masked_fill(~torch.tensor(self.loss_mask[start:stop]), IGNORE_INDEX)
        elif self.labels is not None:
            example["labels"] = torch.tensor(self.labels[index])
        return example

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self[i] for i in range(len(self)))

    def take(self, indices: Sequence[int]) -> TokenRows:
        """The examples at `indices`, in that order, as their own compact TokenRows."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        starts, stops = self.offsets[indices], self.offsets[indices + 1]
        lengths = stops - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        # Every kept token's position in the flat buffer, without a Python loop over examples.
        positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return TokenRows(self.tokens[positions], offsets,
                         None if self.loss_mask is None else self.loss_mask[positions],
                         None if self.labels is None else self.labels[indices])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.tokens, self.offsets, self.loss_mask, self.labels) if a is not None)


class TokenRowsBuilder:
    """Collects examples one at a time (as `tokenize` produces them) into a TokenRows."""

    def __init__(self) -> None:
        self._tokens: list[list[int]] = []
        self._masks: list[list[bool]] = []
        self._labels: list[int] = []
        self._parts: list[TokenRows] = []

    def add(self, input_ids: list[int], loss_mask: list[bool] | None = None, label: int | None = None) -> None:
        self._tokens.append(input_ids)
        if loss_mask is not None:
            self._masks.append(loss_mask)
        if label is not None:
            self._labels.append(label)
        if len(self._tokens) >= 4096:  # a Python list of token lists costs ~9x the flat int32 buffer
            self._flush()

    def _flush(self) -> None:
        if not self._tokens:
            return
        lengths = [len(t) for t in self._tokens]
        flat = [token for tokens in self._tokens for token in tokens]
        masks = [bit for mask in self._masks for bit in mask]
        self._parts.append(TokenRows(np.asarray(flat, np.int32).reshape(-1), np.concatenate([[0], np.cumsum(lengths)]),
                                     np.asarray(masks, bool) if self._masks else None,
                                     np.asarray(self._labels, np.int64) if self._labels else None))
        self._tokens, self._masks, self._labels = [], [], []

    def build(self) -> TokenRows:
        self._flush()
        rows, self._parts = TokenRows.concat(self._parts), []
        return rows
