"""Test helpers: a tiny checkpoint suite (2 sizes x 4 steps, random weights) with a tiny BPE."""

from __future__ import annotations

import json
import os

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from opt_jax import checkpoint
from opt_jax import families
from opt_jax.model import param_shapes

CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Language models learn to predict the next token; larger models learn faster.",
    "In 1901 the library held 4,512 books, and by 1950 it held 97,003 of them.",
    "She said: perplexity is the exponential of the mean negative log-likelihood.",
    "Checkpoints saved along training let us watch what a model learns and when.",
]

# Two tiny sizes; vocab 320 holds the 256 byte symbols, 4 specials and a few merges.
SIZES = {
    "tiny-a": families.get("opt").config(vocab_size=320, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, ffn_dim=64,
                                         max_position_embeddings=64),
    "tiny-b": families.get("opt").config(vocab_size=320, hidden_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, ffn_dim=96,
                                         max_position_embeddings=64),
}
STEPS = (10, 20, 30, 40)
TOKENS_PER_STEP = 1000


def train_tokenizer(directory: str) -> str:
  """Byte-level BPE per CONTRACTS.md (<s>=0, <pad>=1, </s>=2, <unk>=3); returns tokenizer.json."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 4, trainer)
  assert tok.get_vocab_size() <= 320
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "tokenizer.json")
  tok.save(path)
  return path


def make_suite(root: str, sizes: dict[str, DecoderConfig] | None = None, steps=STEPS,
               std: float = 0.3) -> str:
  """Saves len(sizes) x len(steps) random checkpoints under root/ckpt; returns root/suite.json.

  Every checkpoint has its own seed. Random normal(std) weights and 1 + normal(0.1) layer-norm
  scales, drawn with numpy on the shapes of `param_shapes` (`init_params` compiles model.init anew
  on every call, ~30 s on a loaded 2-core machine; the weights would be replaced anyway so that
  outputs differ between checkpoints far above float error).
  """
  sizes = sizes or SIZES
  tok_file = train_tokenizer(os.path.join(root, "tok"))
  models_ = []
  for i, (name, config) in enumerate(sizes.items()):
    ckpts = {}
    for j, step in enumerate(steps):
      params = random_params(config, seed=100 * i + j, std=std)
      rel = f"ckpt/{name}/step{step}"
      checkpoint.save(os.path.join(root, rel), params, config, tokenizer_files=[tok_file])
      ckpts[str(step)] = rel
    models_.append({"name": name, "params": config.num_params(),
                    "tokens_per_step": TOKENS_PER_STEP, "aliases": [f"org/{name}"],
                    "checkpoints": ckpts})
  path = os.path.join(root, "suite.json")
  with open(path, "w") as f:
    json.dump({"name": "tiny", "models": models_}, f, indent=2)
  return path


def random_params(config: DecoderConfig, seed: int, std: float = 0.3):
  """Params pytree of numpy float32 arrays for `config`."""
  import jax  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(seed)

  def draw(path, shape):
    z = rng.standard_normal(shape.shape).astype(np.float32)
    return 1.0 + 0.1 * z if "scale" in jax.tree_util.keystr(path) else std * z
  if config not in _SHAPES:
    _SHAPES[config] = param_shapes(config)
  return jax.tree_util.tree_map_with_path(draw, _SHAPES[config])


_SHAPES: dict = {}


def param_summary(params) -> dict[str, np.ndarray]:
  """A cheap deterministic evaluation (no compilation): float64 sum and norm of every array."""
  import jax  # pylint: disable=import-outside-toplevel
  leaves = jax.tree_util.tree_leaves_with_path(params)
  arrays = [np.asarray(a, np.float64) for _, a in leaves]
  return {"sums": np.array([a.sum() for a in arrays]),
          "norms": np.array([np.sqrt((a * a).sum()) for a in arrays]),
          "paths": np.array([jax.tree_util.keystr(p) for p, _ in leaves])}
