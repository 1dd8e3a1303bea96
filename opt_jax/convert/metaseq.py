"""metaseq checkpoints (the format OPT was trained and released in) -> opt_jax params.

Inputs:
  * a consolidated file (e.g. `restored.pt`, `consolidated.pt`): one unsharded state dict;
  * Megatron model-parallel parts `PREFIX-model_part-0.pt` ... `PREFIX-model_part-{M-1}.pt` (name
    any part, or the directory holding them), merged here tensor by tensor.
Each file is a dict holding the state dict under "model" (or is the state dict itself). Tensor
names: decoder.embed_tokens.weight [V/M, E], decoder.embed_positions.weight [P + 2, D],
decoder.project_in_dim.weight / project_out_dim.weight (OPT-350m), decoder.layer_norm.* (the final
layer norm), decoder.layers.N.{self_attn.qkv_proj, self_attn.out_proj, fc1, fc2,
self_attn_layer_norm, final_layer_norm}.{weight, bias}; unfused self_attn.{q,k,v}_proj also work.
FSDP wrapper segments in names (_fsdp_wrapped_module., _fpw_module.) are dropped. Bookkeeping
(decoder.version, *._float_tensor) is ignored; decoder.output_projection.weight must
equal the embedding (opt_jax ties the head). FSDP-flattened files (`flat_param_*`) are not read:
consolidate them with metaseq first (metaseq.scripts.consolidate_fsdp_shards / reshard_fsdp).

How Megatron parts merge (metaseq.distributed.stitch_fsdp_ckpt.reshard_megatron_parts):
  column-parallel   qkv_proj, q/k/v_proj, fc1 (weight and bias)   concatenate along dim 0
  row-parallel      out_proj.weight, fc2.weight                   concatenate along dim 1
                    out_proj.bias, fc2.bias                       replicated
  vocab-parallel    embed_tokens, output_projection               concatenate along dim 0
  everything else   layer norms, positions, project_in/out        replicated (checked equal)
The fused qkv_proj of each part is [3 D/M, D] holding that part's heads as K, V, Q (in that order:
metaseq's ModelParallelMultiheadAttention splits its output `k, v, q`), so each part is split
first and the K, V and Q pieces are concatenated separately. A consolidated file is the M = 1 case.

Config: a metaseq file carries no config.json. Shapes give vocab, widths, layers, ffn, positions,
biases and which layer norms exist; the head count (and pre/post-LN, activation) come from the
`args` / `cfg` stored in the file, else from the OPT preset of that hidden size, else from an
explicit config.json (`config_path`).

The .pt files are unpickled with a restricted unpickler: tensors and plain containers are rebuilt,
every other object (metaseq's cfg/args classes, optimizer state classes) becomes an inert
placeholder that keeps its state for reading settings; no code from the file runs.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import pickle
import re
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from opt_jax import families
from opt_jax.config import DecoderConfig
from opt_jax.errors import ConversionError
from opt_jax.families import opt
from opt_jax.convert.hf import import_torch, params_from_source, torch_load
from opt_jax.convert.hf import torch_to_numpy

PART_RE = re.compile(r"^(?P<prefix>.*)model_part-(?P<part>\d+)\.pt$")
DIM0 = re.compile(r"(embed_tokens|output_projection)\.weight$|"
                  r"\.(qkv_proj|q_proj|k_proj|v_proj|fc1)\.(weight|bias)$")
DIM1 = re.compile(r"\.(out_proj|fc2)\.weight$")
IGNORED = re.compile(r"(^|\.)version$|_float_tensor$")
RENAMES = {"layer_norm.weight": "final_layer_norm.weight",
           "layer_norm.bias": "final_layer_norm.bias",
           "project_in_dim.weight": "project_in.weight",
           "project_out_dim.weight": "project_out.weight"}
FUSED_ORDER = "kvq"  # order of the pieces of each part's fused qkv_proj rows
# Module wrappers that can appear inside names saved from an FSDP-wrapped model.
WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_fpw_module|_checkpoint_wrapped_module)\.")


# Restricted unpickling ----------------------------------------------------------------------

class Opaque:
  """Stand-in for an object of a class the restricted unpickler does not rebuild. It records what
  the pickle gives it (constructor args, state, items) and runs no code of the original class."""
  qualname = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.args, obj.state, obj.items = args, None, {}
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.items[len(self.items)] = value

  def extend(self, values):
    for v in values:
      self.append(v)

  def __repr__(self):
    return f"<opaque {self.qualname}>"


@functools.cache
def _opaque_class(qualname: str) -> type:
  return type(qualname.rsplit(".", 1)[-1], (Opaque,), {"qualname": qualname})


@functools.cache
def _allowed_globals() -> dict[str, Any]:
  torch = import_torch("")
  try:
    from torch import _weights_only_unpickler
    allowed = dict(_weights_only_unpickler._get_allowed_globals())
  except (ImportError, AttributeError):  # private API: fall back to what state dicts use
    import collections
    allowed = {"collections.OrderedDict": collections.OrderedDict,
               "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
               "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter}
  return allowed


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str) -> Any:
    qualname = f"{module}.{name}"
    allowed = _allowed_globals()
    return allowed[qualname] if qualname in allowed else _opaque_class(qualname)


def _restricted_pickle_module() -> types.ModuleType:
  module = types.ModuleType("opt_jax_restricted_pickle")
  module.Unpickler = _RestrictedUnpickler
  module.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
  return module


def load_pt(path: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
  """(state dict, {"args": ..., "cfg": ...} when stored) of one metaseq .pt file."""
  obj = torch_load(path, weights_only=False, pickle_module=_restricted_pickle_module())
  torch = import_torch(path)
  settings: dict[str, Any] = {}
  if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
    state = obj["model"]
    settings = {k: obj[k] for k in ("cfg", "args") if obj.get(k) is not None}
  elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
    state = obj
  else:
    keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise ConversionError(f"{path}: expected a metaseq checkpoint (a dict with the state dict "
                          f"under \"model\") or a state dict; got {keys}")
  flat = [k for k in state if "flat_param" in k]
  if flat:
    raise ConversionError(
        f"{path}: tensor {flat[0]} is an FSDP-flattened parameter; opt_jax reads consolidated or "
        "Megatron model-parallel files only. Consolidate it first with metaseq "
        "(python -m metaseq.scripts.consolidate_fsdp_shards or metaseq.scripts.reshard_fsdp "
        "--target-world-size 1)")
  bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise ConversionError(f"{path}: state dict entry {bad[0]!r} is a "
                          f"{type(state[bad[0]]).__name__}, expected a tensor")
  return state, settings


# Merging model-parallel parts -----------------------------------------------------------------

def find_parts(path: str | os.PathLike) -> list[str]:
  """The metaseq files of a checkpoint given as a file (a consolidated file or any model part) or
  a directory (its single .pt file, or its model_part-N.pt set)."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file or directory")
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.pt")))
    parts = [f for f in files if PART_RE.match(os.path.basename(f))]
    prefixes = {PART_RE.match(os.path.basename(f))["prefix"] for f in parts}
    if len(prefixes) == 1:
      path = parts[0]
    elif len(files) == 1:
      return files
    else:
      found = ", ".join(os.path.basename(f) for f in files) or "none"
      raise ConversionError(f"{path}: expected one consolidated .pt file or one set of "
                            f"*model_part-N.pt files; found {found}")
  m = PART_RE.match(os.path.basename(path))
  if not m:
    return [path]
  directory = os.path.dirname(path)
  parts = {}
  pattern = os.path.join(glob.escape(directory), glob.escape(m["prefix"]) + "model_part-*.pt")
  for f in glob.glob(pattern):
    pm = PART_RE.match(os.path.basename(f))
    if pm and pm["prefix"] == m["prefix"]:
      parts[int(pm["part"])] = f
  missing = [i for i in range(max(parts) + 1) if i not in parts]
  if missing:
    raise ConversionError(f"{path}: model part {missing[0]} of {max(parts) + 1} not found "
                          f"(expected {m['prefix']}model_part-{missing[0]}.pt in {directory})")
  return [parts[i] for i in range(len(parts))]


class MetaseqSource:
  """The tensors of a metaseq checkpoint (1 or M parts) under HF decoder names (no prefix),
  merged and split on read; implements `opt_jax.checkpoints.hf_tensors.TensorSource`."""

  def __init__(self, paths: list[str]):
    self.paths = paths
    self.description = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} parts)"
    loaded = [load_pt(p) for p in paths]
    self._states = [s for s, _ in loaded]
    self.settings = loaded[0][1]
    names = [k for k in self._states[0] if not IGNORED.search(k)]
    for path, state in zip(paths[1:], self._states[1:]):
      other = {k for k in state if not IGNORED.search(k)}
      if other != set(names):
        diff = sorted(set(names) ^ other)[0]
        raise ConversionError(f"{path}: model parts hold different tensors (e.g. {diff}) than "
                              f"{paths[0]}")
    self.head_name = None
    self._hf: dict[str, tuple[str, int | None]] = {}  # hf name -> (metaseq name, fused piece)
    for name in names:
      clean = WRAPPERS.sub("", name)
      if not clean.startswith("decoder."):
        self._hf[name] = (name, None)  # reported as unexpected by params_from_source
        continue
      short = clean[len("decoder."):]
      if short == "output_projection.weight":
        self.head_name = name
      elif ".qkv_proj." in short:
        for piece in "qkv":
          hf_name = short.replace(".qkv_proj.", f".{piece}_proj.")
          self._hf[hf_name] = (name, FUSED_ORDER.index(piece))
      else:
        self._hf[RENAMES.get(short, short)] = (name, None)
    self._cache: tuple[str, list[np.ndarray]] | None = None

  def names(self) -> list[str]:
    return list(self._hf)

  def where(self, name: str) -> str:
    metaseq_name = self._hf.get(name, (name, None))[0]
    files = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} parts {self.paths[0]}.."
    return f"{files} [{metaseq_name}]"

  def _part_shapes(self, name: str) -> list[tuple[int, ...]]:
    return [tuple(s[name].shape) for s in self._states]

  def shape(self, name: str) -> tuple[int, ...]:
    metaseq_name, piece = self._hf[name]
    return self._merged_shape(metaseq_name, piece)

  def _merged_shape(self, name: str, piece: int | None = None) -> tuple[int, ...]:
    shapes = self._part_shapes(name)
    axis = 0 if DIM0.search(name) else 1 if DIM1.search(name) else None
    if axis is None or len(shapes) == 1:
      merged = list(shapes[0])
    else:
      rest = {s[:axis] + s[axis + 1:] for s in shapes}
      if len(rest) != 1 or any(len(s) <= axis for s in shapes):
        raise ConversionError(f"{self.description}: tensor {name} has part shapes {shapes} that "
                              f"cannot be concatenated along dim {axis}")
      merged = list(shapes[0])
      merged[axis] = sum(s[axis] for s in shapes)
    if len(set(shapes)) != 1 and axis is None:
      raise ConversionError(f"{self.description}: replicated tensor {name} has different shapes "
                            f"in the parts: {shapes}")
    if piece is not None:
      if any(s[0] % 3 for s in shapes):
        raise ConversionError(f"{self.description}: fused tensor {name} has part shapes {shapes}; "
                              "expected a first dimension divisible by 3 (K, V, Q)")
      merged[0] //= 3
    return tuple(merged)

  def read(self, name: str) -> np.ndarray:
    metaseq_name, piece = self._hf[name]
    if piece is None:
      return self._merge(metaseq_name)
    if self._cache is None or self._cache[0] != metaseq_name:
      # Each part holds its own K, V, Q rows: split per part, concatenate each piece over parts.
      parts = [torch_to_numpy(s[metaseq_name]) for s in self._states]
      pieces = [np.split(p, 3, axis=0) for p in parts]
      self._cache = (metaseq_name, [np.concatenate([p[j] for p in pieces], axis=0)
                                    for j in range(3)])
    return self._cache[1][piece]

  def _merge(self, name: str) -> np.ndarray:
    self._merged_shape(name)  # validates the part shapes
    parts = [torch_to_numpy(s[name]) for s in self._states]
    if len(parts) == 1:
      return parts[0]
    if DIM0.search(name):
      return np.concatenate(parts, axis=0)
    if DIM1.search(name):
      return np.concatenate(parts, axis=1)
    for path, p in zip(self.paths[1:], parts[1:]):
      if not np.array_equal(p, parts[0]):
        raise ConversionError(f"{path}: replicated tensor {name} differs from its copy in "
                              f"{self.paths[0]}; model parts must hold identical copies")
    return parts[0]

  def check_tied_head(self) -> None:
    if self.head_name is None:
      return
    head, embed = self._merge(self.head_name), self._merge("decoder.embed_tokens.weight")
    if head.shape != embed.shape or not np.array_equal(head, embed):
      raise ConversionError(f"{self.description}: tensor {self.head_name} differs from "
                            "decoder.embed_tokens.weight; opt_jax ties the LM head to the token "
                            "embedding and cannot represent an untied head")


