"""OPT (Zhang et al., 2022; HF OPTForCausalLM): learned positions with offset 2, LayerNorm, ReLU.

What differs from the others: learned position embeddings whose first 2 rows are reserved
(position p uses row p + 2; padding uses row 1), pre-LN or post-LN (OPT-350m, which also has
project_in / project_out between a 512-wide embedding and the 1024-wide decoder and no final
layer norm), biases everywhere, ReLU MLP, LM head tied to the token embedding. Special tokens
<s>=0 <pad>=1 </s>=2 <unk>=3; every text starts with </s> (OPT's bos, id 2).
"""

from __future__ import annotations

from typing import Any

from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError
from opt_jax.families import base
from opt_jax.families.table import FLAT, LINEAR, LINEAR_FROM_HEADS, row

NAME = "opt"
POSITION_OFFSET = 2  # OPT reserves embed_positions rows 0 and 1; row 1 is used by padding.

TENSORS = (
    row("embed_tokens.weight", "embed/embedding"),
    row("embed_positions.weight", "pos_embed/embedding"),
    row("project_in.weight", "project_in/kernel", transform=LINEAR),
    row("project_out.weight", "project_out/kernel", transform=LINEAR),
    row("final_layer_norm.weight", "final_norm/scale"),
    row("final_layer_norm.bias", "final_norm/bias"),
    row("layers.{i}.self_attn_layer_norm.weight", "layers/attn_norm/scale"),
    row("layers.{i}.self_attn_layer_norm.bias", "layers/attn_norm/bias"),
    row("layers.{i}.self_attn.q_proj.weight", "layers/attn/q_kernel", transform=LINEAR),
    row("layers.{i}.self_attn.k_proj.weight", "layers/attn/k_kernel", transform=LINEAR),
    row("layers.{i}.self_attn.v_proj.weight", "layers/attn/v_kernel", transform=LINEAR),
    row("layers.{i}.self_attn.q_proj.bias", "layers/attn/q_bias", transform=FLAT),
    row("layers.{i}.self_attn.k_proj.bias", "layers/attn/k_bias", transform=FLAT),
    row("layers.{i}.self_attn.v_proj.bias", "layers/attn/v_bias", transform=FLAT),
    row("layers.{i}.self_attn.out_proj.weight", "layers/attn/o_kernel",
        transform=LINEAR_FROM_HEADS),
    row("layers.{i}.self_attn.out_proj.bias", "layers/attn/o_bias"),
    # HF's per-layer `final_layer_norm` is the norm before (pre-LN) or after (post-LN) the MLP.
    row("layers.{i}.final_layer_norm.weight", "layers/mlp_norm/scale"),
    row("layers.{i}.final_layer_norm.bias", "layers/mlp_norm/bias"),
    row("layers.{i}.fc1.weight", "layers/mlp/up_kernel", transform=LINEAR),
    row("layers.{i}.fc1.bias", "layers/mlp/up_bias"),
    row("layers.{i}.fc2.weight", "layers/mlp/down_kernel", transform=LINEAR),
    row("layers.{i}.fc2.bias", "layers/mlp/down_bias"),
    row("lm_head.weight", "lm_head/embedding", top_level=True),
)


def from_hf(d: dict[str, Any], source: str) -> DecoderConfig:
  base.require(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "ffn_dim"), source, "OPT")
  base.check_unsupported(d, source)
  pre_ln = bool(d.get("do_layer_norm_before", True))
  bias = bool(d.get("enable_bias", True))
  return DecoderConfig(
      family=NAME, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
      num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
      intermediate_size=d["ffn_dim"],
      max_position_embeddings=d.get("max_position_embeddings") or 2048,
      embed_dim=d.get("word_embed_proj_dim") or d["hidden_size"],
      positions="learned", position_offset=POSITION_OFFSET,
      norm="layernorm", norm_affine=bool(d.get("layer_norm_elementwise_affine", True)),
      norm_eps=1e-5, block="pre_norm" if pre_ln else "post_norm",
      final_norm=pre_ln and not d.get("_remove_final_layer_norm", False),
      activation=base.activation(d, "activation_function", "relu", source),
      attention_bias=bias, mlp_bias=bias,
      tie_embeddings=bool(d.get("tie_word_embeddings", True)),
      bos_token_id=base.token_id(d, "bos_token_id", 2, source),
      eos_token_id=base.token_id(d, "eos_token_id", 2, source),
      pad_token_id=base.token_id(d, "pad_token_id", 1, source))


def to_hf(c: DecoderConfig) -> dict[str, Any]:
  _check_expressible(c)
  return {
      "architectures": ["OPTForCausalLM"], "model_type": NAME,
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
      "ffn_dim": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
      "word_embed_proj_dim": c.embed_dim, "do_layer_norm_before": c.block == "pre_norm",
      "_remove_final_layer_norm": bool(c.block == "pre_norm" and not c.final_norm),
      "enable_bias": c.attention_bias, "layer_norm_elementwise_affine": c.norm_affine,
      "activation_function": base.ACTIVATION_TO_HF[c.activation],
      "pad_token_id": c.pad_token_id, "bos_token_id": c.bos_token_id,
      "eos_token_id": c.eos_token_id, "tie_word_embeddings": c.tie_embeddings,
      "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0,
      "init_std": 0.02, "use_cache": True,
  }


def _check_expressible(c: DecoderConfig) -> None:
  # OPTConfig can only say what OPT's modelling code does; anything else would be lost silently.
  want = dict(positions="learned", position_offset=POSITION_OFFSET, norm="layernorm",
              norm_eps=1e-5, qk_norm=False, clip_qkv=None, gated_mlp=False,
              mlp_bias=c.attention_bias, num_key_value_heads=c.num_attention_heads,
              head_dim=c.hidden_size // c.num_attention_heads)
  bad = [f"{k}={getattr(c, k)!r}" for k, v in want.items() if getattr(c, k) != v]
  if c.block not in ("pre_norm", "post_norm") or (c.block == "post_norm" and c.final_norm):
    bad.append(f"block={c.block!r} with final_norm={c.final_norm}")
  if bad:
    raise InputError(f"an OPT config.json cannot express {', '.join(bad)}")


def _preset(hidden: int, layers: int, heads: int, **kw: Any) -> DecoderConfig:
  d = {"vocab_size": 50272, "hidden_size": hidden, "num_hidden_layers": layers,
       "num_attention_heads": heads, "ffn_dim": 4 * hidden, "max_position_embeddings": 2048}
  return from_hf({**d, **kw}, "OPT preset")


# Published shapes of the OPT family (Zhang et al., 2022, Table 1; HF facebook/opt-* configs).
PRESETS = {
    "opt-125m": _preset(768, 12, 12),
    "opt-350m": _preset(1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _preset(2048, 24, 32),
    "opt-2.7b": _preset(2560, 32, 32),
    "opt-6.7b": _preset(4096, 32, 32),
    "opt-13b": _preset(5120, 40, 40),
    "opt-30b": _preset(7168, 48, 56),
    "opt-66b": _preset(9216, 64, 72),
    "opt-175b": _preset(12288, 96, 96),
}

FAMILY = base.Family(
    name=NAME, architecture="OPTForCausalLM", from_hf=from_hf, to_hf=to_hf, tensors=TENSORS,
    prefixes=("model.decoder.", "decoder."), head="lm_head.weight", presets=PRESETS,
    aliases={name.removeprefix("opt-"): name for name in PRESETS},
    prepend_bos=True, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
    special_tokens=("<s>", "<pad>", "</s>", "<unk>"))
