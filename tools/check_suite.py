r"""Checks a checkpoint suite for repeated weights, config drift, unreadable files and step order.

  python -m tools.check_suite --suite=pythia.json [--deep] [--out=DIR]

Writes DIR/<suite name>_integrity.csv (model, step, revision, sha, status, duplicate_of, problem;
one row per checkpoint) and keeps a hash cache in DIR (default DIR: the manifest's folder), so a
second check reads no weights of unchanged files. Exits 1 when it finds a problem, 0 when the
suite is clean. The checks are described in opt_jax/integrity.py.
"""

import os
import sys

from absl import app, flags

from opt_jax import integrity, suite
from opt_jax.errors import UserError

_SUITE = flags.DEFINE_string("suite", None, "Suite manifest (.json/.yaml).", required=True)
_DEEP = flags.DEFINE_bool("deep", False, "Hash every byte instead of a fixed sample per tensor.")
_OUT = flags.DEFINE_string("out", None, "Folder for the CSV and the hash cache (default: the "
                           "manifest's folder).")


def main(argv):
  del argv
  try:
    # Only sizes, steps and paths are needed here: the checks read the files themselves.
    s = suite.load_suite(_SUITE.value, check_paths=False)
  except (UserError, suite.SuiteError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  out = _OUT.value or os.path.dirname(os.path.abspath(_SUITE.value))
  report = integrity.check_suite(s, deep=_DEEP.value, cache_dir=out, progress=True)
  csv = report.write_csv(os.path.join(out, f"{s.name}_integrity.csv"))
  for line in report.problems:
    print(f"problem: {line}")
  counts = {}
  for r in report.rows:
    counts[r.status] = counts.get(r.status, 0) + 1
  summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
  print(f"{len(report.rows)} checkpoint(s) ({summary}), {'deep' if report.deep else 'fast'} "
        f"check; wrote {csv}")
  sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
  app.run(main)
