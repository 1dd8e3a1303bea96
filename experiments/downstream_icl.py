r"""Downstream in-context learning across checkpoints and what predicts it (Xia et al. 2023, s. 5).

  python -m experiments.downstream_icl --suite=suite.json --out=out/icl \
      [--bigbench_dir=~/.cache/opt_jax/bigbench/benchmark_tasks] [--tasks=a,b] [--k_shot=0,2] \
      [--cloze_text=book.txt] [--validation_ppl=out/validation_ppl | --validation_text=valid.txt] \
      [--max_examples=0] [--seed=0] [--mesh=data:-1] [--batch_size=8] [--dtype=float32]

  python -m experiments.downstream_icl --lm_eval_results=DIR --suite=MANIFEST \
      --tasks=hellaswag,piqa --metric=acc --ppl_task=lambada_openai --out=DIR

Tasks: the BIG-bench JSON tasks under --bigbench_dir that pass the paper's selection rule (or the
--tasks named there), plus cloze tasks made from --cloze_text. --bigbench_dir defaults to
tools/fetch_bigbench.py's cache ($XDG_CACHE_HOME/opt_jax/bigbench/benchmark_tasks); when that is
absent and no cloze text is given the run stops and says how to fetch the tasks. A malformed task
is skipped and listed in summary.md.

Each option of each example is one harness-style request (experiments.tasks.bigbench): the prompt
(k-shot, BIG-bench's prefixes) is the context, the option the continuation. Requests are encoded
as the harness encodes them (context + continuation as one string; the continuation is what
follows the context's tokens) and scored with Scorer.loglikelihood_tokens, which computes each
shared prompt once (one packed row: the prompt, then every option). An example whose option is
longer than the model's window is skipped (counted in summary.md).

Validation perplexity (the x-axis): --validation_ppl (experiments/validation_ppl.py's CSV or its
folder; --validation_corpus picks a corpus), or --validation_text scored in the same sweep
(token-weighted over the files, windows of the model's length), or missing (NaN: perplexity
correlations are then unavailable).

Outputs in --out:
  icl_results.csv     model, step, params, tokens, flops, validation_ppl, task, n, accuracy,
                      accuracy_norm, correct_option_ppl, incorrect_option_ppl, random_baseline,
                      k_shot (experiments.analysis.icl documents every column)
  correlations.csv    x, spearman, r2, n (+ spearman_p, slope, intercept, y) for the first k_shot;
                      mean_accuracy.csv, correlations_by_metric.csv, residuals_by_model.csv,
                      task_scaling.csv, summary.md, plots/*.{png,pdf} beside it
  k{K}shot/           the same analysis for every further k_shot
  store/, runs/       per-checkpoint results (a re-run scores only what is missing), run manifests

This file is the library function `run` (tests call it) plus thin absl flags (`main`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from experiments.analysis import icl
from experiments.tasks import bigbench as bb
from experiments.tasks import cloze
from opt_jax import files

log = logging.getLogger(__name__)

EXPERIMENT = "downstream_icl"
DEFAULT_K_SHOT = (0, 2)


def default_bigbench_dir() -> str:
  """Where tools/fetch_bigbench.py puts the tasks by default."""
  from tools import fetch_bigbench  # pylint: disable=import-outside-toplevel
  return os.path.join(fetch_bigbench.default_cache_dir(), fetch_bigbench.TASKS_DIR)


# Tasks and requests ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Item:
  """One example's requests in one k-shot setting."""
  k: int
  task: str
  requests: bb.ExampleRequests


