"""Named tensors of HF weight files, matched to the family's table: shared by the in-place read
(opt_jax.checkpoints.hf_format) and conversion (opt_jax.convert.hf), so both accept and refuse the
same files with the same messages.

  FileSetSource     the union of the tensors of several files (the shards of an index)
  open_index        an .index.json and the shards it names, each opened by a given reader
  open_safetensors  model.safetensors or model.safetensors.index.json and its shards
  layout_prefix     which of the family's name layouts (CausalLM or bare base model) is stored
  match_tensors     names, shapes and dtypes against the table (headers only)
  check_tied_head   a stored LM head of a tied model must equal the embedding

Errors are ConversionError naming the file and tensor at fault.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np

from opt_jax import families
from opt_jax.checkpoints import safetensors_io
from opt_jax.config import DecoderConfig
from opt_jax.errors import ConversionError
from opt_jax.families import table


class TensorSource(Protocol):
  """Named tensors spread over one or more files, read one at a time."""
  description: str                        # the checkpoint, for messages

  def names(self) -> list[str]: ...
  def shape(self, name: str) -> tuple[int, ...]: ...
  def where(self, name: str) -> str: ...  # the file(s) holding `name`, for messages
  def read(self, name: str) -> np.ndarray: ...



class FileSetSource:
  """The union of the tensors of several files (shards); a name held twice is an error."""

  def __init__(self, description: str, files: list[Any]):
    self.description = description
    self._file_of: dict[str, Any] = {}
    for f in files:
      for name in f.names():
        if name in self._file_of:
          raise ConversionError(f"tensor {name} is stored twice: in {self._file_of[name].path} "
                                f"and {f.path}")
        self._file_of[name] = f

  def names(self) -> list[str]:
    return list(self._file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._file_of[name].shape(name)

  def where(self, name: str) -> str:
    return self._file_of[name].path

  def read(self, name: str) -> np.ndarray:
    return self._file_of[name].read(name)

  def dtype(self, name: str) -> Any:
    """The stored dtype of `name` (from the header; None where the file cannot say)."""
    f = self._file_of[name]
    return f.dtype(name) if hasattr(f, "dtype") else None

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    f = self._file_of[name]
    return f.read_rows(name, start, stop) if hasattr(f, "read_rows") else f.read(name)[start:stop]


def open_index(index_path: str, open_file: Callable[[str], Any]) -> FileSetSource:
  """The tensors of the shards an .index.json names ({"weight_map": {tensor: file}}), each opened
  with `open_file`; the index must name files beside it and agree with what they hold."""
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    assert isinstance(weight_map, dict)
  except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
    raise ConversionError(f"{index_path}: expected JSON with a \"weight_map\" object "
                          f"{{tensor: file}} ({type(e).__name__}: {e})") from None
  directory = os.path.dirname(index_path)
  files = []
  for shard in sorted(set(weight_map.values())):
    if (not isinstance(shard, str) or os.path.basename(shard) != shard
        or shard in ("", ".", "..")):
      example = next(k for k, v in weight_map.items() if v == shard)
      raise ConversionError(f"{index_path}: lists tensor {example} in {shard!r}, which is not a "
                            f"file name in {directory}: an index names shards beside it, never a "
                            "path elsewhere; fix the index")
    path = os.path.join(directory, shard)
    if not os.path.isfile(path):
      example = next(k for k, v in weight_map.items() if v == shard)
      raise ConversionError(f"{index_path}: shard {shard} (holding e.g. {example}) not found at "
                            f"{path}")
    files.append(open_file(path))
  source = FileSetSource(index_path, files)
  names = set(source.names())
  for name, shard in weight_map.items():
    if name not in names:
      raise ConversionError(f"{index_path}: lists tensor {name} in {shard}, but that file has no "
                            "such tensor")
    if os.path.basename(source.where(name)) != shard:
      raise ConversionError(f"{index_path}: lists tensor {name} in {shard}, but it is in "
                            f"{source.where(name)}")
  return source


def open_safetensors(weights: str) -> FileSetSource:
  """The tensors of model.safetensors, or of model.safetensors.index.json and its shards."""
  if weights.endswith(".index.json"):
    return open_index(weights, safetensors_io.SafetensorsFile)
  return FileSetSource(weights, [safetensors_io.SafetensorsFile(weights)])


def match_tensors(source: TensorSource, config: DecoderConfig, *, prefix: str,
                  ignore: Iterable[str] = (), config_source: str = "the config"
                  ) -> dict[str, str]:
  """{table name: name in `source`} of every tensor of `config`'s model; reads headers only.

  Tensor names in `source` are those of the family's table, with `prefix` on the base model's
  tensors (an alias of a row is accepted in place of its name); names in `ignore`, and stored
  non-parameters the family lists as `ignored`, are skipped. Raises ConversionError naming the
  file and tensor for a missing tensor, an unexpected one, or a shape that differs from what
  `config` implies.
  """
  family = families.get(config.family)
  items = table.items(config, prefix)
  skip = re.compile(family.ignored) if family.ignored else None
  ignore = set(ignore)
  names = [n for n in source.names() if n not in ignore and not (skip and skip.search(n))]
  present = set(names)
  stored: dict[str, str] = {}                      # table name -> name in the source
  missing = []
  for item in items:
    found = [n for n in (item.name,) + item.aliases if n in present]
    if found:
      stored[item.name] = found[0]
    else:
      missing.append(item.name)
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ConversionError(f"{source.description}: missing tensor {missing[0]}{more}, needed by "
                          f"{config_source}")
  used = set(stored.values())
  unexpected = [n for n in names if n not in used]
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise ConversionError(f"{source.where(unexpected[0])}: unexpected tensor {unexpected[0]}{more};"
                          f" {config_source} describes no such {family.architecture} parameter")
  stored_dtype = getattr(source, "dtype", None)
  for item in items:
    got = tuple(source.shape(stored[item.name]))
    if got != item.hf_shape:
      raise ConversionError(f"{source.where(stored[item.name])}: tensor {stored[item.name]} has "
                            f"shape {got}, {config_source} implies {item.hf_shape}")
    dtype = stored_dtype(stored[item.name]) if stored_dtype else None
    if dtype is not None:
      check_dtype(source, stored[item.name], item.tensor, dtype)
  return stored


def check_dtype(source: TensorSource, name: str, tensor: table.Tensor, dtype: Any) -> None:
  """ConversionError naming the tensor when its stored dtype is not one the family's table
  accepts for it (an integer where a float weight belongs)."""
  problem = table.dtype_problem(tensor, dtype)
  if problem:
    raise ConversionError(f"{source.where(name)}: tensor {name} {problem}; the file is corrupt "
                          "or was not written as a checkpoint of this model")


def embedding_row(family: families.Family) -> table.Tensor:
  return next(t for t in family.tensors if t.params == ("embed/embedding",))


def layout_prefix(source: TensorSource, family: families.Family) -> str:
  """Which of the family's name layouts the source uses (judged by the token embedding)."""
  names = set(source.names())
  embed = embedding_row(family).hf
  layouts = [p for p in family.prefixes if p + embed in names]
  if len(layouts) > 1:
    raise ConversionError(f"{source.description}: holds both {layouts[0]}{embed} and "
                          f"{layouts[1]}{embed}; expected one layout")
  if not layouts:
    wanted = " or ".join(p + embed for p in family.prefixes)
    raise ConversionError(f"{source.description}: no tensor {wanted}; not a "
                          f"{family.architecture} checkpoint (first names: "
                          f"{sorted(names)[:3]})")
  return layouts[0]


