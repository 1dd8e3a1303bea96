"""opt_jax's own checkpoints: an orbax params pytree plus config.json, metadata and tokenizer files.

The files (opt_jax.checkpoints.layout):
  DIR/config.json      the HF config.json of the model's family (`families.write_config`)
  DIR/params/          orbax checkpoint of the params pytree (zarr, uncompressed, one file per
                       chunk of <= 64 MiB); layout in the `opt_jax.model` docstring
  DIR/opt_jax.json     {"format": 2, "dtype": "float32", "num_params": ..., **extra}; written last
  DIR/tokenizer.json | vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json)

`save` writes everything under a hidden temporary sibling and renames it into place, so a crash
never leaves a directory that `problem` accepts; the next save to the same place removes the
temporaries of writers that were killed (opt_jax.files). Overwriting replaces only what is
recognisably an earlier output of the same kind (`opt_jax.files.check_can_overwrite`). `restore`
reads every array straight into the sharding the caller asks for: with a mesh, each process reads
only the chunks its devices hold; a missing or truncated chunk is an InputError naming the
tensor. Saving is synchronous and meant for one process (conversion); restoring works on any
mesh.

Format 2 names parameters by feature (embed, layers/attn/q_kernel, ...) for every family; format
1 (OPT-only names, before families) is refused with a message to re-convert.

Readers call opt_jax.checkpoints.checkpoint, which picks this module or hf_format by kind.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from opt_jax import families, files, model
from opt_jax.checkpoints.layout import (CONFIG_FILE, EXPECTED, METADATA_FILE, ORBAX_METADATA,
                                        PARAMS_DIR)
from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError, MissingFileError

FORMAT_VERSION = 2
# Storage chunks of at most 64 MiB: a process restoring one shard of a large tensor reads only the
# chunks that intersect it instead of the whole tensor.
_CHUNK_BYTES = 64 << 20


class _DropOcdbtMergeWarning(logging.Filter):
  # Orbax warns on every save without OCDBT that it has no OCDBT files to merge; we chose that.
  # Its worker threads also log, with a traceback, the error they then hand to the caller of our
  # synchronous save or restore (e.g. a full disk), which reports it in one line.
  def filter(self, record: logging.LogRecord) -> bool:
    text = str(record.msg)
    return ("Skipping merge of OCDBT checkpoints" not in text
            and "_SignalingThread.run() raised an exception" not in text)


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
  want = {_path_str(p): tuple(s.shape)
          for p, s in jax.tree_util.tree_leaves_with_path(model.param_shapes(config))}
  got = {_path_str(p): tuple(np.shape(a)) for p, a in jax.tree_util.tree_leaves_with_path(params)}
  problems = [f"missing {k} {want[k]}" for k in want if k not in got]
  problems += [f"unexpected {k} {got[k]}" for k in got if k not in want]
  problems += [f"{k} has shape {got[k]}, config expects {want[k]}"
               for k in want if k in got and got[k] != want[k]]
  if problems:
    raise InputError("params do not match the config: " + "; ".join(problems))


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
  overwrite: replace an existing directory if it is an earlier opt_jax checkpoint
    (`opt_jax.files.check_can_overwrite`); otherwise an existing `directory` is an
    OutputExistsError. Checked before anything is written.
  """
  directory = os.path.abspath(os.fspath(directory))
  files.check_checkpoint_output(directory, overwrite, "opt_jax")
  tokenizer_files = files.file_pairs(tokenizer_files)
  _check_params_match_config(params, config)
  meta = {"format": FORMAT_VERSION, "dtype": _dtype_name(params),
          "num_params": int(sum(np.size(a) for a in jax.tree.leaves(params)))}
  meta.update(extra or {})
  json.dumps(meta)  # Fail before writing if `extra` is not JSON.

  with files.atomic_checkpoint_directory(directory, overwrite=overwrite, kind="opt_jax") as tmp:
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES), params)
    with _saving_checkpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(params, save_args))
    families.write_config(config, os.path.join(tmp, CONFIG_FILE))
    files.copy_files(tokenizer_files, tmp)
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
      f.write("\n")


