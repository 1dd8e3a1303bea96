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

import dataclasses
import json
import os

from opt_jax import cli


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(cli.Settings):
  out: str = cli.option("results/demo", "Output folder: tokenizer/ and family/ go there.")
  corpus_dir: str | None = cli.option(None, "Corpus cache folder (default "
                                      "~/.cache/opt_jax/corpus).")
  fast: bool = cli.option(False, "The CI variant: tiny sizes, few steps, small vocab.")
  sizes: tuple[str, ...] | None = cli.option(
      None, "Train only these sizes of the family (names as in "
            "experiments.training.demo_family, e.g. demo-0.3m,demo-1m).")
  steps: int | None = cli.option(None, "Training steps (default: the family's).", ge=1)
  batch_size: int | None = cli.option(None, "Sequences per batch (default: the family's).", ge=1)
  seq_len: int | None = cli.option(None, "Tokens per sequence, also the models' "
                                   "max_position_embeddings (default: the family's).", ge=2)
  vocab_size: int | None = cli.option(None, "BPE vocabulary size (default 2048, fast 512).",
                                      ge=260)
  seed: int = cli.option(0, "Seed of the data order and of the initialisation.", ge=0)


def run(s: Settings) -> cli.Summary:
  """Trains the family; returns the closing summary (final validation loss of each size)."""
  # Imported here, not at the top: they import JAX, which must start after _before_jax has set
  # XLA_FLAGS.
  from experiments import training  # pylint: disable=import-outside-toplevel
  from experiments.tasks import corpus  # pylint: disable=import-outside-toplevel
  from opt_jax import train  # pylint: disable=import-outside-toplevel

  data = corpus.demo_training_data(os.path.join(s.out, "tokenizer"), corpus_dir=s.corpus_dir,
                                   fast=s.fast, vocab_size=s.vocab_size)
  family = os.path.join(s.out, "family")
  suite_path = training.train_demo_family(
      family, data.train_ids, data.validation_ids, data.tokenizer_file, fast=s.fast,
      sizes=s.sizes, steps=s.steps, batch_size=s.batch_size, seq_len=s.seq_len, seed=s.seed)
  with open(os.path.join(family, train.TRAINING_FILE)) as f:
    models = json.load(f)["models"]
  return cli.Summary(
      "train_family", evaluated=[f"{len(models)} sizes on {len(data.train_ids):,} training tokens"],
      results=["final validation loss (nats/token): " + ", ".join(
          f"{m['name']} {m['history'][-1]['val_loss']:.3f} (step {m['history'][-1]['step']})"
          for m in models)],
      out_dir=os.path.abspath(family),
      files=[os.path.basename(suite_path), train.TRAINING_FILE, "ckpt/"])


def _before_jax(s: Settings) -> None:
  if s.fast:
    from opt_jax import train  # pylint: disable=import-outside-toplevel
    # Tiny models: compiling dominates, and LLVM's -O0 halves it (set before JAX starts).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + train.FAST_COMPILE_XLA_FLAG)


if __name__ == "__main__":
  cli.main(Settings, run, before=_before_jax)
