"""The skeleton every experiment shares: settings, the suite and its models, mesh, dtype, sweep.

An experiment module is its settings dataclass (a subclass of `ExperimentSettings`: the binary's
flags and the run manifest come from it), an evaluate function (one checkpoint -> arrays) and
`run(settings)`:

  ctx = Experiment("validation_ppl", settings)          # suite, configs, mesh, dtype, tokenizers
  key = ctx.key(digest_of_the_data)                     # (name, tag): the result store's prefix
  ctx.sweep(evaluate, key, max_length=...)              # every checkpoint not yet in the store
  table = ...ctx.store.read((*key, model, step))...     # per-checkpoint results -> a table
  ctx.write_csv("table.csv", table); plots; summary.md  # on the main process only
  return ctx.outcome(table, results=[headline], files=[...])

Everything that can be wrong with the inputs is checked in the constructor and in `window`,
before any checkpoint is restored: the suite and model names, the output folder, the mesh spec
(and that it divides every model), the dtype, the tokenizer files, and windows against the
models' positions. Checkpoints that cannot be read (a missing folder, a .bin-only or truncated HF
snapshot: opt_jax.suite.readable) and those --exclude or the manifest's "exclude" names are left
out of the run, one line each, before anything else; only the --models asked for are looked at.
Before a suite's first sweep, the fast integrity check (opt_jax.integrity: repeated weights,
config drift, unreadable files, steps out of order) leaves out every checkpoint it finds a
problem with and lists them (--strict_integrity: stops the run instead; --skip_integrity_check:
no check). Known duplicates (the manifest's "known_duplicates") are evaluated and marked in the
CSVs (column duplicate_of) and the closing summary. `key` names the stored results by every
setting that changes a number (`cli.option(key=True)`, the default), the compute dtype, the
tokenizers' fingerprints and a digest of the data, so a run with another dtype, window or corpus
never reuses a stale result.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from opt_jax import cli, files, inputs
from opt_jax.errors import InputError

STORE_DIR = "store"
# A run manifest's status between the end of its sweep and the last output written (outcome):
# a run that stops there (an error writing tables or plots, a full disk) never says finished.
WRITING_OUTPUTS = "writing_outputs"
INTEGRITY_DIR = "integrity"   # under --out: the integrity check's hash cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentSettings(cli.Settings):
  """Settings every experiment has; each experiment's Settings adds its own fields."""
  suite: str = cli.option(help="Suite manifest (.json/.yaml): models, steps, checkpoint paths.",
                          key=False)
  out: str = cli.option(help="Output folder (results store, tables, plots, run manifests).",
                        key=False)
  models: tuple[str, ...] | None = cli.option(
      None, "Only these models of the suite (names or aliases; default: all).", key=False)
  mesh: str = cli.option("", "Device mesh spec, e.g. data:-1 or data:2,model:4 (-1: the devices "
                         "left over); empty: one device.", key=False)
  batch_size: int = cli.option(8, "Rows (windows or requests) per forward pass.", ge=1, key=False)
  dtype: str = cli.option("float32", "Parameter and compute dtype (log-probs are fp32).",
                          choices=inputs.DTYPES)
  prefetch: bool = cli.option(True, "Restore the next checkpoint while evaluating the current one.",
                              key=False)
  stop_on_failure: bool = cli.option(
      False, "Stop at the first checkpoint that fails to restore or evaluate (default: report it "
             "in one line, leave it out and go on).", key=False)
  skip_integrity_check: bool = cli.option(
      False, "Do not run the fast integrity check of the suite (python -m tools.check_suite: "
             "repeated weights, config drift, unreadable files, steps out of order); checkpoints "
             "that cannot be read are still left out.", key=False)
  strict_integrity: bool = cli.option(
      False, "Stop the run when a checkpoint cannot be read or the integrity check finds a "
             "problem (default: leave those checkpoints out, list them and evaluate the rest).",
      key=False)
  exclude: tuple[str, ...] = cli.option(
      (), "Checkpoints to leave out, as MODEL@STEP (e.g. pythia-160m@512), besides those the "
          "manifest's \"exclude\" names.", key=False)
  conventions: str = cli.option(
      "native", "Text conventions: native (each family's own prefix: OPT </s>, Llama <s>, none for "
                "Pythia and OLMo) or lm_eval (lm-evaluation-harness HFLM's defaults, to compare "
                "with published lm-eval numbers).", choices=("native", "lm_eval"))


