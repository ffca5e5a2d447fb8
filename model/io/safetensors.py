"""safetensors read and written here, for every dtype DeepSeek's release uses (FP8 E4M3 included, which the
`safetensors` package's numpy API does not know).

The format: an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}, then the tensors' bytes, offsets counted from the end of the header. A
tensor is returned as a read-only memory map of its bytes: nothing is read until it is used, so a directory of
shards is walked tensor by tensor with memory bounded by what the caller keeps. A release directory maps names to
shards through `model.safetensors.index.json` ({"weight_map": {name: file}}); without one, every *.safetensors
file's header is read.

Every inconsistency is a CheckpointError naming the file and the tensor: an unknown dtype, a shape that does not
match its byte range, a byte range past the end of the file (a truncated shard), an index naming a missing file
or a tensor its shard does not hold.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from model.io.errors import CheckpointError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


class SafetensorsFile:
    """One .safetensors file: its header read and checked at once, each tensor memory-mapped on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                if n > size - 8:
                    raise CheckpointError(f"{self.path}: header of {n} bytes runs past the end of the file "
                                          f"({size} bytes): truncated or not a safetensors file")
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has dtype {e.get('dtype')!r}, not one of "
                                      f"{sorted(DTYPES)}")
            dtype, shape = np.dtype(DTYPES[e["dtype"]]), tuple(e["shape"])
            begin, end = e["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(f"{self.path}: tensor {name} {e['dtype']} {list(shape)} needs "
                                      f"{math.prod(shape) * dtype.itemsize} bytes, its range holds {end - begin}")
            if self.data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor {name} ends at byte {self.data_start + end}, past the "
                                      f"end of the file ({size} bytes): the shard is truncated")
            self.entries[name] = (dtype, shape, begin, end)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map (a zero-size tensor as an empty array)."""
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=shape)


class TensorDirectory(Mapping):
    """The tensors of a checkpoint directory by name, across its shards (a read-only mapping: `d[name]` is a memory
    map; `shape`, `dtype` and `nbytes` read nothing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
            for name, file in weight_map.items():
                if file not in files:
                    if not (self.path / file).is_file():
                        raise CheckpointError(f"{index} maps {name} to {file}, which is not in {self.path}")
                    files[file] = SafetensorsFile(self.path / file)
                if name not in files[file]:
                    raise CheckpointError(f"{index} maps {name} to {file}, which does not hold it")
                self.where[name] = files[file]
        else:
            for f in sorted(self.path.glob("*.safetensors")):
                sf = SafetensorsFile(f)
                for name in sf.keys():
                    self.where[name] = sf
        if not self.where:
            raise CheckpointError(f"{self.path} holds no *.safetensors files")

    def __getitem__(self, name: str) -> np.ndarray:
        return self.where[name].get(name)

    def __contains__(self, name) -> bool:  # Mapping's default would map the tensor to find out
        return name in self.where

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self.where[name].dtype(name)

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * self.dtype(name).itemsize


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write tensors (any dtype of DTYPES, FP8 included) to one .safetensors file."""
    header, offset = {}, 0
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for name, a in arrays.items():
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    # written beside and renamed into place: a reader's memory maps of the old file stay valid, and an interrupted
    # write leaves no half file under the final name
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.tobytes())
    os.replace(tmp, path)
