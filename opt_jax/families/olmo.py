"""OLMo-1 (HF OlmoForCausalLM, the "-hf" checkpoints of allenai/OLMo-*): Llama-like, but
non-parametric LayerNorm.

What differs from Llama: every norm is a LayerNorm without scale or bias (eps 1e-5, fixed in
HF's code), q, k and v may be clamped to [-clip_qkv, clip_qkv] right after their projections
(OLMo-7B-0424), no MLP biases. Tensor names are Llama's (minus the norms, which hold nothing).
The tokenizer's end-of-text `<|endoftext|>` (id 50279) ends documents; texts start with nothing.
"""

from __future__ import annotations

from typing import Any

from opt_jax.config import DecoderConfig
from opt_jax.families import base, llama

NAME = "olmo"
TENSORS = llama.PROJECTIONS


def from_hf(d: dict[str, Any], source: str) -> DecoderConfig:
  base.require(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size"), source, "OLMo")
  base.check_unsupported(d, source)
  rotary_base, _ = base.rope(d, source)
  clip = d.get("clip_qkv")
  return DecoderConfig(
      family=NAME, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
      num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
      num_key_value_heads=d.get("num_key_value_heads"), intermediate_size=d["intermediate_size"],
      max_position_embeddings=d.get("max_position_embeddings") or 2048,
      positions="rotary", rotary_base=rotary_base, norm="layernorm", norm_affine=False,
      norm_eps=1e-5,
      block="pre_norm", final_norm=True, clip_qkv=None if clip is None else float(clip),
      activation=base.activation(d, "hidden_act", "silu", source), gated_mlp=True,
      attention_bias=bool(d.get("attention_bias", False)), mlp_bias=False,
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      bos_token_id=base.token_id(d, "bos_token_id", None, source),
      eos_token_id=base.token_id(d, "eos_token_id", 50279, source),
      pad_token_id=base.token_id(d, "pad_token_id", 1, source))


def to_hf(c: DecoderConfig) -> dict[str, Any]:
  llama.check_expressible(c, "OLMo", norm="layernorm", norm_affine=False, norm_eps=1e-5,
                          block="pre_norm", qk_norm=False, mlp_bias=False,
                          head_dim=c.hidden_size // c.num_attention_heads)
  return {"architectures": ["OlmoForCausalLM"], "model_type": NAME, **llama.common_hf(c),
          "clip_qkv": c.clip_qkv}


def _olmo(hidden: int, layers: int, heads: int, intermediate: int, **kw: Any) -> DecoderConfig:
  return from_hf({"model_type": NAME, "vocab_size": 50304, "hidden_size": hidden,
                  "num_hidden_layers": layers, "num_attention_heads": heads,
                  "intermediate_size": intermediate, "max_position_embeddings": 2048,
                  "rope_theta": 10000.0, **kw}, "OLMo preset")


# HF config.json of allenai/OLMo-1B-hf, OLMo-7B-hf and OLMo-7B-0424-hf.
PRESETS = {
    "olmo-1b": _olmo(2048, 16, 16, 8192, tie_word_embeddings=True),
    "olmo-7b": _olmo(4096, 32, 32, 11008),
    "olmo-7b-0424": _olmo(4096, 32, 32, 11008, clip_qkv=8.0, max_position_embeddings=4096),
}

FAMILY = base.Family(
    name=NAME, architecture="OlmoForCausalLM", from_hf=from_hf, to_hf=to_hf, tensors=TENSORS,
    prefixes=("model.", ""), head="lm_head.weight", presets=PRESETS,
    aliases={"olmo-1b-hf": "olmo-1b", "olmo-7b-hf": "olmo-7b", "olmo-7b-0424-hf": "olmo-7b-0424"},
    ignored=llama.IGNORED, prepend_bos=False, bos_token=None, eos_token="<|endoftext|>",
    pad_token="<|padding|>", special_tokens=("<|endoftext|>", "<|padding|>"))
