"""Run an evaluation over every checkpoint of a suite: prefetch, resume, progress, run manifest.

  store = ResultStore(out_dir)
  report = run_sweep(suite, evaluate, store, experiment="validation_ppl")

For every (model, step) whose key (experiment..., model.name, step) is not in the store yet:
restore the checkpoint (onto `mesh` when given), call `evaluate(model, step, config, params)`,
which returns (arrays: dict[str, array], meta: dict), and write that result atomically. The next
checkpoint is restored in a background thread while the current one is evaluated, so when
restoring costs about as much as evaluating the sweep costs the evaluations alone (at most two
checkpoints' parameters are alive at once; prefetch=False keeps one). A re-run skips finished
keys; a crash or kill -9 loses at most the checkpoint in flight.

Parameters are arguments of the evaluator's jitted functions, so one compiled program serves every
checkpoint of a size: `ScorerCache` keeps one `opt_jax.scoring.Scorer` per config and moves it to
each new checkpoint with `Scorer.set_params`.

Multi-host: every process runs the same loop (the forward passes are collective); which keys to
skip is decided once, up front, from the shared store; only the main process writes.
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

from opt_jax import checkpoint, files
from opt_jax.config import DecoderConfig
from opt_jax.results import Key, ResultStore
from opt_jax.suite import Suite, SuiteModel

Evaluate = Callable[[SuiteModel, int, DecoderConfig, Any],
                    tuple[Mapping[str, Any], Mapping[str, Any]]]
Restore = Callable[..., Any]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SweepReport:
  """What a sweep did. Times in seconds; per-key dicts cover the evaluated keys only.

  restore_seconds: time each restore took (in the background thread when prefetching);
  wait_seconds: time the main loop waited for a restore to finish (the restore cost not hidden).
  """
  evaluated: list[Key] = dataclasses.field(default_factory=list)
  skipped: list[Key] = dataclasses.field(default_factory=list)
  eval_seconds: dict[Key, float] = dataclasses.field(default_factory=dict)
  restore_seconds: dict[Key, float] = dataclasses.field(default_factory=dict)
  wait_seconds: dict[Key, float] = dataclasses.field(default_factory=dict)
  wall_seconds: float = 0.0
  run_manifest: str | None = None

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
  """runs/<experiment>-<UTC time>.json in the output folder: flags, suite, versions, times."""

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
        "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()],
        "mesh": dict(mesh.shape) if mesh is not None else None,
    }

  def update(self, **fields: Any) -> None:
    self.data.update(fields)
    if self.enabled:
      files.write_json(self.path, self.data)


def run_sweep(suite: Suite, evaluate: Evaluate, store: ResultStore, *,
              experiment: str | Sequence[str] = "eval", prefetch: bool = True, mesh: Any = None,
              progress: bool = True, dtype: Any = None, run_info: Mapping[str, Any] | None = None,
              out_dir: str | None = None, restore: Restore | None = None) -> SweepReport:
  """Evaluates every checkpoint of `suite` not yet in `store`; see the module docstring.

  evaluate(model, step, config, params) -> (arrays, meta): arrays name -> array (stored as npz);
    meta JSON-serialisable; meta["num_tokens"] (tokens scored) feeds the tokens/s of the progress
    bar. The stored meta also gets model, step, params, tokens, flops, path and timings.
  experiment: first component(s) of every key: (*experiment, model.name, step).
  mesh: restore each checkpoint onto it (opt_jax.sharding.param_shardings); None: one device.
  dtype: cast parameters while restoring (e.g. jnp.bfloat16); None keeps the stored dtype.
  run_info: flags etc. recorded in the run manifest, written to out_dir (default store.root)/runs/.
  restore: replaces opt_jax.checkpoint.restore (signature restore(path, shardings=, dtype=)).
  """
  prefix = _key_prefix(experiment)
  restore = restore or checkpoint.restore
  start = time.perf_counter()
  report = SweepReport()
  todo = []
  for key, model, step in sweep_keys(suite, prefix):
    if store.has(key):
      report.skipped.append(key)
    else:
      todo.append((key, model, step))
  manifest = _RunManifest(out_dir or store.root, prefix, suite, mesh, run_info, store.is_writer)
  manifest.update(num_checkpoints=len(report.skipped) + len(todo), skipped=len(report.skipped))
  report.run_manifest = manifest.path if store.is_writer else None
  log.info("sweep %s: %d checkpoints to evaluate, %d already done", "/".join(prefix), len(todo),
           len(report.skipped))

  configs: dict[str, DecoderConfig] = {}
  shardings: dict[DecoderConfig, Any] = {}

  def config_of(path: str) -> DecoderConfig:
    if path not in configs:
      configs[path] = checkpoint.load_config(path)
    return configs[path]

  def load(path: str) -> tuple[Any, float]:
    t0 = time.perf_counter()
    config = config_of(path)
    sh = None
    if mesh is not None:
      if config not in shardings:
        from opt_jax import sharding  # pylint: disable=import-outside-toplevel
        shardings[config] = sharding.param_shardings(config, mesh)
      sh = shardings[config]
    try:
      params = restore(path, shardings=sh, dtype=dtype)
    except Exception as e:
      raise RuntimeError(f"restoring checkpoint {path} failed: {e}") from e
    # Wait for the arrays here, in the background thread, not in the evaluator.
    params = jax.block_until_ready(params)
    return params, time.perf_counter() - t0

  bar = tqdm(total=len(todo), desc="/".join(prefix), unit="ckpt", dynamic_ncols=True,
             disable=not progress or not store.is_writer)
  tokens_done, eval_done = 0.0, 0.0
  executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
  status = "failed"
  try:
    pending = executor.submit(load, todo[0][1].path(todo[0][2])) if (todo and prefetch) else None
    for i, (key, model, step) in enumerate(todo):
      path = model.path(step)
      t_wait = time.perf_counter()
      if prefetch:
        params, restore_s = pending.result()
        pending = None
        if i + 1 < len(todo):
          nxt_model, nxt_step = todo[i + 1][1], todo[i + 1][2]
          pending = executor.submit(load, nxt_model.path(nxt_step))
      else:
        params, restore_s = load(path)
      report.wait_seconds[key] = time.perf_counter() - t_wait
      report.restore_seconds[key] = restore_s
      bar.set_postfix_str(f"{model.name} step {step}", refresh=False)

      t_eval = time.perf_counter()
      try:
        arrays, meta = evaluate(model, step, config_of(path), params)
        # The evaluator may return device arrays: materialise before stopping the clock.
        arrays = {k: np.asarray(v) for k, v in dict(arrays).items()}
      except Exception as e:
        e.add_note(f"while evaluating {model.name} step {step} ({path})")
        raise
      eval_s = time.perf_counter() - t_eval
      del params

      meta = dict(meta or {})
      stored_meta = {"model": model.name, "step": step, "params": model.params,
                     "tokens": model.tokens(step), "flops": model.flops(step), "path": path,
                     "eval_seconds": eval_s, "restore_seconds": restore_s, **meta}
      store.write(key, arrays, stored_meta)
      report.evaluated.append(key)
      report.eval_seconds[key] = eval_s
      tokens_done += float(meta.get("num_tokens", 0) or 0)
      eval_done += eval_s
      postfix = f"{model.name} step {step}"
      if tokens_done:
        postfix += f", {tokens_done / max(eval_done, 1e-9):,.0f} tok/s"
      bar.set_postfix_str(postfix, refresh=False)
      bar.update(1)
    status = "finished"
  finally:
    executor.shutdown(wait=True, cancel_futures=True)
    bar.close()
    report.wall_seconds = time.perf_counter() - start
    manifest.update(status=status, finished=_utc_now(), evaluated=len(report.evaluated),
                    wall_seconds=report.wall_seconds, eval_seconds=report.total_eval_seconds)
  return report


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
    """The tokenizer stored with the model's checkpoints (the first one that has its files)."""
    if model.name not in self._tokenizers:
      from opt_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
      errors = []
      for path in model.checkpoints.values():
        try:
          self._tokenizers[model.name] = load_tokenizer(path, conventions=self.conventions)
          break
        except (OSError, ValueError) as e:
          errors.append(str(e))
      else:
        raise FileNotFoundError(f"model {model.name!r}: no checkpoint directory has tokenizer "
                                f"files (tokenizer.json or vocab.json + merges.txt); first error: "
                                f"{errors[0] if errors else '-'}")
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
