"""Atomic file writes: everything goes to a hidden temporary sibling first, then os.replace.

A crash (or kill -9) never leaves a half-written file under the final name: readers see the old
file or the new one. The temporary name keeps the extension (`.tmp-<pid>-name.png`), so writers
that infer a format from it (matplotlib, numpy) work unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path to write; on success it replaces `path`, on error it is removed.

  Creates the parent folder if needed.
  """
  path = os.fspath(path)
  parent = os.path.dirname(path) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".tmp-{os.getpid()}-{os.path.basename(path)}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def sha256_file(path: str | os.PathLike) -> str:
  """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def write_text(path: str | os.PathLike, data: str | bytes) -> str:
  """Writes text (UTF-8) or bytes atomically; returns the path."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
  return os.fspath(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> str:
  """JSON (values it cannot encode written as str) plus a newline, atomically; returns the path."""
  return write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def write_csv(frame: Any, path: str | os.PathLike, float_format: str | None = None) -> str:
  """A pandas DataFrame as CSV without its index, atomically; returns the path."""
  with atomic_path(path) as tmp:
    frame.to_csv(tmp, index=False, float_format=float_format)
  return os.fspath(path)


def user_cache_dir(*parts: str) -> str:
  """$XDG_CACHE_HOME/opt_jax/<parts> (~/.cache/opt_jax/... when XDG_CACHE_HOME is unset): where
  downloads and the compilation cache live between runs."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "opt_jax", *parts)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[str]:
  """Yields a hidden temporary sibling folder to fill; when the block completes it becomes
  `path`, when it raises it is removed (so a failure leaves nothing that looks complete).

  An existing `path` is an error unless replace=True: then it is renamed aside, the new folder
  renamed into place, and the old one removed. Only for folders this tool owns (a cache it fills).
  """
  import shutil  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel

  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path) and not replace:
    raise FileExistsError(f"{path} already exists")
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    yield tmp
    if os.path.lexists(path):
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rename(path, os.path.join(old, name))
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def check_output(path: str | os.PathLike, *, folder: bool, what: str) -> str:
  """The absolute path of an output to be written later, checked now (nothing is created): a
  folder output must not be a file, a file output must not be a folder, and the nearest existing
  folder above it must be writable. Raises opt_jax.errors.InputError naming `what` (a flag)."""
  from opt_jax.errors import InputError  # pylint: disable=import-outside-toplevel

  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if folder and os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"{what}={path} is a file; expected a folder (it is created if absent)")
  if not folder and os.path.isdir(path):
    raise InputError(f"{what}={path} is a folder; expected the path of a file to write")
  existing = path if folder and os.path.isdir(path) else os.path.dirname(path)
  while not os.path.isdir(existing):
    if os.path.exists(existing):
      raise InputError(f"{what}={path}: {existing} is a file, so no folder can be created there")
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK | os.X_OK):
    raise InputError(f"{what}={path}: cannot write into {existing} (permission denied)")
  return path
