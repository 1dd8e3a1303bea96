"""The demo family: the model sizes and training settings of `make demo` (and of its fast CI
mode), trained with `opt_jax.train.train_family`.

  demo_family        the members (OPT-architecture models, DEMO_FAMILY) and the TrainConfig
  train_demo_family  demo_family trained into a folder, the vocabulary taken from the tokenizer
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from opt_jax import families
from opt_jax.config import DecoderConfig
from opt_jax.tokenizer import load_tokenizer
from opt_jax.train import FamilyMember, TrainConfig, train_family

DEMO_FAMILY = "opt"   # the architecture of the demo's models


def _config(vocab: int, d: int, layers: int, heads: int, positions: int) -> DecoderConfig:
  return families.get(DEMO_FAMILY).config(
      vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
      ffn_dim=4 * d, max_position_embeddings=positions)


def demo_family(vocab_size: int, *, fast: bool = False, seq_len: int | None = None,
                steps: int | None = None, batch_size: int | None = None, seed: int = 0,
                sizes: Sequence[str] | None = None) -> tuple[list[FamilyMember], TrainConfig]:
  """The members and TrainConfig of `make demo` (fast: the CI variant, a few seconds each).

  max_position_embeddings equals seq_len, so every position the model has was trained.
  sizes: keep only these member names (in family order).
  """
  if fast:
    seq_len = seq_len or 64
    shapes = [("fast-s", 16, 1, 2, 5e-3), ("fast-m", 32, 2, 2, 5e-3), ("fast-l", 64, 2, 2, 3e-3)]
    tc = TrainConfig(steps=steps or 120, batch_size=batch_size or 8, seq_len=seq_len, seed=seed,
                     num_checkpoints=8, eval_batches=8)
  else:
    # Sized for `make demo` on 2 CPU cores: 1000 steps of 8 x 128 tokens (1M tokens) each took
    # 48 s, 69 s and 281 s on a shared machine; validation loss ends 4.83 > 4.75 > 4.66 nats.
    # A 4M model (d=256, L=4) was tried: with the tokens this budget allows it ended no better
    # than the 1M one at any of the learning rates tried. Learning rates from short sweeps.
    seq_len = seq_len or 128
    shapes = [("demo-0.1m", 32, 2, 2, 4e-3), ("demo-0.3m", 64, 2, 2, 4e-3),
              ("demo-1m", 128, 4, 4, 2.5e-3)]
    tc = TrainConfig(steps=steps or 1000, batch_size=batch_size or 8, seq_len=seq_len, seed=seed,
                     num_checkpoints=15, eval_batches=4)
  members = [FamilyMember(name, _config(vocab_size, d, layers, heads, seq_len), lr)
             for name, d, layers, heads, lr in shapes]
  if sizes:
    known = [m.name for m in members]
    unknown = [s for s in sizes if s not in known]
    if unknown:
      raise ValueError(f"unknown size(s) {unknown}; this family has {known}")
    members = [m for m in members if m.name in sizes]
  return members, tc


def train_demo_family(out_dir: str, train_ids: np.ndarray, val_ids: np.ndarray,
                      tokenizer_file: str, *, fast: bool = False,
                      sizes: Sequence[str] | None = None, steps: int | None = None,
                      batch_size: int | None = None, seq_len: int | None = None, seed: int = 0,
                      progress: bool = True) -> str:
  """`demo_family` trained with `train_family` into OUT_DIR; returns OUT_DIR/suite.json.

  The model vocabulary is the tokenizer's, rounded up to a multiple of 64.
  """
  vocab = load_tokenizer(os.path.dirname(os.path.abspath(tokenizer_file))).vocab_size
  members, tc = demo_family(-(-vocab // 64) * 64, fast=fast, seq_len=seq_len, steps=steps,
                            batch_size=batch_size, seed=seed, sizes=sizes)
  return train_family(out_dir, members, train_ids, tc, val_ids=val_ids,
                      tokenizer_file=tokenizer_file, suite_name="demo-fast" if fast else "demo",
                      progress=progress)
