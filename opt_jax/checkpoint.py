"""opt_jax checkpoints: an orbax params pytree plus config.json, metadata and tokenizer files.

A checkpoint is a directory:
  DIR/config.json      the HF config.json of the model's family (`families.write_config`)
  DIR/params/          orbax checkpoint of the params pytree (zarr, uncompressed, one file per
                       chunk of <= 64 MiB); layout in the `opt_jax.model` docstring
  DIR/opt_jax.json     {"format": 2, "dtype": "float32", "num_params": ..., **extra}; written last
  DIR/tokenizer.json | vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json)

`save` writes everything under a hidden temporary sibling and renames it into place, so a crash
never leaves a directory that `is_checkpoint` accepts; the next save to the same place removes the
temporaries of writers that were killed (opt_jax.files). Overwriting replaces only what is
recognisably an earlier output of the same kind (`check_can_overwrite`). `restore` reads every
array straight into the sharding the caller asks for: with a mesh, each process reads only the
chunks its devices hold; a missing or truncated chunk is an InputError naming the tensor. Saving
is synchronous and meant for one process (conversion); restoring works on any mesh.

Format 2 names parameters by feature (embed, layers/attn/q_kernel, ...) for every family; format
1 (OPT-only names, before families) is refused with a message to re-convert.

HF checkpoints are read in place too: wherever a checkpoint directory is accepted, a directory
with config.json and model.safetensors (or model.safetensors.index.json and its shards), e.g. an
HF-cache snapshot, is one (`checkpoint_kind` "hf"; opt_jax.convert.hf_direct restores it onto
the mesh, each device reading its slices). Its PyTorch .bin weights are read only by conversion.

`checkpoint_problem` is the one test of whether opt_jax can read a directory (cheap, no arrays);
`identity` is what a stored result records of the checkpoint it was computed from.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from opt_jax import families, files
from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError, MissingFileError, OutputExistsError

FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
METADATA_FILE = "opt_jax.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
ORBAX_METADATA = "_METADATA"   # orbax's tree metadata in PARAMS_DIR: present once params are saved
# What an HF safetensors directory written by opt_jax.convert.hf.write_hf holds, besides tokenizer
# files: the only HF folders an overwrite may replace.
_HF_OUTPUT = re.compile(r"config\.json|model\.safetensors(\.index\.json)?|"
                        r"model-\d{5}-of-\d{5}\.safetensors")
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
  from opt_jax import model  # Deferred: building the Flax module is only needed here.

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
    (`check_can_overwrite`); otherwise an existing `directory` is an OutputExistsError. Checked
    before anything is written.
  """
  directory = os.path.abspath(os.fspath(directory))
  _check_output(directory, overwrite, "opt_jax")
  tokenizer_files = file_pairs(tokenizer_files)
  _check_params_match_config(params, config)
  metadata = {"format": FORMAT_VERSION, "dtype": _dtype_name(params),
              "num_params": int(sum(np.size(a) for a in jax.tree.leaves(params)))}
  metadata.update(extra or {})
  json.dumps(metadata)  # Fail before writing if `extra` is not JSON.

  with atomic_directory(directory, overwrite=overwrite, kind="opt_jax") as tmp:
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES), params)
    with _saving_checkpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(params, save_args))
    families.write_config(config, os.path.join(tmp, CONFIG_FILE))
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
      raise MissingFileError(f"tokenizer file not found: {src}")
    pairs.append((src, name))
  return pairs


