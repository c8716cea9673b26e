"""hessian.method kfac / kfac_mix in the job: the Kronecker factor sums of each committed chunk.

A worker sums A_C and G_R (distinf.core.kfac.FactorSums) over the rows of a train chunk it commits,
and only those: a batch's padding slots run real examples, and with data.on_bad_row: skip a row
may be left out after its batch ran, so the capture is handed a `ChunkFactors`, which masks each
step's rows. The sums are committed with the chunk, as safetensors beside its Parquet file
(`factor_arrays`); the reducer adds every chunk's (`read_factor_sums`, `add_factor_sums`), in any
order, and builds from the total exactly what distinf.attribute builds from its FactorSums.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from distinf.core.index_set import Columns
from distinf.core.kfac import FactorSums, TensorFactors
from distinf.core.tracking import ModuleUse

_SUMS = ("input_sum", "output_sum", "tokens")
_INDICES = ("input_of_entry", "output_of_entry", "output_index", "input_index")


def plans_only(sums: FactorSums) -> FactorSums:
    """`sums` with its sum tensors on the meta device: the template a worker keeps for the whole
    pass holds the index plans only, not a second set of sums the size of a chunk's."""
    return _with_sums(sums, lambda f: f.input_sum.to("meta"), lambda f: f.output_sum.to("meta"))


def zeroed(template: FactorSums) -> FactorSums:
    """Empty sums (float64, on the CPU) of the same tensors as `template`, sharing its (read-only)
    index plans."""
    return _with_sums(template, lambda f: torch.zeros(f.input_sum.shape, dtype=f.input_sum.dtype),
                      lambda f: torch.zeros(f.output_sum.shape, dtype=f.output_sum.dtype))


def _with_sums(template: FactorSums, input_sum, output_sum) -> FactorSums:
    sums = FactorSums.__new__(FactorSums)
    sums.__dict__.update(template.__dict__)
    sums.tensors = {name: replace(f, input_sum=input_sum(f), output_sum=output_sum(f), tokens=0.0)
                    for name, f in template.tensors.items()}
    sums.count = 0
    return sums


class ChunkFactors:
    """What a worker's capture sums the factors into during one chunk: only the rows it commits.

    Call `start_step(live)` before each batch runs (live[i]: slot i is a real example, not a
    padding slot) and `commit_step(rows)` after it (the slots whose rows are committed). With
    `per_row` (rows may be left out after the batch ran) each live slot is summed on its own and
    only the committed ones are added; without it every live slot is committed (a bad row stops
    the job), so one masked sum per step suffices.
    """

    def __init__(self, template: FactorSums, per_row: bool):
        self.template, self.per_row = template, per_row
        self.chunk = zeroed(template)
        self._live: Tensor | None = None
        self._rows: dict[int, FactorSums] = {}

    def start_step(self, live: list[bool]) -> None:
        self._live = torch.tensor(live, dtype=torch.bool)
        self._rows = {i: zeroed(self.template) for i, is_live in enumerate(live) if is_live} if self.per_row else {}

    def add(self, use: ModuleUse, kept: Any, grad_output: Tensor) -> None:
        if not self.per_row:
            self.chunk.add(use, kept, grad_output, rows=self._live)
            return
        for i, sums in self._rows.items():
            only = torch.zeros_like(self._live)
            only[i] = True
            sums.add(use, kept, grad_output, rows=only)

    def add_examples(self, n: int) -> None:
        """The capture's count of a batch's rows; the committed ones are counted in commit_step."""

    def commit_step(self, rows: list[int]) -> None:
        for i in rows:
            if self.per_row:
                self.chunk.merge(self._rows[i])
            elif not bool(self._live[i]):
                raise ValueError(f"slot {i} of the step is a padding slot, not a row to commit")
        self.chunk.count += len(rows)
        self._rows = {}


def factor_arrays(sums: FactorSums) -> dict[str, np.ndarray]:
    """A FactorSums as named arrays ("{tensor}/{field}", and "count"), for a safetensors file."""
    arrays = {"count": np.array([sums.count], dtype=np.int64)}
    for name, f in sums.tensors.items():
        for field in _SUMS + _INDICES:
            value = getattr(f, field)
            if value is None:
                continue
            arrays[f"{name}/{field}"] = (np.array([value], dtype=np.float64) if field == "tokens"
                                         else value.numpy())
    return arrays


def _columns(index_table: pa.Table) -> Columns:
    """The index set's columns per tensor, from its stored table (a tensor's rows are contiguous)."""
    params = index_table.column("param").to_pylist()
    columns = Columns()
    columns.names = tuple(dict.fromkeys(params))
    columns.sizes = [params.count(name) for name in columns.names]
    return columns


def read_factor_sums(arrays: dict[str, np.ndarray], index_table: pa.Table, where: str) -> FactorSums:
    """FactorSums from a chunk's arrays, over the run's index set; tensors not in the file take the
    Gram (gram_fallback), as they did in the worker. `where` names the file in errors."""
    fields: dict[str, dict[str, Tensor]] = {}
    for key, value in arrays.items():
        if key == "count":
            continue
        name, _, field = key.rpartition("/")
        if field not in _SUMS + _INDICES:
            raise ValueError(f"{where}: unknown array {key!r}")
        fields.setdefault(name, {})[field] = torch.from_numpy(np.array(value))
    if "count" not in arrays:
        raise ValueError(f"{where}: no 'count' array")
    columns = _columns(index_table)
    unknown = set(fields) - set(columns.names)
    if unknown:
        raise ValueError(f"{where}: factors of tensors the index set does not hold: {sorted(unknown)[:5]}")
    sums = FactorSums.__new__(FactorSums)
    sums.index_set = columns
    sums.tensors = {name: TensorFactors(**{**fields[name], "tokens": float(fields[name]["tokens"][0])})
                    for name in columns.names if name in fields}  # index-set order, as the worker's
    sums.gram_fallback = [name for name in columns.names if name not in sums.tensors]
    sums._modules = {}
    sums.count = int(arrays["count"][0])
    return sums


def add_factor_sums(total: FactorSums | None, part: FactorSums, where: str) -> FactorSums:
    """total + part (total None: part); both must be of the same tensors and kept entries."""
    if total is None:
        return part
    if set(total.tensors) != set(part.tensors):
        raise ValueError(f"{where}: factors of other tensors than the other chunks'")
    for name, f in total.tensors.items():
        other = part.tensors[name]
        if not all(torch.equal(getattr(f, field), getattr(other, field)) for field in _INDICES[:3]):
            raise ValueError(f"{where}: {name}: factors of other kept entries than the other chunks'")
    return total.merge(part)
