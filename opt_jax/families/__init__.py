"""Model families: everything that differs between OPT, GPT-NeoX (Pythia), Llama, OLMo and OLMo-2.

One module per family defines `FAMILY = Family(...)` (`opt_jax.families.base`): its HF
config.json in and out (as a `DecoderConfig`, whose fields name features), its presets, its ONE
table of HF tensor names <-> params paths <-> transforms (`opt_jax.families.table`, read in both
conversion directions), its special tokens and its native text convention. Nothing outside this
package names a family: the engine asks `families.get(config.family)`. This package also reads
and writes config.json files (`read_config`, `write_config`). Adding a family = one module
imported here and named in `opt_jax.config.FAMILIES` + its parity test.

Text conventions (what precedes a text, see opt_jax/tokenizer.py):
  native   the family's own: OPT prepends `</s>` (its bos), Llama `<s>`; Pythia and OLMo prepend
           nothing (an empty context, which needs one token to condition on, is the eos token:
           the separator they were trained with).
  lm_eval  lm-evaluation-harness HFLM's defaults (lm_eval 0.4.9, add_bos_token=False): nothing
           prepended to any text; an empty context and the first rolling window condition on
           bos (eos when there is no bos).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from opt_jax import files
from opt_jax.config import FAMILIES as NAMES
from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError, MissingFileError
from opt_jax.families import gpt_neox, llama, olmo, olmo2, opt
from opt_jax.families.base import (ACTIVATION_TO_HF, UNSUPPORTED, Family, activation,
                                   check_unsupported, require, rope, token_id)

__all__ = ["ACTIVATION_TO_HF", "BARE_TOKENIZER_FAMILY", "CONVENTIONS", "FAMILIES", "NAMES",
           "UNSUPPORTED", "Family", "activation", "check_unsupported", "from_hf_dict", "get",
           "preset", "presets", "read_config", "require", "rope", "to_hf_dict", "token_id",
           "write_config"]

CONVENTIONS = ("native", "lm_eval")
# The conventions of a tokenizer directory without a config.json beside it: the tokenizers
# opt_jax trains (the demo's, the tests') use OPT's special tokens.
BARE_TOKENIZER_FAMILY = "opt"

# One module per family, named as the family and as the model_type of its HF config.json, in the
# order of opt_jax.config.FAMILIES.
FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (opt, gpt_neox, llama, olmo, olmo2)}
assert tuple(FAMILIES) == NAMES, (tuple(FAMILIES), NAMES)


def get(name: str) -> Family:
  """The family called `name` (DecoderConfig.family)."""
  if name not in FAMILIES:
    raise InputError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
  return FAMILIES[name]


# HF config.json ---------------------------------------------------------------------------------

def from_hf_dict(d: Mapping[str, Any], source: str = "config") -> DecoderConfig:
  """The config of an HF config.json dict, read by the family of its model_type.

  Raises InputError naming `source` for an unsupported model_type (listing the supported ones),
  a missing key, or a field opt_jax does not implement set to a non-default value."""
  model_type = d.get("model_type")
  if model_type not in FAMILIES:
    what = "has no model_type" if model_type is None else f"model_type {model_type!r}"
    raise InputError(f"{source}: {what} is not supported; opt_jax supports model_type "
                     f"{', '.join(FAMILIES)}")
  return FAMILIES[model_type].from_hf(dict(d), source)


def to_hf_dict(config: DecoderConfig) -> dict[str, Any]:
  """The HF config.json of `config` (its family's model_type and field names)."""
  return get(config.family).to_hf(config)


def read_config(path: str | os.PathLike) -> DecoderConfig:
  """The DecoderConfig of an HF config.json file (errors name the file)."""
  path = os.fspath(path)
  try:
    with open(path) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise MissingFileError(f"config file not found: {path}") from None
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise InputError(f"{path}: expected a JSON object (an HF config.json)")
  return from_hf_dict(d, source=path)


def write_config(config: DecoderConfig, path: str | os.PathLike) -> None:
  """Writes the HF-compatible config.json of `config` atomically."""
  files.write_text(path, json.dumps(to_hf_dict(config), indent=2, sort_keys=True) + "\n")


# Presets ----------------------------------------------------------------------------------------

def presets() -> dict[str, DecoderConfig]:
  """Every preset of every family, by name."""
  return {name: c for f in FAMILIES.values() for name, c in f.presets.items()}


def preset(name: str) -> DecoderConfig:
  """A published shape by name: "opt-1.3b", "pythia-12b", "olmo-2-13b", "llama-7b", an HF repo
  id ("facebook/opt-30b", "EleutherAI/pythia-160m-deduped") or a family's alias ("175b")."""
  key = name.strip().lower().rsplit("/", 1)[-1]
  for f in FAMILIES.values():
    if key in f.presets:
      return f.presets[key]
    if key in f.aliases:
      return f.presets[f.aliases[key]]
  raise InputError(f"unknown preset {name!r}; known: {', '.join(presets())}")
