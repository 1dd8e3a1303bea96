"""HF checkpoints of every family <-> opt_jax params, through the family's tensor table.

Reading: a directory (or a weights file inside one) with config.json and the weights as
  model.safetensors | model.safetensors.index.json + shards | pytorch_model.bin (+ .index.json).
config.json's model_type picks the family (opt_jax.families); the family's table
(opt_jax.families.table) says which tensors must be there, under which names and shapes, and how
each becomes params. Both layouts of a family are read: the CausalLM one (e.g. `model.decoder.*`
for OPT, `gpt_neox.*`) and the bare base model's (`decoder.*`, unprefixed). A stored head of a
tied model must equal the token embedding. Tensors are read one at a time and written into the
stacked params arrays, so peak memory is the params plus one tensor.

Safetensors files are read with positioned reads of the byte ranges their header names rather
than through the `safetensors` library: its numpy backend cannot return bfloat16, and its memory
map would count the whole input file as resident. .bin files need PyTorch and are loaded with
`weights_only=True` (memory-mapped when the file is in the zip format).

Writing: `write_hf` streams config.json + model.safetensors (or numbered shards and
model.safetensors.index.json) that the family's HF class (`from_pretrained`) loads, with the
tensor names of the released checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import ml_dtypes
import numpy as np
import tqdm

from opt_jax import checkpoint, families
from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError
from opt_jax.families import table

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_INDEX, SAFETENSORS, TORCH_BIN_INDEX, TORCH_BIN)  # preference order
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER_BYTES = 100 << 20


class ConversionError(InputError):
  """Bad conversion input. The message names the file and tensor at fault and what was expected."""


class TensorSource(Protocol):
  """Named tensors spread over one or more files, read one at a time."""
  description: str                        # the checkpoint, for messages

  def names(self) -> list[str]: ...
  def shape(self, name: str) -> tuple[int, ...]: ...
  def where(self, name: str) -> str: ...  # the file(s) holding `name`, for messages
  def read(self, name: str) -> np.ndarray: ...


# Safetensors --------------------------------------------------------------------------------

class SafetensorsFile:
  """One .safetensors file: u64 little-endian header length N, N bytes of JSON
  {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data
  (offsets relative to its start). The header is validated on open, including that every tensor's
  bytes lie inside the file, so a truncated file fails before anything is converted."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      n = int.from_bytes(head, "little") if len(head) == 8 else -1
      if n < 2 or n > min(size - 8, _MAX_HEADER_BYTES):
        raise ConversionError(f"{path}: not a valid safetensors file (header length field {n}, "
                              f"file size {size} bytes): the file is truncated or corrupt")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
      raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    self._data_start = 8 + n
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
    data_size = size - self._data_start
    for name, e in header.items():
      try:
        dtype = _ST_DTYPES[e["dtype"]]
        shape = tuple(int(d) for d in e["shape"])
        begin, end = (int(o) for o in e["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{path}: tensor {name}: corrupt or unsupported header entry "
                              f"{str(e)[:200]}") from None
      if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise ConversionError(f"{path}: tensor {name}: header byte range {begin}..{end} does not "
                              f"fit shape {shape} of {e['dtype']}: the file is corrupt")
      if end > data_size:
        raise ConversionError(f"{path}: tensor {name} needs bytes {begin}..{end} of the data but "
                              f"the file holds only {data_size}: the file is truncated")
      self._entries[name] = (dtype, shape, self._data_start + begin)

  def names(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def read(self, name: str) -> np.ndarray:
    dtype, shape, offset = self._entries[name]
    out = np.empty(shape, dtype)
    with open(self.path, "rb") as f:
      f.seek(offset)
      got = f.readinto(out.reshape(-1).view(np.uint8))
    if got != out.nbytes:
      raise ConversionError(f"{self.path}: tensor {name}: read {got} of {out.nbytes} bytes: the "
                            "file is truncated")
    return out

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows start:stop (of the first dimension) of a tensor, read alone."""
    dtype, shape, offset = self._entries[name]
    out = np.empty((stop - start,) + shape[1:], dtype)
    with open(self.path, "rb") as f:
      f.seek(offset + start * out[:1].nbytes)
      got = f.readinto(out.reshape(-1).view(np.uint8))
    if got != out.nbytes:
      raise ConversionError(f"{self.path}: tensor {name}: read {got} of {out.nbytes} bytes: the "
                            "file is truncated")
    return out


def safetensors_header(entries: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype in entries:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  return blob + b" " * (-len(blob) % 8)  # data starts 8-byte aligned


# PyTorch .bin -------------------------------------------------------------------------------

def import_torch(path: str):
  try:
    import torch
  except ImportError:
    raise ConversionError(f"{path}: reading PyTorch files needs torch (pip install "
                          "'opt_jax[torch]'); safetensors checkpoints do not") from None
  return torch


def torch_to_numpy(t) -> np.ndarray:
  """A numpy copy of a CPU tensor (bfloat16 through its bits: numpy has no bfloat16)."""
  torch = import_torch("")
  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return t.numpy().copy()


def torch_load(path: str, **kwargs) -> Any:
  """torch.load on CPU, memory-mapped when the file is in the zip format."""
  torch = import_torch(path)
  try:
    try:
      return torch.load(path, map_location="cpu", mmap=True, **kwargs)
    except RuntimeError as e:
      if "mmap" not in str(e) and "zip" not in str(e):
        raise
      return torch.load(path, map_location="cpu", **kwargs)  # legacy (non-zip) format
  except Exception as e:
    raise ConversionError(_torch_load_problem(path, e)) from None


# Lines of torch's weights_only refusal that are advice, not what happened: never repeated (one
# of them suggests weights_only=False, i.e. running the file's code).
_TORCH_ADVICE = ("Weights only load failed", "In PyTorch", "Re-running `torch.load`",
                 "Please file an issue", "Check the documentation", "WeightsUnpickler error")


def _torch_load_problem(path: str, e: Exception) -> str:
  """One message for a .bin/.pt file torch.load could not read: what happened and what to do."""
  text = str(e)
  if "Weights only load failed" not in text:
    return (f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {text[:300]}): "
            "the file is truncated, corrupt or not a state dict")
  facts = [line.strip() for line in text.splitlines()
           if line.strip() and not line.strip().startswith(_TORCH_ADVICE)]
  fact = " ".join(facts)[:300] or "no reason given"
  if "GLOBAL" in fact:
    return (f"{path}: refused to unpickle: the file asks to import code a weights file never "
            f"needs ({fact}); opt_jax loads PyTorch files with torch's safe loader only, which "
            "never runs code from the file. Do not load it elsewhere either unless you trust its "
            "source; use the checkpoint's .safetensors weights instead")
  return (f"{path}: cannot read as a PyTorch state dict ({fact}): the file is truncated, corrupt "
          "or not a state dict")


class TorchStateDictFile:
  """One pytorch_model.bin: a flat {name: tensor} dict, loaded with weights_only=True."""

  def __init__(self, path: str):
    self.path = path
    state = torch_load(path, weights_only=True)
    if not isinstance(state, Mapping):
      raise ConversionError(f"{path}: expected a state dict {{name: tensor}}, got "
                            f"{type(state).__name__}")
    torch = import_torch(path)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
      raise ConversionError(f"{path}: entry {bad[0]!r} is not a tensor; expected a state dict")
    self._state = state

  def names(self) -> list[str]:
    return list(self._state)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._state[name].shape)

  def dtype(self, name: str) -> str:
    return str(self._state[name].dtype).removeprefix("torch.")

  def read(self, name: str) -> np.ndarray:
    return torch_to_numpy(self._state[name])

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    return torch_to_numpy(self._state[name][start:stop])


# A checkpoint of several files ----------------------------------------------------------------

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


def _open_index(index_path: str, open_file: Callable[[str], Any]) -> FileSetSource:
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


def resolve(path: str | os.PathLike) -> tuple[str, str]:
  """(directory, weights file) of an HF checkpoint given as a directory or one of its files."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file or directory")
  if os.path.isfile(path):
    if not path.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json")):
      raise ConversionError(f"{path}: unknown weights format; expected .safetensors, .bin or a "
                            ".index.json of either")
    return os.path.dirname(path), path
  for name in WEIGHT_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return path, os.path.join(path, name)
  raise ConversionError(f"{path}: no HF weights found; expected one of {', '.join(WEIGHT_FILES)}")


def open_weights(weights: str) -> FileSetSource:
  """The tensors of an HF weights file (.safetensors, .bin, or either's .index.json)."""
  name = os.path.basename(weights)
  if name.endswith(".safetensors.index.json"):
    return _open_index(weights, SafetensorsFile)
  if name.endswith(".bin.index.json"):
    return _open_index(weights, TorchStateDictFile)
  if name.endswith(".safetensors"):
    return FileSetSource(weights, [SafetensorsFile(weights)])
  if name.endswith((".bin", ".pt", ".pth")):
    return FileSetSource(weights, [TorchStateDictFile(weights)])
  raise ConversionError(f"{weights}: unknown weights format; expected .safetensors, .bin or a "
                        ".index.json of either")


# Building params ----------------------------------------------------------------------------

def params_from_source(source: TensorSource, config: DecoderConfig, *, prefix: str,
                       ignore: Iterable[str] = (), dtype: Any = None, progress: bool = False,
                       config_source: str = "the config") -> dict[str, Any]:
  """Validates `source` against `config` (`match_tensors`), then builds the params pytree tensor
  by tensor; nothing is read before the whole checkpoint has been validated."""
  items = table.items(config, prefix)
  stored = match_tensors(source, config, prefix=prefix, ignore=ignore,
                         config_source=config_source)

  bar = tqdm.tqdm(total=len(items), unit="tensor", desc="converting", disable=not progress,
                  dynamic_ncols=True)

  def get(item: table.Item) -> np.ndarray:
    name = stored[item.name]
    try:
      array = source.read(name)
    except ConversionError:
      raise
    except Exception as e:
      raise ConversionError(f"{source.where(name)}: cannot read tensor {name} "
                            f"({type(e).__name__}: {e})") from None
    check_dtype(source, name, item.tensor, array.dtype)   # sources without a header say it here
    bar.update()
    return array

  with bar:
    return table.read_params(config, get, prefix=prefix, dtype=dtype)


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


def _embedding_row(family: families.Family) -> table.Tensor:
  return next(t for t in family.tensors if t.params == ("embed/embedding",))


def layout_prefix(source: TensorSource, family: families.Family) -> str:
  """Which of the family's name layouts the source uses (judged by the token embedding)."""
  names = set(source.names())
  embed = _embedding_row(family).hf
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


def read_hf(path: str | os.PathLike, *, dtype: Any = None, progress: bool = False
            ) -> tuple[dict[str, Any], DecoderConfig]:
  """Reads an HF checkpoint of any supported family (directory or weights file with config.json
  beside it). dtype: cast every tensor (None keeps the stored dtype). Returns (params, config)."""
  directory, weights = resolve(path)
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise ConversionError(f"{config_path} not found: an HF checkpoint needs its config.json "
                          f"beside {os.path.basename(weights)}")
  try:
    config = families.read_config(config_path)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  params = _read(open_weights(weights), config, dtype=dtype, progress=progress,
                 config_source=config_path)
  return params, config


def _read(source: TensorSource, config: DecoderConfig, *, dtype: Any, progress: bool,
          config_source: str) -> dict[str, Any]:
  family = families.get(config.family)
  prefix = layout_prefix(source, family)
  head = [family.head] if config.tie_embeddings else []
  match_tensors(source, config, prefix=prefix, ignore=head, config_source=config_source)
  check_tied_head(source, config, prefix)   # before the long read
  return params_from_source(source, config, prefix=prefix, ignore=head, dtype=dtype,
                            progress=progress, config_source=config_source)


class _DictSource:
  """A TensorSource over an in-memory state dict (numpy arrays or torch tensors)."""

  def __init__(self, state: Mapping[str, Any], description: str):
    self._state, self.description = state, description

  def names(self) -> list[str]:
    return list(self._state)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._state[name].shape)

  def where(self, name: str) -> str:
    return self.description

  def dtype(self, name: str) -> Any:
    return self._state[name].dtype

  def read(self, name: str) -> np.ndarray:
    value = self._state[name]
    return value if isinstance(value, np.ndarray) else torch_to_numpy(value)


def params_from_state_dict(state: Mapping[str, Any], config: DecoderConfig, *,
                           dtype: Any = None) -> dict[str, Any]:
  """The params of an HF state dict {name: array or torch tensor} (e.g. `model.state_dict()` of
  the family's HF class), validated like a checkpoint file."""
  return _read(_DictSource(state, "state dict"), config, dtype=dtype, progress=False,
               config_source="the config")


def state_dict_from_params(params: Mapping[str, Any], config: DecoderConfig
                           ) -> dict[str, np.ndarray]:
  """The HF tensors of `params` by name, as write_hf writes them (a tied head left out)."""
  prefix = families.get(config.family).prefixes[0]
  return {item.name: array for item, array in table.hf_tensors(config, params, prefix=prefix)}


def expected_tensors(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape of every tensor an HF checkpoint of `config` holds."""
  prefix = families.get(config.family).prefixes[0]
  return {item.name: item.hf_shape for item in table.items(config, prefix)}


_COMPARE_BYTES = 64 << 20   # rows of the head and the embedding compared at a time


def check_tied_head(source: TensorSource, config: DecoderConfig, prefix: str) -> None:
  """The one check of a stored LM head of a model whose config ties it to the token embedding
  (tie_word_embeddings), made by conversion and by the in-place read (opt_jax.convert.hf_direct)
  alike: the head must be a float tensor equal to the embedding, else ConversionError naming it
  (the model would use the embedding and silently ignore the stored head). Compares a block of
  rows at a time, so memory stays at two blocks whatever the vocabulary."""
  family = families.get(config.family)
  head_name, embed_row = family.head, _embedding_row(family)
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


# Writing ------------------------------------------------------------------------------------

def write_hf(directory: str | os.PathLike, params: Mapping[str, Any], config: DecoderConfig, *,
             dtype: Any = None, tokenizer_files: Iterable[Any] = (),
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
             progress: bool = False) -> list[str]:
  """Writes an HF checkpoint of the config's family (its CausalLM class loads it with
  from_pretrained): config.json + model.safetensors, or numbered shards of at most
  `max_shard_bytes` + model.safetensors.index.json when larger; tensors are named as the released
  checkpoints name them, a tied head is left out (HF re-ties it). Atomic like `checkpoint.save`.
  dtype: cast while writing. Returns the weight file names."""
  cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype, copy=False))
  prefix = families.get(config.family).prefixes[0]
  items = table.items(config, prefix)
  # Pass 1: names, shapes and dtypes from the table (nothing computed) to plan the shards.
  leaves = table.flatten(params)
  entries = [(item.name, item.hf_shape,
              np.dtype(leaves[item.tensor.params[0]].dtype if dtype is None else dtype))
             for item in items]
  shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
  size = 0
  for e in entries:
    nbytes = math.prod(e[1]) * e[2].itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes
  names = ([SAFETENSORS] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  shard_of = {e[0]: i for i, shard in enumerate(shards) for e in shard}
  tokenizer_files = checkpoint.file_pairs(tokenizer_files)

  with checkpoint.atomic_directory(directory, overwrite=overwrite) as tmp:
    files = [None] * len(shards)
    try:
      # Pass 2: tensors come in the planned order, so each shard is written front to back.
      for item, array in tqdm.tqdm(table.hf_tensors(config, params, prefix=prefix),
                                   total=len(entries), unit="tensor", desc="writing",
                                   disable=not progress, dynamic_ncols=True):
        i = shard_of[item.name]
        if files[i] is None:
          files[i] = open(os.path.join(tmp, names[i]), "wb")
          header = safetensors_header(shards[i])
          files[i].write(len(header).to_bytes(8, "little") + header)
        files[i].write(np.ascontiguousarray(cast(np.asarray(array))).reshape(-1).view(np.uint8))
    finally:
      for f in files:
        if f is not None:
          f.close()
    if len(shards) > 1:
      total = sum(math.prod(e[1]) * e[2].itemsize for e in entries)
      index = {"metadata": {"total_size": total},
               "weight_map": {e[0]: names[shard_of[e[0]]] for e in entries}}
      with open(os.path.join(tmp, SAFETENSORS_INDEX), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    families.write_config(config, os.path.join(tmp, "config.json"))
    checkpoint.copy_files(tokenizer_files, tmp)
  return names