def load_tasks(bigbench_dir: str | None, task_names: Sequence[str] | None,
               cloze_texts: Sequence[str] = (), *, cloze_examples: int = 200, seed: int = 0
               ) -> tuple[list[bb.Task], dict[str, str], list[str]]:
  """(tasks, failures {task: error}, notes) for a run; see the module docstring."""
  tasks: list[bb.Task] = []
  failures: dict[str, str] = {}
  notes: list[str] = []
  explicit = bigbench_dir is not None
  root = os.path.expanduser(bigbench_dir) if explicit else default_bigbench_dir()
  if bigbench_dir == "":  # explicitly none: cloze tasks only, even if a fetched copy exists
    if not cloze_texts:
      raise ValueError("bigbench_dir='' disables BIG-bench, and no cloze text was given: "
                       "nothing to evaluate")
    notes.append("BIG-bench disabled (empty --bigbench_dir)")
  elif os.path.isdir(root):
    loaded, failures = bb.load_tasks(root, task_names)
    if task_names:
      for t in loaded:
        problems = bb.selection_problems(t)
        if problems and not bb.paper_selection(t):
          notes.append(f"task {t.name} fails the paper's selection rule ({'; '.join(problems)}); "
                       f"its multiple-choice examples are evaluated because --tasks names it")
      tasks += [t.multiple_choice() for t in loaded]
    else:
      tasks += bb.select_tasks(loaded)
    for t in [t for t in tasks if not t.examples]:
      failures[t.name] = "no multiple-choice examples"
    tasks = [t for t in tasks if t.examples]
    notes.append(f"BIG-bench tasks from {root}: {len(tasks)} evaluated"
                 + ("" if task_names else " (the paper's selection rule)"))
  elif explicit or not cloze_texts:
    bb.task_names(root)  # raises FileNotFoundError saying how to fetch the tasks
  else:
    notes.append(f"no BIG-bench tasks: {root} does not exist (python -m tools.fetch_bigbench)")
  for path in cloze_texts:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    stem = os.path.splitext(os.path.basename(path))[0]
    for t in cloze.cloze_tasks(text, n_examples=cloze_examples, seed=seed):
      name = t.name if len(cloze_texts) == 1 else f"{t.name}_{stem}"
      tasks.append(dataclasses.replace(t, name=name))
    notes.append(f"cloze tasks from {path}")
  if not tasks:
    raise ValueError("no task to evaluate: every task failed to load:\n  " + "\n  ".join(
        f"{k}: {v}" for k, v in sorted(failures.items())))
  return tasks, failures, notes


def make_items(tasks: Sequence[bb.Task], k_shots: Sequence[int], seed: int,
               max_examples: int | None) -> list[Item]:
  return [Item(k, t.name, r) for k in k_shots for t in tasks
          for r in bb.requests_for(t, k, seed, max_examples)]


@dataclasses.dataclass
class Encoded:
  """Token ids of every option request of `items` under one tokenizer.

  pairs: (context ids, continuation ids) per option of every kept item, items in order;
  kept[i]: whether item i fits the window (every continuation 1..max_length tokens).
  """
  pairs: list[tuple[list[int], list[int]]]
  kept: np.ndarray

  @property
  def n_tokens(self) -> np.ndarray:
    return np.array([len(c) for _, c in self.pairs], np.int64)


def encode(items: Sequence[Item], tokenizer, max_length: int) -> Encoded:
  """The harness's encoding: context and context + continuation encoded as strings (</s> first),
  the continuation is the whole encoding after the context's tokens."""
  contexts = sorted({it.requests.context for it in items})
  ctx_ids = dict(zip(contexts, tokenizer.encode_batch(contexts)))
  wholes = [it.requests.context + c for it in items for c in it.requests.continuations]
  whole_ids = iter(tokenizer.encode_batch(wholes))
  pairs, kept = [], []
  for it in items:
    ctx = ctx_ids[it.requests.context]
    conts = [next(whole_ids)[len(ctx):] for _ in it.requests.continuations]
    ok = all(1 <= len(c) <= max_length for c in conts)
    kept.append(ok)
    if ok:
      pairs += [(ctx, c) for c in conts]
  return Encoded(pairs, np.array(kept, bool))