# Config -------------------------------------------------------------------------------------

def _unwrap(value: Any) -> Any:
  # omegaconf pickles a leaf as a node object whose state holds the value under "_val".
  if isinstance(value, Opaque):
    state = value.state
    if isinstance(state, tuple):  # (dict state, slot state)
      state = next((s for s in state if isinstance(s, Mapping)), None)
    if isinstance(state, Mapping):
      inner = state.get("_val", state.get("_content"))
      return _unwrap(inner) if inner is not value else None
  return value


def find_setting(obj: Any, key: str, depth: int = 0) -> Any:
  """The first value stored under `key` anywhere in metaseq's args/cfg (dicts, argparse
  Namespaces and omegaconf containers, all possibly opaque); None when absent."""
  if depth > 12 or obj is None:
    return None
  if isinstance(obj, Opaque):
    for part in (obj.state, obj.items, obj.args):
      found = find_setting(part, key, depth + 1)
      if found is not None:
        return found
    return None
  if isinstance(obj, Mapping):
    if key in obj:
      return _unwrap(obj[key])
    children = obj.values()
  elif isinstance(obj, (list, tuple)):
    children = obj
  else:
    return None
  for child in children:
    found = find_setting(child, key, depth + 1)
    if found is not None:
      return found
  return None


def infer_config(source: MetaseqSource) -> DecoderConfig:
  """The (OPT) config of a metaseq checkpoint from its tensor shapes and stored settings."""
  names = set(source.names())
  need = ["embed_tokens.weight", "embed_positions.weight", "layers.0.fc1.weight"]
  missing = [n for n in need if n not in names]
  if missing:
    raise ConversionError(f"{source.description}: missing tensor decoder.{missing[0]}; expected an "
                          "OPT decoder state dict")
  vocab, embed_dim = source.shape("embed_tokens.weight")
  positions, hidden = source.shape("embed_positions.weight")
  layers = 1 + max(int(m.group(1)) for n in names if (m := re.match(r"layers\.(\d+)\.", n)))
  ffn = source.shape("layers.0.fc1.weight")[0]
  setting = lambda key: find_setting(source.settings, key)
  heads = setting("decoder_attention_heads")
  if heads is None:
    presets = {p.hidden_size: p.num_attention_heads for p in opt.PRESETS.values()}
    heads = presets.get(hidden)
  if heads is None:
    raise ConversionError(
        f"{source.description}: cannot tell the number of attention heads (hidden size {hidden} "
        "is no OPT preset and the file stores no args/cfg with decoder_attention_heads); pass an "
        "HF-style config.json (--config)")
  final_ln = "final_layer_norm.weight" in names or "final_layer_norm.bias" in names
  pre_ln = setting("decoder_normalize_before")
  pre_ln = final_ln if pre_ln is None else bool(pre_ln)
  try:
    return opt.from_hf({
        "model_type": opt.NAME, "vocab_size": vocab, "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": int(heads), "ffn_dim": ffn,
        "max_position_embeddings": positions - opt.POSITION_OFFSET,
        "word_embed_proj_dim": embed_dim, "do_layer_norm_before": pre_ln,
        "_remove_final_layer_norm": pre_ln and not final_ln,
        "enable_bias": "layers.0.fc1.bias" in names,
        "layer_norm_elementwise_affine": "layers.0.self_attn_layer_norm.weight" in names,
        "activation_function": str(setting("activation_fn") or "relu")}, source.description)
  except ValueError as e:
    raise ConversionError(f"{source.description}: the inferred config is invalid ({e}); pass an "
                          "HF-style config.json (--config)") from None


