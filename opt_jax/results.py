"""Atomic result store: one .npz file per key, written under a temporary name and renamed.

A key is a tuple of str/int components, e.g. ("validation_ppl", "opt-125m", 2000). The file of a
key is ROOT/<component>/.../<last>.npz, each component escaped to a safe file name. The file holds
the result's arrays plus its metadata as JSON (array "__meta__", a 0-d unicode string, readable
without pickle), so one rename publishes arrays and metadata together: after a crash a key is
either complete or absent, never half-written. Temporary files start with "." and are ignored
(opt_jax.files names them after their writer; the next write of a key removes those of writers
that are gone). A file that is not a readable result raises CorruptResultError naming it;
`move_aside` renames it to `<file>.corrupt-<UTC time>` (no longer a key) so it can be recomputed.

Only the main process writes (multi-host runs evaluate on every process; one copy of the result
is enough); every process can read.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import zipfile
import zlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from opt_jax import files
from opt_jax.errors import InputError

Key = tuple[str | int, ...]
_META = "__meta__"
_SUFFIX = ".npz"


class CorruptResultError(InputError):
  """A stored result file that cannot be read (truncated, not an .npz, metadata missing)."""

  def __init__(self, path: str, reason: str):
    self.path = path
    super().__init__(f"{path}: not a readable result ({reason})")


# What numpy, zipfile and json raise on a damaged file (not OSError: an unreadable disk is not a
# damaged result, and must not get the file moved aside).
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError)


def _is_main_process() -> bool:
  # sharding imports JAX: only a store that writes needs it, not one read by the analysis.
  from opt_jax.sharding import is_main_process  # pylint: disable=import-outside-toplevel
  return is_main_process()


def _load_file(path: str, arrays: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(arrays or {}, meta with "key") of one result file; CorruptResultError when damaged."""
  try:
    with np.load(path, allow_pickle=False) as z:
      if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError("an .npy array, not an .npz archive")
      meta = json.loads(str(z[_META]))
      if not isinstance(meta, dict) or not isinstance(meta.get("key"), list):
        raise ValueError(f"metadata without a key: {str(meta)[:100]}")
      data = {k: z[k] for k in z.files if k != _META} if arrays else {}
  except _DAMAGED as e:
    reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    raise CorruptResultError(path, reason.splitlines()[0][:200]) from None
  return data, meta


def _component(part: str | int) -> str:
  if isinstance(part, bool) or not isinstance(part, (str, int, np.integer)):
    raise TypeError(f"result key components must be str or int, got {part!r}")
  text = str(int(part)) if isinstance(part, (int, np.integer)) else part
  if not text:
    raise ValueError("result key components must be non-empty")
  # Keep readable names; escape anything a file system might mind, and a leading "." (temp files).
  escaped = urllib.parse.quote(text, safe="-_=+@,")
  return escaped.replace(".", "%2E") if escaped.startswith(".") else escaped


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (set, frozenset)):
    return sorted(value)
  raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON-serialisable")


class ResultStore:
  """Results of an experiment, one atomic file per key.

  root: directory (created on first write). writer: whether this process writes; default
  `opt_jax.sharding.is_main_process()` (process 0), evaluated lazily.
  """

  def __init__(self, root: str | os.PathLike, *, writer: bool | None = None):
    self.root = os.path.abspath(os.fspath(root))
    self._writer = writer

  @property
  def is_writer(self) -> bool:
    if self._writer is None:
      self._writer = _is_main_process()
    return self._writer

  @staticmethod
  def normalize(key: Sequence[str | int]) -> Key:
    if isinstance(key, (str, bytes)) or not key:
      raise TypeError(f"a result key is a non-empty tuple of str/int components, got {key!r}")
    return tuple(int(k) if isinstance(k, np.integer) else k for k in key)

  def path(self, key: Sequence[str | int]) -> str:
    """The file that holds `key`."""
    parts = [_component(p) for p in self.normalize(key)]
    return os.path.join(self.root, *parts[:-1], parts[-1] + _SUFFIX)

  def has(self, key: Sequence[str | int]) -> bool:
    return os.path.isfile(self.path(key))

  def write(self, key: Sequence[str | int], arrays: Mapping[str, Any],
            meta: Mapping[str, Any] | None = None) -> bool:
    """Stores `arrays` (name -> array-like) and JSON-serialisable `meta` under `key`.

    Atomic: written to a temporary file in the same directory, fsynced and renamed over the key's
    file. Returns False without writing on a process that is not the writer.
    """
    key = self.normalize(key)
    if _META in arrays:
      raise ValueError(f"array name {_META!r} is reserved for the metadata")
    meta_json = json.dumps({"key": list(key), **dict(meta or {})}, default=_json_default,
                           sort_keys=True)
    if not self.is_writer:
      return False
    with files.atomic_path(self.path(key)) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}, **{_META: np.array(meta_json)})
        f.flush()
        os.fsync(f.fileno())
    return True

  def read(self, key: Sequence[str | int]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) stored under `key`; KeyError naming the file if absent, CorruptResultError
    if the file is damaged."""
    return self._load(key, arrays=True)

  def read_meta(self, key: Sequence[str | int]) -> dict[str, Any]:
    """Only the metadata of `key` (no array is read); errors as `read`."""
    return self._load(key, arrays=False)[1]

  def _load(self, key: Sequence[str | int], arrays: bool
            ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = self.path(key)
    try:
      data, meta = _load_file(path, arrays)
    except FileNotFoundError:
      raise KeyError(f"no result for key {tuple(key)!r} in {self.root} (expected {path})") from None
    meta.pop("key", None)
    return data, meta

  def move_aside(self, key: Sequence[str | int], reason: str = "corrupt") -> str:
    """Renames the file of `key` to `<file>.<reason>-<UTC time>`, which is no longer a key (kept
    for inspection, never deleted); returns the new path. Only the writer renames (else: "")."""
    if not self.is_writer:
      return ""
    path = self.path(key)
    aside = f"{path}.{reason}-{files.utc_stamp()}"
    while os.path.lexists(aside):
      aside += "x"
    os.rename(path, aside)
    return aside

  def keys(self, prefix: Sequence[str | int] = ()) -> list[Key]:
    """Every stored key starting with `prefix`, sorted (ints sort numerically)."""
    prefix = tuple(prefix)
    start = self.root
    if prefix and os.path.isdir(os.path.join(self.root, *[_component(p) for p in prefix])):
      start = os.path.join(self.root, *[_component(p) for p in prefix])
    found = [self.path(prefix)] if prefix and self.has(prefix) else []
    found += list(self._files(start)) if os.path.isdir(start) else []
    keys = set()
    for path in found:
      key = tuple(_load_file(path, arrays=False)[1]["key"])
      if key[:len(prefix)] == prefix:
        keys.add(key)
    return sorted(keys, key=lambda k: [(isinstance(p, str), p) for p in k])

  @staticmethod
  def _files(directory: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(directory):
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      for name in filenames:
        if name.endswith(_SUFFIX) and not name.startswith("."):
          yield os.path.join(dirpath, name)

  def list(self, prefix: Sequence[str | int] = ()) -> "list[Key]":  # noqa: A003
    """Alias of `keys`."""
    return self.keys(prefix)

  def __contains__(self, key: Sequence[str | int]) -> bool:
    return self.has(key)

  def __repr__(self) -> str:
    return f"ResultStore({self.root!r})"