def items_tag(items: Sequence[Item], fingerprints: Sequence[str], max_length: int,
              dtype: str) -> str:
  """12 hex digits naming what the stored numbers depend on."""
  h = hashlib.sha256(json.dumps({"fp": sorted(set(fingerprints)), "max_length": max_length,
                                 "dtype": dtype}).encode())
  for it in items:
    h.update(json.dumps([it.k, it.task, it.requests.context, it.requests.continuations]).encode())
  return h.hexdigest()[:12]


def task_rows(items: Sequence[Item], enc: Encoded, logprobs: np.ndarray
              ) -> list[dict[str, Any]]:
  """Per (k, task) metrics (icl.task_metrics) from the flat per-option log-probs of `enc`."""
  groups: dict[tuple[int, str], list] = {}
  ntok = enc.n_tokens
  o = 0
  for it, ok in zip(items, enc.kept):
    g = groups.setdefault((it.k, it.task), [[], [], [], [], 0])
    if not ok:
      g[4] += 1
      continue
    n = len(it.requests.continuations)
    g[0].append(logprobs[o:o + n])
    g[1].append(ntok[o:o + n])
    g[2].append([len(c) for c in it.requests.continuations])
    g[3].append(it.requests.example.scores)
    o += n
  if o != len(logprobs):
    raise ValueError(f"{len(logprobs)} option log-probs for {o} options: stale stored results?")
  rows = []
  for (k, task), (lp, nt, nc, sc, skipped) in groups.items():
    if not lp:
      log.warning("task %s (k=%d): every example is longer than the window; no metrics", task, k)
      continue
    rows.append({"k_shot": k, "task": task, **icl.task_metrics(lp, nt, nc, sc),
                 "skipped_examples": skipped})
  return rows


# The run -----------------------------------------------------------------------------------------

