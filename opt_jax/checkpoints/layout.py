"""What the files of a checkpoint are called, and which kind of checkpoint a directory is.

An opt_jax checkpoint (opt_jax.checkpoints.orbax_format):
  DIR/config.json      the HF config.json of the model's family (`families.write_config`)
  DIR/params/          orbax checkpoint of the params pytree
  DIR/opt_jax.json     {"format": 2, "dtype": ..., "num_params": ..., **extra}; written last
  DIR/tokenizer.json | vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json)
An HF checkpoint (opt_jax.checkpoints.hf_format): config.json + model.safetensors, or
model.safetensors.index.json and its shards (PyTorch .bin weights are read only by conversion).

Pure Python (no JAX, no numpy): the HF-cache scan and the output checks use it too.
"""

from __future__ import annotations

import os
import re

CONFIG_FILE = "config.json"
METADATA_FILE = "opt_jax.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
ORBAX_METADATA = "_METADATA"   # orbax's tree metadata in PARAMS_DIR: present once params are saved

# HF weight files, in the order transformers prefers them.
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_INDEX, SAFETENSORS, TORCH_BIN_INDEX, TORCH_BIN)
SAFETENSORS_FILES = (SAFETENSORS_INDEX, SAFETENSORS)
TORCH_FILES = (TORCH_BIN_INDEX, TORCH_BIN)
# What an HF safetensors directory written by opt_jax.convert.hf.write_hf holds, besides tokenizer
# files: the only HF folders an overwrite may replace.
HF_OUTPUT = re.compile(r"config\.json|model\.safetensors(\.index\.json)?|"
                       r"model-\d{5}-of-\d{5}\.safetensors")

# What a directory given as a checkpoint must hold, for messages.
EXPECTED = (f"expected an opt_jax checkpoint directory ({CONFIG_FILE}, {PARAMS_DIR}/, "
            f"{METADATA_FILE}) as written by opt_jax.checkpoints.orbax_format.save or `python -m "
            f"tools.convert_checkpoint`, or an HF one ({CONFIG_FILE} + {SAFETENSORS} or "
            f"{SAFETENSORS_INDEX} and its shards)")


def has_hf_weights(directory: str | os.PathLike) -> bool:
  """True if `directory` holds HF weights of any format (safetensors or .bin)."""
  return any(os.path.lexists(os.path.join(directory, f)) for f in WEIGHT_FILES)


def checkpoint_kind(directory: str | os.PathLike) -> str | None:
  """'opt_jax' when `directory` has an opt_jax checkpoint's own parts (opt_jax.json or params/),
  else 'hf' when it holds HF weights (safetensors or .bin), else None. Says nothing of whether
  the files are complete (`opt_jax.checkpoints.checkpoint.checkpoint_problem` does)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return None
  if any(os.path.lexists(os.path.join(directory, p)) for p in (METADATA_FILE, PARAMS_DIR)):
    return "opt_jax"
  return "hf" if has_hf_weights(directory) else None


def enclosing_checkpoint(path: str | os.PathLike) -> str | None:
  """The checkpoint folder that `path` is or lies inside, links resolved; None when there is
  none. A checkpoint here is a folder with opt_jax.json, or config.json beside params/ or HF
  weights (a folder that merely has a params/ subfolder is not one). Outputs never go there: a
  run writing into a checkpoint would change what later runs read (and its identity)."""
  path = os.path.realpath(os.path.expanduser(os.fspath(path)))
  while True:
    if os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, METADATA_FILE))
        or (os.path.isfile(os.path.join(path, CONFIG_FILE))
            and (os.path.isdir(os.path.join(path, PARAMS_DIR)) or has_hf_weights(path)))):
      return path
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent
