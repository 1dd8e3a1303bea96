"""Llama (HF LlamaForCausalLM): Llama 1/2, TinyLlama, LLM360 Amber, SmolLM2, MAP-Neo and the like.

What differs: RMSNorm (a scale, no bias), SwiGLU MLP (down(silu(gate(x)) * up(x))), RoPE over the
whole head with base rope_theta, grouped-query attention (num_key_value_heads), no biases unless
attention_bias / mlp_bias, the head tied or not (tie_word_embeddings). Special tokens <unk>=0
<s>=1 </s>=2; every text starts with <s>.
"""

from __future__ import annotations

from typing import Any

from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError
from opt_jax.families import base
from opt_jax.families.table import FLAT, LINEAR, LINEAR_FROM_HEADS, row

NAME = "llama"

# Rows shared with OLMo and OLMo-2, which name their projections as Llama does.
PROJECTIONS = (
    row("embed_tokens.weight", "embed/embedding"),
    row("layers.{i}.self_attn.q_proj.weight", "layers/attn/q_kernel", transform=LINEAR),
    row("layers.{i}.self_attn.k_proj.weight", "layers/attn/k_kernel", transform=LINEAR),
    row("layers.{i}.self_attn.v_proj.weight", "layers/attn/v_kernel", transform=LINEAR),
    row("layers.{i}.self_attn.q_proj.bias", "layers/attn/q_bias", transform=FLAT),
    row("layers.{i}.self_attn.k_proj.bias", "layers/attn/k_bias", transform=FLAT),
    row("layers.{i}.self_attn.v_proj.bias", "layers/attn/v_bias", transform=FLAT),
    row("layers.{i}.self_attn.o_proj.weight", "layers/attn/o_kernel", transform=LINEAR_FROM_HEADS),
    row("layers.{i}.self_attn.o_proj.bias", "layers/attn/o_bias"),
    row("layers.{i}.mlp.gate_proj.weight", "layers/mlp/gate_kernel", transform=LINEAR),
    row("layers.{i}.mlp.up_proj.weight", "layers/mlp/up_kernel", transform=LINEAR),
    row("layers.{i}.mlp.down_proj.weight", "layers/mlp/down_kernel", transform=LINEAR),
    row("layers.{i}.mlp.gate_proj.bias", "layers/mlp/gate_bias"),
    row("layers.{i}.mlp.up_proj.bias", "layers/mlp/up_bias"),
    row("layers.{i}.mlp.down_proj.bias", "layers/mlp/down_bias"),
    row("lm_head.weight", "lm_head/embedding", top_level=True),
)

TENSORS = PROJECTIONS + (
    row("layers.{i}.input_layernorm.weight", "layers/attn_norm/scale"),
    row("layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm/scale"),
    row("norm.weight", "final_norm/scale"),
)

IGNORED = r"\.rotary_emb\.inv_freq$"   # a buffer older checkpoints saved


def from_hf(d: dict[str, Any], source: str) -> DecoderConfig:
  base.require(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size"), source, "Llama")
  base.check_unsupported(d, source)
  rotary_base, _ = base.rope(d, source)   # HF's Llama rotates whole heads, whatever the fraction
  return DecoderConfig(
      family=NAME, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
      num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
      num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
      intermediate_size=d["intermediate_size"],
      max_position_embeddings=d.get("max_position_embeddings") or 2048,
      positions="rotary", rotary_base=rotary_base, norm="rmsnorm", norm_affine=True,
      norm_eps=float(d.get("rms_norm_eps", 1e-6)), block="pre_norm", final_norm=True,
      activation=base.activation(d, "hidden_act", "silu", source), gated_mlp=True,
      attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      bos_token_id=base.token_id(d, "bos_token_id", 1, source),
      eos_token_id=base.token_id(d, "eos_token_id", 2, source),
      pad_token_id=base.token_id(d, "pad_token_id", None, source))


def to_hf(c: DecoderConfig) -> dict[str, Any]:
  check_expressible(c, "Llama", norm="rmsnorm", norm_affine=True, block="pre_norm",
                    qk_norm=False, clip_qkv=None)
  return {"architectures": ["LlamaForCausalLM"], "model_type": NAME, **common_hf(c),
          "rms_norm_eps": c.norm_eps, "mlp_bias": c.mlp_bias, "head_dim": c.head_dim}


def check_expressible(c: DecoderConfig, family: str, **want: Any) -> None:
  """InputError unless `c` has the values every model of a Llama-like family has, plus `want`."""
  want = dict(positions="rotary", rotary_fraction=1.0, final_norm=True, gated_mlp=True,
              has_projections=False, **want)
  bad = [f"{k}={getattr(c, k)!r}" for k, v in want.items() if getattr(c, k) != v]
  if bad:
    raise InputError(f"a {family} config.json cannot express {', '.join(bad)}")


def common_hf(c: DecoderConfig) -> dict[str, Any]:
  """config.json keys Llama, OLMo and OLMo-2 share."""
  return {
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
      "num_key_value_heads": c.num_key_value_heads, "intermediate_size": c.intermediate_size,
      "max_position_embeddings": c.max_position_embeddings, "rope_theta": c.rotary_base,
      "rope_scaling": None, "hidden_act": base.ACTIVATION_TO_HF[c.activation],
      "attention_bias": c.attention_bias, "tie_word_embeddings": c.tie_embeddings,
      "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
      "pad_token_id": c.pad_token_id, "attention_dropout": 0.0, "initializer_range": 0.02,
      "use_cache": True,
  }


def _llama(**kw: Any) -> DecoderConfig:
  return from_hf({"model_type": NAME, "vocab_size": 32000, **kw}, "Llama preset")


# Shapes from the HF config.json of meta-llama/Llama-2-7b-hf and TinyLlama/TinyLlama-1.1B-*.
PRESETS = {
    "llama-7b": _llama(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       intermediate_size=11008, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "tinyllama-1.1b": _llama(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, intermediate_size=5632,
                             max_position_embeddings=2048, rms_norm_eps=1e-5),
}

FAMILY = base.Family(
    name=NAME, architecture="LlamaForCausalLM", from_hf=from_hf, to_hf=to_hf, tensors=TENSORS,
    prefixes=("model.", ""), head="lm_head.weight", presets=PRESETS,
    aliases={"llama-2-7b": "llama-7b", "llama-2-7b-hf": "llama-7b"}, ignored=IGNORED,
    prepend_bos=True, bos_token="<s>", eos_token="</s>", pad_token=None,
    special_tokens=("<unk>", "<s>", "</s>"))