def run(suite_path: str, out_dir: str, *, bigbench_dir: str | None = None,
        tasks: Sequence[str] | None = None, cloze_text: Sequence[str] = (),
        cloze_examples: int = 200, k_shot: Sequence[int] = DEFAULT_K_SHOT, seed: int = 0,
        max_examples: int | None = None, validation_ppl: str | None = None,
        validation_corpus: str | None = None, validation_text: Sequence[str] = (),
        models: Sequence[str] | None = None, mesh_spec: str | None = None, batch_size: int = 8,
        dtype: str = "float32", share_prefix: bool = True, n_bins: int | None = 10,
        top_k: int = 5, plots: bool = True, progress: bool = True,
        run_info: dict | None = None) -> pd.DataFrame | None:
  """Evaluates every checkpoint of the suite on the tasks, writes icl_results.csv and the
  analysis (module docstring). Returns the results table (None on processes other than the
  main one)."""
  import jax.numpy as jnp  # the engine is imported here so that `--help` stays fast

  from opt_jax import checkpoint, sharding, suite as suite_lib, sweep
  from opt_jax.results import ResultStore

  if validation_ppl and validation_text:
    raise ValueError("give --validation_ppl or --validation_text, not both")
  k_shot = [int(k) for k in k_shot]
  if not k_shot or min(k_shot) < 0 or len(set(k_shot)) != len(k_shot):
    raise ValueError(f"k_shot={k_shot}: expected distinct non-negative integers")
  suite = suite_lib.load_suite(suite_path).select(list(models) if models else None)
  task_list, failures, notes = load_tasks(bigbench_dir, tasks, cloze_text,
                                          cloze_examples=cloze_examples, seed=seed)
  items = make_items(task_list, k_shot, seed, max_examples)
  val: dict[tuple[str, int], float] = {}
  if validation_ppl:  # read before scoring: a bad file fails now, not after the sweep
    from experiments import validation_ppl as vp  # pylint: disable=import-outside-toplevel
    val = vp.read_validation_ppl(validation_ppl, validation_corpus, suite=suite)

  configs = {m.name: checkpoint.load_config(next(iter(m.checkpoints.values())))
             for m in suite.models}
  max_length = min(c.max_position_embeddings for c in configs.values())
  mesh = sharding.make_mesh(mesh_spec) if mesh_spec else None
  compute_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype]
  cache = sweep.ScorerCache(batch_size=batch_size, max_length=max_length, dtype=compute_dtype,
                            mesh=mesh, share_prefix=share_prefix)
  toks = {m.name: cache.tokenizer(m) for m in suite.models}
  fps = {name: t.fingerprint() for name, t in toks.items()}
  encoded: dict[str, Encoded] = {}
  for name, t in toks.items():
    if fps[name] not in encoded:
      encoded[fps[name]] = encode(items, t, max_length)

  val_corpora = []
  if validation_text:
    from experiments import validation_ppl as vp  # pylint: disable=import-outside-toplevel
    val_corpora = vp.load_corpora(list(validation_text))
    score_validation = vp.corpus_scorer(val_corpora, None, None)
  tag = items_tag(items, list(fps.values()), max_length, dtype)
  if val_corpora:
    tag = hashlib.sha256((tag + vp.fingerprint(val_corpora, None, None, dtype)).encode()
                         ).hexdigest()[:12]
  experiment = (EXPERIMENT, tag)

  def evaluate(model, step, config, params):
    tokenizer = toks[model.name]
    enc = encoded[fps[model.name]]
    scorer = cache.get(config, params, tokenizer)
    results = scorer.loglikelihood_tokens(enc.pairs)
    arrays = {"logprob": np.array([r[0] for r in results], np.float64),
              "greedy": np.array([r[1] for r in results], bool)}
    num_tokens = int(sum(len(c) for _, c in enc.pairs))
    if val_corpora:
      val_arrays, val_tokens = score_validation(scorer, tokenizer)
      arrays.update({"validation/" + k: v for k, v in val_arrays.items()})
      num_tokens += val_tokens
    return arrays, {"num_tokens": num_tokens, "num_requests": len(enc.pairs)}

  info = {"suite": os.path.abspath(suite_path), "tasks": [t.name for t in task_list],
          "k_shot": k_shot, "seed": seed, "max_examples": max_examples, "mesh": mesh_spec,
          "dtype": dtype, "batch_size": batch_size, "share_prefix": share_prefix,
          "max_length": max_length, "tag": tag, "num_items": len(items), **(run_info or {})}
  store = ResultStore(os.path.join(out_dir, "store"))
  sweep.run_sweep(suite, evaluate, store, experiment=experiment, mesh=mesh, progress=progress,
                  dtype=None if dtype == "float32" else compute_dtype, run_info=info,
                  out_dir=out_dir)
  cache.clear()
  if not sharding.is_main_process():
    return None

  rows = []
  for m, step, _ in suite.checkpoints():
    arrays, _ = store.read((*experiment, m.name, step))
    ppl = val.get((m.name, step), np.nan)
    if val_corpora:
      nll = sum(float(arrays[f"validation/{c.name}/nll_sum"].sum()) for c in val_corpora)
      n = sum(int(arrays[f"validation/{c.name}/num_tokens"].sum()) for c in val_corpora)
      ppl = float(np.exp(nll / n)) if n else np.nan
    base = {"model": m.name, "step": step, "params": m.params, "tokens": m.tokens(step),
            "flops": m.flops(step), "validation_ppl": ppl}
    rows += [{**base, **r} for r in task_rows(items, encoded[fps[m.name]], arrays["logprob"])]
  table = pd.DataFrame(rows)
  skipped = table.groupby(["k_shot", "task"])["skipped_examples"].max()
  skipped = skipped[skipped > 0]
  table = table.drop(columns=["skipped_examples"])
  table = icl.check_results(table[list(icl.RESULT_COLUMNS) + ["k_shot"]], "icl_results")
  table = table.sort_values(["k_shot", "model", "step", "task"], ignore_index=True)
  files.write_csv(table, os.path.join(out_dir, "icl_results.csv"))

  if not validation_ppl and not val_corpora:
    notes.append("no --validation_ppl or --validation_text: perplexity correlations unavailable")
  elif validation_ppl:
    notes.append(f"validation perplexity from {validation_ppl}")
  else:
    notes.append(f"validation perplexity: token-weighted over {list(validation_text)}")
  notes += [f"{int(v)} examples of {t} (k={k}) skipped: an option is longer than the "
            f"{max_length}-token window" for (k, t), v in skipped.items()]
  notes.append(f"seed {seed}; at most {max_examples or 'all'} examples per task; options scored "
               f"by summed log-prob (accuracy) and per character (accuracy_norm)")
  for i, k in enumerate(k_shot):
    sub_dir = out_dir if i == 0 else os.path.join(out_dir, f"k{k}shot")
    analyze_and_report(table[table["k_shot"] == k], sub_dir, notes=[f"{k}-shot prompts"] + notes,
                       failures=failures, n_bins=n_bins, top_k=top_k, plots=plots)
  return table


