"""The mapping between HF `OPTForCausalLM` state-dict tensors and the opt_jax params pytree.

HF stores Linear weights as [out, in]; opt_jax stores kernels as [in, out] with heads split out,
and stacks every layer on a leading L axis. This module only moves and reshapes numpy arrays;
file reading, streaming and error reporting live in `opt_jax.convert.hf`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from opt_jax.config import OPTConfig

PREFIXES = ("model.decoder.", "decoder.")
LM_HEAD = "lm_head.weight"


def layer_keys(config: OPTConfig, i: int) -> list[str]:
  """HF names (without prefix) of layer i's tensors."""
  names = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
           "self_attn.out_proj.weight", "fc1.weight", "fc2.weight"]
  if config.enable_bias:
    names += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
              "self_attn.out_proj.bias", "fc1.bias", "fc2.bias"]
  if config.layer_norm_elementwise_affine:
    names += [f"{ln}.{p}" for ln in ("self_attn_layer_norm", "final_layer_norm")
              for p in ("weight", "bias")]
  return [f"layers.{i}.{n}" for n in names]


def expected_keys(config: OPTConfig) -> list[str]:
  """Every decoder tensor name (without prefix) an HF checkpoint of `config` must hold."""
  keys = ["embed_tokens.weight", "embed_positions.weight"]
  if config.has_projections:
    keys += ["project_in.weight", "project_out.weight"]
  if config.final_layer_norm and config.layer_norm_elementwise_affine:
    keys += ["final_layer_norm.weight", "final_layer_norm.bias"]
  for i in range(config.num_hidden_layers):
    keys += layer_keys(config, i)
  return keys


