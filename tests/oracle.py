"""The independent oracle of the tests: HF transformers' PyTorch OPTForCausalLM, random-initialised."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from opt_jax.config import OPTConfig
from opt_jax.convert import hf_keys

# Tiny shapes that compile in seconds and still exercise every code path.
TINY = {
    "pre_ln": OPTConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        ffn_dim=64, max_position_embeddings=64),
    # The 350m layout: post-LN, project_in/out, no final layer norm.
    "post_ln_350m": OPTConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
                              word_embed_proj_dim=16, do_layer_norm_before=False),
    "odd_heads": OPTConfig(vocab_size=101, hidden_size=30, num_hidden_layers=3, num_attention_heads=5,
                           ffn_dim=48, max_position_embeddings=64),
}


def hf_model(config: OPTConfig, seed: int = 0, std: float = 0.1) -> transformers.OPTForCausalLM:
  """A random fp32 HF model. std 0.1 (not HF's 0.02) so layers change the output measurably."""
  hf_config = transformers.OPTConfig(**config.to_hf_dict())
  torch.manual_seed(seed)
  model = transformers.OPTForCausalLM(hf_config).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(std * torch.randn(p.shape, generator=gen))
  return model


def params_from_hf_model(model: transformers.OPTForCausalLM, config: OPTConfig) -> dict:
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return hf_keys.params_from_hf(lambda name: sd["model.decoder." + name], config)


def hf_logprobs(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """[B, T-1] log p(ids[:, t+1] | ids[:, :t+1]) from HF, fp32 (float64 log-softmax)."""
  with torch.no_grad():
    logits = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.double()
  lp = torch.log_softmax(logits, -1)[:, :-1]
  return torch.gather(lp, 2, torch.tensor(ids[:, 1:, None])).squeeze(-1).numpy()


def padded_batch(vocab: int, lengths: list[int], total: int, side: str, seed: int = 0,
                 pad_id: int = 1, bos_id: int = 2):
  """Random rows of the given real lengths (each starting with </s>), padded on `side`."""
  rng = np.random.RandomState(seed)
  ids = np.full((len(lengths), total), pad_id, np.int64)
  mask = np.zeros((len(lengths), total), np.int64)
  for r, n in enumerate(lengths):
    row = np.concatenate([[bos_id], rng.randint(3, vocab, n - 1)])
    sl = slice(0, n) if side == "right" else slice(total - n, total)
    ids[r, sl], mask[r, sl] = row, 1
  return ids, mask
