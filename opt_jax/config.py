"""The neutral decoder config: every field that changes the math, named by the feature it selects.

A model family (opt_jax/families/) is a set of values of these fields plus its HF file formats;
opt_jax/model.py builds the decoder from the fields alone and never asks which family it is.
HF config.json in and out: `opt_jax.families` (from_hf_dict, to_hf_dict, read_config,
write_config). This module imports nothing of opt_jax but its errors.

Dimension letters (as in model.py): V vocab, E embed_dim, D hidden_size, N heads, K kv heads,
H head_dim, F intermediate_size, L layers, P max_position_embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from opt_jax.errors import InputError

# The model families (opt_jax/families/, one module each, named as config.json's model_type).
FAMILIES = ("opt", "gpt_neox", "llama", "olmo", "olmo2")
POSITIONS = ("learned", "rotary")
NORMS = ("layernorm", "rmsnorm")
BLOCKS = ("pre_norm", "post_norm", "parallel", "output_norm")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape and architecture of a decoder-only transformer.

  family: the opt_jax/families/ module that reads and writes this model's HF files.
  vocab_size: rows of the token embedding and of the LM head. It may exceed the tokenizer's
    vocabulary (Pythia pads 50277 tokens to 50304 rows): the extra rows take part in every
    softmax exactly as they do in HF.
  num_key_value_heads: K key/value heads shared by groups of N / K query heads (GQA; K = 1 is
    MQA); None = N. head_dim: H; None = D / N. embed_dim: E, the width of the token embedding
    and LM head; E != D adds project_in [E, D] and project_out [D, E] (OPT-350m); None = D.

  positions: "learned" (a table of position_offset + P rows; position p uses row p +
    position_offset, OPT reserves 2 rows) or "rotary" (RoPE on the first rotary_fraction * H
    dims of each query and key head, rotate-half layout: dim j pairs with dim j + rotary_dim / 2,
    frequencies rotary_base^(-2j / rotary_dim)).
  norm: "layernorm" or "rmsnorm", computed in fp32; norm_affine: learned scale (and bias for
    layernorm); False is the non-parametric norm of OLMo-1. norm_eps: added to the variance.
  block: where the two norms of a layer sit (f = attention, then the MLP):
    pre_norm     x = x + f(norm(x))                       (OPT, Llama, OLMo)
    post_norm    x = norm(x + f(x))                       (OPT-350m)
    parallel     x = x + attn(norm_a(x)) + mlp(norm_m(x)) (GPT-NeoX use_parallel_residual)
    output_norm  x = x + norm(f(x))                       (OLMo-2)
  final_norm: a norm after the last layer.
  qk_norm: the norm (same kind and eps) over the whole query and the whole key projection
    (all heads together), before rotary (OLMo-2). clip_qkv: clamp q, k and v to [-c, c] right
    after their projections (OLMo-1); None = no clipping.
  activation: "relu", "gelu" (exact erf), "gelu_tanh" (tanh approximation) or "silu";
    gated_mlp: down(act(x W_gate) * (x W_up)) (SwiGLU with silu) instead of down(act(x W_up)).
  attention_bias: biases on the q, k, v and output projections; mlp_bias: on the MLP's.
  tie_embeddings: the LM head is the token embedding; False: a separate [V, E] head.
  bos/eos/pad_token_id: the special ids of config.json (None where the model has none).
  """

  family: str
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  embed_dim: int | None = None
  positions: str = "learned"
  position_offset: int = 0
  rotary_base: float = 10000.0
  rotary_fraction: float = 1.0
  norm: str = "layernorm"
  norm_affine: bool = True
  norm_eps: float = 1e-5
  block: str = "pre_norm"
  final_norm: bool = True
  qk_norm: bool = False
  clip_qkv: float | None = None
  activation: str = "relu"
  gated_mlp: bool = False
  attention_bias: bool = True
  mlp_bias: bool = True
  tie_embeddings: bool = True
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    # Frozen dataclass: resolve defaults that depend on other fields through object.__setattr__.
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    d, n = self.hidden_size, self.num_attention_heads
    if self.head_dim is None and _positive_int(d) and _positive_int(n) and d % n == 0:
      object.__setattr__(self, "head_dim", d // n)   # otherwise validate() names the problem
    if self.embed_dim is None:
      object.__setattr__(self, "embed_dim", self.hidden_size)
    self.validate()

  def validate(self) -> None:
    """Raises InputError naming every field whose value is invalid."""
    problems = []
    if self.family not in FAMILIES:
      problems.append(f"family={self.family!r} is not one of {FAMILIES}")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "max_position_embeddings",
                 "embed_dim"):
      if not _positive_int(getattr(self, name)):
        problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
    if not problems:
      if self.head_dim is None:
        problems.append(f"hidden_size={self.hidden_size} is not divisible by "
                        f"num_attention_heads={self.num_attention_heads} (or give head_dim)")
      elif not _positive_int(self.head_dim):
        problems.append(f"head_dim must be a positive integer, got {self.head_dim!r}")
      if self.num_attention_heads % self.num_key_value_heads:
        problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads={self.num_key_value_heads}")
    for name, allowed in (("positions", POSITIONS), ("norm", NORMS), ("block", BLOCKS),
                          ("activation", ACTIVATIONS)):
      if getattr(self, name) not in allowed:
        problems.append(f"{name}={getattr(self, name)!r} is not one of {allowed}")
    if not (isinstance(self.position_offset, int) and self.position_offset >= 0):
      problems.append(f"position_offset must be an integer >= 0, got {self.position_offset!r}")
    if not 0.0 < self.rotary_fraction <= 1.0:
      problems.append(f"rotary_fraction must be in (0, 1], got {self.rotary_fraction!r}")
    elif self.positions == "rotary" and not problems and self.rotary_dim % 2:
      problems.append(f"rotary_fraction={self.rotary_fraction} of head_dim={self.head_dim} "
                      f"rotates {self.rotary_dim} dims; rotate-half needs an even number")
    if self.clip_qkv is not None and not self.clip_qkv > 0:
      problems.append(f"clip_qkv must be > 0 or None, got {self.clip_qkv!r}")
    if not self.norm_eps > 0:
      problems.append(f"norm_eps must be > 0, got {self.norm_eps!r}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                    and value >= 0):
        problems.append(f"{name} must be a token id (integer >= 0) or None, got {value!r}")
    if problems:
      raise InputError("invalid DecoderConfig: " + "; ".join(problems))

  # Derived quantities ---------------------------------------------------------------------------

  @property
  def has_projections(self) -> bool:
    return self.embed_dim != self.hidden_size

  @property
  def rotary_dim(self) -> int:
    """Dims of each head that rotary rotates (HF: int(head_dim * partial_rotary_factor))."""
    return int(self.head_dim * self.rotary_fraction)

  @property
  def filler_token_id(self) -> int:
    """A valid id for padded (masked) slots: pad, else eos, else 0."""
    for value in (self.pad_token_id, self.eos_token_id):
      if value is not None and value < self.vocab_size:
        return value
    return 0

  def num_params(self) -> int:
    """Number of parameters (a tied head counted once); equals the params tree's size."""
    d, f, e, v = self.hidden_size, self.intermediate_size, self.embed_dim, self.vocab_size
    qh, kh = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
    norm = (2 * d if self.norm == "layernorm" else d) if self.norm_affine else 0
    per_layer = 2 * d * qh + 2 * d * kh + (2 if self.gated_mlp else 1) * d * f + f * d + 2 * norm
    if self.attention_bias:
      per_layer += qh + 2 * kh + d
    if self.mlp_bias:
      per_layer += (2 if self.gated_mlp else 1) * f + d
    if self.qk_norm and self.norm_affine:
      per_layer += (qh + kh) * (2 if self.norm == "layernorm" else 1)
    total = v * e + self.num_hidden_layers * per_layer
    if self.positions == "learned":
      total += (self.max_position_embeddings + self.position_offset) * d
    if self.has_projections:
      total += 2 * d * e
    if self.final_norm:
      total += norm
    if not self.tie_embeddings:
      total += v * e
    return total

  def flops_per_token(self, context_length: int) -> float:
    """Forward FLOPs per token: 2 x matmul parameters + attention scores and values (full T x T)."""
    d, f, e, v = self.hidden_size, self.intermediate_size, self.embed_dim, self.vocab_size
    qh, kh = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
    per_layer = 2 * d * qh + 2 * d * kh + (3 if self.gated_mlp else 2) * d * f
    matmul = self.num_hidden_layers * per_layer + v * e
    if self.has_projections:
      matmul += 2 * d * e
    attention = self.num_hidden_layers * 2 * qh * context_length
    return 2.0 * matmul + 2.0 * attention

  def replace(self, **changes: Any) -> "DecoderConfig":
    """A copy with `changes`. Fields left at their derived defaults (num_key_value_heads = N,
    head_dim = D / N, embed_dim = D) are derived again from the changed fields unless given, so
    replace(hidden_size=48) of a plain model stays plain (no project_in appears)."""
    derived = {"num_key_value_heads": self.num_attention_heads,
               "head_dim": self.hidden_size // self.num_attention_heads,
               "embed_dim": self.hidden_size}
    for name, default in derived.items():
      if name not in changes and getattr(self, name) == default:
        changes[name] = None
    return dataclasses.replace(self, **changes)


def _positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0
