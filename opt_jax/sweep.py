"""Run an evaluation over every checkpoint of a suite: prefetch, resume, progress, run manifest.

  store = ResultStore(out_dir)
  report = run_sweep(suite, evaluate, store, experiment="validation_ppl")

For every (model, step) whose key (experiment..., model.name, step) has no valid result in the
store: restore the checkpoint (onto `mesh` when given), call `evaluate(model, step, config,
params)`, which returns (arrays: dict[str, array], meta: dict), and write that result atomically
with the checkpoint's identity (path, content fingerprint, restore dtype). The next checkpoint is
restored in a background thread while the current one is evaluated, so when restoring costs about
as much as evaluating the sweep costs the evaluations alone (at most two checkpoints' parameters
are alive at once; prefetch=False keeps one). A re-run skips finished keys; a crash or kill -9
loses at most the checkpoint in flight, and the killed run's manifest is marked interrupted.

A stored result is valid only for the checkpoint identity it records: after a checkpoint is
re-converted or replaced, its manifest path edited, or the restore dtype changed, the result is
stale: said in one line, recomputed, replaced atomically. A damaged result file is named, moved
aside (`<file>.corrupt-<time>`) and recomputed. A checkpoint that fails to restore or evaluate is
reported in one line naming it, recorded in `SweepReport.failed` and the run manifest, and the
sweep goes on (`stop_on_failure=True`: it stops there).

Parameters are arguments of the evaluator's jitted functions, so one compiled program serves every
checkpoint of a size: `ScorerCache` keeps one `opt_jax.scoring.Scorer` per config and moves it to
each new checkpoint with `Scorer.set_params`.

Multi-host: every process runs the same loop (the forward passes are collective); which keys to
skip is decided once, up front, from the shared store (the processes check that they decided the
same); only the main process writes, and every process waits at a barrier at the end of the
sweep, so results are written before any process reads them. Collectives come from the main
thread only: the prefetching restore reads each process's own slices and issues none
(opt_jax.checkpoints' restore). Whether a checkpoint restored is agreed by all processes before it
is evaluated (a file one process cannot read fails it on every process); an evaluation error
stops the run on every process, since the others may be inside a collective of that evaluation
(the binaries end every process with the same one-line error: sharding.fail_together).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import socket
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from opt_jax import files, programs, sharding
from opt_jax.checkpoints import checkpoint
from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError, UserError
from opt_jax.results import CorruptResultError, Key, ResultStore
from opt_jax.suite import Suite, SuiteModel

Evaluate = Callable[[SuiteModel, int, DecoderConfig, Any],
                    tuple[Mapping[str, Any], Mapping[str, Any]]]
Restore = Callable[..., Any]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SweepReport:
  """What a sweep did. Times in seconds; per-key dicts cover the evaluated keys only.

  failed: key -> one line saying why that checkpoint was not evaluated (restore or evaluation
  failed; the file is named); its key has no result in the store afterwards.
  recomputed: keys whose stored result was stale (another checkpoint identity or restore dtype)
  or damaged, evaluated again (they are in `evaluated` or `failed` as well).
  restore_seconds: time each restore took (in the background thread when prefetching);
  wait_seconds: time the main loop waited for a restore to finish (the restore cost not hidden).
  """
  evaluated: list[Key] = dataclasses.field(default_factory=list)
  skipped: list[Key] = dataclasses.field(default_factory=list)
  failed: dict[Key, str] = dataclasses.field(default_factory=dict)
  recomputed: list[Key] = dataclasses.field(default_factory=list)
  eval_seconds: dict[Key, float] = dataclasses.field(default_factory=dict)
  restore_seconds: dict[Key, float] = dataclasses.field(default_factory=dict)
  wait_seconds: dict[Key, float] = dataclasses.field(default_factory=dict)
  wall_seconds: float = 0.0
  run_manifest: str | None = None
  # Time spent making programs during the sweep (opt_jax.programs.compile_share: tracing,
  # lowering, XLA compiles or persistent-cache reads) and its share of wall_seconds.
  compile: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def total_eval_seconds(self) -> float:
    return float(sum(self.eval_seconds.values()))


def _key_prefix(experiment: str | Sequence[str]) -> tuple[str, ...]:
  prefix = (experiment,) if isinstance(experiment, str) else tuple(experiment)
  if not prefix or not all(isinstance(p, str) and p for p in prefix):
    raise ValueError(f"experiment must be a non-empty string or tuple of strings, got {experiment!r}")
  return prefix


def sweep_keys(suite: Suite, experiment: str | Sequence[str]) -> list[tuple[Key, SuiteModel, int]]:
  """(key, model, step) for every checkpoint of the suite, in sweep order."""
  prefix = _key_prefix(experiment)
  return [((*prefix, m.name, step), m, step) for m, step, _ in suite.checkpoints()]


def _utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _package_versions() -> dict[str, str]:
  out = {}
  for name in ("opt_jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


class _RunManifest:
  """runs/<experiment>-<UTC time>-<pid>.json in the output folder: flags, suite, versions, times,
  status ("running", then "finished", "finished_with_failures", "stopped" (stop_on_failure),
  "failed" (an error ended the sweep) or "interrupted": set by a later sweep when the process
  that wrote "running" is gone, e.g. after kill -9) and the failed checkpoints."""

  def __init__(self, out_dir: str, experiment: tuple[str, ...], suite: Suite, mesh: Any,
               run_info: Mapping[str, Any] | None, enabled: bool):
    started = _utc_now()
    stamp = started.replace(":", "").replace("-", "")
    self.path = os.path.join(out_dir, "runs", f"{'-'.join(experiment)}-{stamp}-{os.getpid()}.json")
    self.enabled = enabled
    self.data: dict[str, Any] = {
        "experiment": list(experiment),
        "status": "running",
        "started": started,
        "finished": None,
        "run_info": dict(run_info or {}),
        "argv": list(sys.argv),
        "suite_source": suite.source,
        "suite": suite.to_dict(),
        "versions": _package_versions(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "writer": files.process_tag(),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()],
        "mesh": dict(mesh.shape) if mesh is not None else None,
        "failed": {},
    }

  def update(self, **fields: Any) -> None:
    self.data.update(fields)
    if self.enabled:
      files.write_json(self.path, self.data)


def mark_interrupted_runs(runs_dir: str) -> list[str]:
  """Sets "status": "interrupted" in every run manifest of `runs_dir` still "running" whose
  process is certainly gone (it ran on this host and has ended: files.writer_is_gone); says so.
  Manifests from other hosts are left as they are. Returns the manifests marked."""
  marked = []
  names = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
  for name in names:
    path = os.path.join(runs_dir, name)
    if name.startswith(".") or not name.endswith(".json"):
      continue
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, ValueError):
      continue  # not a manifest this code can read: leave it alone
    if not isinstance(data, dict) or data.get("status") != "running":
      continue
    writer = data.get("writer")
    if not isinstance(writer, str) or not files.writer_is_gone(writer):
      continue
    data.update(status="interrupted", interrupted_noticed=_utc_now())
    files.write_json(path, data)
    marked.append(path)
    log.warning("run manifest %s: its process %s ended without finishing; marked it interrupted",
                path, writer)
  return marked


def _restore_dtype(path: str, dtype: Any) -> str:
  # What the evaluator gets: the cast dtype, or the stored one (cast to float32 on a float32
  # checkpoint is the same numbers as no cast).
  if dtype is not None:
    return np.dtype(dtype).name
  return checkpoint.stored_dtype(path)


def checkpoint_identity(path: str, dtype: Any = None, sha: str | None = None,
                        revision: str | None = None) -> dict[str, str]:
  """What a stored result records of its input: checkpoint.identity (path, content fingerprint,
  or the snapshot sha of an HF-cache checkpoint) plus the dtype its parameters were restored in,
  and the HF revision name when the suite gives one (recorded, not compared)."""
  ident = {**checkpoint.identity(path, sha=sha), "restore_dtype": _restore_dtype(path, dtype)}
  if revision is not None:
    ident["revision"] = revision
  return ident


def _stale_reason(stored: Any, current: Mapping[str, str]) -> str | None:
  """Why a result stored with identity `stored` does not hold for `current`; None if it does."""
  if not isinstance(stored, Mapping):
    return "it records no checkpoint identity (written by an earlier opt_jax)"
  if stored.get("path") != current["path"]:
    return f"computed from {stored.get('path')}, the suite now gives {current['path']}"
  if stored.get("fingerprint") != current["fingerprint"]:
    old, new = stored.get("fingerprint") or "", current["fingerprint"]
    if old.startswith("hf-snapshot:") and new.startswith("hf-snapshot:"):
      return (f"computed from commit {old.split(':', 1)[1]}, the suite now gives "
              f"{new.split(':', 1)[1]} (re-uploaded)")
    return f"checkpoint {current['path']} changed since (re-converted or replaced)"
  if stored.get("files") != current.get("files"):
    return f"the files of {current['path']} changed since (a blob replaced?)"
  if stored.get("restore_dtype") != current["restore_dtype"]:
    return f"restored as {stored.get('restore_dtype')}, now as {current['restore_dtype']}"
  return None


def _one_line(e: BaseException, path: str) -> str:
  text = (str(e).strip().splitlines() or [""])[0][:400] or type(e).__name__
  if not isinstance(e, UserError):
    text = f"{type(e).__name__}: {text}"
  # Messages of opt_jax's errors start with the checkpoint's path: name it once.
  for lead in (f"{path}: ", f"{path} "):
    if text.startswith(lead):
      return text[len(lead):]
  return text


def run_sweep(suite: Suite, evaluate: Evaluate, store: ResultStore, *,
              experiment: str | Sequence[str] = "eval", prefetch: bool = True, mesh: Any = None,
              progress: bool = True, dtype: Any = None, run_info: Mapping[str, Any] | None = None,
              out_dir: str | None = None, restore: Restore | None = None,
              stop_on_failure: bool = False) -> SweepReport:
  """Evaluates every checkpoint of `suite` without a valid result in `store`; see the module
  docstring.

  evaluate(model, step, config, params) -> (arrays, meta): arrays name -> array (stored as npz);
    meta JSON-serialisable; meta["num_tokens"] (tokens scored) feeds the tokens/s of the progress
    bar. The stored meta also gets model, step, params, tokens, flops, path, timings and
    "identity" (`checkpoint_identity`).
  experiment: first component(s) of every key: (*experiment, model.name, step).
  mesh: restore each checkpoint onto it (opt_jax.sharding.param_shardings); every size's config
    is checked against it (sharding.check_divisible) before anything is restored. None: one
    device.
  dtype: cast parameters while restoring (e.g. jnp.bfloat16); None keeps the stored dtype.
  run_info: flags etc. recorded in the run manifest, written to out_dir (default store.root)/runs/.
  restore: replaces opt_jax.checkpoints' restore (signature restore(path, shardings=, dtype=)).
  stop_on_failure: raise the first restore or evaluation error (after recording it) instead of
    recording it in SweepReport.failed and the run manifest and going on.
  """
  prefix = _key_prefix(experiment)
  restore = restore or checkpoint.restore
  start = time.perf_counter()
  compile_before = programs.compile_seconds()
  out_dir = out_dir or store.root
  report = SweepReport()
  name = "/".join(prefix)
  if store.is_writer:
    mark_interrupted_runs(os.path.join(out_dir, "runs"))

  # Which keys to (re)compute is decided here, once, from the shared store (multi-host: every
  # process decides the same; only the writer moves damaged or stale files aside).
  todo: list[tuple[Key, SuiteModel, int, dict[str, str]]] = []
  unreadable = []                            # (key, model, step, error): no identity
  stale: set[Key] = set()                    # stale stored results, kept until replaced
  for key, model, step in sweep_keys(suite, prefix):
    path = model.path(step)
    try:
      ident = checkpoint_identity(path, dtype, sha=model.sha(step), revision=model.revision(step))
    except (OSError, ValueError) as e:
      unreadable.append((key, model, step, e))
      continue
    if store.has(key):
      try:
        reason = _stale_reason(store.read_meta(key).get("identity"), ident)
      except CorruptResultError as e:
        aside = store.move_aside(key)
        log.warning("%s; %s and recomputing", e, f"moved it to {aside}" if aside else "ignoring it")
        report.recomputed.append(key)
      except KeyError:
        pass  # removed meanwhile (by the writer process): compute it
      else:
        if reason is None:
          report.skipped.append(key)
          continue
        log.warning("%s: stale result (%s): recomputing", store.path(key), reason)
        stale.add(key)
        report.recomputed.append(key)
    todo.append((key, model, step, ident))

  configs: dict[str, DecoderConfig] = {}
  shardings: dict[DecoderConfig, Any] = {}

  def config_of(path: str) -> DecoderConfig:
    if path not in configs:
      configs[path] = checkpoint.load_config(path)
    return configs[path]

  # Multi-host: every process must have decided the same (they read one shared store).
  differ = sharding.same_everywhere(
      f"sweep {name} todo", json.dumps([list(map(str, t[0])) for t in todo] +
                                       [list(map(str, u[0])) for u in unreadable]))
  if differ:
    raise InputError(f"sweep {name}: the processes found different results in {store.root} "
                     f"({differ}): --out must be one folder that every process sees (a shared "
                     f"file system)")

  if mesh is not None:
    checked = set()
    for key, model, step, _ in todo:
      path = model.path(step)
      try:
        config = config_of(path)
      except (OSError, ValueError):
        continue  # reported when its restore fails
      if config not in checked:
        checked.add(config)
        try:
          sharding.check_divisible(config, mesh)
        except ValueError as e:
          raise InputError(f"model {model.name} ({os.path.join(path, checkpoint.CONFIG_FILE)}): "
                           f"{e}") from None

  manifest = _RunManifest(out_dir, prefix, suite, mesh, run_info, store.is_writer)
  manifest.update(num_checkpoints=len(report.skipped) + len(todo) + len(unreadable),
                  skipped=len(report.skipped))
  report.run_manifest = manifest.path if store.is_writer else None
  log.info("sweep %s: %d checkpoints to evaluate, %d already done", name,
           len(todo) + len(unreadable), len(report.skipped))

  def load(path: str) -> tuple[Any, float]:
    t0 = time.perf_counter()
    config = config_of(path)
    sh = None
    if mesh is not None:
      if config not in shardings:
        shardings[config] = sharding.param_shardings(config, mesh)
      sh = shardings[config]
    params = restore(path, shardings=sh, dtype=dtype)
    # Wait for the arrays here, in the background thread, not in the evaluator.
    params = jax.block_until_ready(params)
    return params, time.perf_counter() - t0

  bar = tqdm(total=len(todo) + len(unreadable), desc=name, unit="ckpt", dynamic_ncols=True,
             disable=not progress or not store.is_writer)

  def fail(key: Key, model: SuiteModel, step: int, doing: str, e: BaseException) -> None:
    path = model.path(step)
    reason = f"{doing} {path} failed: {_one_line(e, path)}"
    report.failed[key] = reason
    log.error("sweep %s: %s step %s: %s", name, model.name, step, reason)
    log.debug("sweep %s: %s step %s", name, model.name, step, exc_info=e)
    if key in stale:  # must not pass for a result of the checkpoint now at this path
      aside = store.move_aside(key, "stale")
      if aside:
        log.warning("moved the stale result of %s step %s to %s", model.name, step, aside)
    manifest.update(failed={"/".join(map(str, k)): r for k, r in report.failed.items()})
    bar.update(1)
    if stop_on_failure:
      if not isinstance(e, UserError):
        e.add_note(f"while {doing} {model.name} step {step} ({path})")
      raise e

  tokens_done, eval_done = 0.0, 0.0
  executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
  status = "failed"
  try:
    for key, model, step, e in unreadable:
      fail(key, model, step, "reading", e)
    pending = executor.submit(load, todo[0][1].path(todo[0][2])) if (todo and prefetch) else None
    for i, (key, model, step, ident) in enumerate(todo):
      path = model.path(step)
      t_wait = time.perf_counter()
      try:
        if prefetch:
          future = pending
          # Queued behind the current restore: at most two checkpoints' parameters are alive.
          pending = (executor.submit(load, todo[i + 1][1].path(todo[i + 1][2]))
                     if i + 1 < len(todo) else None)
          params, restore_s = future.result()
        else:
          params, restore_s = load(path)
        error = None
      except Exception as e:  # pylint: disable=broad-except
        error = e
      # Multi-host: a checkpoint is evaluated only where it restored on every process.
      other = sharding.agree(f"restored {key}", None if error is None else _one_line(error, path))
      if other is not None and jax.process_count() > 1:
        params = None
        error = InputError(other)          # the same reason on every process
      if error is not None:
        fail(key, model, step, "restoring", error)
        continue
      report.wait_seconds[key] = time.perf_counter() - t_wait
      report.restore_seconds[key] = restore_s
      bar.set_postfix_str(f"{model.name} step {step}", refresh=False)

      t_eval = time.perf_counter()
      try:
        arrays, meta = evaluate(model, step, config_of(path), params)
        # The evaluator may return device arrays: materialise before stopping the clock.
        arrays = {k: np.asarray(v) for k, v in dict(arrays).items()}
      except Exception as e:  # pylint: disable=broad-except
        del params
        if jax.process_count() > 1 and not stop_on_failure:
          # The other processes may be waiting in a collective of this evaluation.
          e.add_note("(a multi-process run stops at an evaluation error)")
          stop_on_failure = True
        fail(key, model, step, "evaluating", e)
        continue
      eval_s = time.perf_counter() - t_eval
      del params

      meta = dict(meta or {})
      stored_meta = {"model": model.name, "step": step, "params": model.params,
                     "tokens": model.tokens(step), "flops": model.flops(step), "path": path,
                     "eval_seconds": eval_s, "restore_seconds": restore_s, **meta,
                     "identity": ident}
      store.write(key, arrays, stored_meta)   # replaces a stale result atomically
      report.evaluated.append(key)
      report.eval_seconds[key] = eval_s
      tokens_done += float(meta.get("num_tokens", 0) or 0)
      eval_done += eval_s
      postfix = f"{model.name} step {step}"
      if tokens_done:
        postfix += f", {tokens_done / max(eval_done, 1e-9):,.0f} tok/s"
      if report.failed:
        postfix += f", {len(report.failed)} failed"
      bar.set_postfix_str(postfix, refresh=False)
      bar.update(1)
    # Every process waits until the main process has written every result.
    sharding.barrier(f"sweep {name} written")
    status = "finished_with_failures" if report.failed else "finished"
    if report.failed:
      log.warning("sweep %s: %d of %d checkpoints failed (listed in %s)", name,
                  len(report.failed), len(todo) + len(unreadable), manifest.path)
  except KeyboardInterrupt:
    status = "interrupted"
    raise
  except Exception:
    status = "stopped" if stop_on_failure and report.failed else "failed"
    raise
  finally:
    executor.shutdown(wait=True, cancel_futures=True)
    bar.close()
    report.wall_seconds = time.perf_counter() - start
    report.compile = programs.compile_share(compile_before, programs.compile_seconds(),
                                            report.wall_seconds)
    manifest.update(status=status, finished=_utc_now(), evaluated=len(report.evaluated),
                    wall_seconds=report.wall_seconds, eval_seconds=report.total_eval_seconds,
                    restore_seconds=float(sum(report.restore_seconds.values())),
                    restore_wait_seconds=float(sum(report.wait_seconds.values())),
                    compile=report.compile)
  return report


def load_model_tokenizer(model: SuiteModel, conventions: str = "native") -> Any:
  """The tokenizer stored with the model's checkpoints (the first checkpoint that has its files),
  under `conventions` ("native" | "lm_eval"); MissingFileError naming the model otherwise."""
  from opt_jax.errors import MissingFileError  # pylint: disable=import-outside-toplevel
  from opt_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  errors = []
  for path in model.checkpoints.values():
    try:
      return load_tokenizer(path, conventions=conventions)
    except (OSError, ValueError) as e:
      errors.append(str(e))
  raise MissingFileError(f"model {model.name!r}: no checkpoint directory has tokenizer files "
                         f"(tokenizer.json, or vocab.json + merges.txt); first error: "
                         f"{errors[0] if errors else '-'}")


class ScorerCache:
  """One `opt_jax.scoring.Scorer` per (config, tokenizer): later checkpoints of the same config
  reuse its compiled programs through `Scorer.set_params` (no recompilation).

  Only the most recently used scorer is kept (a sweep goes size by size), so a finished size does
  not keep its last parameters alive.
  scorer_kwargs: passed to every Scorer (batch_size, max_length, dtype, attention, mesh).
  conventions: "native" or "lm_eval", the text convention of the tokenizers it loads and of its
    Scorers (opt_jax/tokenizer.py).
  """

  def __init__(self, conventions: str = "native", **scorer_kwargs: Any):
    self.conventions = conventions
    self._kwargs = dict(scorer_kwargs, conventions=conventions)
    self._key: Any = None
    self._scorer: Any = None
    self._tokenizers: dict[str, Any] = {}

  def tokenizer(self, model: SuiteModel) -> Any:
    """The model's tokenizer under this cache's conventions (`load_model_tokenizer`)."""
    if model.name not in self._tokenizers:
      self._tokenizers[model.name] = load_model_tokenizer(model, self.conventions)
    return self._tokenizers[model.name]

  def get(self, config: DecoderConfig, params: Any, tokenizer: Any = None) -> Any:
    """A Scorer for `config` holding `params`."""
    key = (config, tokenizer.fingerprint() if tokenizer is not None else None)
    if key == self._key:
      self._scorer.set_params(params)
    else:
      from opt_jax.scoring import Scorer  # pylint: disable=import-outside-toplevel
      self.clear()  # drop the previous size's scorer (and its params) before building the next
      self._scorer = Scorer(config, params, tokenizer=tokenizer, **self._kwargs)
      self._key = key
    return self._scorer

  def clear(self) -> None:
    self._key = self._scorer = None
