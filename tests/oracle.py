"""The independent oracle of the tests: HF transformers' PyTorch classes of every family
(OPTForCausalLM, GPTNeoXForCausalLM, LlamaForCausalLM, OlmoForCausalLM, Olmo2ForCausalLM),
random-initialised from the config.json opt_jax writes (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from opt_jax import families
from opt_jax.config import DecoderConfig
from opt_jax.convert import hf

OPT = families.get("opt")

# Tiny shapes that compile in seconds and still exercise every code path.
TINY = {
    "pre_ln": OPT.config(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, ffn_dim=64, max_position_embeddings=64),
    # The 350m layout: post-LN, project_in/out, no final layer norm.
    "post_ln_350m": OPT.config(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
                               word_embed_proj_dim=16, do_layer_norm_before=False),
    "odd_heads": OPT.config(vocab_size=101, hidden_size=30, num_hidden_layers=3,
                            num_attention_heads=5, ffn_dim=48, max_position_embeddings=64),
}

# One tiny model per feature set of the other families. Token ids of the tests stay below
# TOKENS, so the GPT-NeoX vocabularies (104 rows) are padded beyond the ids in use.
TOKENS = 96
_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64)
_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
FAMILY_TINY = {
    # Pythia: partial rotary (1/4 of head_dim 8 = 2 dims), parallel residual, exact GELU,
    # untied embed_out, per-head fused query_key_value, padded vocabulary.
    "neox_parallel": families.get("gpt_neox").config(
        vocab_size=104, **_SHAPE, rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu",
        **_IDS),
    "neox_sequential": families.get("gpt_neox").config(
        vocab_size=104, **dict(_SHAPE, hidden_size=48, num_attention_heads=3), rotary_pct=0.5,
        rotary_emb_base=500.0, use_parallel_residual=False, **_IDS),
    # GQA 8 query heads / 2 kv heads, RoPE theta, untied head.
    "llama_gqa": families.get("llama").config(
        vocab_size=101, **dict(_SHAPE, hidden_size=64, num_attention_heads=8),
        num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, **_IDS),
    # MQA (1 kv head), tied head, biases on projections and MLP.
    "llama_tied": families.get("llama").config(
        vocab_size=101, **_SHAPE, num_key_value_heads=1, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True, **_IDS),
    # Non-parametric LayerNorm, clip_qkv, no biases.
    "olmo": families.get("olmo").config(vocab_size=101, **_SHAPE, clip_qkv=0.5, **_IDS),
    # Norms on sublayer outputs, QK-norm over the whole projection, GQA.
    "olmo2": families.get("olmo2").config(vocab_size=101, **_SHAPE, num_key_value_heads=2,
                                          **_IDS),
}


def hf_config(config: DecoderConfig) -> transformers.PretrainedConfig:
  d = families.to_hf_dict(config)
  d.pop("architectures")
  return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def hf_model(config: DecoderConfig, seed: int = 0, std: float = 0.1):
  """A random fp32 HF model. std 0.1 (not HF's 0.02) so layers change the output measurably;
  norm scales 1 + 0.1 N(0, 1)."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config(config)).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(std * torch.randn(p.shape, generator=gen))
  return model


def params_from_hf_model(model, config: DecoderConfig) -> dict:
  return hf.params_from_state_dict(
      {k: v.detach().numpy() for k, v in model.state_dict().items()}, config)


def hf_logprobs(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """[B, T-1] log p(ids[:, t+1] | ids[:, :t+1]) from HF, fp32 (float64 log-softmax)."""
  with torch.no_grad():
    logits = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.double()
  lp = torch.log_softmax(logits, -1)[:, :-1]
  return torch.gather(lp, 2, torch.tensor(ids[:, 1:, None])).squeeze(-1).numpy()


def padded_batch(vocab: int, lengths: list[int], total: int, side: str, seed: int = 0,
                 pad_id: int = 1, bos_id: int = 2):
  """Random rows of the given real lengths (each starting with bos_id), padded on `side`."""
  rng = np.random.RandomState(seed)
  ids = np.full((len(lengths), total), pad_id, np.int64)
  mask = np.zeros((len(lengths), total), np.int64)
  for r, n in enumerate(lengths):
    row = np.concatenate([[bos_id], rng.randint(3, vocab, n - 1)])
    sl = slice(0, n) if side == "right" else slice(total - n, total)
    ids[r, sl], mask[r, sl] = row, 1
  return ids, mask


def hf_rolling(model, tokens, length):
  """HF's log p of tokens[1:] in HFLM's disjoint rolling windows of `length` predictions: the
  window scoring tokens[a..b] sees the `length` tokens before b (all of them, in the first)."""
  out = []
  for a in range(1, len(tokens), length):
    b = min(a + length - 1, len(tokens) - 1)
    start = max(0, b - length)
    with torch.no_grad():
      logits = model(torch.tensor([tokens[start:b]])).logits[0].double()
    lp = torch.log_softmax(logits, -1).numpy()
    out += [lp[j - 1 - start, tokens[j]] for j in range(a, b + 1)]
  return np.asarray(out)
