"""Fetch BIG-bench's JSON tasks: from the package index, or from a copy of the BIG-bench repository.

  python -m tools.fetch_bigbench [--out=~/.cache/opt_jax/bigbench] [--version=1.0.0]
  python -m tools.fetch_bigbench --from=PATH [--out=~/.cache/opt_jax/bigbench]

Without --from: runs `pip download --no-deps --no-binary=:all: bigbench==VERSION` into
OUT/downloads (pip shows its own progress; about 358 MB for 1.0.0; with pip >= 26 it runs pip 24.2
from its wheel, also fetched from the index, because newer pip refuses this sdist's metadata).
An index that does not serve that version (some mirrors hold only bigbench 0.0.1) stops the run
with an error naming the other route.

With --from=PATH: PATH is a local checkout of the BIG-bench repository (git clone
https://github.com/google/BIG-bench), its bigbench/benchmark_tasks folder, or a downloaded archive
of the repository (.zip or .tar.gz, e.g. GitHub's "Download ZIP") or of the bigbench sdist; nothing
is downloaded.

Either way only `bigbench/benchmark_tasks/**/task.json` is extracted, into OUT/benchmark_tasks (pass
that folder to `experiments/downstream_icl.py --bigbench_dir`). The tasks are written under a
temporary name and renamed into place with a FETCHED.json record, so an interrupted run leaves
nothing that looks complete; a second index run finds the record and does nothing. The package is
never installed (its dependencies do not install on current Python); nothing is imported from it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import json
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Sequence

from tqdm import tqdm

from opt_jax import cli, files
from opt_jax.errors import InputError, OutputExistsError, UserError

TASKS_DIR = "benchmark_tasks"
TASK_FILE = "task.json"
RECORD = "FETCHED.json"
_MARKER = "bigbench/benchmark_tasks/"
OLD_PIP = "24.2"  # the newest pip line known to save the bigbench sdist; see _pip_download_command


def default_cache_dir() -> str:
  """$XDG_CACHE_HOME/opt_jax/bigbench (~/.cache/opt_jax/bigbench); tasks land in its
  benchmark_tasks/ folder (where experiments/downstream_icl.py looks by default)."""
  return files.user_cache_dir("bigbench")


def _task_relpath(member_name: str) -> str | None:
  """'bigbench-1.0.0/bigbench/benchmark_tasks/a/b/task.json' -> 'a/b/task.json'; None for any other
  file or for a path that could escape the destination."""
  name = member_name.replace("\\", "/")
  i = name.find(_MARKER)
  if i < 0 or posixpath.basename(name) != "task.json":
    return None
  rel = name[i + len(_MARKER):]
  parts = rel.split("/")
  if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or len(parts) < 2:
    return None
  return rel


def _directory_entries(path: str):
  """(relative task path, open binary file) for each task.json under a BIG-bench checkout (its
  bigbench/benchmark_tasks folder) or under a benchmark_tasks folder itself."""
  root = os.path.abspath(path)
  inner = os.path.join(root, *_MARKER.rstrip("/").split("/"))
  base = inner if os.path.isdir(inner) else root
  for d, subdirs, names in os.walk(base):
    subdirs.sort()
    if TASK_FILE in names and d != base:
      rel = os.path.relpath(os.path.join(d, TASK_FILE), base).replace(os.sep, "/")
      with open(os.path.join(d, TASK_FILE), "rb") as f:
        yield rel, f


def _archive_entries(path: str):
  """(relative task path, open binary file) for each task.json in a .tar.gz / .zip archive (the
  bigbench sdist or an archive of the repository), or under a folder (`_directory_entries`)."""
  if os.path.isdir(path):
    yield from _directory_entries(path)
    return
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      for info in z.infolist():
        rel = None if info.is_dir() else _task_relpath(info.filename)
        if rel:
          with z.open(info) as f:
            yield rel, f
    return
  with tarfile.open(path, "r:*") as tar:
    for member in tar:  # streams: the archive is read once
      rel = _task_relpath(member.name) if member.isfile() else None
      if rel:
        yield rel, tar.extractfile(member)


def extract_tasks(sdist: str, out_dir: str, *, version: str | None = None,
                  progress: bool = True) -> int:
  """Extract every benchmark_tasks/**/task.json of `sdist` (an archive or a folder: see
  `_archive_entries`) into OUT_DIR/benchmark_tasks.

  Atomic: written under a temporary sibling and renamed; an existing complete folder is replaced.
  Returns the number of files extracted. Raises InputError when the source holds none.
  """
  if not os.path.exists(sdist):
    raise InputError(f"--from={sdist}: no such file or folder")
  final = os.path.join(out_dir, TASKS_DIR)
  n = 0
  with files.atomic_directory(final, may_replace=_own_tasks) as tmp:
    bar = tqdm(desc="extracting task.json", unit=" files", disable=not progress)
    for rel, f in _archive_entries(sdist):
      dest = os.path.join(tmp, *rel.split("/"))
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      with open(dest, "wb") as out:   # inside the temporary folder: published by its rename
        shutil.copyfileobj(f, out)
      n += 1
      bar.update(1)
    bar.close()
    if n == 0:
      raise InputError(f"{sdist}: no bigbench/benchmark_tasks/**/task.json inside; expected the "
                       f"bigbench source distribution, a BIG-bench checkout or an archive of the "
                       f"repository")
    files.write_json(os.path.join(tmp, RECORD),
                     {"source": os.path.basename(sdist), "version": version, "task_files": n},
                     indent=1)
  return n


def _own_tasks(final: str) -> None:
  """An existing tasks folder is replaced only when this tool wrote it (it has FETCHED.json)."""
  if not os.path.isfile(os.path.join(final, RECORD)):
    raise OutputExistsError(f"{final} exists but holds no {RECORD} (not written by "
                            f"tools.fetch_bigbench); move it away or choose another --out")


def _find_sdist(download_dir: str, version: str) -> str | None:
  found = [p for ext in ("tar.gz", "zip")
           for p in glob.glob(os.path.join(download_dir, f"bigbench-{version}.{ext}"))]
  return found[0] if found else None


def _pip_download_command(downloads: str) -> list[str]:
  """`python -m pip download`, or, from pip 26 on, pip OLD_PIP run from its wheel.

  Even with --no-deps, pip >= 26 prepares the sdist's metadata and rejects it because bigbench
  declares a direct-URL dependency (bleurt @ file://...): "Distributions from PyPI cannot declare
  direct URL dependencies", and the archive is never saved. pip 24.2 saves it. A pip wheel runs
  as `python pip-X.whl/pip ...` without being installed; it comes from the package index too.
  """
  current = [sys.executable, "-m", "pip", "download"]
  try:
    major = int(importlib.metadata.version("pip").split(".")[0])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    major = 0
  if major < 26:
    return current
  wheel = os.path.join(downloads, f"pip-{OLD_PIP}-py3-none-any.whl")
  if not os.path.isfile(wheel):
    cmd = current + ["--no-deps", f"pip=={OLD_PIP}", "-d", downloads]
    print("running:", " ".join(cmd))
    subprocess.run(cmd, check=True)
  return [sys.executable, os.path.join(wheel, "pip"), "download"]


def fetch(out_dir: str | None = None, version: str = "1.0.0", *,
          pip_command: Sequence[str] | None = None, progress: bool = True) -> str:
  """Make OUT_DIR/benchmark_tasks hold the task.json files of bigbench==VERSION; returns its path.

  Does nothing when a previous run completed (FETCHED.json present with the same version).
  pip_command: the `pip download` command to run (default: see _pip_download_command); the
  options, the package spec and `-d DIR` are appended.
  """
  out_dir = os.path.abspath(os.path.expanduser(out_dir or default_cache_dir()))
  final = os.path.join(out_dir, TASKS_DIR)
  record = os.path.join(final, RECORD)
  if os.path.isfile(record):
    with open(record) as f:
      if json.load(f).get("version") == version:
        print(f"BIG-bench {version} tasks already in {final}")
        return final
  downloads = os.path.join(out_dir, "downloads")
  os.makedirs(downloads, exist_ok=True)
  sdist = _find_sdist(downloads, version)
  if sdist is None:
    cmd = list(pip_command or _pip_download_command(downloads))
    cmd += ["--no-deps", "--no-binary=:all:", f"bigbench=={version}", "-d", downloads]
    print("running:", " ".join(cmd))
    res = subprocess.run(cmd)
    sdist = _find_sdist(downloads, version)
    if sdist is None:
      raise UserError(
          f"`{' '.join(cmd)}` (exit status {res.returncode}) left no bigbench-{version}.tar.gz in "
          f"{downloads}: the package index does not serve bigbench=={version}. Two routes: "
          f"(1) the package index: put bigbench-{version}.tar.gz (from an index that has it, "
          f"`pip download --no-deps --no-binary=:all: bigbench=={version}`) into {downloads} and "
          f"run this again; (2) the BIG-bench repository: `git clone "
          f"https://github.com/google/BIG-bench` or download its archive "
          f"(https://github.com/google/BIG-bench/archive/refs/heads/main.zip), then "
          f"`python -m tools.fetch_bigbench --from=PATH`")
  n = extract_tasks(sdist, out_dir, version=version, progress=progress)
  print(f"extracted {n} task.json files of bigbench {version} into {final}")
  return final


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(cli.Settings):
  out: str | None = cli.option(None, "Cache folder (default: $XDG_CACHE_HOME/opt_jax/bigbench); "
                               "the tasks land in OUT/benchmark_tasks.")
  version: str = cli.option("1.0.0", "bigbench version on the package index.")


def fetch_from(source: str, out_dir: str | None = None, *, progress: bool = True) -> str:
  """Make OUT_DIR/benchmark_tasks hold the task.json files of a BIG-bench checkout or archive
  (`_archive_entries`); returns its path. Always extracts again (the source may have changed)."""
  out_dir = os.path.abspath(os.path.expanduser(out_dir or default_cache_dir()))
  source = os.path.abspath(os.path.expanduser(source))
  n = extract_tasks(source, out_dir, version=None, progress=progress)
  final = os.path.join(out_dir, TASKS_DIR)
  print(f"extracted {n} task.json files from {source} into {final}")
  return final


def run(s: Settings, source: str | None = None) -> cli.Summary:
  """The binary: fetch through the index, or extract from `source` (--from)."""
  final = fetch_from(source, s.out) if source else fetch(s.out, s.version)
  count = sum(TASK_FILE in names for _, _, names in os.walk(final))
  what = source if source else f"bigbench {s.version}"
  return cli.Summary("fetch_bigbench", evaluated=[f"{what}: {count} task.json files"],
                     out_dir=final, files=[RECORD, "<task>/task.json"])


if __name__ == "__main__":
  from absl import flags  # pylint: disable=import-outside-toplevel

  # "from" cannot be a settings field (a Python keyword): the binary reads it and passes it on.
  flags.DEFINE_string("from", None, "A BIG-bench checkout, its benchmark_tasks folder, or a "
                      "downloaded archive of the repository (.zip / .tar.gz) to take the tasks "
                      "from instead of the package index.")
  cli.main(Settings, lambda s: run(s, flags.FLAGS["from"].value))