def copy_files(files: Iterable[tuple[str, str]], directory: str) -> None:
  for src, name in files:
    shutil.copyfile(src, os.path.join(directory, name))


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *, overwrite: bool = False,
                     kind: str | None = None) -> Iterator[str]:
  """Yields a hidden temporary sibling of `directory` to fill; renames it to `directory` when the
  block completes, removes it when the block raises (so a failure leaves nothing behind).

  overwrite: replace an existing `directory` if `check_can_overwrite(directory, kind)` allows it
  (checked before the block runs and again before the replace); otherwise it is an
  OutputExistsError. kind: 'opt_jax', 'hf' or None (either).
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.lexists(directory) and not overwrite:
    raise OutputExistsError(f"{directory} already exists; pass overwrite=True to replace it")
  may_replace = (lambda d: check_can_overwrite(d, kind)) if overwrite else None
  with files.atomic_directory(directory, may_replace=may_replace) as tmp:
    yield tmp


def _check_output(directory: str, overwrite: bool, kind: str | None) -> None:
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
      allowed = lambda e: e in (CONFIG_FILE, METADATA_FILE, PARAMS_DIR, *TOKENIZER_FILES)
      lacks = [p for p in (CONFIG_FILE, METADATA_FILE, PARAMS_DIR) if p not in entries]
      what = "an opt_jax checkpoint"
    elif k == "hf":
      allowed = lambda e: e in TOKENIZER_FILES or _HF_OUTPUT.fullmatch(e) is not None
      lacks = [] if CONFIG_FILE in entries else [CONFIG_FILE]
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


def checkpoint_kind(directory: str | os.PathLike) -> str | None:
  """'opt_jax' when `directory` has an opt_jax checkpoint's own parts (opt_jax.json or params/),
  else 'hf' when it holds HF weights (safetensors or .bin), else None. Says nothing of whether
  the files are complete (`checkpoint_problem` does)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return None
  if any(os.path.lexists(os.path.join(directory, p)) for p in (METADATA_FILE, PARAMS_DIR)):
    return "opt_jax"
  from opt_jax.convert import hf_direct  # pylint: disable=import-outside-toplevel
  return "hf" if hf_direct.has_weights(directory) else None


def enclosing_checkpoint(path: str | os.PathLike) -> str | None:
  """The checkpoint folder that `path` is or lies inside, links resolved; None when there is
  none. A checkpoint here is a folder with opt_jax.json, or config.json beside params/ or HF
  weights (a folder that merely has a params/ subfolder is not one). Outputs never go there: a
  run writing into a checkpoint would change what later runs read (and its identity)."""
  from opt_jax.convert import hf_direct  # pylint: disable=import-outside-toplevel
  path = os.path.realpath(os.path.expanduser(os.fspath(path)))
  while True:
    if os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, METADATA_FILE))
        or (os.path.isfile(os.path.join(path, CONFIG_FILE))
            and (os.path.isdir(os.path.join(path, PARAMS_DIR)) or hf_direct.has_weights(path)))):
      return path
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent


def _problem(directory: str) -> tuple[type[Exception], str] | None:
  """(error class, message): why opt_jax cannot read `directory` as a checkpoint; None if it can."""
  expected = (f"expected an opt_jax checkpoint directory ({CONFIG_FILE}, {PARAMS_DIR}/, "
              f"{METADATA_FILE}) as written by opt_jax.checkpoint.save or `python -m "
              f"tools.convert_checkpoint`, or an HF one ({CONFIG_FILE} + model.safetensors or "
              "model.safetensors.index.json and its shards)")
  if not os.path.isdir(directory):
    return MissingFileError, f"{directory}: no such directory; {expected}"
  if checkpoint_kind(directory) == "hf":
    from opt_jax.convert import hf_direct  # pylint: disable=import-outside-toplevel
    problem = hf_direct.problem(directory)
    if problem is None:
      return None
    has_config = os.path.isfile(os.path.join(directory, CONFIG_FILE))
    cls = InputError if has_config else MissingFileError
    return cls, problem if problem.startswith(directory) else f"{directory}: {problem}"
  parts = [(CONFIG_FILE, os.path.isfile), (METADATA_FILE, os.path.isfile),
           (PARAMS_DIR, os.path.isdir)]
  missing = [p for p, exists in parts if not exists(os.path.join(directory, p))]
  if CONFIG_FILE in missing:
    return MissingFileError, f"{os.path.join(directory, CONFIG_FILE)} not found; {expected}"
  if missing:
    return InputError, (f"{directory} is not an opt_jax checkpoint: it lacks "
                        f"{', '.join(missing)}; {expected}")
  if not os.path.isfile(os.path.join(directory, PARAMS_DIR, ORBAX_METADATA)):
    return InputError, (f"{directory} is not a complete opt_jax checkpoint: "
                        f"{PARAMS_DIR}/{ORBAX_METADATA} is missing (the params were never fully "
                        "written); convert or save it again")
  try:
    _read_metadata(directory)
    families.read_config(os.path.join(directory, CONFIG_FILE))
  except (OSError, ValueError, KeyError, TypeError) as e:
    return InputError, f"{directory}: {e}"
  return None


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
  checkpoint."""
  directory = require_checkpoint(directory)
  if checkpoint_kind(directory) == "hf":
    raise InputError(f"{directory} is an HF checkpoint: it has no {METADATA_FILE}")
  return _read_metadata(directory)


def stored_dtype(directory: str | os.PathLike) -> str:
  """The dtype the checkpoint's params are stored in ('float32', ...; 'mixed:a,b' if several)."""
  directory = require_checkpoint(directory)
  if checkpoint_kind(directory) == "hf":
    from opt_jax.convert import hf_direct  # pylint: disable=import-outside-toplevel
    return hf_direct.stored_dtype(directory)
  return str(_read_metadata(directory).get("dtype", "unknown"))