def problem(directory: str) -> tuple[type[Exception], str] | None:
  """(error class, message): why opt_jax cannot read `directory` as an opt_jax checkpoint; None if
  it can. Reads config.json and opt_jax.json, checks orbax's metadata file is there."""
  parts = [(CONFIG_FILE, os.path.isfile), (METADATA_FILE, os.path.isfile),
           (PARAMS_DIR, os.path.isdir)]
  missing = [p for p, exists in parts if not exists(os.path.join(directory, p))]
  if CONFIG_FILE in missing:
    return MissingFileError, f"{os.path.join(directory, CONFIG_FILE)} not found; {EXPECTED}"
  if missing:
    return InputError, (f"{directory} is not an opt_jax checkpoint: it lacks "
                        f"{', '.join(missing)}; {EXPECTED}")
  if not os.path.isfile(os.path.join(directory, PARAMS_DIR, ORBAX_METADATA)):
    return InputError, (f"{directory} is not a complete opt_jax checkpoint: "
                        f"{PARAMS_DIR}/{ORBAX_METADATA} is missing (the params were never fully "
                        "written); convert or save it again")
  try:
    metadata(directory)
    families.read_config(os.path.join(directory, CONFIG_FILE))
  except (OSError, ValueError, KeyError, TypeError) as e:
    return InputError, f"{directory}: {e}"
  return None


def metadata(directory: str) -> dict[str, Any]:
  """The contents of opt_jax.json (format version, stored dtype, extra entries)."""
  path = os.path.join(directory, METADATA_FILE)
  try:
    with open(path) as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: not valid JSON ({e})") from None
  if isinstance(meta, dict) and meta.get("format") == 1:
    source = meta.get("converted_from")
    raise InputError(f"{directory} is an opt_jax checkpoint of format 1 (OPT-only parameter "
                     f"names); this opt_jax reads format {FORMAT_VERSION}: re-convert it from "
                     + (f"its source {source}" if source else "its source checkpoint")
                     + " with python -m tools.convert_checkpoint")
  if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
    raise InputError(f"{path}: expected an object with \"format\": {FORMAT_VERSION}, got "
                     f"{meta!r:.200}")
  return meta


def stored_dtype(directory: str) -> str:
  """The dtype the params are stored in, as opt_jax.json records it."""
  return str(metadata(directory).get("dtype", "unknown"))


def param_metadata(directory: str) -> Any:
  """Pytree of jax.ShapeDtypeStruct (no sharding) of the stored params; reads no arrays. Checks
  first that every tensor's files are there (InputError naming the tensor otherwise)."""
  _check_tensor_files(directory)
  try:
    with _checkpointer() as ckptr:
      tree = ckptr.metadata(os.path.join(directory, PARAMS_DIR)).item_metadata
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"{directory}: cannot read the params' metadata ({PARAMS_DIR}/"
                     f"{ORBAX_METADATA}): {_first_line(e)}") from e
  tree = getattr(tree, "tree", tree)
  if tree is None:
    raise InputError(f"{directory}: {PARAMS_DIR}/ holds no params metadata; convert or save the "
                     "checkpoint again")
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def restore(directory: str, *, shardings: Any = None, dtype: Any = None) -> Any:
  """The params of the checkpoint at `directory`, each array read straight into its sharding
  (opt_jax.checkpoints.checkpoint.restore says what the arguments are). A damaged checkpoint
  (missing tensor folder or chunk file, truncated chunk, unreadable metadata) is an InputError
  naming the checkpoint and tensor."""
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
  # The handler, not a Checkpointer: Checkpointer.restore ends with a barrier across processes
  # (a device collective on CPU), which would race the evaluation's collectives when a sweep
  # restores the next checkpoint in a background thread. Reading needs no agreement: each
  # process reads the slices its own devices hold.
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.restore(epath.Path(directory) / PARAMS_DIR,
                           args=ocp.args.StandardRestore(target))
  except Exception as e:  # orbax / tensorstore: name the tensor if a file of it is at fault
    error = _read_error(directory, e)
    if error is None:
      raise
    raise error from e
  finally:
    handler.close()


