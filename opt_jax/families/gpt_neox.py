"""GPT-NeoX (HF GPTNeoXForCausalLM): the Pythia suite (Biderman et al., 2023).

What differs: rotary positions on the first rotary_pct (Pythia: 1/4) of each head's dims,
rotate-half layout; parallel residual (x + attn(ln1(x)) + mlp(ln2(x))) unless
use_parallel_residual is false; q, k, v fused per head in one `query_key_value` tensor (rows
[N, 3, H]: head n's q, k, v); exact GELU; LayerNorm with bias; an untied head `embed_out`; the
vocabulary padded beyond the tokenizer (50277 tokens in 50304 rows for Pythia up to 2.8B).
Pythia's tokenizer has `<|endoftext|>` (id 0) as bos and eos; texts start with nothing.
"""

from __future__ import annotations

from typing import Any

from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError
from opt_jax.families import base
from opt_jax.families.table import LINEAR, LINEAR_FROM_HEADS, FusedHeads, row

NAME = "gpt_neox"
_QKV = FusedHeads(3)

TENSORS = (
    row("embed_in.weight", "embed/embedding"),
    row("layers.{i}.input_layernorm.weight", "layers/attn_norm/scale"),
    row("layers.{i}.input_layernorm.bias", "layers/attn_norm/bias"),
    row("layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm/scale"),
    row("layers.{i}.post_attention_layernorm.bias", "layers/mlp_norm/bias"),
    row("layers.{i}.attention.query_key_value.weight", "layers/attn/q_kernel",
        "layers/attn/k_kernel", "layers/attn/v_kernel", transform=_QKV),
    row("layers.{i}.attention.query_key_value.bias", "layers/attn/q_bias", "layers/attn/k_bias",
        "layers/attn/v_bias", transform=_QKV),
    row("layers.{i}.attention.dense.weight", "layers/attn/o_kernel", transform=LINEAR_FROM_HEADS),
    row("layers.{i}.attention.dense.bias", "layers/attn/o_bias"),
    row("layers.{i}.mlp.dense_h_to_4h.weight", "layers/mlp/up_kernel", transform=LINEAR),
    row("layers.{i}.mlp.dense_h_to_4h.bias", "layers/mlp/up_bias"),
    row("layers.{i}.mlp.dense_4h_to_h.weight", "layers/mlp/down_kernel", transform=LINEAR),
    row("layers.{i}.mlp.dense_4h_to_h.bias", "layers/mlp/down_bias"),
    row("final_layer_norm.weight", "final_norm/scale"),
    row("final_layer_norm.bias", "final_norm/bias"),
    # Released checkpoints (and save_pretrained) store the head as embed_out; transformers >= 5
    # names the module lm_head and renames on load.
    row("embed_out.weight", "lm_head/embedding", top_level=True, aliases=("lm_head.weight",)),
)


def from_hf(d: dict[str, Any], source: str) -> DecoderConfig:
  base.require(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size"), source, "GPT-NeoX")
  base.check_unsupported(d, source)
  rotary_base, fraction = base.rope(d, source, theta_key="rotary_emb_base",
                                    fraction_key="rotary_pct", default_fraction=0.25)
  bias = bool(d.get("attention_bias", True))
  return DecoderConfig(
      family=NAME, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
      num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
      intermediate_size=d["intermediate_size"],
      max_position_embeddings=d.get("max_position_embeddings") or 2048,
      positions="rotary", rotary_base=rotary_base, rotary_fraction=fraction,
      norm="layernorm", norm_affine=True, norm_eps=float(d.get("layer_norm_eps", 1e-5)),
      block="parallel" if d.get("use_parallel_residual", True) else "pre_norm",
      final_norm=True, activation=base.activation(d, "hidden_act", "gelu", source),
      attention_bias=bias, mlp_bias=True,
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      bos_token_id=base.token_id(d, "bos_token_id", 0, source),
      eos_token_id=base.token_id(d, "eos_token_id", 2, source),
      pad_token_id=base.token_id(d, "pad_token_id", None, source))


def to_hf(c: DecoderConfig) -> dict[str, Any]:
  want = dict(positions="rotary", norm="layernorm", norm_affine=True, final_norm=True,
              qk_norm=False, clip_qkv=None, gated_mlp=False, mlp_bias=True, has_projections=False,
              num_key_value_heads=c.num_attention_heads,
              head_dim=c.hidden_size // c.num_attention_heads)
  bad = [f"{k}={getattr(c, k)!r}" for k, v in want.items() if getattr(c, k) != v]
  if c.block not in ("parallel", "pre_norm"):
    bad.append(f"block={c.block!r}")
  if bad:
    raise InputError(f"a GPT-NeoX config.json cannot express {', '.join(bad)}")
  # The released Pythia configs' keys (rotary_pct, rotary_emb_base), which every transformers
  # version reads.
  return {
      "architectures": ["GPTNeoXForCausalLM"], "model_type": NAME,
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
      "intermediate_size": c.intermediate_size,
      "max_position_embeddings": c.max_position_embeddings,
      "rotary_pct": c.rotary_fraction, "rotary_emb_base": c.rotary_base,
      "use_parallel_residual": c.block == "parallel", "layer_norm_eps": c.norm_eps,
      "hidden_act": base.ACTIVATION_TO_HF[c.activation], "attention_bias": c.attention_bias,
      "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_token_id,
      "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
      "attention_dropout": 0.0, "hidden_dropout": 0.0, "initializer_range": 0.02,
      "use_cache": True,
  }


def _pythia(hidden: int, layers: int, heads: int, vocab: int = 50304) -> DecoderConfig:
  return from_hf({"model_type": NAME, "vocab_size": vocab, "hidden_size": hidden,
                  "num_hidden_layers": layers, "num_attention_heads": heads,
                  "intermediate_size": 4 * hidden, "max_position_embeddings": 2048,
                  "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True,
                  "bos_token_id": 0, "eos_token_id": 0}, "Pythia preset")


# HF config.json of EleutherAI/pythia-* (the same shapes for the -deduped models).
PRESETS = {
    "pythia-14m": _pythia(128, 6, 4),
    "pythia-31m": _pythia(256, 6, 8),
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "pythia-1b": _pythia(2048, 16, 8),
    "pythia-1.4b": _pythia(2048, 24, 16),
    "pythia-2.8b": _pythia(2560, 32, 32),
    "pythia-6.9b": _pythia(4096, 32, 32, vocab=50432),
    "pythia-12b": _pythia(5120, 36, 40, vocab=50688),
}

FAMILY = base.Family(
    name=NAME, architecture="GPTNeoXForCausalLM", from_hf=from_hf, to_hf=to_hf,
    tensors=TENSORS, prefixes=("gpt_neox.", ""), head="embed_out.weight", presets=PRESETS,
    aliases={f"{name}-deduped": name for name in PRESETS},
    ignored=r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$",
    prepend_bos=False, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token=None,
    special_tokens=("<|endoftext|>", "<|padding|>"))