@dataclasses.dataclass
class Outcome:
  """What run() returns: the main results table (None on processes other than the main one),
  the analysis object when there is one, and the closing summary the binary prints."""
  table: Any
  summary: cli.Summary
  analysis: Any = None


class Experiment:
  """One run of an experiment (module docstring). Attributes: name, settings, suite, configs
  {model: config}, tokenizers {model: Tokenizer}, max_positions (smallest of the sizes), mesh,
  dtype (jnp dtype), store (ResultStore under out/store), out_dir, is_main."""

  def __init__(self, name: str, settings: ExperimentSettings, *, progress: bool = True,
               run_info: dict[str, Any] | None = None, suite_path: str | None = None):
    from opt_jax import sharding  # pylint: disable=import-outside-toplevel
    from opt_jax.results import ResultStore  # pylint: disable=import-outside-toplevel

    self.name, self.settings, self.progress = name, settings, progress
    self.run_info = dict(run_info or {})
    self.dtype = inputs.parse_dtype(settings.dtype)
    self.mesh = _make_mesh(settings.mesh)
    self.is_main = sharding.is_main_process()
    self.reports: list[tuple[str, Any]] = []
    self.skipped: list[str] = []
    self.left_out: list[str] = []         # checkpoints left out by the pre-checks, one line each
    self._scorers: Any = None
    self._failed: dict[tuple, str] = {}   # shared with with_suite() copies, like reports
    self._checked: set[str] = set()       # suites (their paths) checked for integrity; shared
    self._manifests: list[str] = []       # run manifests of this run's sweeps; shared
    self._load(suite_path or settings.suite, settings.models)
    # Checked, not created: the first file written creates it, so a run that fails its checks
    # leaves nothing behind.
    self.out_dir = files.check_output(settings.out, folder=True, what="--out")
    _check_out_is_ours(self.out_dir, name)
    self.store = ResultStore(os.path.join(self.out_dir, STORE_DIR))

  def _load(self, suite_path: str, models: Sequence[str] | None, *, own: bool = True) -> None:
    """Loads the suite of the run (own) or another (with_suite: --exclude names of models it does
    not have are not its)."""
    from opt_jax import sharding, sweep  # pylint: disable=import-outside-toplevel
    from opt_jax.checkpoints import checkpoint  # pylint: disable=import-outside-toplevel

    self.suite, left_out = _load_suite(suite_path, models, self.settings.exclude,
                                       strict=self.settings.strict_integrity, own=own)
    for line in left_out:
      self._leave_out(line)
    self.configs = {m.name: checkpoint.load_config(next(iter(m.checkpoints.values())))
                    for m in self.suite.models}
    self.max_positions = min(c.max_position_embeddings for c in self.configs.values())
    if self.mesh is not None:
      for config in dict.fromkeys(self.configs.values()):
        try:
          sharding.check_divisible(config, self.mesh, batch_size=self.settings.batch_size)
        except ValueError as e:
          raise InputError(f"--mesh={self.settings.mesh}: {e}") from None
    self.tokenizers = {m.name: sweep.load_model_tokenizer(m, self.settings.conventions)
                       for m in self.suite.models}
    self.fingerprints = {name: t.fingerprint() for name, t in self.tokenizers.items()}

  def _leave_out(self, line: str) -> None:
    if line not in self.left_out:
      self.left_out.append(line)
      self.say(line)

  def with_suite(self, suite_path: str) -> "Experiment":
    """The same run (mesh, dtype, store, summary) over another suite's models."""
    other = copy.copy(self)
    other._load(suite_path, None, own=False)  # pylint: disable=protected-access
    return other

  # Checks and names ---------------------------------------------------------------------------

  def window(self, context_length: int | None, stride: int | None) -> tuple[int | None, int | None]:
    """(context_length, stride) checked against the smallest model's positions; None stays None
    (each model's max_position_embeddings; a stride of one window)."""
    if context_length is not None and not 2 <= context_length <= self.max_positions:
      raise InputError(f"--context_length={context_length}: expected 2 to {self.max_positions} "
                       f"(max_position_embeddings of the smallest-context model of "
                       f"{sorted(self.configs)})")
    if stride is not None and stride > (context_length or self.max_positions):
      raise InputError(f"--stride={stride}: expected at most the context length "
                       f"({context_length or self.max_positions})")
    return context_length, stride

  def one_tokenizer(self, why: str):
    """The tokenizer all models share; InputError naming the models when they differ."""
    if len(set(self.fingerprints.values())) > 1:
      groups: dict[str, list[str]] = {}
      for name, fp in self.fingerprints.items():
        groups.setdefault(fp[:12], []).append(name)
      raise InputError(f"the models use different tokenizers {groups} (fingerprints): {why}")
    return self.tokenizers[self.suite.models[0].name]

  def key(self, *data: Any) -> tuple[str, str]:
    """(experiment name, tag): the tag is 12 hex digits over every result-changing setting, the
    compute dtype, the tokenizer fingerprints and `data` (JSON-able digests of the inputs)."""
    blob = json.dumps({"experiment": self.name, "settings": cli.key(self.settings),
                       "dtype": self.dtype.name,
                       "tokenizers": sorted(set(self.fingerprints.values())), "data": list(data)},
                      sort_keys=True, default=str)
    return self.name, hashlib.sha256(blob.encode()).hexdigest()[:12]

  # The sweep ---------------------------------------------------------------------------------

  def sweep(self, evaluate: Callable, key: Sequence[str], *, label: str | None = None,
            **scorer_options: Any):
    """run_sweep over the suite into the store under `key`; evaluate(model, step, config, params)
    gets its Scorer from `scorer(model, config, params)` (one per size, built with the settings'
    batch size, dtype and mesh plus scorer_options). Returns the SweepReport."""
    from opt_jax import sweep  # pylint: disable=import-outside-toplevel

    s = self.settings
    self.check_integrity()
    self._scorers = sweep.ScorerCache(batch_size=s.batch_size, dtype=self.dtype, mesh=self.mesh,
                                      conventions=s.conventions,
                                      **scorer_options)
    info = {"settings": cli.as_dict(s), "key": list(key), **self.run_info}
    try:
      report = sweep.run_sweep(
          self.suite, evaluate, self.store, experiment=tuple(key), prefetch=s.prefetch,
          mesh=self.mesh, progress=self.progress and self.is_main,
          dtype=None if self.dtype.name == "float32" else self.dtype, run_info=info,
          out_dir=self.out_dir, stop_on_failure=s.stop_on_failure)
    finally:
      self._scorers.clear()
    self.reports.append((label or self.suite.name, report))
    self._failed.update(report.failed)
    if report.run_manifest:   # finished only once the outputs are written too (outcome)
      _set_status(report.run_manifest, WRITING_OUTPUTS)
      self._manifests.append(report.run_manifest)
    return report

  def check_integrity(self) -> None:
    """The fast integrity check of the suite (opt_jax.integrity.check_suite), once per suite,
    before its first sweep: every checkpoint it finds a problem with is left out of the suite
    (one line each, in the closing summary); InputError listing every problem instead with
    --strict_integrity, or when nothing is left. Nothing with --skip_integrity_check. Its hash
    cache is kept in out/integrity/ (main process), so a re-run reads no weights of unchanged
    files."""
    which = "\0".join(path for _, _, path in self.suite.checkpoints())
    if self.settings.skip_integrity_check or which in self._checked:
      return
    from opt_jax import integrity  # pylint: disable=import-outside-toplevel
    cache = self.path(INTEGRITY_DIR) if self.is_main else None
    report = integrity.check_suite(self.suite, cache_dir=cache)
    self._checked.add(which)
    if report.ok:
      return
    problems = report.problems
    # A duplicate group is left out whole (which step holds its own weights is unknowable); its
    # problem is named once, on the later steps, the first step's row says which steps repeat it.
    bad = {(r.model, r.step): "; ".join(r.problems or [r.note or r.status])
           for r in report.rows if r.problems or r.status == "duplicate"}
    kept = [(m, s) for m, s, _ in self.suite.checkpoints() if (m.name, s) not in bad]
    if self.settings.strict_integrity or not kept:
      shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more"
                                             if len(problems) > 20 else "")
      why = ("--strict_integrity" if kept else "no checkpoint passes it")
      raise InputError(
          f"suite {self.suite.name}: the integrity check found {len(problems)} problem(s) "
          f"({why}); nothing was evaluated:\n  " + shown + "\nSee python -m tools.check_suite "
          "--suite=... [--deep] for the full report; fix the suite, name known duplicates in the "
          "manifest's \"known_duplicates\", leave checkpoints out with --exclude, or pass "
          "--skip_integrity_check")
    for (model, step), why in bad.items():
      self._leave_out(f"{model} step {step} left out by the integrity check: {why}")
    self.suite = self.suite.exclude([f"{m}@{s}" for m, s in bad],
                                    "left out by the integrity check").without_empty_models()

  def scorer(self, model, config, params):
    """The Scorer of this size holding `params` (inside evaluate)."""
    return self._scorers.get(config, params, self.tokenizers[model.name])

  def checkpoints(self, key: Sequence[str]):
    """(model, step) of every checkpoint with a result under `key`, in sweep order: those that
    failed (listed in the closing summary) are left out of the tables."""
    return [(m, step) for m, step, _ in self.suite.checkpoints()
            if (*key, m.name, step) not in self._failed]

  def read(self, key: Sequence[str], model, step: int):
    """(arrays, meta) stored for one checkpoint."""
    return self.store.read((*key, model.name, step))

  # Outputs ----------------------------------------------------------------------------------

  def path(self, *parts: str) -> str:
    return os.path.join(self.out_dir, *parts)

  def known_duplicates(self) -> dict[tuple[str, int], int]:
    """{(model, step): the step whose weights it repeats} of the suite's known duplicates
    (the manifest's "known_duplicates") that are evaluated."""
    return {(m.name, s): m.duplicate_of(s) for m, s, _ in self.suite.checkpoints()
            if m.duplicate_of(s) is not None and m.duplicate_of(s) in m.checkpoints}

  def mark_duplicates(self, frame):
    """`frame` with a duplicate_of column (the step a known duplicate repeats, else empty) when
    it has model and step columns and the suite has known duplicates; else `frame` itself."""
    dups = self.known_duplicates()
    columns = getattr(frame, "columns", ())
    if not dups or "model" not in columns or "step" not in columns or "duplicate_of" in columns:
      return frame
    frame = frame.copy()
    frame["duplicate_of"] = [dups.get((m, int(s)), "") if s == s else ""
                             for m, s in zip(frame["model"], frame["step"])]
    return frame

  def write_csv(self, name: str, frame, float_format: str | None = None) -> str:
    """out/<name> on the main process (atomic), known duplicates marked (`mark_duplicates`);
    returns the path."""
    path = self.path(name)
    if self.is_main:
      files.write_csv(self.mark_duplicates(frame), path, float_format=float_format)
    return path

  def write_text(self, name: str, text: str) -> str:
    path = self.path(name)
    if self.is_main:
      files.write_text(path, text)
    return path

  def say(self, message: str) -> None:
    cli.say(message, self.progress and self.is_main)

  def describe_suite(self) -> str:
    """'suite S: tiny-a, tiny-b x 4 checkpoints (8)'."""
    steps = {len(m.steps) for m in self.suite.models}
    n = len(self.suite)
    if len(self.suite.models) == 1:
      per = cli.plural(n, "checkpoint")
    else:
      per = (f"{cli.plural(steps.pop(), 'checkpoint')} each" if len(steps) == 1 else
             " and ".join(str(len(m.steps)) for m in self.suite.models) + " checkpoints")
      per += f", {n} in all"
    return f"suite {self.suite.name}: {', '.join(m.name for m in self.suite.models)} ({per})"

  def outcome(self, table: Any, *, results: Sequence[str] = (), files_: Sequence[str] = (),
              evaluated: Sequence[str] = (), analysis: Any = None) -> Outcome:
    """The Outcome with its closing summary: what the sweeps did, `evaluated` (what was scored:
    tokens, tasks), `results` (headline), what was skipped (self.skipped) and the files."""
    lines, failed = list(evaluated), list(self.left_out)
    for label, report in self.reports:
      done, reused, bad = len(report.evaluated), len(report.skipped), len(report.failed)
      stale = f", {len(report.recomputed)} of them recomputed (stale)" if report.recomputed else ""
      lines.append(f"{label}: {done + reused + bad} checkpoints ({done} evaluated now{stale}, "
                   f"{reused} already in {self.store.root}"
                   + (f", {bad} failed" if bad else "") + ")")
      failed += [f"{label} {k[-2]} step {k[-1]} failed and is left out: {why}"
                 for k, why in report.failed.items()]
    dups = self.known_duplicates()
    if dups:
      lines.append("known duplicates evaluated (column duplicate_of in the CSVs): "
                   + ", ".join(f"{m} step {s} = step {d}" for (m, s), d in dups.items()))
    summary = cli.Summary(self.name, evaluated=lines, results=list(results),
                          skipped=failed + list(self.skipped), out_dir=self.out_dir,
                          files=list(files_))
    for path in self._manifests:   # every output is written: the sweep's status stands
      _set_status(path, None)
    return Outcome(table, summary, analysis)