def _read_metadata(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, METADATA_FILE)
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: not valid JSON ({e})") from None
  if isinstance(metadata, dict) and metadata.get("format") == 1:
    source = metadata.get("converted_from")
    raise InputError(f"{directory} is an opt_jax checkpoint of format 1 (OPT-only parameter "
                     f"names); this opt_jax reads format {FORMAT_VERSION}: re-convert it from "
                     + (f"its source {source}" if source else "its source checkpoint")
                     + " with python -m tools.convert_checkpoint")
  if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_VERSION:
    raise InputError(f"{path}: expected an object with \"format\": {FORMAT_VERSION}, got "
                     f"{metadata!r:.200}")
  return metadata


def param_metadata(directory: str | os.PathLike) -> Any:
  """Pytree of jax.ShapeDtypeStruct (no sharding) of the stored params; reads no arrays.

  Checks first that every tensor's files are there (InputError naming the tensor otherwise).
  """
  directory = require_checkpoint(directory)
  if checkpoint_kind(directory) == "hf":
    from opt_jax.convert import hf_direct  # pylint: disable=import-outside-toplevel
    return hf_direct.param_metadata(directory)
  return _param_metadata(directory)


def _param_metadata(directory: str) -> Any:
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


def restore(directory: str | os.PathLike, *, shardings: Any = None, dtype: Any = None) -> Any:
  """Reads the params of the checkpoint at `directory`.

  shardings: None (everything on the first local device), one jax.sharding.Sharding for every
    array, or a pytree of Shardings matching the params (e.g. `opt_jax.sharding.param_shardings`).
    Each array is read straight into its layout: a process reads only what its devices hold.
  dtype: cast every array to this dtype while reading (None keeps the stored dtype).
  Returns the params pytree of jax.Arrays. A damaged checkpoint (missing tensor folder or chunk
  file, truncated chunk, unreadable metadata) is an InputError naming the checkpoint and tensor.
  An HF checkpoint directory is restored by opt_jax.convert.hf_direct (same arguments).
  """
  directory = require_checkpoint(directory)
  if checkpoint_kind(directory) == "hf":
    from opt_jax.convert import hf_direct  # pylint: disable=import-outside-toplevel
    return hf_direct.restore(directory, shardings=shardings, dtype=dtype)
  stored = _param_metadata(directory)
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


def _check_same_tree(stored: Any, shardings: Any, directory: str) -> None:
  want = {_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(stored)}
  got = {_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))}
  if want != got:
    raise ValueError(
        f"shardings do not match the params stored in {directory}: missing "
        f"{sorted(want - got)}, unexpected {sorted(got - want)}")
