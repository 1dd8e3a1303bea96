"""Reading a checkpoint of any format opt_jax reads: the one place that picks the format.

A checkpoint directory is an opt_jax checkpoint (opt_jax.checkpoints.orbax_format) or an HF one,
read in place (opt_jax.checkpoints.hf_format: config.json + model.safetensors or
model.safetensors.index.json and its shards, e.g. an HF-cache snapshot; its PyTorch .bin weights
are read only by conversion). `_format` picks the module once from `layout.checkpoint_kind`;
every reader here hands the call to it.

`checkpoint_problem` is the one test of whether opt_jax can read a directory (cheap, no arrays);
`identity` is what a stored result records of the checkpoint it was computed from.
"""

from __future__ import annotations

import hashlib
import os
import re
from types import ModuleType
from typing import Any

from opt_jax import families
from opt_jax.checkpoints import hf_format, layout, orbax_format
from opt_jax.checkpoints.layout import CONFIG_FILE, ORBAX_METADATA
from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError, MissingFileError


def _format(directory: str) -> ModuleType:
  """The reader of `directory`'s kind: hf_format for HF weights, else orbax_format (which also
  says what an opt_jax checkpoint lacks when `directory` is neither)."""
  return hf_format if layout.checkpoint_kind(directory) == "hf" else orbax_format


def _problem(directory: str) -> tuple[type[Exception], str] | None:
  """(error class, message): why opt_jax cannot read `directory` as a checkpoint; None if it can."""
  if not os.path.isdir(directory):
    return MissingFileError, f"{directory}: no such directory; {layout.EXPECTED}"
  return _format(directory).problem(directory)


def checkpoint_problem(directory: str | os.PathLike) -> str | None:
  """Why opt_jax cannot read `directory` as a checkpoint (opt_jax or HF), in one line naming the
  file at fault; None when it can. Cheap (reads config.json and opt_jax.json, checks orbax's
  metadata file is there; of an HF checkpoint the safetensors headers, matched to the family's
  table; reads no array): suites run it on every entry before a sweep starts."""
  problem = _problem(os.path.abspath(os.fspath(directory)))
  return None if problem is None else problem[1]


def is_checkpoint(directory: str | os.PathLike) -> bool:
  """True iff `directory` holds a checkpoint opt_jax can read (`checkpoint_problem` is None)."""
  return checkpoint_problem(directory) is None


def require_checkpoint(directory: str | os.PathLike) -> str:
  """The absolute path of `directory`; raises MissingFileError / InputError with
  `checkpoint_problem`'s message unless it holds a checkpoint opt_jax can read."""
  directory = os.path.abspath(os.fspath(directory))
  problem = _problem(directory)
  if problem is not None:
    raise problem[0](problem[1])
  return directory


def load_config(directory: str | os.PathLike) -> DecoderConfig:
  """The DecoderConfig of the checkpoint at `directory` (read by the family of its model_type)."""
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise MissingFileError(f"{directory}: no such directory; expected a checkpoint directory")
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise MissingFileError(f"{path} not found; expected the HF config.json of the checkpoint")
  return families.read_config(path)


def load_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """The contents of opt_jax.json (format version, stored dtype, extra entries) of an opt_jax
  checkpoint; InputError for an HF one."""
  directory = require_checkpoint(directory)
  return _format(directory).metadata(directory)


def stored_dtype(directory: str | os.PathLike) -> str:
  """The dtype the checkpoint's params are stored in ('float32', ...; 'mixed:a,b' if several)."""
  directory = require_checkpoint(directory)
  return _format(directory).stored_dtype(directory)


def param_metadata(directory: str | os.PathLike) -> Any:
  """Pytree of jax.ShapeDtypeStruct (no sharding) of the stored params; reads no arrays.

  Checks first that every tensor's files are there (InputError naming the tensor otherwise).
  """
  directory = require_checkpoint(directory)
  return _format(directory).param_metadata(directory)


def restore(directory: str | os.PathLike, *, shardings: Any = None, dtype: Any = None) -> Any:
  """Reads the params of the checkpoint at `directory`.

  shardings: None (everything on the first local device), one jax.sharding.Sharding for every
    array, or a pytree of Shardings matching the params (e.g. `opt_jax.sharding.param_shardings`).
    Each array is read straight into its layout: a process reads only what its devices hold.
  dtype: cast every array to this dtype while reading (None keeps the stored dtype).
  Returns the params pytree of jax.Arrays. A damaged checkpoint (missing tensor folder or chunk
  file, truncated chunk, unreadable metadata, a header or tensor that cannot be read) is an
  InputError naming the checkpoint and tensor.
  """
  directory = require_checkpoint(directory)
  return _format(directory).restore(directory, shardings=shardings, dtype=dtype)


