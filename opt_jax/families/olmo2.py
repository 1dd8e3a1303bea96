"""OLMo-2 (HF Olmo2ForCausalLM, allenai/OLMo-2-*): norms on the sublayer outputs and QK-norm.

What differs from Llama: each layer is x = x + rmsnorm(attn(x)); x = x + rmsnorm(mlp(x)) (the
norms sit on the sublayers' outputs, named post_attention_layernorm and
post_feedforward_layernorm); the query and key projections are RMS-normalised over their whole
width (all heads together, q_norm [N * H], k_norm [K * H]) before rotary. The tokenizer's
`<|endoftext|>` (id 100257) ends documents; texts start with nothing.
"""

from __future__ import annotations

from typing import Any

from opt_jax.config import DecoderConfig
from opt_jax.families import base, llama
from opt_jax.families.table import FLAT, row

NAME = "olmo2"
TENSORS = llama.PROJECTIONS + (
    row("layers.{i}.self_attn.q_norm.weight", "layers/attn/q_norm/scale", transform=FLAT),
    row("layers.{i}.self_attn.k_norm.weight", "layers/attn/k_norm/scale", transform=FLAT),
    row("layers.{i}.post_attention_layernorm.weight", "layers/attn_norm/scale"),
    row("layers.{i}.post_feedforward_layernorm.weight", "layers/mlp_norm/scale"),
    row("norm.weight", "final_norm/scale"),
)


def from_hf(d: dict[str, Any], source: str) -> DecoderConfig:
  base.require(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size"), source, "OLMo-2")
  base.check_unsupported(d, source)
  rotary_base, _ = base.rope(d, source)
  return DecoderConfig(
      family=NAME, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
      num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
      num_key_value_heads=d.get("num_key_value_heads"), intermediate_size=d["intermediate_size"],
      max_position_embeddings=d.get("max_position_embeddings") or 2048,
      positions="rotary", rotary_base=rotary_base, norm="rmsnorm", norm_affine=True,
      norm_eps=float(d.get("rms_norm_eps", 1e-5)), block="output_norm", final_norm=True,
      qk_norm=True, activation=base.activation(d, "hidden_act", "silu", source),
      gated_mlp=True, attention_bias=bool(d.get("attention_bias", False)), mlp_bias=False,
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      bos_token_id=base.token_id(d, "bos_token_id", None, source),
      eos_token_id=base.token_id(d, "eos_token_id", 50279, source),
      pad_token_id=base.token_id(d, "pad_token_id", 1, source))


def to_hf(c: DecoderConfig) -> dict[str, Any]:
  llama.check_expressible(c, "OLMo-2", norm="rmsnorm", norm_affine=True, block="output_norm",
                          qk_norm=True, clip_qkv=None, mlp_bias=False,
                          head_dim=c.hidden_size // c.num_attention_heads)
  return {"architectures": ["Olmo2ForCausalLM"], "model_type": NAME, **llama.common_hf(c),
          "rms_norm_eps": c.norm_eps}


def _olmo2(hidden: int, layers: int, heads: int, intermediate: int) -> DecoderConfig:
  return from_hf({"model_type": NAME, "vocab_size": 100352, "hidden_size": hidden,
                  "num_hidden_layers": layers, "num_attention_heads": heads,
                  "intermediate_size": intermediate, "max_position_embeddings": 4096,
                  "rope_theta": 500000.0, "rms_norm_eps": 1e-6, "bos_token_id": None,
                  "eos_token_id": 100257, "pad_token_id": 100277}, "OLMo-2 preset")


# HF config.json of allenai/OLMo-2-1124-7B and OLMo-2-1124-13B.
PRESETS = {
    "olmo-2-7b": _olmo2(4096, 32, 32, 11008),
    "olmo-2-13b": _olmo2(5120, 40, 40, 13824),
}

FAMILY = base.Family(
    name=NAME, architecture="Olmo2ForCausalLM", from_hf=from_hf, to_hf=to_hf, tensors=TENSORS,
    prefixes=("model.", ""), head="lm_head.weight", presets=PRESETS,
    aliases={"olmo-2-1124-7b": "olmo-2-7b", "olmo-2-1124-13b": "olmo-2-13b"},
    ignored=llama.IGNORED, prepend_bos=False, bos_token=None, eos_token="<|endoftext|>",
    pad_token="<|pad|>", special_tokens=("<|endoftext|>", "<|pad|>"))
