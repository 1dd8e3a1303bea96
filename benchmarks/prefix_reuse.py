r"""Multiple-choice scoring with the shared prompt computed once (packed rows) vs not.

  python -m benchmarks.prefix_reuse [--bigbench_dir=../shared/data/bigbench] [--task=ruin_names]
      [--k_shot=2] [--examples=64] [--layers=12] [--batch_size=8] [--reps=3]

One run, one model, the same requests: every option of the first --examples examples of a
4-option BIG-bench task (k-shot prompts, BIG-bench's prefixes, the harness's encoding, as
experiments/downstream_icl.py builds them), scored by two opt_jax.scoring.Scorers that differ only
in share_prefix. Model: OPT-125M shapes (--layers to shrink it on CPU) with random weights;
tokenizer: a byte-level BPE (8k tokens) trained on the task's own text, so prompt and option
lengths in tokens are realistic for an English BPE. Both scorers are warmed up on the full request
list (every bucket compiled) before timing; timed passes alternate (on, off, on, off, ...) so load
from other processes hits both alike; the reported ratio is median(off) / median(on). The two
scorers' log-probs are compared (max abs difference) so the speed-up is not bought with errors.
Target (issue 7): ratio >= 1.5 on a 4-option task.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

_DIR = flags.DEFINE_string("bigbench_dir", os.path.join(os.path.dirname(__file__), "..", "..",
                                                        "shared", "data", "bigbench"),
                           "folder of BIG-bench task folders")
_TASK = flags.DEFINE_string("task", "ruin_names", "a multiple-choice task (4 options)")
_K = flags.DEFINE_integer("k_shot", 2, "shots per prompt")
_EXAMPLES = flags.DEFINE_integer("examples", 64, "examples scored per pass")
_LAYERS = flags.DEFINE_integer("layers", 12, "decoder layers of the OPT-125M-shaped model")
_BATCH = flags.DEFINE_integer("batch_size", 8, "rows per forward pass (both scorers)")
_REPS = flags.DEFINE_integer("reps", 3, "timed passes per setting")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 1024, "scorer window in tokens")


def train_tokenizer(texts: list[str], directory: str, vocab_size: int = 8000):
  """A byte-level BPE with OPT's special tokens (<s>=0, <pad>=1, </s>=2, <unk>=3)."""
  from experiments.tasks import corpus
  from opt_jax.tokenizer import load_tokenizer
  tok = corpus.bpe_tokenizer(texts, vocab_size, min_frequency=0)
  tok.save(os.path.join(directory, "tokenizer.json"))
  return load_tokenizer(directory)


def random_params(config, seed: int = 0, std: float = 0.02):
  """numpy float32 params of `config` (normal(std) weights, layer-norm scales 1)."""
  import jax

  from opt_jax.model import param_shapes
  rng = np.random.RandomState(seed)

  def draw(path, shape):
    if "scale" in jax.tree_util.keystr(path):
      return np.ones(shape.shape, np.float32)
    return (std * rng.standard_normal(shape.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from experiments import downstream_icl
  from experiments.tasks import bigbench as bb
  from opt_jax import families
  from opt_jax.scoring import Scorer

  task = bb.load_task(os.path.join(_DIR.value, _TASK.value)).multiple_choice()
  items = downstream_icl.make_items([task], [_K.value], seed=0, max_examples=_EXAMPLES.value)
  counts = sorted({len(it.requests.continuations) for it in items})
  with tempfile.TemporaryDirectory() as d:
    texts = [e.input + " " + " ".join(e.options) for e in task.examples]
    tokenizer = train_tokenizer(texts, d)
  config = families.preset("opt-125m").replace(num_hidden_layers=_LAYERS.value)
  enc = downstream_icl.encode(items, tokenizer, _MAX_LENGTH.value)
  pairs = enc.pairs
  ctx_len = [len(c) for c, _ in pairs]
  cont_len = [len(c) for _, c in pairs]
  params = jax.device_put(random_params(config))
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[_DTYPE.value]
  scorers = {on: Scorer(config, params, batch_size=_BATCH.value, max_length=_MAX_LENGTH.value,
                        dtype=dtype, share_prefix=on) for on in (True, False)}
  results = {}
  for on, s in scorers.items():          # warm-up: compiles every bucket both paths need
    results[on] = np.array([r[0] for r in s.loglikelihood_tokens(pairs)])
  times = {True: [], False: []}
  for _ in range(_REPS.value):
    for on in (True, False):
      t = time.perf_counter()
      scorers[on].loglikelihood_tokens(pairs)
      times[on].append(time.perf_counter() - t)
  on, off = statistics.median(times[True]), statistics.median(times[False])
  report = {
      "device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
      "task": task.name, "options_per_example": counts, "k_shot": _K.value,
      "examples": len(items), "requests": len(pairs), "layers": config.num_hidden_layers,
      "hidden": config.hidden_size, "dtype": _DTYPE.value, "batch_size": _BATCH.value,
      "median_context_tokens": float(np.median(ctx_len)),
      "median_option_tokens": float(np.median(cont_len)),
      "seconds_shared": on, "seconds_independent": off, "speedup": off / on,
      "requests_per_s_shared": len(pairs) / on, "requests_per_s_independent": len(pairs) / off,
      "max_abs_logprob_diff": float(np.max(np.abs(results[True] - results[False]))),
      # Programs each path runs (the two Scorers share one spec, hence their compiled programs).
      "programs": {"shared": sorted(scorers[True].shapes_run),
                   "independent": sorted(scorers[False].shapes_run)},
      "times": {"shared": times[True], "independent": times[False]}}
  print(json.dumps(report))
  print(f"{task.name} ({counts} options, {_K.value}-shot, {len(items)} examples, {len(pairs)} "
        f"requests; median context {report['median_context_tokens']:.0f} tokens, option "
        f"{report['median_option_tokens']:.0f}) on {report['device']}, {config.num_hidden_layers}"
        f"x{config.hidden_size} {_DTYPE.value}: shared prefix {on:.2f} s, independent {off:.2f} s "
        f"-> {off / on:.2f}x (target >= 1.5x); max |log-prob difference| "
        f"{report['max_abs_logprob_diff']:.2e}")


if __name__ == "__main__":
  app.run(main)
