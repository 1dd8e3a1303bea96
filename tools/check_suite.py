r"""Checks a checkpoint suite for repeated weights, config drift, unreadable files and step order.

  python -m tools.check_suite --suite=pythia.json [--deep] [--out=DIR]

Writes DIR/<suite name>_integrity.csv (model, step, revision, sha, status, duplicate_of, problem;
one row per checkpoint) and keeps a hash cache in DIR (default DIR: the manifest's folder), so a
second fast check reads no weights of unchanged files (--deep re-reads every byte). Exits 1 when
it finds a problem, 0 when the suite is clean; known duplicates (the manifest's
"known_duplicates") and revisions with PyTorch .bin weights only are noted, not problems, and the
checkpoints the manifest excludes are listed and not checked. The checks are described in
opt_jax/integrity.py.
"""

from __future__ import annotations

import dataclasses
import os

from opt_jax import cli
from opt_jax.errors import InputError, UserError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(cli.Settings):
  suite: str = cli.option(help="Suite manifest (.json/.yaml).")
  deep: bool = cli.option(False, "Hash every byte instead of a fixed sample per tensor.")
  out: str | None = cli.option(None, "Folder for the CSV and the hash cache (default: the "
                               "manifest's folder).")


def run(s: Settings) -> cli.Summary:
  from opt_jax import integrity, suite  # pylint: disable=import-outside-toplevel
  try:
    # Only sizes, steps and paths are needed here: the checks read the files themselves.
    manifest = suite.load_suite(s.suite, check_paths=False)
  except (suite.SuiteError, FileNotFoundError) as e:
    if isinstance(e, UserError):
      raise
    raise InputError(str(e)) from None
  out = s.out or os.path.dirname(os.path.abspath(s.suite))
  report = integrity.check_suite(manifest, deep=s.deep, cache_dir=out, progress=True)
  csv = report.write_csv(os.path.join(out, f"{manifest.name}_integrity.csv"))
  counts: dict[str, int] = {}
  for r in report.rows:
    counts[r.status] = counts.get(r.status, 0) + 1
  notes = [f"{r.model} step {r.step}: {r.note}" for r in report.rows
           if r.status in ("bin_only", "known_duplicate") and r.note]
  return cli.Summary(
      "check_suite", evaluated=[f"{cli.plural(len(report.rows), 'checkpoint')} of "
                                f"{manifest.name}, {'deep' if report.deep else 'fast'} check"],
      results=[", ".join(f"{n} {k}" for k, n in sorted(counts.items()))]
      + [f"problem: {line}" for line in report.problems] + [f"note: {n}" for n in notes],
      skipped=manifest.excluded_lines(), files=[os.path.abspath(csv)],
      exit_code=0 if report.ok else 1)


if __name__ == "__main__":
  cli.main(Settings, run)