def analyze_and_report(results: pd.DataFrame, out_dir: str, *, notes: Sequence[str] = (),
                       failures: dict[str, str] | None = None, n_bins: int | None = 10,
                       top_k: int = 5, plots: bool = True) -> icl.Analysis:
  """Tables, plots and summary.md of one results table into out_dir."""
  a = icl.analyze(results, n_bins=n_bins, top_k=top_k)
  icl.write_tables(a, out_dir)
  if plots:
    from experiments.analysis import icl_plots  # pylint: disable=import-outside-toplevel
    icl_plots.plot_all(a, out_dir)
  files.write_text(os.path.join(out_dir, "summary.md"),
                   icl.summary_markdown(a, notes=notes, failures=failures))
  return a


def run_import(lm_eval_results: str, suite_path: str, out_dir: str, *, tasks: Sequence[str],
               metric: str = "acc", ppl_task: str = "lambada_openai", n_bins: int | None = 10,
               top_k: int = 5, plots: bool = True) -> pd.DataFrame:
  """The analysis on lm-evaluation-harness result files (icl.import_lm_eval): writes
  icl_results.csv (k_shot empty), the tables, plots and summary.md into out_dir."""
  from opt_jax import suite as suite_lib  # pylint: disable=import-outside-toplevel

  if not tasks:
    raise ValueError("--tasks must name the lm-evaluation-harness tasks to analyse")
  suite = suite_lib.load_suite(suite_path, check_paths=False)
  table, problems = icl.import_lm_eval(lm_eval_results, suite.models, tasks, metric, ppl_task)
  files.write_csv(table, os.path.join(out_dir, "icl_results.csv"))
  notes = [f"lm-evaluation-harness results from {lm_eval_results}: metric {metric!r}, validation "
           f"perplexity from task {ppl_task!r}; no random baselines or option perplexities"]
  notes += [f"import problem: {p}" for p in problems]
  analyze_and_report(table, out_dir, notes=notes, n_bins=n_bins, top_k=top_k, plots=plots)
  return table


# --- binary -----------------------------------------------------------------------------------

_FLAG_NAMES = ("suite", "out", "bigbench_dir", "tasks", "cloze_text", "cloze_examples", "k_shot",
               "seed", "max_examples", "validation_ppl", "validation_corpus", "validation_text",
               "models", "mesh", "batch_size", "dtype", "share_prefix", "n_bins", "top_k", "plots",
               "lm_eval_results", "metric", "ppl_task")