def main(settings_cls: type, run: Callable[[Any], Outcome]) -> None:
  """The binary of an experiment: flags from settings_cls, multi-host start-up (every process
  runs the same command), run(settings), its closing summary (opt_jax.cli.main). A run that
  fails after its sweeps (analysis, tables, plots, summary.md) is marked so in its run manifests
  (status "failed", the sweep's in "sweep_status"; between the sweep and the last output they say
  "writing_outputs", never finished for outputs that were not all written), and an error that is
  not a user error stops the binary with one line (rc 2), not a traceback (the manifest keeps it).

  Multi-process: every process ends the same way: all print process 0's closing summary and
  exit with its code, or all print the same one-line error within seconds of the first process
  failing (opt_jax.sharding.fail_together)."""
  def start(_):
    from opt_jax import sharding  # pylint: disable=import-outside-toplevel
    sharding.initialize_distributed()   # before anything touches a device; no-op on one host

  def body(settings):
    from opt_jax import sharding  # pylint: disable=import-outside-toplevel
    began = time.perf_counter()
    return sharding.fail_together(lambda: _closing(run_and_mark(run, settings).summary, began),
                                  cli.user_error_message)
  cli.main(settings_cls, body, before=start)


class AnalysisError(InputError):
  """An error after the sweeps, reported in one line (the run manifest holds the traceback)."""


