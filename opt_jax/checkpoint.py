"""opt_jax checkpoints: an orbax params pytree plus config.json, metadata and tokenizer files.

A checkpoint is a directory:
  DIR/config.json      the HF config.json of the model's family (`DecoderConfig.to_json_file`)
  DIR/params/          orbax checkpoint of the params pytree (zarr, uncompressed, one file per
                       chunk of <= 64 MiB); layout in the `opt_jax.model` docstring
  DIR/opt_jax.json     {"format": 2, "dtype": "float32", "num_params": ..., **extra}; written last
  DIR/tokenizer.json | vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json)

`save` writes everything under a hidden temporary sibling and renames it into place, so a crash
never leaves a directory that `is_checkpoint` accepts. `restore` reads every array straight into
the sharding the caller asks for: with a mesh, each process reads only the chunks its devices hold.
Saving is synchronous and meant for one process (conversion); restoring works on any mesh.

Format 2 names parameters by feature (embed, layers/attn/q_kernel, ...) for every family; format
1 (OPT-only names, before families) is refused with a message to re-convert.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError, MissingFileError

FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
METADATA_FILE = "opt_jax.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
# Storage chunks of at most 64 MiB: a process restoring one shard of a large tensor reads only the
# chunks that intersect it instead of the whole tensor.
_CHUNK_BYTES = 64 << 20


class _DropOcdbtMergeWarning(logging.Filter):
  # Orbax warns on every save without OCDBT that it has no OCDBT files to merge; we chose that.
  def filter(self, record: logging.LogRecord) -> bool:
    return "Skipping merge of OCDBT checkpoints" not in str(record.msg)


logging.getLogger("absl").addFilter(_DropOcdbtMergeWarning())


def _checkpointer() -> ocp.Checkpointer:
  # The synchronous Checkpointer: save returns only once everything is on disk.
  return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _saving_checkpointer() -> ocp.Checkpointer:
  # Three departures from orbax's defaults, each measured on a 1 GB model (benchmarks/
  # convert_memory.py): orbax deep-copies numpy leaves (against mutation during an async save;
  # ours is synchronous): +1 GB. OCDBT buffers the written data before committing it: +0.45 GB.
  # zstd gains ~8% on float weights, triples the save time and costs time on every restore.
  # Without OCDBT each array is a zarr directory with one file per chunk: fine for ~20 leaves.
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      type_handler_registry=registry, use_ocdbt=False, use_compression=False))


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_params_match_config(params: Any, config: DecoderConfig) -> None:
  """Raises ValueError naming every leaf whose presence or shape differs from `config`'s model."""
  from opt_jax import model  # Deferred: building the Flax module is only needed here.

  want = {_path_str(p): tuple(s.shape)
          for p, s in jax.tree_util.tree_leaves_with_path(model.param_shapes(config))}
  got = {_path_str(p): tuple(np.shape(a)) for p, a in jax.tree_util.tree_leaves_with_path(params)}
  problems = [f"missing {k} {want[k]}" for k in want if k not in got]
  problems += [f"unexpected {k} {got[k]}" for k in got if k not in want]
  problems += [f"{k} has shape {got[k]}, config expects {want[k]}"
               for k in want if k in got and got[k] != want[k]]
  if problems:
    raise ValueError("params do not match the config: " + "; ".join(problems))


def _dtype_name(params: Any) -> str:
  names = sorted({np.dtype(a.dtype).name for a in jax.tree.leaves(params)})
  return names[0] if len(names) == 1 else "mixed:" + ",".join(names)


def save(directory: str | os.PathLike, params: Any, config: DecoderConfig, *,
         tokenizer_files: Iterable[str | os.PathLike | tuple[str | os.PathLike, str]] = (),
         extra: Mapping[str, Any] | None = None,
         overwrite: bool = False) -> None:
  """Writes an opt_jax checkpoint atomically.

  params: pytree of numpy or jax arrays with the layout of `opt_jax.model` for `config` (checked
    before anything is written). tokenizer_files: paths copied into the checkpoint by base name,
    or (path, name) pairs to store a file under another name.
  extra: JSON-serialisable entries added to opt_jax.json (e.g. the source of a conversion).
  overwrite: replace an existing directory; otherwise an existing `directory` is an error.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.lexists(directory) and not overwrite:
    raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
  tokenizer_files = file_pairs(tokenizer_files)
  _check_params_match_config(params, config)
  metadata = {"format": FORMAT_VERSION, "dtype": _dtype_name(params),
              "num_params": int(sum(np.size(a) for a in jax.tree.leaves(params)))}
  metadata.update(extra or {})
  json.dumps(metadata)  # Fail before writing if `extra` is not JSON.

  with atomic_directory(directory, overwrite=overwrite) as tmp:
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES), params)
    with _saving_checkpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(params, save_args))
    config.to_json_file(os.path.join(tmp, CONFIG_FILE))
    copy_files(tokenizer_files, tmp)
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
      json.dump(metadata, f, indent=2, sort_keys=True)
      f.write("\n")


def file_pairs(files: Iterable[str | os.PathLike | tuple[str | os.PathLike, str]]
                ) -> list[tuple[str, str]]:
  """(source path, name in the output) for each entry: a path keeps its base name."""
  pairs = []
  for f in files:
    src, name = (f if isinstance(f, tuple) else (f, os.path.basename(os.fspath(f))))
    src = os.fspath(src)
    if not os.path.isfile(src):
      raise FileNotFoundError(f"tokenizer file not found: {src}")
    pairs.append((src, name))
  return pairs


def copy_files(files: Iterable[tuple[str, str]], directory: str) -> None:
  for src, name in files:
    shutil.copyfile(src, os.path.join(directory, name))


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a hidden temporary sibling of `directory` to fill; renames it to `directory` when the
  block completes, removes it when the block raises (so a failure leaves nothing behind)."""
  directory = os.path.abspath(os.fspath(directory))
  if os.path.lexists(directory) and not overwrite:
    raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    yield tmp
    _move_into_place(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _move_into_place(tmp: str, directory: str) -> None:
  if not os.path.lexists(directory):
    os.rename(tmp, directory)
    return
  # Overwrite: move the old one aside first so that `directory` is never a mix of the two.
  old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-",
                         dir=os.path.dirname(directory))
  os.rmdir(old)
  os.rename(directory, old)
  os.rename(tmp, directory)
  if os.path.isdir(old) and not os.path.islink(old):
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.remove(old)