def main(argv):
  from absl import flags

  from opt_jax import sharding  # pylint: disable=import-outside-toplevel

  del argv
  f = flags.FLAGS
  sharding.initialize_distributed()  # before anything touches a device; no-op for one process
  if f.lm_eval_results:
    run_import(f.lm_eval_results, f.suite, f.out, tasks=f.tasks or [], metric=f.metric,
               ppl_task=f.ppl_task, n_bins=f.n_bins or None, top_k=f.top_k, plots=f.plots)
    return
  run(f.suite, f.out, bigbench_dir=f.bigbench_dir, tasks=f.tasks, cloze_text=f.cloze_text or (),
      cloze_examples=f.cloze_examples, k_shot=[int(k) for k in f.k_shot], seed=f.seed,
      max_examples=f.max_examples or None, validation_ppl=f.validation_ppl,
      validation_corpus=f.validation_corpus, validation_text=f.validation_text or (),
      models=f.models, mesh_spec=f.mesh or None, batch_size=f.batch_size, dtype=f.dtype,
      share_prefix=f.share_prefix, n_bins=f.n_bins or None, top_k=f.top_k, plots=f.plots,
      run_info={"flags": {name: getattr(f, name) for name in _FLAG_NAMES}})


def _define_flags():
  from absl import flags

  flags.DEFINE_string("suite", None, "suite manifest (.json/.yaml)", required=True)
  flags.DEFINE_string("out", None, "output folder", required=True)
  flags.DEFINE_string("bigbench_dir", None, "folder of BIG-bench task folders (default: "
                      "tools/fetch_bigbench.py's cache, $XDG_CACHE_HOME/opt_jax/bigbench/"
                      "benchmark_tasks); an empty value disables BIG-bench (cloze tasks only)")
  flags.DEFINE_list("tasks", None, "BIG-bench tasks to evaluate (default: those passing the "
                    "paper's selection rule); with --lm_eval_results: the harness tasks")
  flags.DEFINE_list("cloze_text", None, "held-out text file(s) to make cloze tasks from")
  flags.DEFINE_integer("cloze_examples", 200, "examples per cloze task")
  flags.DEFINE_list("k_shot", [str(k) for k in DEFAULT_K_SHOT], "shots per prompt; the first "
                    "value's analysis goes to --out, the others' to --out/k{K}shot")
  flags.DEFINE_integer("seed", 0, "seed of the few-shot draws and the listed-choice order")
  flags.DEFINE_integer("max_examples", 0, "examples per task (0: all)")
  flags.DEFINE_string("validation_ppl", None, "validation_ppl.csv (or its folder) of "
                      "experiments/validation_ppl.py")
  flags.DEFINE_string("validation_corpus", None, "corpus of --validation_ppl to use")
  flags.DEFINE_list("validation_text", None, "text/jsonl file(s) whose perplexity is scored in "
                    "this sweep as the validation perplexity")
  flags.DEFINE_list("models", None, "subset of the suite's models (names or aliases)")
  flags.DEFINE_string("mesh", "", "device mesh spec, e.g. data:-1 ('': one device)")
  flags.DEFINE_integer("batch_size", 8, "rows per forward pass")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "compute dtype")
  flags.DEFINE_bool("share_prefix", True, "score each prompt once for all its options "
                    "(packed rows)")
  flags.DEFINE_integer("n_bins", 10, "bins of the perplexity order for linearity and "
                       "breakthroughness (0: every checkpoint)")
  flags.DEFINE_integer("top_k", 5, "tasks plotted per linearity / breakthroughness ranking")
  flags.DEFINE_bool("plots", True, "draw plots (PNG and PDF)")
  flags.DEFINE_string("lm_eval_results", None, "folder of lm-evaluation-harness result JSON files "
                      "to analyse instead of scoring checkpoints")
  flags.DEFINE_string("metric", "acc", "lm-eval metric used as accuracy")
  flags.DEFINE_string("ppl_task", "lambada_openai", "lm-eval task whose perplexity is the "
                      "validation perplexity")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  logging.basicConfig(level=logging.INFO)
  app.run(main)