def run_and_mark(run: Callable[[Any], Outcome], settings: ExperimentSettings) -> Outcome:
  """run(settings); when it raises, the run manifests this run wrote and marked finished (or
  writing_outputs) are marked failed first (`mark_runs_failed`); an error that is not a user error
  is then raised again as one line (AnalysisError) naming the manifest that keeps its traceback."""
  before = set(_manifests(settings.out))
  try:
    return run(settings)
  except BaseException as e:
    marked = mark_runs_failed(settings.out, e, skip=before)
    if (not marked or not isinstance(e, Exception)
        or cli.user_error_message(e) is not None):
      raise
    raise AnalysisError(f"{type(e).__name__}: {_one_line(e)} (after the sweep; the results are "
                        f"kept under {settings.out}/{STORE_DIR}, the run manifest "
                        f"{marked[0]} says \"failed\" and holds the traceback)") from None


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text[:500] + (" ..." if len(text) > 500 else "")


def _set_status(path: str, status: str | None) -> None:
  """Sets a run manifest's status, keeping the sweep's in "sweep_status"; None: back to it."""
  with open(path) as f:
    data = json.load(f)
  data.setdefault("sweep_status", data.get("status"))
  data["status"] = status or data["sweep_status"]
  files.write_json(path, data)


def _manifests(out: str | None) -> list[str]:
  if not out:
    return []
  runs = os.path.join(os.path.abspath(out), "runs")
  try:
    names = sorted(os.listdir(runs)) if os.path.isdir(runs) else []
  except OSError:
    return []
  return [os.path.join(runs, n) for n in names if n.endswith(".json") and not n.startswith(".")]


