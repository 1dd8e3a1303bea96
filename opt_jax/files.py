"""Atomic writes: everything goes to a hidden temporary sibling first, then os.replace / rename.

A crash (or kill -9) never leaves a half-written file or folder under the final name: readers see
the old one or the new one. Temporaries are named after their final name and their writer,

  .NAME.tmp-PID.START@HOST-RAND[.EXT]      (START: the writer's start time, so a reused pid is
                                            not taken for the writer; HOST: host name and pid
                                            namespace)

so that the next write of NAME can tell which temporaries were left by a writer that is gone (a
killed conversion leaves one nearly the size of the model) and remove them, and never touches one
whose writer may still be running (alive on this host, or on another host). A file temporary
keeps NAME's extension at its end: writers that infer a format from it (matplotlib, numpy) work
unchanged. Files and folders are created with the default modes, so the user's umask applies.

A write that fails because the disk (or quota) is full, however deep in a library it happened
(orbax's RESOURCE_EXHAUSTED naming ENOSPC, matplotlib's broken stream, a numpy write), leaves no
temporary and is raised as one DiskFullError naming the output and the free space
(`disk_full_cause`), which the binaries print as one `error:` line.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

from opt_jax.checkpoints import layout
from opt_jax.errors import MissingFileError, OutputExistsError, UserError

log = logging.getLogger(__name__)


def _host() -> str:
  """This machine's name plus the id of its pid namespace: processes of two containers that share
  a host name and a file system must not take each other's pids for their own."""
  name = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"
  try:
    return f"{name}.{os.stat('/proc/self/ns/pid').st_ino}"
  except OSError:
    return name


_HOST = _host()
_TMP, _OLD = "tmp", "old"   # a temporary being filled; a previous version moved aside


def _start_ticks(pid: int) -> int:
  """Start time of process `pid` in clock ticks since boot (Linux /proc); 0 where unknown."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      stat = f.read()
    # Field 22; the command name (field 2) may hold spaces, so count after its closing ')'.
    return int(stat[stat.rindex(b")") + 2:].split()[19])
  except (OSError, ValueError, IndexError):
    return 0


def process_tag() -> str:
  """'PID.START@HOST' of this process: what temporaries and run manifests record of their writer."""
  pid = os.getpid()
  return f"{pid}.{_start_ticks(pid)}@{_HOST}"


def writer_is_gone(tag: str) -> bool:
  """True only when the process of `tag` (from process_tag) has certainly ended: it ran on this
  host and no process with its pid and start time exists. False for other hosts (unknowable)."""
  m = re.fullmatch(r"(\d+)\.(\d+)@(.+)", tag)
  if not m or m.group(3) != _HOST:
    return False
  pid, start = int(m.group(1)), int(m.group(2))
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    pass  # it exists, under another user
  now = _start_ticks(pid)
  return bool(start and now and now != start)  # the pid was reused by a later process


def utc_stamp() -> str:
  """'20250101T120000Z': the current UTC time, for names of files moved aside."""
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _suffix(name: str) -> str:
  ext = os.path.splitext(name)[1]
  return ext if ext != name else ""


def temporary_sibling(path: str | os.PathLike, kind: str = _TMP, suffix: str = "") -> str:
  """A fresh hidden name beside `path` that names this process (see the module docstring)."""
  parent, name = os.path.split(os.fspath(path))
  return os.path.join(parent, f".{name}.{kind}-{process_tag()}-{secrets.token_hex(4)}{suffix}")


def _temporaries_of(path: str) -> list[tuple[str, str, str]]:
  """(path, kind, writer tag) of every temporary of `path` in its folder."""
  parent, name = os.path.split(path)
  pattern = re.compile(rf"\.{re.escape(name)}\.({_TMP}|{_OLD})-(\d+\.\d+@[A-Za-z0-9._-]+?)"
                       rf"-[0-9a-f]{{8}}(?:{re.escape(_suffix(name))})?")
  try:
    entries = os.listdir(parent or ".")
  except FileNotFoundError:
    return []
  found = []
  for entry in sorted(entries):
    m = pattern.fullmatch(entry)
    if m:
      found.append((os.path.join(parent, entry), m.group(1), m.group(2)))
  return found


class DiskFullError(UserError, OSError):
  """An output could not be written: no space left on its device (or over quota)."""


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Words of wrapped errors (tensorstore's RESOURCE_EXHAUSTED carries the OS message; its other
# RESOURCE_EXHAUSTED errors, e.g. device memory, are not about disks).
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")


def disk_full_cause(error: BaseException | None) -> BaseException | None:
  """The exception in `error`'s chain (itself, its cause or context) saying the disk or quota is
  full, None if there is none: libraries wrap ENOSPC in their own errors (tensorstore's
  RESOURCE_EXHAUSTED, matplotlib's AttributeError raised while handling it)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, DiskFullError):
      return error
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
      return error
    if not isinstance(error, UserError) and any(w in str(error) for w in _FULL_WORDS):
      return error
    error = error.__cause__ or error.__context__
  return None


def format_bytes(n: float) -> str:
  for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} bytes"  # unreachable