def expected_shapes(config: OPTConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name (without prefix) -> shape."""
  d, f, e = config.hidden_size, config.ffn_dim, config.word_embed_proj_dim
  shapes = {"embed_tokens.weight": (config.vocab_size, e),
            "embed_positions.weight": (config.max_position_embeddings + 2, d),
            "project_in.weight": (d, e), "project_out.weight": (e, d),
            "final_layer_norm.weight": (d,), "final_layer_norm.bias": (d,)}
  per_layer = {"self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (d, d),
               "self_attn.v_proj.weight": (d, d), "self_attn.out_proj.weight": (d, d),
               "fc1.weight": (f, d), "fc2.weight": (d, f),
               "self_attn.q_proj.bias": (d,), "self_attn.k_proj.bias": (d,),
               "self_attn.v_proj.bias": (d,), "self_attn.out_proj.bias": (d,),
               "fc1.bias": (f,), "fc2.bias": (d,),
               "self_attn_layer_norm.weight": (d,), "self_attn_layer_norm.bias": (d,),
               "final_layer_norm.weight": (d,), "final_layer_norm.bias": (d,)}
  for i in range(config.num_hidden_layers):
    for name, shape in per_layer.items():
      shapes[f"layers.{i}.{name}"] = shape
  return {k: shapes[k] for k in expected_keys(config)}


def params_from_hf(get: Callable[[str], np.ndarray], config: OPTConfig,
                   dtype: Any = None) -> dict[str, Any]:
  """Builds the params pytree from a tensor getter.

  get(name) returns the HF tensor `name` (no prefix) as a numpy array of the expected shape;
  it is called once per tensor, so a caller can stream from disk. dtype: cast (None keeps it).
  """
  cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype, copy=False))
  n_layers, d, n, h = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                       config.head_dim)

  def stacked(fn: Callable[[int], np.ndarray]) -> np.ndarray:
    first = cast(fn(0))
    out = np.empty((n_layers,) + first.shape, first.dtype)
    out[0] = first
    for i in range(1, n_layers):
      out[i] = cast(fn(i))
    return out

  lay = lambda i, name: get(f"layers.{i}.{name}")
  attn = {
      "qkv_kernel": stacked(lambda i: np.stack(
          [lay(i, f"self_attn.{x}_proj.weight").T.reshape(d, n, h) for x in "qkv"], axis=1)),
      "out_kernel": stacked(lambda i: lay(i, "self_attn.out_proj.weight").T.reshape(n, h, d)),
  }
  layers: dict[str, Any] = {
      "self_attn": attn,
      "fc1": {"kernel": stacked(lambda i: lay(i, "fc1.weight").T)},
      "fc2": {"kernel": stacked(lambda i: lay(i, "fc2.weight").T)},
  }
  if config.enable_bias:
    attn["qkv_bias"] = stacked(lambda i: np.stack(
        [lay(i, f"self_attn.{x}_proj.bias").reshape(n, h) for x in "qkv"], axis=0))
    attn["out_bias"] = stacked(lambda i: lay(i, "self_attn.out_proj.bias"))
    layers["fc1"]["bias"] = stacked(lambda i: lay(i, "fc1.bias"))
    layers["fc2"]["bias"] = stacked(lambda i: lay(i, "fc2.bias"))
  if config.layer_norm_elementwise_affine:
    for ln in ("self_attn_layer_norm", "final_layer_norm"):
      layers[ln] = {"scale": stacked(lambda i, ln=ln: lay(i, f"{ln}.weight")),
                    "bias": stacked(lambda i, ln=ln: lay(i, f"{ln}.bias"))}

  params: dict[str, Any] = {
      "embed_tokens": {"embedding": cast(get("embed_tokens.weight"))},
      "embed_positions": {"embedding": cast(get("embed_positions.weight"))},
      "layers": layers,
  }
  if config.has_projections:
    params["project_in"] = {"kernel": cast(get("project_in.weight")).T}
    params["project_out"] = {"kernel": cast(get("project_out.weight")).T}
  if config.final_layer_norm and config.layer_norm_elementwise_affine:
    params["final_layer_norm"] = {"scale": cast(get("final_layer_norm.weight")),
                                  "bias": cast(get("final_layer_norm.bias"))}
  return params


def hf_from_params(params: Mapping[str, Any], config: OPTConfig) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name with `model.decoder.` prefix, [out, in] tensor) one at a time; inverse of
  `params_from_hf`. The tied LM head is not yielded (HF re-ties it on load)."""
  d, n, h = config.hidden_size, config.num_attention_heads, config.head_dim
  p = "model.decoder."
  yield p + "embed_tokens.weight", np.asarray(params["embed_tokens"]["embedding"])
  yield p + "embed_positions.weight", np.asarray(params["embed_positions"]["embedding"])
  if config.has_projections:
    yield p + "project_in.weight", np.asarray(params["project_in"]["kernel"]).T
    yield p + "project_out.weight", np.asarray(params["project_out"]["kernel"]).T
  if "final_layer_norm" in params:
    yield p + "final_layer_norm.weight", np.asarray(params["final_layer_norm"]["scale"])
    yield p + "final_layer_norm.bias", np.asarray(params["final_layer_norm"]["bias"])
  layers = params["layers"]
  attn = layers["self_attn"]
  for i in range(config.num_hidden_layers):
    q = f"{p}layers.{i}."
    qkv = np.asarray(attn["qkv_kernel"][i])                                      # [D, 3, N, H]
    for j, x in enumerate("qkv"):
      yield f"{q}self_attn.{x}_proj.weight", qkv[:, j].reshape(d, n * h).T
    yield f"{q}self_attn.out_proj.weight", np.asarray(attn["out_kernel"][i]).reshape(n * h, d).T
    if "qkv_bias" in attn:
      qkv_b = np.asarray(attn["qkv_bias"][i])                                    # [3, N, H]
      for j, x in enumerate("qkv"):
        yield f"{q}self_attn.{x}_proj.bias", qkv_b[j].reshape(n * h)
      yield f"{q}self_attn.out_proj.bias", np.asarray(attn["out_bias"][i])
    yield f"{q}fc1.weight", np.asarray(layers["fc1"]["kernel"][i]).T
    yield f"{q}fc2.weight", np.asarray(layers["fc2"]["kernel"][i]).T
    if "bias" in layers["fc1"]:
      yield f"{q}fc1.bias", np.asarray(layers["fc1"]["bias"][i])
      yield f"{q}fc2.bias", np.asarray(layers["fc2"]["bias"][i])
    for ln in ("self_attn_layer_norm", "final_layer_norm"):
      if ln in layers:
        yield f"{q}{ln}.weight", np.asarray(layers[ln]["scale"][i])
        yield f"{q}{ln}.bias", np.asarray(layers[ln]["bias"][i])