def mark_runs_failed(out: str | None, error: BaseException, skip=frozenset()) -> list[str]:
  """Sets "status" to "failed" ("interrupted" for Ctrl-C), "error" (one line) and "traceback" in
  the run manifests under out/runs/ (but those in `skip`) that this process wrote and marked
  finished or writing_outputs: the sweep ended, what came after it did not. Returns the manifests
  changed; never raises (the error being reported matters more; on a full disk a manifest keeps
  "writing_outputs", which says the same). None on processes other than the main one, which
  write no manifest."""
  import traceback  # pylint: disable=import-outside-toplevel
  changed = []
  status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
  message = cli.user_error_message(error)
  message = (" ".join(message.split()) if message is not None
             else f"{type(error).__name__}: {_one_line(error)}")
  for path in _manifests(out):
    if path in skip:
      continue
    try:
      with open(path) as f:
        data = json.load(f)
      if (not isinstance(data, dict) or data.get("writer") != files.process_tag()
          or not (data.get("status") == WRITING_OUTPUTS
                  or str(data.get("status", "")).startswith("finished"))):
        continue
      data.setdefault("sweep_status", data.get("status"))
      data.update(status=status, error=message,
                  traceback="".join(traceback.format_exception(error)).splitlines())
      files.write_json(path, data)
      changed.append(path)
    except Exception:  # pylint: disable=broad-except
      continue
  return changed


