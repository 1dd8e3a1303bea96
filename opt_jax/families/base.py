"""The `Family` type and the helpers every family module uses to read and write config.json.

A family module (opt.py, gpt_neox.py, ...) imports this module at its top and defines
`FAMILY = Family(...)`; `opt_jax.families` imports the family modules and looks them up by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError
from opt_jax.families import table


@dataclasses.dataclass(frozen=True)
class Family:
  """What opt_jax knows about one family.

  name: the value of DecoderConfig.family and of config.json's model_type.
  architecture: the HF class written to config.json ("OPTForCausalLM").
  from_hf(d, source) -> DecoderConfig and to_hf(config) -> dict: config.json in and out.
  tensors: the table (rows for every tensor the family can have).
  prefixes: names of the base model's tensors start with one of these (the first is written;
    e.g. "model.decoder." for OPTForCausalLM, "decoder." for a bare OPTModel).
  head: the absolute name of the LM head tensor (also read when the head is tied, and then it
    must equal the token embedding).
  ignored: regular expression of stored tensors that are not parameters (buffers), skipped.
  presets: published shapes, by name ("opt-125m"); aliases: other names of presets.
  prepend_bos: the native convention prepends bos to every text.
  bos_token, eos_token, pad_token: the special tokens of the released tokenizer (strings);
    special_tokens: every token string that text may contain as one special token.
  """
  name: str
  architecture: str
  from_hf: Callable[[dict[str, Any], str], DecoderConfig]
  to_hf: Callable[[DecoderConfig], dict[str, Any]]
  tensors: tuple[table.Tensor, ...]
  prefixes: tuple[str, ...]
  head: str
  presets: Mapping[str, DecoderConfig]
  prepend_bos: bool
  bos_token: str | None
  eos_token: str
  pad_token: str | None
  special_tokens: tuple[str, ...]
  ignored: str = ""
  aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def config(self, **hf_fields: Any) -> DecoderConfig:
    """The config of a config.json with these fields (HF's names for this family), e.g.
    families.get("gpt_neox").config(vocab_size=128, hidden_size=64, ..., rotary_pct=0.25)."""
    return self.from_hf({"model_type": self.name, **hf_fields}, f"{self.name} config")



# Helpers of the family modules ------------------------------------------------------------------

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "silu": "silu",
                "swish": "silu"}
ACTIVATION_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}

# Fields of HF configs that change the math in ways opt_jax does not implement, with the value
# that means "off". Any other value fails naming the field instead of computing something else.
UNSUPPORTED = {"rope_scaling": None, "sliding_window": None, "use_sliding_window": False,
               "alibi": False, "attn_logit_softcapping": None, "final_logit_softcapping": None,
               "layer_types": None, "use_qk_norm": False, "num_experts": None}


def activation(d: Mapping[str, Any], key: str, default: str, source: str) -> str:
  value = d.get(key) or default
  if value not in _ACTIVATIONS:
    raise InputError(f"{source}: {key}={value!r} is not supported; expected one of "
                     f"{', '.join(_ACTIVATIONS)}")
  return _ACTIVATIONS[value]


def require(d: Mapping[str, Any], keys: tuple[str, ...], source: str, family: str) -> None:
  missing = [k for k in keys if d.get(k) is None]
  if missing:
    raise InputError(f"{source}: missing key(s) {missing} needed for a {family} config")


def check_unsupported(d: Mapping[str, Any], source: str,
                      extra: Mapping[str, Any] | None = None) -> None:
  """InputError naming the first field set to a value opt_jax does not implement."""
  for key, off in {**UNSUPPORTED, **(extra or {})}.items():
    if key in d and d[key] != off and not (off is None and d[key] in ({}, [])):
      raise InputError(f"{source}: {key}={d[key]!r} is not supported by opt_jax (only "
                       f"{off!r}); it would compute a different model")


def rope(d: Mapping[str, Any], source: str, theta_key: str = "rope_theta",
         fraction_key: str | None = None, default_fraction: float = 1.0) -> tuple[float, float]:
  """(rotary base, rotated fraction of head_dim) from legacy keys or transformers' newer
  `rope_parameters` {"rope_type", "rope_theta", "partial_rotary_factor"}; only plain RoPE."""
  params = d.get("rope_parameters") or {}
  if not isinstance(params, Mapping) or "full_attention" in params:
    raise InputError(f"{source}: rope_parameters={params!r} is not supported (per-layer or "
                     "non-dict rope parameters)")
  kind = params.get("rope_type", params.get("type", "default"))
  if kind != "default":
    raise InputError(f"{source}: rope_parameters.rope_type={kind!r} is not supported by opt_jax "
                     "(only 'default': plain RoPE without scaling)")
  base = params.get("rope_theta", d.get(theta_key))
  fraction = params.get("partial_rotary_factor",
                        d.get(fraction_key) if fraction_key else None)
  return (float(10000.0 if base is None else base),
          float(default_fraction if fraction is None else fraction))


def token_id(d: Mapping[str, Any], key: str, default: int | None, source: str) -> int | None:
  """A special-token id of config.json; a list (several eos ids) must hold exactly one."""
  value = d.get(key, default)
  if isinstance(value, list):
    if len(value) != 1:
      raise InputError(f"{source}: {key}={value!r}: opt_jax supports one id per special token")
    value = value[0]
  return value
