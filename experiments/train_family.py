"""Train the demo family of small OPTs on the Gutenberg corpus: checkpoints + suite manifest.

  python -m experiments.train_family --out=results/demo [--fast] [--sizes=demo-1m,...]

Gets the corpus (pip, cached; experiments/tasks/corpus.py), trains the byte-level BPE tokenizer
on its training texts (OUT/tokenizer/), then trains every size on the same batches with
checkpoints at log-spaced steps (OUT/family/ckpt/<size>/step<k>/) and writes
OUT/family/suite.json (the `opt_jax.suite` manifest) and OUT/family/training.json (loss
histories). A second run reuses the corpus, tokenizer and every size already trained with the
same settings.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from experiments.tasks import corpus
from opt_jax import train

_OUT = flags.DEFINE_string("out", "results/demo", "Output folder: tokenizer/ and family/ go "
                            "there.")
_CORPUS_DIR = flags.DEFINE_string("corpus_dir", None, "Corpus cache folder (default "
                                  "~/.cache/opt_jax/corpus).")
_FAST = flags.DEFINE_bool("fast", False, "The CI variant: tiny sizes, few steps, small vocab.")
_SIZES = flags.DEFINE_list("sizes", None, "Train only these sizes of the family (names as in "
                           "opt_jax.train.demo_family, e.g. demo-0.3m,demo-1m).")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps (default: the family's).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: the family's).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per sequence, also the models' "
                                "max_position_embeddings (default: the family's).")
_VOCAB = flags.DEFINE_integer("vocab_size", None, "BPE vocabulary size (default 2048, fast 512).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data order and of the initialisation.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  if _FAST.value:
    # Tiny models: compiling dominates, and LLVM's -O0 halves it (set before JAX starts).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + train.FAST_COMPILE_XLA_FLAG)
  data = corpus.demo_training_data(os.path.join(_OUT.value, "tokenizer"),
                                  corpus_dir=_CORPUS_DIR.value, fast=_FAST.value,
                                  vocab_size=_VOCAB.value)
  suite_path = train.train_demo_family(
      os.path.join(_OUT.value, "family"), data.train_ids, data.validation_ids,
      data.tokenizer_file, fast=_FAST.value, sizes=_SIZES.value, steps=_STEPS.value,
      batch_size=_BATCH.value, seq_len=_SEQ_LEN.value, seed=_SEED.value)
  print(f"suite manifest: {suite_path}")


if __name__ == "__main__":
  app.run(main)