def read_metaseq(path: str | os.PathLike, *, config_path: str | None = None, dtype: Any = None,
                 progress: bool = False) -> tuple[dict[str, Any], DecoderConfig]:
  """Reads a metaseq checkpoint (consolidated file, any model part, or their directory).

  config_path: an HF-style config.json to use instead of inferring the config. dtype: cast every
  tensor (None keeps the stored dtype). Returns (params, config).
  """
  source = MetaseqSource(find_parts(path))
  if config_path is not None:
    try:
      config = families.read_config(config_path)
    except (ValueError, FileNotFoundError) as e:
      raise ConversionError(str(e)) from None
    if config.family != opt.NAME:
      raise ConversionError(f"{config_path}: model_type {config.family!r}; metaseq checkpoints "
                            "are OPT models (model_type 'opt')")
    config_source = config_path
  else:
    config = infer_config(source)
    config_source = f"the config inferred from {source.description}"
  params = params_from_source(source, config, prefix="", dtype=dtype, progress=progress,
                              config_source=config_source)
  source.check_tied_head()
  return params, config


# Tokenizer ----------------------------------------------------------------------------------

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq Dictionary ids 0..3


def opt_vocab(gpt2_vocab_path: str, dict_path: str) -> dict[str, int]:
  """OPT's vocab.json from metaseq's GPT-2 BPE vocab and fairseq dict.txt.

  metaseq embeds fairseq Dictionary ids: <s>, <pad>, </s>, <unk> are 0..3 and line i of dict.txt
  ("<gpt2 id> <count>") is id 4 + i. HF's OPT vocab.json maps each BPE token to that id.
  """
  try:
    with open(gpt2_vocab_path) as f:
      gpt2 = json.load(f)
    with open(dict_path) as f:
      symbols = [line.split()[0] for line in f if line.strip()]
  except (OSError, json.JSONDecodeError, IndexError) as e:
    raise ConversionError(f"{gpt2_vocab_path} / {dict_path}: cannot read the tokenizer "
                          f"({e})") from None
  index = {s: len(SPECIALS) + i for i, s in enumerate(symbols)}
  vocab = {s: i for i, s in enumerate(SPECIALS)}
  for token, gpt2_id in gpt2.items():
    if str(gpt2_id) in index and token not in vocab:
      vocab[token] = index[str(gpt2_id)]
  return vocab
