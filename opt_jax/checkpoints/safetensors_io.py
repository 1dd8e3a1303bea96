"""The one safetensors reader: headers, tensors by byte range, and slices of tensors.

A .safetensors file is a u64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data
(offsets relative to its start).

  read_header       the header as stored, byte ranges included, nothing checked beyond its
                    syntax (the integrity check hashes and reports the ranges itself)
  SafetensorsFile   one file validated on open (dtypes known, every tensor's bytes inside the
                    file, so a truncated file fails before anything is read), read by positioned
                    reads: whole tensors or rows of one (conversion, the tied-head check)
  open_slices       the `safetensors` library's memory-mapped slices, for reading the box of a
                    tensor a device holds (the in-place restore, opt_jax.checkpoints.hf_format)
  header_bytes      the header of a file to write (opt_jax.convert.hf.write_hf)

Whole tensors are read here rather than through the `safetensors` library: its numpy backend
cannot return bfloat16, and its memory map would count the whole input file as resident; the
integrity check needs the raw byte ranges, which its API does not expose. Errors are
ConversionError (an InputError) naming the file and, where one is at fault, the tensor.
Numpy only: the HF-cache scan (opt_jax.hf_cache) reads headers without importing JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

from opt_jax.errors import ConversionError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Every dtype name a safetensors header may hold: bytes per element (checks of byte ranges), and
# the floating ones (weights; the rest are buffers or corrupt).
ITEMSIZE: dict[str, int] = {**{k: v.itemsize for k, v in DTYPES.items()}, "F8_E4M3": 1,
                            "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_NAMES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
MAX_HEADER_BYTES = 100 << 20


class HeaderError(ConversionError):
  """A header that cannot be parsed. `detail` is the fact alone (e.g. the length field and the
  file size), for callers that word their own report of an unreadable file."""

  def __init__(self, path: str, message: str, detail: str):
    super().__init__(f"{path}: {message}")
    self.path, self.detail = path, detail


@dataclasses.dataclass(frozen=True)
class Header:
  """A .safetensors header: tensors maps name -> (dtype, shape, begin, end), offsets relative to
  data_start; file_size is the file's size in bytes."""
  path: str
  data_start: int
  file_size: int
  tensors: dict[str, tuple[str, tuple[int, ...], int, int]]


def read_header(path: str) -> Header:
  """Parses the header without reading data. Raises HeaderError naming the file when the header
  is unreadable; byte ranges are returned as stored (SafetensorsFile checks them)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
      fact = f"header length field {n}, file size {size} bytes"
      raise HeaderError(path, f"not a valid safetensors file ({fact}): the file is truncated or "
                        "corrupt", fact)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise HeaderError(path, f"corrupt safetensors header ({e})", f"header: {e}") from None
  if not isinstance(header, dict):
    raise HeaderError(path, "corrupt safetensors header (not a JSON object)",
                      "header: not a JSON object")
  header.pop("__metadata__", None)
  tensors = {}
  for name, e in header.items():
    try:
      begin, end = (int(o) for o in e["data_offsets"])
      tensors[name] = (str(e["dtype"]), tuple(int(d) for d in e["shape"]), begin, end)
    except (KeyError, TypeError, ValueError):
      entry = f"tensor {name}: header entry {str(e)[:200]}"
      raise HeaderError(path, f"tensor {name}: corrupt or unsupported header entry "
                        f"{str(e)[:200]}", entry) from None
  return Header(path=path, data_start=8 + n, file_size=size, tensors=tensors)


class SafetensorsFile:
  """One .safetensors file, its header validated on open: every dtype known, every tensor's byte
  range the size its shape and dtype need and inside the file."""

  def __init__(self, path: str):
    self.path = path
    header = read_header(path)
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
    data_size = header.file_size - header.data_start
    for name, (dtype_name, shape, begin, end) in header.tensors.items():
      dtype = DTYPES.get(dtype_name)
      if dtype is None:
        raise ConversionError(f"{path}: tensor {name}: corrupt or unsupported header entry "
                              f"(dtype {dtype_name[:50]})")
      if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise ConversionError(f"{path}: tensor {name}: header byte range {begin}..{end} does not "
                              f"fit shape {shape} of {dtype_name}: the file is corrupt")
      if end > data_size:
        raise ConversionError(f"{path}: tensor {name} needs bytes {begin}..{end} of the data but "
                              f"the file holds only {data_size}: the file is truncated")
      self._entries[name] = (dtype, shape, header.data_start + begin)

  def names(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def read(self, name: str) -> np.ndarray:
    dtype, shape, offset = self._entries[name]
    return self._read_into(name, np.empty(shape, dtype), offset)

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows start:stop (of the first dimension) of a tensor, read alone."""
    dtype, shape, offset = self._entries[name]
    out = np.empty((stop - start,) + shape[1:], dtype)
    return self._read_into(name, out, offset + start * out[:1].nbytes)

  def _read_into(self, name: str, out: np.ndarray, offset: int) -> np.ndarray:
    with open(self.path, "rb") as f:
      f.seek(offset)
      got = f.readinto(out.reshape(-1).view(np.uint8))
    if got != out.nbytes:
      raise ConversionError(f"{self.path}: tensor {name}: read {got} of {out.nbytes} bytes: the "
                            "file is truncated")
    return out


def open_slices(path: str) -> Any:
  """The `safetensors` library's reader of `path` (a context manager; `.get_slice(name)[box]`
  reads one box of a tensor from the memory-mapped file)."""
  return safe_open(path, framework="np")


def header_bytes(entries: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
  """The JSON header of a file holding `entries` (name, shape, dtype) in order, padded so the
  data starts 8-byte aligned (the u64 length field that precedes it is the caller's)."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype in entries:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  return blob + b" " * (-len(blob) % 8)