def _missing_parts(directory: str) -> list[str]:
  parts = [(CONFIG_FILE, os.path.isfile), (METADATA_FILE, os.path.isfile),
           (PARAMS_DIR, os.path.isdir)]
  return [p for p, exists in parts if not exists(os.path.join(directory, p))]


def is_checkpoint(directory: str | os.PathLike) -> bool:
  """True iff `directory` holds a complete opt_jax checkpoint (cheap: no arrays are read)."""
  directory = os.fspath(directory)
  return os.path.isdir(directory) and not _missing_parts(directory)


def require_checkpoint(directory: str | os.PathLike) -> str:
  """The absolute path of `directory`; raises an error naming what is missing unless it holds a
  complete opt_jax checkpoint."""
  directory = os.path.abspath(os.fspath(directory))
  expected = (f"an opt_jax checkpoint directory ({CONFIG_FILE}, {PARAMS_DIR}/, {METADATA_FILE}) "
              "as written by opt_jax.checkpoint.save or `python -m tools.convert_checkpoint`")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such directory; expected {expected}")
  missing = _missing_parts(directory)
  if CONFIG_FILE in missing:
    raise FileNotFoundError(f"{os.path.join(directory, CONFIG_FILE)} not found; "
                            f"expected {expected}")
  if missing:
    hint = ""
    if any(os.path.exists(os.path.join(directory, f))
           for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")):
      hint = (" (it looks like an HF checkpoint: convert it with "
              "`python -m tools.convert_checkpoint`)")
    raise ValueError(f"{directory} is not an opt_jax checkpoint: it lacks {', '.join(missing)}"
                     f"{hint}; expected {expected}")
  return directory


def load_config(directory: str | os.PathLike) -> DecoderConfig:
  """The DecoderConfig of the checkpoint at `directory` (read by the family of its model_type)."""
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise MissingFileError(f"{directory}: no such directory; expected an opt_jax checkpoint")
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise MissingFileError(f"{path} not found; expected the HF config.json of the checkpoint")
  return DecoderConfig.from_json_file(path)


def load_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """The contents of opt_jax.json (format version, stored dtype, extra entries)."""
  directory = require_checkpoint(directory)
  path = os.path.join(directory, METADATA_FILE)
  try:
    with open(path) as f:
      metadata = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if isinstance(metadata, dict) and metadata.get("format") == 1:
    source = metadata.get("converted_from")
    raise InputError(f"{directory} is an opt_jax checkpoint of format 1 (OPT-only parameter "
                     f"names); this opt_jax reads format {FORMAT_VERSION}: re-convert it from "
                     + (f"its source {source}" if source else "its source checkpoint")
                     + " with python -m tools.convert_checkpoint")
  if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_VERSION:
    raise ValueError(f"{path}: expected an object with \"format\": {FORMAT_VERSION}, got "
                     f"{metadata!r:.200}")
  return metadata


def param_metadata(directory: str | os.PathLike) -> Any:
  """Pytree of jax.ShapeDtypeStruct (no sharding) of the stored params; reads no arrays."""
  directory = require_checkpoint(directory)
  with _checkpointer() as ckptr:
    tree = ckptr.metadata(os.path.join(directory, PARAMS_DIR)).item_metadata
  tree = getattr(tree, "tree", tree)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def restore(directory: str | os.PathLike, *, shardings: Any = None, dtype: Any = None) -> Any:
  """Reads the params of the checkpoint at `directory`.

  shardings: None (everything on the first local device), one jax.sharding.Sharding for every
    array, or a pytree of Shardings matching the params (e.g. `opt_jax.sharding.param_shardings`).
    Each array is read straight into its layout: a process reads only what its devices hold.
  dtype: cast every array to this dtype while reading (None keeps the stored dtype).
  Returns the params pytree of jax.Arrays.
  """
  directory = require_checkpoint(directory)
  load_metadata(directory)
  stored = param_metadata(directory)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, stored)
  else:
    _check_same_tree(stored, shardings, directory)
  target = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype if dtype is not None else s.dtype,
                                         sharding=sh),
      stored, shardings)
  with _checkpointer() as ckptr:
    return ckptr.restore(os.path.join(directory, PARAMS_DIR), args=ocp.args.StandardRestore(target))


def _check_same_tree(stored: Any, shardings: Any, directory: str) -> None:
  want = {_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(stored)}
  got = {_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))}
  if want != got:
    raise ValueError(
        f"shardings do not match the params stored in {directory}: missing "
        f"{sorted(want - got)}, unexpected {sorted(got - want)}")