def _closing(summary: cli.Summary, began: float) -> cli.Summary:
  """Multi-process: process 0's closing summary, printed by the other processes too (opt_jax.cli
  prints it on process 0), and its exit code on every process."""
  from opt_jax import sharding  # pylint: disable=import-outside-toplevel
  if not sharding.multi_process():
    return summary
  mine = (json.dumps([summary.render(time.perf_counter() - began), summary.exit_code])
          if sharding.is_main_process() else None)
  text, code = json.loads(sharding.from_main("closing summary", mine))
  if not sharding.is_main_process():
    print(text, flush=True)
    summary = dataclasses.replace(summary, exit_code=code)
  return summary


def _check_out_is_ours(out: str, name: str) -> None:
  """One experiment per output folder, and never a checkpoint folder: InputError before any work
  when --out is (or lies inside) a checkpoint, or holds another experiment's results or run
  manifests (its summary.md and tables would be overwritten)."""
  from opt_jax.checkpoints import layout  # pylint: disable=import-outside-toplevel
  inside = layout.enclosing_checkpoint(out)
  if inside:
    raise InputError(f"--out={out} is or lies inside the checkpoint folder {inside}: outputs "
                     "never go into a checkpoint (later runs would find it changed); give "
                     "another folder")
  others = set()
  store = os.path.join(out, STORE_DIR)
  if os.path.isdir(store):
    others |= {e for e in os.listdir(store) if os.path.isdir(os.path.join(store, e))
               and not e.startswith(".")}
  runs = os.path.join(out, "runs")
  for entry in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
    if entry.endswith(".json") and not entry.startswith("."):
      try:
        with open(os.path.join(runs, entry)) as f:
          others.add(str(json.load(f)["experiment"][0]))
      except (OSError, ValueError, KeyError, IndexError, TypeError):
        continue
  others = {o for o in others if o != name and not o.startswith(name + "_")}  # its own tables
  if others:
    raise InputError(f"--out={out} holds the outputs of {', '.join(sorted(others))} (its "
                     f"{STORE_DIR}/ and runs/): one experiment per output folder, or their "
                     f"summary.md and tables overwrite each other; give {name} another --out")


def _make_mesh(spec: str):
  if not spec:
    return None
  from opt_jax import sharding  # pylint: disable=import-outside-toplevel
  try:
    return sharding.make_mesh(spec)
  except ValueError as e:
    raise InputError(f"--mesh={spec}: {e}") from None


def _load_suite(path: str, models: Sequence[str] | None, exclude: Sequence[str] = (), *,
                strict: bool = False, own: bool = True):
  """(suite, lines): the manifest's --models without the checkpoints --exclude or the manifest
  excludes and, unless strict, without those that cannot be read (a line each); only the
  selected models' checkpoints are looked at."""
  from opt_jax import suite as suite_lib  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise InputError(f"--suite={path}: no such file; expected a suite manifest (.json/.yaml)")
  try:
    suite = suite_lib.load_suite(path, check_paths=False)
    suite = suite.select(list(models) if models else None)
  except KeyError as e:   # an unknown --models name; the message lists the suite's models
    raise InputError(f"--models: {e.args[0]}") from None
  except ValueError as e:  # suite.SuiteError lists every problem of the manifest
    if isinstance(e, InputError):
      raise
    raise InputError(str(e)) from None
  if not own:
    def has(name):
      try:
        suite.model(name.rpartition("@")[0])
        return True
      except KeyError:
        return False
    exclude = [n for n in exclude if has(n)]
  try:
    suite = suite.exclude(list(exclude))
  except KeyError as e:
    raise InputError(f"--exclude: {e.args[0]}") from None
  lines = suite.excluded_lines()
  suite = suite.without_empty_models()
  if not suite.models:
    raise InputError(f"--suite={path}: every checkpoint is excluded:\n  " + "\n  ".join(lines))
  if strict:
    problems = suite_lib.check_checkpoints(suite)
    if problems:
      raise suite_lib.SuiteError(suite.source or path, problems)
    return suite, lines
  suite, left_out = suite_lib.readable(suite)
  return suite, lines + left_out
