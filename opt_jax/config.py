"""OPT model configuration: every field that changes the math, presets, HF config.json in and out."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")


@dataclasses.dataclass(frozen=True)
class OPTConfig:
  """Shape and architecture of an OPT decoder.

  `word_embed_proj_dim` is the width of the token embedding (and tied LM head); when it differs
  from `hidden_size` the model has `project_in` [E, D] and `project_out` [D, E] (OPT-350m).
  `do_layer_norm_before=False` is the post-LN variant (OPT-350m). `final_layer_norm` says
  whether the decoder ends with a layer norm (HF: pre-LN and not `_remove_final_layer_norm`).
  """

  vocab_size: int = 50272
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  ffn_dim: int = 3072
  max_position_embeddings: int = 2048
  word_embed_proj_dim: int | None = None
  do_layer_norm_before: bool = True
  final_layer_norm: bool | None = None
  enable_bias: bool = True
  layer_norm_elementwise_affine: bool = True
  activation_function: str = "relu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 2
  eos_token_id: int = 2

  def __post_init__(self):
    # Frozen dataclass: resolve defaults that depend on other fields through object.__setattr__.
    if self.word_embed_proj_dim is None:
      object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
    if self.final_layer_norm is None:
      object.__setattr__(self, "final_layer_norm", bool(self.do_layer_norm_before))
    self.validate()

  def validate(self) -> None:
    problems = []
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                 "max_position_embeddings", "word_embed_proj_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        problems.append(f"{name} must be a positive integer, got {value!r}")
    if not problems and self.hidden_size % self.num_attention_heads:
      problems.append(f"hidden_size={self.hidden_size} is not divisible by "
                      f"num_attention_heads={self.num_attention_heads}")
    if self.activation_function not in ACTIVATIONS:
      problems.append(f"activation_function={self.activation_function!r} is not one of {ACTIVATIONS}")
    if problems:
      raise ValueError("invalid OPTConfig: " + "; ".join(problems))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def has_projections(self) -> bool:
    return self.word_embed_proj_dim != self.hidden_size

  def num_params(self) -> int:
    """Number of parameters (tied LM head counted once)."""
    d, f, e, v = self.hidden_size, self.ffn_dim, self.word_embed_proj_dim, self.vocab_size
    b = 1 if self.enable_bias else 0
    ln = 2 * d if self.layer_norm_elementwise_affine else 0
    per_layer = 4 * d * d + 4 * d * b + 2 * d * f + (f + d) * b + 2 * ln
    total = v * e + (self.max_position_embeddings + 2) * d + self.num_hidden_layers * per_layer
    if self.has_projections:
      total += 2 * d * e
    if self.final_layer_norm:
      total += ln
    return total

  def flops_per_token(self, context_length: int) -> float:
    """Forward FLOPs per token: 2 x matmul parameters + attention scores and values (full T x T)."""
    d, f, e, v = self.hidden_size, self.ffn_dim, self.word_embed_proj_dim, self.vocab_size
    matmul = self.num_hidden_layers * (4 * d * d + 2 * d * f) + v * e
    if self.has_projections:
      matmul += 2 * d * e
    attention = self.num_hidden_layers * 2 * d * context_length
    return 2.0 * matmul + 2.0 * attention

  def replace(self, **changes: Any) -> "OPTConfig":
    return dataclasses.replace(self, **changes)

  # HF config.json -----------------------------------------------------------------------------

  def to_hf_dict(self) -> dict[str, Any]:
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "ffn_dim": self.ffn_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "word_embed_proj_dim": self.word_embed_proj_dim,
        "do_layer_norm_before": self.do_layer_norm_before,
        "_remove_final_layer_norm": bool(self.do_layer_norm_before and not self.final_layer_norm),
        "enable_bias": self.enable_bias,
        "layer_norm_elementwise_affine": self.layer_norm_elementwise_affine,
        "activation_function": self.activation_function,
        "pad_token_id": self.pad_token_id,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "tie_word_embeddings": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "layerdrop": 0.0,
        "init_std": 0.02,
        "use_cache": True,
    }

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "OPTConfig":
    model_type = d.get("model_type", "opt")
    if model_type != "opt":
      raise ValueError(f"{source}: model_type is {model_type!r}, expected 'opt'")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"{source}: missing key(s) {missing} needed for an OPT config")
    do_ln_before = bool(d.get("do_layer_norm_before", True))
    hidden = d["hidden_size"]
    try:
      return cls(
          vocab_size=d["vocab_size"],
          hidden_size=hidden,
          num_hidden_layers=d["num_hidden_layers"],
          num_attention_heads=d["num_attention_heads"],
          ffn_dim=d["ffn_dim"],
          max_position_embeddings=d.get("max_position_embeddings", 2048),
          word_embed_proj_dim=d.get("word_embed_proj_dim") or hidden,
          do_layer_norm_before=do_ln_before,
          final_layer_norm=do_ln_before and not d.get("_remove_final_layer_norm", False),
          enable_bias=bool(d.get("enable_bias", True)),
          layer_norm_elementwise_affine=bool(d.get("layer_norm_elementwise_affine", True)),
          activation_function=d.get("activation_function", "relu"),
          pad_token_id=d.get("pad_token_id", 1) if d.get("pad_token_id") is not None else 1,
          bos_token_id=d.get("bos_token_id", 2) if d.get("bos_token_id") is not None else 2,
          eos_token_id=d.get("eos_token_id", 2) if d.get("eos_token_id") is not None else 2,
      )
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> "OPTConfig":
    path = os.fspath(path)
    try:
      with open(path) as f:
        d = json.load(f)
    except FileNotFoundError:
      raise FileNotFoundError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(d, source=path)

  def to_json_file(self, path: str | os.PathLike) -> None:
    """Writes HF-compatible config.json atomically."""
    from opt_jax import files  # pylint: disable=import-outside-toplevel
    files.write_text(path, json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")


def _preset(hidden: int, layers: int, heads: int, **kw: Any) -> OPTConfig:
  return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                   ffn_dim=4 * hidden, **kw)


# Published shapes of the OPT family (Zhang et al., 2022, Table 1; HF facebook/opt-* configs).
PRESETS: dict[str, OPTConfig] = {
    "125m": _preset(768, 12, 12),
    "350m": _preset(1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    "1.3b": _preset(2048, 24, 32),
    "2.7b": _preset(2560, 32, 32),
    "6.7b": _preset(4096, 32, 32),
    "13b": _preset(5120, 40, 40),
    "30b": _preset(7168, 48, 56),
    "66b": _preset(9216, 64, 72),
    "175b": _preset(12288, 96, 96),
}


def get_preset(name: str) -> OPTConfig:
  key = name.lower().removeprefix("facebook/").removeprefix("opt-")
  if key not in PRESETS:
    raise KeyError(f"unknown OPT preset {name!r}; known: {', '.join(PRESETS)}")
  return PRESETS[key]
