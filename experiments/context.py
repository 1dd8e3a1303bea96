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
models' positions. Before a suite's first sweep, the fast integrity check (opt_jax.integrity:
repeated weights, config drift, unreadable files, steps out of order) stops the run with its
problems unless --skip_integrity_check. `key` names the stored results by every setting that
changes a number (`cli.option(key=True)`, the default), the compute dtype, the tokenizers'
fingerprints and a digest of the data, so a run with another dtype, window or corpus never
reuses a stale result.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
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
      False, "Evaluate even when the fast integrity check of the suite (python -m "
             "tools.check_suite) finds problems: repeated weights, config drift, unreadable files, "
             "steps out of order.", key=False)
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

  def _load(self, suite_path: str, models: Sequence[str] | None) -> None:
    from opt_jax import checkpoint, sharding, sweep  # pylint: disable=import-outside-toplevel

    self.suite = _load_suite(suite_path, models)
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

  def with_suite(self, suite_path: str) -> "Experiment":
    """The same run (mesh, dtype, store, summary) over another suite's models."""
    other = copy.copy(self)
    other._load(suite_path, None)  # pylint: disable=protected-access
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
    before its first sweep: InputError listing every problem unless --skip_integrity_check.
    Its hash cache is kept in out/integrity/ (main process), so a re-run reads no weights of
    unchanged files."""
    which = "\0".join(path for _, _, path in self.suite.checkpoints())
    if self.settings.skip_integrity_check or which in self._checked:
      return
    from opt_jax import integrity  # pylint: disable=import-outside-toplevel
    cache = self.path(INTEGRITY_DIR) if self.is_main else None
    report = integrity.check_suite(self.suite, cache_dir=cache)
    self._checked.add(which)
    if not report.ok:
      problems = report.problems
      shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more"
                                             if len(problems) > 20 else "")
      raise InputError(
          f"suite {self.suite.name}: the integrity check found {len(problems)} problem(s); "
          "nothing was evaluated:\n  " + shown + "\nSee python -m tools.check_suite "
          "--suite=... [--deep] for the full report, fix the suite, or pass "
          "--skip_integrity_check to evaluate anyway")

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

  def write_csv(self, name: str, frame, float_format: str | None = None) -> str:
    """out/<name> on the main process (atomic); returns the path."""
    path = self.path(name)
    if self.is_main:
      files.write_csv(frame, path, float_format=float_format)
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
    per = f"{steps.pop()} checkpoints each" if len(steps) == 1 else "checkpoints"
    return (f"suite {self.suite.name}: {', '.join(m.name for m in self.suite.models)} ({per}, "
            f"{len(self.suite)} in all)")

  def outcome(self, table: Any, *, results: Sequence[str] = (), files_: Sequence[str] = (),
              evaluated: Sequence[str] = (), analysis: Any = None) -> Outcome:
    """The Outcome with its closing summary: what the sweeps did, `evaluated` (what was scored:
    tokens, tasks), `results` (headline), what was skipped (self.skipped) and the files."""
    lines, failed = list(evaluated), []
    for label, report in self.reports:
      done, reused, bad = len(report.evaluated), len(report.skipped), len(report.failed)
      stale = f", {len(report.recomputed)} of them recomputed (stale)" if report.recomputed else ""
      lines.append(f"{label}: {done + reused + bad} checkpoints ({done} evaluated now{stale}, "
                   f"{reused} already in {self.store.root}"
                   + (f", {bad} failed" if bad else "") + ")")
      failed += [f"{label} {k[-2]} step {k[-1]} failed and is left out: {why}"
                 for k, why in report.failed.items()]
    summary = cli.Summary(self.name, evaluated=lines, results=list(results),
                          skipped=failed + list(self.skipped), out_dir=self.out_dir,
                          files=list(files_))
    for path in self._manifests:   # every output is written: the sweep's status stands
      _set_status(path, None)
    return Outcome(table, summary, analysis)


def main(settings_cls: type, run: Callable[[Any], Outcome]) -> None:
  """The binary of an experiment: flags from settings_cls, multi-host start-up (every process
  runs the same command), run(settings), its closing summary (opt_jax.cli.main). A run that
  fails after its sweeps (writing tables, plots, summary.md) is marked so in its run manifests
  (status "failed", the sweep's in "sweep_status"): they never say finished for outputs that
  were not all written (between the sweep and the last output, "writing_outputs")."""
  def start(_):
    from opt_jax import sharding  # pylint: disable=import-outside-toplevel
    sharding.initialize_distributed()   # before anything touches a device; no-op on one host

  cli.main(settings_cls, lambda settings: run_and_mark(run, settings).summary, before=start)


def run_and_mark(run: Callable[[Any], Outcome], settings: ExperimentSettings) -> Outcome:
  """run(settings); when it raises, the run manifests this run wrote and marked finished are
  marked failed first (`mark_unfinished_runs`)."""
  before = set(_manifests(settings.out))
  try:
    return run(settings)
  except BaseException as e:
    mark_unfinished_runs(settings.out, e, skip=before)
    raise


def _set_status(path: str, status: str | None) -> None:
  """Sets a run manifest's status, keeping the sweep's in "sweep_status"; None: back to it."""
  with open(path) as f:
    data = json.load(f)
  data.setdefault("sweep_status", data.get("status"))
  data["status"] = status or data["sweep_status"]
  files.write_json(path, data)


def _manifests(out: str) -> list[str]:
  runs = os.path.join(os.path.abspath(out), "runs")
  try:
    names = sorted(os.listdir(runs)) if os.path.isdir(runs) else []
  except OSError:
    return []
  return [os.path.join(runs, n) for n in names if n.endswith(".json") and not n.startswith(".")]


def mark_unfinished_runs(out: str, error: BaseException, skip=frozenset()) -> list[str]:
  """Sets "status" to "failed" ("interrupted" for Ctrl-C) in the run manifests under out/runs/
  (but those in `skip`) that this process wrote and marked finished or writing_outputs: the
  sweep ended, then writing the outputs did not. Returns the manifests changed; never raises
  (the error being reported matters more; on a full disk the manifest keeps "writing_outputs",
  which says the same)."""
  changed = []
  status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
  message = (cli.user_error_message(error) or f"{type(error).__name__}: {error}").splitlines()
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
      data.update(status=status, error=message[0] if message else "")
      files.write_json(path, data)
      changed.append(path)
    except Exception:  # pylint: disable=broad-except
      continue
  return changed


def _check_out_is_ours(out: str, name: str) -> None:
  """One experiment per output folder, and never a checkpoint folder: InputError before any work
  when --out is (or lies inside) a checkpoint, or holds another experiment's results or run
  manifests (its summary.md and tables would be overwritten)."""
  from opt_jax import checkpoint  # pylint: disable=import-outside-toplevel
  inside = checkpoint.enclosing_checkpoint(out)
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


def _load_suite(path: str, models: Sequence[str] | None):
  from opt_jax import suite as suite_lib  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise InputError(f"--suite={path}: no such file; expected a suite manifest (.json/.yaml)")
  try:
    return suite_lib.load_suite(path).select(list(models) if models else None)
  except KeyError as e:   # an unknown --models name; the message lists the suite's models
    raise InputError(f"--models: {e.args[0]}") from None
  except ValueError as e:  # suite.SuiteError lists every problem of the manifest
    if isinstance(e, InputError):
      raise
    raise InputError(str(e)) from None
