"""Checkpoint conversion: HF (safetensors / .bin) and metaseq (.pt) files <-> opt_jax params.

  hf        read HF checkpoints of every family tensor by tensor, through the family's table
            (opt_jax.families); write HF safetensors
  metaseq   read metaseq consolidated files and Megatron model-parallel parts (OPT only)
  convert   one call from any input format to an opt_jax checkpoint or HF safetensors
            (what `python -m tools.convert_checkpoint` runs)

Submodules (and the checkpoint readers, which import JAX) import lazily so that importing this
package stays light (`python -m tools.convert_checkpoint --help`).
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from typing import Any

import numpy as np

from opt_jax import files
from opt_jax.checkpoints import layout
from opt_jax.errors import ConversionError, InputError, OutputExistsError
from opt_jax.families import table
from opt_jax.inputs import DTYPES, parse_dtype  # noqa: F401  (DTYPES: tools.convert_checkpoint)

INPUT_FORMATS = ("auto", "hf", "metaseq", "opt_jax")
OUTPUT_FORMATS = ("opt_jax", "hf")
_HF_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")




def detect_format(path: str | os.PathLike) -> str:
  """'opt_jax', 'hf' or 'metaseq' from what `path` holds; ConversionError when none fits."""
  from opt_jax.checkpoints import checkpoint  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file or directory")
  if os.path.isdir(path):
    if layout.checkpoint_kind(path) == "opt_jax" and checkpoint.is_checkpoint(path):
      return "opt_jax"
    if any(os.path.isfile(os.path.join(path, f)) for f in layout.WEIGHT_FILES):
      return "hf"
    if glob.glob(os.path.join(glob.escape(path), "*.pt")):
      return "metaseq"
  elif path.endswith(_HF_SUFFIXES):
    return "hf"
  elif path.endswith(".pt"):
    return "metaseq"
  raise ConversionError(
      f"{path}: unknown checkpoint format; expected an HF checkpoint (config.json + "
      f"{' | '.join(layout.WEIGHT_FILES)}), metaseq .pt file(s) (consolidated or "
      "*model_part-N.pt), or an opt_jax checkpoint directory")


def _not_opt_jax(path: str) -> str:
  """Why `path`, given as opt_jax input, is not one: what it holds instead, or what it lacks."""
  from opt_jax.checkpoints import checkpoint  # pylint: disable=import-outside-toplevel
  try:
    found = detect_format(path)
  except ConversionError:
    found = None
  if found in ("hf", "metaseq"):
    return (f"{path} is not an opt_jax checkpoint: it holds {found} weights; convert it with "
            f"input format {found!r} or 'auto' (--format={found} or --format=auto)")
  return checkpoint.checkpoint_problem(path) or f"{path}: not an opt_jax checkpoint"


def _tokenizer_files(directory: str, input_format: str, scratch: str) -> list[tuple[str, str]]:
  """(path, name) of the tokenizer files to store with the output."""
  present = [f for f in layout.TOKENIZER_FILES if os.path.isfile(os.path.join(directory, f))]
  if present or input_format != "metaseq":
    return [(os.path.join(directory, f), f) for f in present]
  # metaseq ships GPT-2's vocab with GPT-2 ids plus fairseq's dict.txt mapping them to model ids.
  vocab, merges, dict_txt = (os.path.join(directory, f)
                             for f in ("gpt2-vocab.json", "gpt2-merges.txt", "dict.txt"))
  if not (os.path.isfile(vocab) and os.path.isfile(merges)):
    return []
  if not os.path.isfile(dict_txt):
    logging.warning("%s: gpt2-vocab.json without dict.txt: GPT-2 ids are not the model's ids, so "
                    "no tokenizer is stored", directory)
    return []
  import json
  from opt_jax.convert import metaseq
  out = os.path.join(scratch, "vocab.json")
  with open(out, "w") as f:
    json.dump(metaseq.opt_vocab(vocab, dict_txt), f, ensure_ascii=False)
  return [(out, "vocab.json"), (merges, "merges.txt")]


def convert(input_path: str | os.PathLike, output: str | os.PathLike, *,
            input_format: str = "auto", output_format: str = "opt_jax", dtype: Any = None,
            config_path: str | None = None, overwrite: bool = False, progress: bool = False,
            max_shard_bytes: int | None = None) -> str:
  """Converts a checkpoint; returns the absolute output directory.

  input_format: 'hf' | 'metaseq' | 'opt_jax' | 'auto' (detected from the files).
  output_format: 'opt_jax' (orbax params + config.json + tokenizer, see
    opt_jax.checkpoints.orbax_format) or
    'hf' (config.json + safetensors that the family's HF class loads with from_pretrained).
  dtype: 'float32' | 'bfloat16' | 'float16' (or a dtype) to cast to; None keeps the stored one.
  config_path: metaseq only: an HF-style config.json instead of the inferred config.
  max_shard_bytes: hf output only: largest safetensors shard.
  overwrite: replace `output` if it is an earlier output of `output_format` with nothing else in
    it (opt_jax.files.check_can_overwrite), never a folder holding the input or anything
    else; checked before the input is read (OutputExistsError).
  Tokenizer files found beside the input are stored with the output. The output is written under
  a temporary name and renamed when complete; on any error nothing is left behind.
  """
  # pylint: disable-next=import-outside-toplevel
  from opt_jax.checkpoints import checkpoint, orbax_format
  from opt_jax.convert import hf, metaseq  # pylint: disable=import-outside-toplevel

  if input_format not in INPUT_FORMATS:
    raise ConversionError(f"unknown input format {input_format!r}; expected one of "
                          f"{', '.join(INPUT_FORMATS)}")
  if output_format not in OUTPUT_FORMATS:
    raise ConversionError(f"unknown output format {output_format!r}; expected one of "
                          f"{', '.join(OUTPUT_FORMATS)}")
  np_dtype = parse_dtype(dtype)
  input_path = os.path.abspath(os.fspath(input_path))
  output = os.path.abspath(os.fspath(output))
  # What the output may not be, before asking whether it may be replaced: the input (also
  # through a link), inside or around it, or inside any checkpoint folder.
  conflict = files.conflict_with_inputs(output, {"--input": input_path}, "--output")
  if conflict:
    raise OutputExistsError(f"refusing to write: {conflict}")
  inside = layout.enclosing_checkpoint(os.path.dirname(output))
  if inside:
    raise OutputExistsError(f"refusing to write: --output={output} lies inside the checkpoint "
                            f"folder {inside}; write the output elsewhere")
  files.check_output(output, folder=True, what="--output")   # a file in the way, no permission
  if os.path.lexists(output):
    if not overwrite:
      raise OutputExistsError(f"{output} already exists; pass overwrite=True (--overwrite) to "
                              "replace it")
    files.check_can_overwrite(output, output_format)
  if not os.path.exists(input_path):
    raise ConversionError(f"{input_path}: no such file or directory")
  fmt = detect_format(input_path) if input_format == "auto" else input_format
  if config_path is not None and fmt != "metaseq":
    raise ConversionError(f"a config file is only used for metaseq input, not {fmt}")
  if fmt == "opt_jax" and (layout.checkpoint_kind(input_path) != "opt_jax"
                          or not checkpoint.is_checkpoint(input_path)):
    raise InputError(_not_opt_jax(input_path))

  if fmt == "hf":
    params, config = hf.read_hf(input_path, dtype=np_dtype, progress=progress)
  elif fmt == "metaseq":
    params, config = metaseq.read_metaseq(input_path, config_path=config_path, dtype=np_dtype,
                                          progress=progress)
  else:
    params = checkpoint.restore(input_path, dtype=np_dtype)   # checks it is a checkpoint first
    config = checkpoint.load_config(input_path)
  directory = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)

  needed = sum(int(np.size(a)) * np.dtype(a.dtype).itemsize
               for a in table.flatten(params).values())
  files.check_free_space(output, needed)   # before writing: a full disk is found mid-write too
  with tempfile.TemporaryDirectory() as scratch:
    tokenizer = _tokenizer_files(directory, fmt, scratch)
    try:
      if output_format == "opt_jax":
        orbax_format.save(output, params, config, tokenizer_files=tokenizer, overwrite=overwrite,
                          extra={"converted_from": input_path, "source_format": fmt})
      else:
        hf.write_hf(output, params, config, tokenizer_files=tokenizer, overwrite=overwrite,
                    progress=progress,
                    max_shard_bytes=max_shard_bytes or hf.DEFAULT_MAX_SHARD_BYTES)
    except files.DiskFullError as e:   # the temporary is gone; say how much the output needs
      raise files.disk_full_error(output, needed) from e
  return output