def free_bytes(path: str | os.PathLike) -> int | None:
  """Free space (for this user) on the file system of `path` or its nearest existing parent."""
  path = os.path.abspath(os.fspath(path))
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def disk_full_error(path: str | os.PathLike, needed: int | None = None) -> DiskFullError:
  """The one-line error for an output `path` that did not fit (what was written is removed)."""
  free = free_bytes(path)
  where = f"{format_bytes(free)} free there" if free is not None else "free space unknown"
  need = f", about {format_bytes(needed)} needed" if needed else ""
  error = DiskFullError(f"no space left on the device of {os.fspath(path)} ({where}{need}; "
                        "the partial output was removed): free some space or write the output "
                        "elsewhere")
  error.errno = errno.ENOSPC
  return error


def check_free_space(path: str | os.PathLike, needed: int) -> None:
  """DiskFullError before anything is written when the file system of `path` (or its nearest
  existing parent) has less than `needed` bytes free."""
  free = free_bytes(path)
  if free is not None and free < needed:
    raise disk_full_error(path, needed)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  else:
    os.remove(path)


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
  """Removes the temporaries of `path` left by interrupted writers (gone, on this host); says so.

  A previous version moved aside by an interrupted replace (`.NAME.old-...`) is renamed back to
  `path` when `path` is missing (the writer died between its two renames), else removed. Returns
  what was removed. Temporaries of writers that may be alive are left, with a warning for other
  hosts' (this host cannot tell whether they are still running).
  """
  path = os.path.abspath(os.fspath(path))
  removed = []
  for tmp, kind, tag in _temporaries_of(path):
    if not writer_is_gone(tag):
      if not tag.endswith("@" + _HOST):
        log.warning("left %s: written by process %s on another host, which may still be running; "
                    "delete it by hand if not", tmp, tag)
      continue
    if kind == _OLD and not os.path.lexists(path):
      os.rename(tmp, path)
      log.warning("restored %s from %s, moved aside by an interrupted run (process %s)", path, tmp,
                  tag)
      continue
    _remove(tmp)
    removed.append(tmp)
    log.warning("removed %s, left by an interrupted run (process %s)", tmp, tag)
  return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path to write; on success it replaces `path`, on error it is removed.

  Creates the parent folder if needed and first removes temporaries of `path` left by
  interrupted writers.
  """
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  remove_stale_temporaries(path)
  tmp = temporary_sibling(path, suffix=_suffix(os.path.basename(path)))
  try:
    yield tmp
    os.replace(tmp, path)
  except Exception as e:
    if os.path.lexists(tmp):
      _remove(tmp)
    if disk_full_cause(e) is not None and not isinstance(e, DiskFullError):
      raise disk_full_error(path) from e
    raise
  finally:
    if os.path.lexists(tmp):
      _remove(tmp)


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *,
                     may_replace: Callable[[str], None] | None = None) -> Iterator[str]:
  """Yields a new hidden sibling folder of `directory` to fill; renames it to `directory` when the
  block completes, removes it when the block raises (a failure leaves nothing behind).

  An existing `directory` is an OutputExistsError unless `may_replace` is given: it is called on
  the existing directory before anything is written and again just before the replace, and
  raises (OutputExistsError naming what is in the way) unless the directory may be deleted. The
  old directory is moved aside, the new one renamed into place, then the old one is deleted, so
  `directory` is never a mix of the two. Temporaries of interrupted writers are removed first.
  """
  directory = os.path.abspath(os.fspath(directory))
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  remove_stale_temporaries(directory)   # first: it may put back a version moved aside
  check = may_replace or _refuse_existing
  if os.path.lexists(directory):
    check(directory)
  tmp = temporary_sibling(directory)
  os.mkdir(tmp)
  try:
    yield tmp
    if os.path.lexists(directory):
      check(directory)
      old = temporary_sibling(directory, _OLD)
      os.rename(directory, old)
      os.rename(tmp, directory)
      try:
        _remove(old)
      except OSError as e:  # the new directory is in place; a later write removes `old`
        log.warning("could not remove %s (the previous %s): %s", old, directory, e)
    else:
      os.rename(tmp, directory)
  except BaseException as e:
    _remove_until_gone(tmp)
    if (isinstance(e, Exception) and not isinstance(e, DiskFullError)
        and disk_full_cause(e) is not None):
      raise disk_full_error(directory) from e
    raise


def _remove_until_gone(path: str, seconds: float = 5.0) -> None:
  """Removes the folder `path`, again while something still writes into it: a library's worker
  threads (orbax's) may go on creating files for a moment after the error that stopped the
  write. Whatever is still there at exit is removed then."""
  deadline = time.monotonic() + seconds
  while os.path.lexists(path):
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path) or time.monotonic() > deadline:
      break
    time.sleep(0.05)
  time.sleep(0.05)   # a last file created after the rmtree: once more
  if os.path.lexists(path):
    shutil.rmtree(path, ignore_errors=True)
  if os.path.lexists(path):
    atexit.register(shutil.rmtree, path, True)


def _refuse_existing(directory: str) -> None:
  raise OutputExistsError(f"{directory} already exists")


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


def conflict_with_inputs(path: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                         what: str) -> str | None:
  """Why writing the output `path` would overwrite one of `inputs` ({flag: path}), None if it
  would not: it is an input (also through a symlink), or lies inside an input folder, or holds
  one (replacing a folder deletes what is in it). Paths are compared after resolving links."""
  real = os.path.realpath(os.path.expanduser(os.fspath(path)))
  for flag, given in inputs.items():
    if given is None:
      continue
    source = os.path.realpath(os.path.expanduser(os.fspath(given)))
    shown = f"{what}={os.fspath(path)}"
    link = f" (through the link {os.fspath(path)})" if real != os.path.abspath(path) else ""
    if real == source:
      return f"{shown} is the input {flag}={os.fspath(given)}{link}; give a new output path"
    if os.path.commonpath([real, source]) == source:
      return (f"{shown} lies inside the input {flag}={os.fspath(given)}{link}; write the output "
              "elsewhere")
    if os.path.commonpath([real, source]) == real:
      return (f"{shown} holds the input {flag}={os.fspath(given)}{link}; give a new output "
              "path")
  return None


def check_new_output(path: str | os.PathLike, *, what: str,
                     inputs: Mapping[str, str | os.PathLike | None], overwrite: bool,
                     ours: Callable[[str], bool], owner: str,
                     overwrite_flag: str = "--overwrite") -> str:
  """The absolute path of a file output, checked before any work: `check_output`, then never one
  of `inputs` (or inside or around one: `conflict_with_inputs`), and an existing file only with
  `overwrite` and only when `ours(path)` recognises it as an earlier output of `owner`. Raises
  OutputExistsError / InputError naming the conflict."""
  path = check_output(path, folder=False, what=what)
  conflict = conflict_with_inputs(path, inputs, what)
  if conflict:
    raise OutputExistsError(f"refusing to write: {conflict}")
  if os.path.lexists(path):
    if not overwrite:
      raise OutputExistsError(f"{what}={path} already exists; pass {overwrite_flag} to replace "
                              f"an earlier output of {owner}")
    if os.path.islink(path) or not os.path.isfile(path) or not ours(path):
      raise OutputExistsError(f"refusing to overwrite {what}={path}: it is not an output of "
                              f"{owner} ({overwrite_flag} replaces only those); give a new "
                              "output path")
  return path


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


# Checkpoint outputs ---------------------------------------------------------------------------

def file_pairs(paths: Iterable[str | os.PathLike | tuple[str | os.PathLike, str]]
               ) -> list[tuple[str, str]]:
  """(source path, name in the output) for each tokenizer file of a checkpoint output: a path
  keeps its base name. MissingFileError for a path that is not a file."""
  pairs = []
  for f in paths:
    src, name = (f if isinstance(f, tuple) else (f, os.path.basename(os.fspath(f))))
    src = os.fspath(src)
    if not os.path.isfile(src):
      raise MissingFileError(f"tokenizer file not found: {src}")
    pairs.append((src, name))
  return pairs


def copy_files(pairs: Iterable[tuple[str, str]], directory: str) -> None:
  """Copies each (source path, name) of `file_pairs` into `directory` under its name."""
  for src, name in pairs:
    shutil.copyfile(src, os.path.join(directory, name))


@contextlib.contextmanager
def atomic_checkpoint_directory(directory: str | os.PathLike, *, overwrite: bool = False,
                                kind: str | None = None) -> Iterator[str]:
  """`atomic_directory` for a checkpoint output: yields a hidden temporary sibling of `directory`
  to fill; renames it to `directory` when the block completes, removes it when the block raises.

  overwrite: replace an existing `directory` if `check_can_overwrite(directory, kind)` allows it
  (checked before the block runs and again before the replace); otherwise it is an
  OutputExistsError. kind: 'opt_jax', 'hf' or None (either).
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.lexists(directory) and not overwrite:
    raise OutputExistsError(f"{directory} already exists; pass overwrite=True to replace it")
  may_replace = (lambda d: check_can_overwrite(d, kind)) if overwrite else None
  with atomic_directory(directory, may_replace=may_replace) as tmp:
    yield tmp


def check_checkpoint_output(directory: str, overwrite: bool, kind: str | None) -> None:
  """Before writing a checkpoint to `directory`: OutputExistsError unless it is absent, or
  `overwrite` is set and `check_can_overwrite(directory, kind)` allows replacing it."""
  if not os.path.lexists(directory):
    return
  if not overwrite:
    raise OutputExistsError(f"{directory} already exists; pass overwrite=True to replace it")
  check_can_overwrite(directory, kind)


def check_can_overwrite(directory: str | os.PathLike, kind: str | None = "opt_jax") -> None:
  """Raises OutputExistsError unless `directory` is absent or recognisably an earlier output of
  `kind` with nothing else in it, so that replacing it deletes only what opt_jax wrote.

  kind 'opt_jax': a complete opt_jax checkpoint (config.json, opt_jax.json, params/, tokenizer
  files); 'hf': config.json + model.safetensors (or numbered shards + their index) + tokenizer
  files, as opt_jax.convert.hf.write_hf writes; None: either.
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.lexists(directory):
    return
  kinds = ("opt_jax", "hf") if kind is None else (kind,)
  refusal = f"refusing to overwrite {directory}"
  if not os.path.isdir(directory) or os.path.islink(directory):
    raise OutputExistsError(f"{refusal}: it is not a directory; give another output directory")
  entries = sorted(os.listdir(directory))
  reasons = []
  for k in kinds:
    if k == "opt_jax":
      # A damaged earlier checkpoint is still recognisably ours: a rerun is what replaces it.
      parts = (layout.CONFIG_FILE, layout.METADATA_FILE, layout.PARAMS_DIR)
      allowed = lambda e: e in parts or e in layout.TOKENIZER_FILES
      lacks = [p for p in parts if p not in entries]
      what = "an opt_jax checkpoint"
    elif k == "hf":
      allowed = lambda e: e in layout.TOKENIZER_FILES or layout.HF_OUTPUT.fullmatch(e) is not None
      lacks = [] if layout.CONFIG_FILE in entries else [layout.CONFIG_FILE]
      if not {"model.safetensors", "model.safetensors.index.json"} & set(entries):
        lacks.append("model.safetensors")
      what = "an HF safetensors checkpoint as opt_jax writes it"
    else:
      raise ValueError(f"kind must be 'opt_jax', 'hf' or None, got {kind!r}")
    others = [e + ("/" if os.path.isdir(os.path.join(directory, e)) else "")
              for e in entries if not allowed(e)]
    if not lacks and not others:
      return
    if lacks:
      reasons.append(f"it is not {what} (it lacks {', '.join(lacks)})")
    else:
      reasons.append(f"it holds {', '.join(others[:8])}{' ...' if len(others) > 8 else ''} "
                     f"besides the files of {what}")
  raise OutputExistsError(f"{refusal}: {'; '.join(reasons)}; overwrite replaces only an earlier "
                          "output of the same kind, nothing else: give a new output directory")