_COMPARE_BYTES = 64 << 20   # rows of the head and the embedding compared at a time


def check_tied_head(source: TensorSource, config: DecoderConfig, prefix: str) -> None:
  """The one check of a stored LM head of a model whose config ties it to the token embedding
  (tie_word_embeddings), made by conversion and by the in-place read
  (opt_jax.checkpoints.hf_format) alike: the head must be a float tensor equal to the embedding,
  else ConversionError naming it (the model would use the embedding and silently ignore the
  stored head). Compares a block of rows at a time, so memory stays at two blocks whatever the
  vocabulary."""
  family = families.get(config.family)
  head_name, embed_row = family.head, embedding_row(family)
  embed_name = prefix + embed_row.hf
  if not config.tie_embeddings or head_name not in source.names():
    return
  dtype = source.dtype(head_name) if hasattr(source, "dtype") else None
  if dtype is not None:
    check_dtype(source, head_name, embed_row, dtype)
  shape, embed_shape = tuple(source.shape(head_name)), tuple(source.shape(embed_name))
  diff = f"shape {shape} vs {embed_shape}" if shape != embed_shape else None
  if diff is None:
    row_bytes = max(1, math.prod(shape[1:]) * 4)
    step = max(1, _COMPARE_BYTES // row_bytes)
    differs, worst = False, 0.0
    read = getattr(source, "read_rows", None)
    whole = None if read else (source.read(head_name), source.read(embed_name))
    for start in range(0, shape[0] if shape else 0, step):
      stop = min(start + step, shape[0])
      head, embed = ((read(head_name, start, stop), read(embed_name, start, stop)) if read
                     else (whole[0][start:stop], whole[1][start:stop]))
      if not np.array_equal(head, embed, equal_nan=True):
        differs = True
        gap = np.abs(head.astype(np.float32) - embed.astype(np.float32))
        worst = max(worst, float(np.nanmax(gap)) if not np.all(np.isnan(gap)) else 0.0)
    if differs:
      diff = f"max abs difference {worst}"
  if diff is not None:
    raise ConversionError(
        f"{source.where(head_name)}: tensor {head_name} differs from {embed_name} ({diff}), but "
        "config.json ties the LM head to the token embedding (tie_word_embeddings); set "
        "tie_word_embeddings to false if the head is its own")
