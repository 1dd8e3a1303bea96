"""HF checkpoints of every family <-> opt_jax params, through the family's tensor table.

Reading: a directory (or a weights file inside one) with config.json and the weights as
  model.safetensors | model.safetensors.index.json + shards | pytorch_model.bin (+ .index.json).
config.json's model_type picks the family (opt_jax.families); the family's table
(opt_jax.families.table) says which tensors must be there, under which names and shapes, and how
each becomes params. Both layouts of a family are read: the CausalLM one (e.g. `model.decoder.*`
for OPT, `gpt_neox.*`) and the bare base model's (`decoder.*`, unprefixed). A stored head of a
tied model must equal the token embedding. Tensors are read one at a time and written into the
stacked params arrays, so peak memory is the params plus one tensor.

Safetensors files are read by opt_jax.checkpoints.safetensors_io, and matched to the family's
table by opt_jax.checkpoints.hf_tensors (`match_tensors`, `check_tied_head`), the same functions
the in-place read (opt_jax.checkpoints.hf_format) uses. .bin files need PyTorch and are loaded
with `weights_only=True` (memory-mapped when the file is in the zip format).

Writing: `write_hf` streams config.json + model.safetensors (or numbered shards and
model.safetensors.index.json) that the family's HF class (`from_pretrained`) loads, with the
tensor names of the released checkpoints.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
import tqdm

from opt_jax import families, files
from opt_jax.checkpoints import hf_tensors, safetensors_io
from opt_jax.checkpoints.hf_tensors import FileSetSource, TensorSource
from opt_jax.checkpoints.layout import SAFETENSORS, SAFETENSORS_INDEX, WEIGHT_FILES
from opt_jax.config import DecoderConfig
from opt_jax.errors import ConversionError
from opt_jax.families import table

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"

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
  if name.endswith((".safetensors.index.json", ".safetensors")):
    return hf_tensors.open_safetensors(weights)
  if name.endswith(".bin.index.json"):
    return hf_tensors.open_index(weights, TorchStateDictFile)
  if name.endswith((".bin", ".pt", ".pth")):
    return FileSetSource(weights, [TorchStateDictFile(weights)])
  raise ConversionError(f"{weights}: unknown weights format; expected .safetensors, .bin or a "
                        ".index.json of either")


# Building params ----------------------------------------------------------------------------

def params_from_source(source: TensorSource, config: DecoderConfig, *, prefix: str,
                       ignore: Iterable[str] = (), dtype: Any = None, progress: bool = False,
                       config_source: str = "the config") -> dict[str, Any]:
  """Validates `source` against `config` (`hf_tensors.match_tensors`), then builds the params
  pytree tensor by tensor; nothing is read before the whole checkpoint has been validated."""
  items = table.items(config, prefix)
  stored = hf_tensors.match_tensors(source, config, prefix=prefix, ignore=ignore,
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
    # Sources without a header say the dtype only here.
    hf_tensors.check_dtype(source, name, item.tensor, array.dtype)
    bar.update()
    return array

  with bar:
    return table.read_params(config, get, prefix=prefix, dtype=dtype)


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
  prefix = hf_tensors.layout_prefix(source, family)
  head = [family.head] if config.tie_embeddings else []
  hf_tensors.match_tensors(source, config, prefix=prefix, ignore=head,
                           config_source=config_source)
  hf_tensors.check_tied_head(source, config, prefix)   # before the long read
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


# Writing ------------------------------------------------------------------------------------

def write_hf(directory: str | os.PathLike, params: Mapping[str, Any], config: DecoderConfig, *,
             dtype: Any = None, tokenizer_files: Iterable[Any] = (),
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
             progress: bool = False) -> list[str]:
  """Writes an HF checkpoint of the config's family (its CausalLM class loads it with
  from_pretrained): config.json + model.safetensors, or numbered shards of at most
  `max_shard_bytes` + model.safetensors.index.json when larger; tensors are named as the released
  checkpoints name them, a tied head is left out (HF re-ties it). Atomic like
  `opt_jax.checkpoints.orbax_format.save`.
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
  tokenizer_files = files.file_pairs(tokenizer_files)

  with files.atomic_checkpoint_directory(directory, overwrite=overwrite) as tmp:
    outs = [None] * len(shards)
    try:
      # Pass 2: tensors come in the planned order, so each shard is written front to back.
      for item, array in tqdm.tqdm(table.hf_tensors(config, params, prefix=prefix),
                                   total=len(entries), unit="tensor", desc="writing",
                                   disable=not progress, dynamic_ncols=True):
        i = shard_of[item.name]
        if outs[i] is None:
          outs[i] = open(os.path.join(tmp, names[i]), "wb")
          header = safetensors_io.header_bytes(shards[i])
          outs[i].write(len(header).to_bytes(8, "little") + header)
        outs[i].write(np.ascontiguousarray(cast(np.asarray(array))).reshape(-1).view(np.uint8))
    finally:
      for f in outs:
        if f is not None:
          f.close()
    if len(shards) > 1:
      total = sum(math.prod(e[1]) * e[2].itemsize for e in entries)
      index = {"metadata": {"total_size": total},
               "weight_map": {e[0]: names[shard_of[e[0]]] for e in entries}}
      with open(os.path.join(tmp, SAFETENSORS_INDEX), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    families.write_config(config, os.path.join(tmp, "config.json"))
    files.copy_files(tokenizer_files, tmp)
  return names
