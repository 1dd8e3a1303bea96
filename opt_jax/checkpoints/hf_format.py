"""HF safetensors checkpoints evaluated in place: restored onto devices without a converted copy.

A directory with config.json and model.safetensors (or model.safetensors.index.json and its
shards), e.g. an HF-cache snapshot, is read like an opt_jax checkpoint
(opt_jax.checkpoints.checkpoint dispatches here). Each params array is built with
`jax.make_array_from_callback`: for every block a local device holds, the family's table
(opt_jax.families.table, `Transform.read_slice`) says which box of which HF tensor holds it, and
only that box is read (`safetensors_io.open_slices`), cast to the requested dtype on the way. So
a process reads what its devices hold and never holds a host copy of the whole model: peak host
memory is one params array's local blocks (plus the pages of the file mapping being read) beyond
what the devices hold.

What is read equals what conversion (opt_jax.convert.hf.read_hf) writes, tensor for tensor, and
both make the same checks from the same functions of opt_jax.checkpoints.hf_tensors: names,
shapes and dtypes against the family's table (`match_tensors`: headers only, so `problem` reports
them too), and a stored LM head of a model whose config ties it to the embedding must equal the
embedding (`check_tied_head`: reads both, a block of rows at a time, when restoring). Nothing is
hashed (opt_jax.integrity does that).

PyTorch .bin weights are read only by conversion: unpickling needs torch and the whole file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import jax
import numpy as np

from opt_jax import families, model
from opt_jax.checkpoints import hf_tensors, safetensors_io
from opt_jax.checkpoints.layout import CONFIG_FILE, METADATA_FILE, SAFETENSORS_FILES, TORCH_FILES
from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError, MissingFileError
from opt_jax.families import table


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
  """A validated HF safetensors checkpoint: its config, where each tensor of the table is."""
  directory: str
  config: DecoderConfig
  source: hf_tensors.FileSetSource
  items: tuple[table.Item, ...]
  stored: dict[str, str]                  # table name -> name in the files
  prefix: str                             # the base model's name prefix in the files


def _open(directory: str) -> _Checkpoint:
  """Reads config.json and the safetensors headers and matches them to the family's table.
  Raises MissingFileError / InputError naming the file at fault; reads no tensor data."""
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise MissingFileError(f"{config_path} not found: an HF checkpoint needs its config.json")
  weights = next((os.path.join(directory, f) for f in SAFETENSORS_FILES
                  if os.path.isfile(os.path.join(directory, f))), None)
  if weights is None:
    if any(os.path.isfile(os.path.join(directory, f)) for f in TORCH_FILES):
      raise InputError(f"{directory} holds PyTorch .bin weights, which opt_jax reads only to "
                       "convert them: run python -m tools.convert_checkpoint "
                       f"--input={directory} --output=DIR and use DIR")
    raise MissingFileError(f"{directory}: no HF weights ({' or '.join(SAFETENSORS_FILES)})")
  config = families.read_config(config_path)
  source = hf_tensors.open_safetensors(weights)
  family = families.get(config.family)
  prefix = hf_tensors.layout_prefix(source, family)
  head = [family.head] if config.tie_embeddings else []
  stored = hf_tensors.match_tensors(source, config, prefix=prefix, ignore=head,
                                    config_source=config_path)
  return _Checkpoint(directory, config, source, table.items(config, prefix), stored, prefix)


def problem(directory: str) -> tuple[type[Exception], str] | None:
  """(error class, message): why `directory` is not an HF safetensors checkpoint opt_jax can
  restore, in one line naming the file at fault; None when it is. Reads config.json and the
  safetensors headers only."""
  try:
    _open(directory)
  except (OSError, ValueError, KeyError, TypeError) as e:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    has_config = os.path.isfile(os.path.join(directory, CONFIG_FILE))
    cls = InputError if has_config else MissingFileError
    return cls, text if text.startswith(directory) else f"{directory}: {text}"
  return None


def metadata(directory: str) -> dict[str, Any]:
  """Refused: the metadata file is opt_jax's (an HF checkpoint's facts are in its config.json)."""
  raise InputError(f"{directory} is an HF checkpoint: it has no {METADATA_FILE}")


def _stored_dtypes(ckpt: _Checkpoint) -> dict[str, np.dtype]:
  """params path -> dtype of its HF tensor (of layer 0 for stacked ones)."""
  out: dict[str, np.dtype] = {}
  for item in ckpt.items:
    name = ckpt.stored[item.name]
    for path in item.tensor.params:
      out.setdefault(path, ckpt.source.dtype(name))
  return out


def param_metadata(directory: str) -> Any:
  """Pytree of jax.ShapeDtypeStruct of the params the checkpoint holds (stored dtype)."""
  ckpt = _open(directory)
  shapes = table.flatten(model.param_shapes(ckpt.config))
  dtypes = _stored_dtypes(ckpt)
  return table.nest({p: jax.ShapeDtypeStruct(tuple(s.shape), dtypes[p]) for p, s in shapes.items()})


def stored_dtype(directory: str) -> str:
  """The dtype the weights are stored in ('float16', ...; 'mixed:a,b' when they differ)."""
  names = sorted({d.name for d in _stored_dtypes(_open(directory)).values()})
  return names[0] if len(names) == 1 else "mixed:" + ",".join(names)


def restore(directory: str, *, shardings: Any = None, dtype: Any = None) -> Any:
  """The params of the HF checkpoint at `directory`, each array built in `shardings` from the
  slices its local devices hold (see the module docstring).

  shardings: None (everything on the first local device), one Sharding for every array, or a
    pytree of Shardings matching the params. dtype: cast while reading (None: the stored dtype).
  Raises InputError naming the file and tensor when a header or the data cannot be read.
  """
  ckpt = _open(directory)
  hf_tensors.check_tied_head(ckpt.source, ckpt.config, ckpt.prefix)   # as conversion does
  shapes = table.flatten(model.param_shapes(ckpt.config))
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    per_leaf = {p: shardings for p in shapes}
  else:
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    per_leaf = {"/".join(str(k.key) for k in keys): single if s is None else s
                for keys, s in jax.tree_util.tree_leaves_with_path(
                    shardings, is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding))}
    if set(per_leaf) != set(shapes):
      raise ValueError(f"shardings do not match the params of {directory}: missing "
                       f"{sorted(set(shapes) - set(per_leaf))}, unexpected "
                       f"{sorted(set(per_leaf) - set(shapes))}")
  stored_dtypes = _stored_dtypes(ckpt)
  # params path -> (item per layer, or the one item of an unstacked leaf; its part index)
  sources: dict[str, tuple[list[table.Item], int]] = {}
  for item in ckpt.items:
    for part, path in enumerate(item.tensor.params):
      sources.setdefault(path, ([], part))[0].append(item)

  out = {}
  for path, (items, part) in sources.items():
    target = np.dtype(dtype) if dtype is not None else stored_dtypes[path]
    out[path] = _restore_leaf(ckpt, items, part, tuple(shapes[path].shape), per_leaf[path],
                              target)
  return table.nest(out)


def _restore_leaf(ckpt: _Checkpoint, items: list[table.Item], part: int, shape: tuple[int, ...],
                  sharding: jax.sharding.Sharding, target: np.dtype) -> jax.Array:
  """One params array [L, ...] (stacked: items[l] is layer l's HF tensor) or [...] (one item),
  `part` of its items' transform, built block by block in `sharding`."""
  stacked = items[0].layer is not None
  handles: dict[str, Any] = {}
  blocks: dict[tuple[tuple[int, int, int], ...], np.ndarray] = {}

  def read_item(item: table.Item, index: tuple[slice, ...], files: contextlib.ExitStack
                ) -> np.ndarray:
    name = ckpt.stored[item.name]
    file = ckpt.source.where(name)
    if file not in handles:
      handles[file] = files.enter_context(safetensors_io.open_slices(file))
    tensor = handles[file].get_slice(name)
    try:
      value = item.tensor.transform.read_slice(lambda box: tensor[box], list(item.shapes), part,
                                               index)
    except Exception as e:  # safetensors: a file truncated or changed since it was opened
      raise InputError(f"{file}: cannot read tensor {name} ({type(e).__name__}: "
                       f"{str(e)[:300]})") from None
    return value.astype(target, copy=False)

  with contextlib.ExitStack() as files:

    def block(index: tuple[slice, ...]) -> np.ndarray:
      # Devices that hold the same block (replicas over data) get the one read.
      key = tuple(s.indices(n) for s, n in zip(index, shape))
      if key in blocks:
        return blocks[key]
      if not stacked:
        value = read_item(items[0], index, files)
      else:
        layers = range(*index[0].indices(len(items)))
        first = read_item(items[layers[0]], index[1:], files)
        value = np.empty((len(layers),) + first.shape, target)
        value[0] = first
        for k, layer in enumerate(layers[1:], 1):
          value[k] = read_item(items[layer], index[1:], files)
      blocks[key] = value
      return value

    array = jax.make_array_from_callback(shape, sharding, block)
    # Wait before the files close and the blocks go: a device may still be copying one.
    return jax.block_until_ready(array)