def _first_line(e: BaseException) -> str:
  # tensorstore appends its whole spec to messages; the first line says what went wrong.
  text = str(e).split(" [tensorstore_spec")[0].strip()
  return (text.splitlines() or [type(e).__name__])[0][:300]


def _read_error(directory: str, e: BaseException) -> InputError | None:
  """An InputError naming the tensor whose file is named in `e`'s chain (innermost first)."""
  chain = []
  while e is not None and len(chain) < 16:
    chain.append(e)
    e = e.__cause__ or e.__context__
  where = re.compile(re.escape(os.path.join(directory, PARAMS_DIR)) + r"/([^/\"'\s]+)")
  for x in reversed(chain):
    m = where.search(str(x))
    if m:
      return InputError(f"{directory}: cannot read tensor {m.group(1).replace('.', '/')}: "
                        f"{_first_line(x)}")
  return None


def _tensor_names(directory: str) -> list[str]:
  """'layers/fc1/kernel', ... as listed in orbax's tree metadata file (read as JSON)."""
  rel = f"{PARAMS_DIR}/{ORBAX_METADATA}"
  try:
    with open(os.path.join(directory, rel)) as f:
      tree = json.load(f)["tree_metadata"]
    return ["/".join(str(k["key"]) for k in v["key_metadata"]) for v in tree.values()]
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise InputError(f"{directory}: {rel} is not orbax tree metadata ({type(e).__name__}: "
                     f"{_first_line(e)}); convert or save the checkpoint again") from None


def _check_tensor_files(directory: str) -> None:
  """InputError naming the tensor when its zarr folder, .zarray or a chunk file is missing or a
  chunk has the wrong size. orbax reads tensors concurrently and would fail mid-read, buried in
  asyncio noise; this costs one listdir per tensor and one stat per chunk file."""
  params_dir = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(os.path.join(params_dir, "manifest.ocdbt")):
    return  # an OCDBT checkpoint (not written by opt_jax): no per-tensor folders to check
  again = "the checkpoint is damaged or incomplete: convert or save it again"
  for name in _tensor_names(directory):
    rel = f"{PARAMS_DIR}/{name.replace('/', '.')}"
    folder = os.path.join(directory, rel)
    try:
      with open(os.path.join(folder, ".zarray")) as f:
        zarray = json.load(f)
      shape, chunks = list(zarray["shape"]), list(zarray["chunks"])
      separator = zarray.get("dimension_separator", ".")
    except FileNotFoundError:
      raise InputError(f"{directory}: tensor {name} is missing ({rel}/.zarray not found); "
                       f"{again}") from None
    except (ValueError, KeyError, TypeError) as e:
      raise InputError(f"{directory}: tensor {name}: {rel}/.zarray is not valid zarr metadata "
                       f"({e}); {again}") from None
    try:
      itemsize = np.dtype(zarray.get("dtype")).itemsize
    except TypeError:
      itemsize = 0
    plain = zarray.get("compressor") is None and not zarray.get("filters") and itemsize
    size = math.prod(chunks) * itemsize if plain else None
    present = set(os.listdir(folder))
    for index in itertools.product(*(range(-(-n // max(c, 1))) for n, c in zip(shape, chunks))):
      chunk = separator.join(map(str, index)) or "0"
      if chunk not in present:
        raise InputError(f"{directory}: tensor {name}: chunk file {rel}/{chunk} is missing; "
                         f"{again}")
      if size is not None:
        got = os.path.getsize(os.path.join(folder, chunk))
        if got != size:
          raise InputError(f"{directory}: tensor {name}: chunk file {rel}/{chunk} has {got} "
                           f"bytes, expected {size}; {again}")


def _check_same_tree(stored: Any, shardings: Any, directory: str) -> None:
  want = {_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(stored)}
  got = {_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))}
  if want != got:
    raise ValueError(
        f"shardings do not match the params stored in {directory}: missing "
        f"{sorted(want - got)}, unexpected {sorted(got - want)}")