# Identity -------------------------------------------------------------------------------------

_FINGERPRINTED_BYTES = 1 << 20   # metadata files up to this size are hashed byte for byte


def fingerprint(directory: str | os.PathLike) -> str:
  """A cheap content fingerprint of a checkpoint directory: 'files:<sha256 hex>'.

  Hashes the name, size and modification time (ns) of every entry of the directory and of its
  sub-folders (params/'s per-tensor folders, whose mtimes change when their chunk files are
  written), and the bytes of the small metadata files among them (*.json, orbax's _METADATA and
  _CHECKPOINT_METADATA, which records the save time in ns). Reads no array data: a few dozen
  stat calls whatever the model's size. Re-converting or replacing the checkpoint changes it,
  copying it without keeping mtimes changes it, reading it does not. Names starting with "."
  (file system litter) are left out. Checkpoints in an HF cache are identified by their
  snapshot's commit sha instead (`identity`).
  """
  directory = os.path.abspath(os.fspath(directory))
  h = hashlib.sha256()
  for rel in _fingerprinted_entries(directory):
    path = os.path.join(directory, rel)
    st = os.stat(path)
    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    name = os.path.basename(rel)
    if (os.path.isfile(path) and st.st_size <= _FINGERPRINTED_BYTES
        and (name.endswith(".json") or name in (ORBAX_METADATA, "_CHECKPOINT_METADATA"))):
      with open(path, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
  return "files:" + h.hexdigest()


def _fingerprinted_entries(directory: str) -> list[str]:
  out = []
  for entry in sorted(os.listdir(directory)):
    if entry.startswith("."):
      continue
    out.append(entry)
    sub = os.path.join(directory, entry)
    if os.path.isdir(sub):
      out += [f"{entry}/{e}" for e in sorted(os.listdir(sub)) if not e.startswith(".")]
  return out


_SHA = re.compile(r"[0-9a-f]{40}")


def snapshot_sha(directory: str | os.PathLike) -> str | None:
  """The commit sha of an HF-cache snapshot folder (CACHE/models--ORG--NAME/snapshots/<sha>);
  None for any other directory."""
  directory = os.path.abspath(os.fspath(directory))
  parent = os.path.dirname(directory)
  if (_SHA.fullmatch(os.path.basename(directory)) and os.path.basename(parent) == "snapshots"
      and os.path.basename(os.path.dirname(parent)).startswith("models--")):
    return os.path.basename(directory)
  return None


def snapshot_files(directory: str | os.PathLike) -> str:
  """sha256 hex of what a snapshot folder holds: per entry its name, size and, for a link into
  the cache's blobs (content-addressed), the blob's name, else its mtime (ns). A blob replaced or
  a file edited in place changes it; a few stat calls, no data read."""
  directory = os.path.abspath(os.fspath(directory))
  h = hashlib.sha256()
  for name in sorted(os.listdir(directory)):
    if name.startswith("."):
      continue
    path = os.path.join(directory, name)
    st = os.stat(path)
    what = (os.path.basename(os.readlink(path)) if os.path.islink(path)
            else str(st.st_mtime_ns))
    h.update(f"{name}\0{st.st_size}\0{what}\0".encode())
  return h.hexdigest()


def identity(directory: str | os.PathLike, sha: str | None = None) -> dict[str, str]:
  """What a stored result records of the checkpoint it was computed from; opt_jax.sweep
  recomputes a result whose checkpoint's identity has changed.

  An HF-cache snapshot (`snapshot_sha`), or a directory whose suite entry names its commit
  `sha`: {"path", "fingerprint": "hf-snapshot:<sha>", "files": `snapshot_files`}, so a
  re-upload (a new sha) or a blob replaced under the same sha is a new identity. Any other
  directory: {"path", "fingerprint": `fingerprint(path)`}. Raises InputError when `sha` is not
  the sha of the snapshot folder `directory` is.
  """
  directory = os.path.abspath(os.fspath(directory))
  folder_sha = snapshot_sha(directory)
  if sha is not None and folder_sha is not None and sha != folder_sha:
    raise InputError(f"{directory}: the suite gives sha {sha}, but this is the snapshot folder "
                     f"of commit {folder_sha}; rebuild the manifest (python -m tools.make_suite)")
  sha = sha or folder_sha
  if sha is not None:
    return {"path": directory, "fingerprint": f"hf-snapshot:{sha}",
            "files": snapshot_files(directory)}
  return {"path": directory, "fingerprint": fingerprint(directory)}
