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


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors one safetensors file holds, by name."""
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"'{file}': not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise CheckpointError(f"'{file}': unreadable safetensors header ({error})") from None
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"'{file}': tensor '{name}' has dtype {entry['dtype']}, which distinf cannot read")
        start, stop = entry["data_offsets"]
        stored = StoredTensor(file, DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + length + start)
        if stop - start != stored.numel * stored.dtype.itemsize:
            raise CheckpointError(f"'{file}': tensor '{name}' spans {stop - start} bytes, not its shape's")
        tensors[name] = stored
    return tensors


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
