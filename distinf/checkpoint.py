"""A Hugging Face safetensors checkpoint folder read one flat range of one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the raw row-major bytes. So elements [start, stop) of a tensor's
flattening are one contiguous byte range, read with a seek and a read: a ZeRO-3 rank loads its
own partition of every weight without mapping or materialising the rest of the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from distinf.models import ModelError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ModelError):
    pass


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Byte position of the tensor's first element in the file."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


MAX_HEADER_BYTES = 100 << 20
"""safetensors' own readers refuse a longer header: a sane JSON index of tensors is far smaller."""


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors one safetensors file holds, by name; CheckpointError for a file that is not a
    well-formed safetensors file: a header longer than the file or than MAX_HEADER_BYTES, not a JSON
    object of entries with a known dtype, a shape of non-negative integers and byte ranges that
    match the shapes and tile the data, in order, from its start to the end of the file."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"'{file}': not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"'{file}': not a safetensors file (a header of {length:,} bytes in a file of "
                                  f"{size:,}; at most {MAX_HEADER_BYTES:,} are allowed)")
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise CheckpointError(f"'{file}': unreadable safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"'{file}': the safetensors header is a JSON {type(header).__name__}, not an object")
    tensors, ranges = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _stored(file, name, entry, 8 + length)
        ranges.append((entry["data_offsets"][0], entry["data_offsets"][1], name))
    end = 0
    for start, stop, name in sorted(ranges):
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves bytes {end}:{start} unused"
            raise CheckpointError(f"'{file}': tensor '{name}' at bytes {start}:{stop} {what}; the file is damaged")
        end = stop
    if 8 + length + end != size:
        raise CheckpointError(f"'{file}': its tensors end at byte {8 + length + end:,} but the file has "
                              f"{size:,} bytes; the file is truncated or damaged")
    return tensors


def _stored(file: Path, name: str, entry: object, data_start: int) -> StoredTensor:
    """One header entry, checked: its dtype, shape and byte range [start, stop) within the data."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"'{file}': tensor '{name}' {why}; the file is damaged")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise bad("has no dtype, shape and data_offsets in the header")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"'{file}': tensor '{name}' has dtype {dtype}, which distinf cannot read")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has the shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has the byte range {offsets!r}, not [start, stop] with 0 <= start <= stop")
    stored = StoredTensor(file, DTYPES[dtype], tuple(shape), data_start + offsets[0])
    if offsets[1] - offsets[0] != stored.numel * stored.dtype.itemsize:
        raise bad(f"spans {offsets[1] - offsets[0]} bytes, not its shape's")
    return stored


class Checkpoint:
    """Every tensor of a model folder's *.safetensors files (one file, or a sharded set)."""

    def __init__(self, folder: str | Path):
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"'{folder}' has no .safetensors files")
        self.tensors: dict[str, StoredTensor] = {}
        for file in files:
            for name, stored in read_header(file).items():
                if name in self.tensors:
                    raise CheckpointError(f"'{folder}': tensor '{name}' is in both {self.tensors[name].file.name} "
                                          f"and {file.name}")
                self.tensors[name] = stored

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the named tensor's row-major flattening, in its stored dtype."""
        stored = self.tensors[name]
        stop = stored.numel if stop is None else stop
        if not 0 <= start <= stop <= stored.numel:
            raise CheckpointError(f"'{stored.file}': range {start}:{stop} is outside tensor '{name}' "
                                  f"of {stored.numel} elements")
        size = stored.dtype.itemsize
        out = torch.empty(stop - start, dtype=stored.dtype)
        view = memoryview(out.view(torch.uint8).numpy()) if stop > start else memoryview(b"")
        with stored.file.open("rb", buffering=0) as handle:
            handle.seek(stored.offset + start * size)
            got = 0
            while got < len(view):
                n = handle.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"'{stored.file}': truncated inside tensor '{name}'")
                got += n
        return out
