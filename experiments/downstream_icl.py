r"""Downstream in-context learning across checkpoints and what predicts it (Xia et al. 2023, s. 5).

  python -m experiments.downstream_icl --suite=suite.json --out=out/icl \
      [--bigbench_dir=~/.cache/opt_jax/bigbench/benchmark_tasks] [--tasks=a,b] [--k_shot=0,2] \
      [--cloze_text=book.txt] [--validation_ppl=out/validation_ppl | --validation_text=valid.txt] \
      [--max_examples=0] [--seed=0] [--mesh=data:-1] [--batch_size=8] [--dtype=float32]

  python -m experiments.downstream_icl --lm_eval_results=DIR --suite=MANIFEST \
      --tasks=hellaswag,piqa --metric=acc --ppl_task=lambada_openai --out=DIR

Tasks: the BIG-bench JSON tasks under --bigbench_dir that pass the paper's selection rule (the
others are listed with the reason), or the --tasks named there (an unknown name is an error that
names the closest known ones), plus cloze tasks made from --cloze_text. --bigbench_dir defaults
to tools/fetch_bigbench.py's cache ($XDG_CACHE_HOME/opt_jax/bigbench/benchmark_tasks); when that
is absent and no cloze text is given the run stops and says how to fetch the tasks; an empty
value disables BIG-bench. A malformed task is skipped and listed in summary.md.

Each option of each example is one harness-style request (experiments.tasks.bigbench): the prompt
(k-shot, BIG-bench's prefixes) is the context, the option the continuation. Requests are encoded
as the harness encodes them (context + continuation as one string; the continuation is what
follows the context's tokens) and scored with Scorer.loglikelihood_tokens, which computes each
shared prompt once (one packed row: the prompt, then every option). An example whose option is
longer than the model's window is skipped (counted in summary.md).

Validation perplexity (the x-axis): --validation_ppl (experiments/validation_ppl.py's CSV or its
folder; --validation_corpus picks a corpus), or --validation_text scored in the same sweep
(token-weighted over the files, windows of the model's length), or missing (NaN: perplexity
correlations and the plots against it are then skipped, and the summary says so).

Outputs in --out:
  icl_results.csv     model, step, params, tokens, flops, validation_ppl, task, n, accuracy,
                      accuracy_norm, correct_option_ppl, incorrect_option_ppl, random_baseline,
                      k_shot (experiments.analysis.icl documents every column)
  correlations.csv    x, spearman, r2, n (+ spearman_p, slope, intercept, y) for the first k_shot;
                      mean_accuracy.csv, correlations_by_metric.csv, residuals_by_model.csv,
                      task_scaling.csv, summary.md, plots/*.{png,pdf} beside it
  lm_eval/            the results as lm-evaluation-harness 0.4 result files, one per checkpoint
                      (<ORG__NAME>/results_step<N>.json, icl.export_lm_eval; validation
                      perplexity as the pseudo-task "validation_ppl"), for the first k_shot
  k{K}shot/           the same analysis (and lm_eval/) for every further k_shot
  store/, runs/       per-checkpoint results (a re-run scores only what is missing), run manifests
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from experiments import context, perplexity
from experiments.analysis import icl
from experiments.context import Experiment, ExperimentSettings, Outcome
from experiments.tasks import bigbench as bb
from experiments.tasks import cloze
from opt_jax import cli, files, inputs
from opt_jax.errors import InputError

NAME = "downstream_icl"
DEFAULT_K_SHOT = (0, 2)
RESULTS_CSV = "icl_results.csv"
LM_EVAL_DIR = "lm_eval"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(ExperimentSettings):
  # The tasks, prompts and validation texts are in the result key through their contents.
  bigbench_dir: str | None = cli.option(
      None, "Folder of BIG-bench task folders (default: tools/fetch_bigbench.py's cache, "
            "$XDG_CACHE_HOME/opt_jax/bigbench/benchmark_tasks); empty: no BIG-bench (cloze tasks "
            "only).", key=False)
  tasks: tuple[str, ...] | None = cli.option(
      None, "BIG-bench tasks to evaluate (default: those passing the paper's selection rule); "
            "with --lm_eval_results: the harness tasks.", key=False)
  cloze_text: tuple[str, ...] | None = cli.option(
      None, "Held-out text file(s) to make cloze tasks from.", key=False)
  cloze_examples: int = cli.option(200, "Examples per cloze task.", ge=1, key=False)
  k_shot: tuple[int, ...] = cli.option(
      DEFAULT_K_SHOT, "Shots per prompt; the first value's analysis goes to --out, the others' to "
      "--out/k{K}shot.", ge=0, key=False)
  seed: int = cli.option(0, "Seed of the few-shot draws and the listed-choice order.", ge=0,
                         key=False)
  max_examples: int = cli.option(0, "Examples per task (0: all).", ge=0, key=False)
  validation_ppl: str | None = cli.option(
      None, "validation_ppl.csv (or its folder) of experiments/validation_ppl.py.", key=False)
  validation_corpus: str | None = cli.option(None, "Corpus of --validation_ppl to use.",
                                             key=False)
  validation_text: tuple[str, ...] | None = cli.option(
      None, "Text file(s) whose perplexity is scored in this sweep as the validation perplexity "
            "(.jsonl: JSON lines with a \"text\" field; any other file: one document).", key=False)
  # Same numbers either way (the shared prompt is computed once or with every option).
  share_prefix: bool = cli.option(True, "Score each prompt once for all its options (packed rows).",
                                  key=False)
  n_bins: int = cli.option(10, "Bins of the perplexity order for linearity and breakthroughness "
                           "(0: every checkpoint).", ge=0, key=False)
  top_k: int = cli.option(5, "Tasks plotted per linearity / breakthroughness ranking.", ge=0,
                          key=False)
  plots: bool = cli.option(True, "Draw the plots (PNG and PDF).", key=False)
  lm_eval_results: str | None = cli.option(
      None, "Folder of lm-evaluation-harness result JSON files to analyse instead of scoring "
            "checkpoints.", key=False)
  metric: str = cli.option("acc", "lm-eval metric used as accuracy.", key=False)
  ppl_task: str = cli.option("lambada_openai", "lm-eval task whose perplexity is the validation "
                             "perplexity.", key=False)

  def __post_init__(self):
    super().__post_init__()
    if not self.k_shot or len(set(self.k_shot)) != len(self.k_shot):
      raise InputError(f"--k_shot={','.join(map(str, self.k_shot))}: expected distinct "
                       f"non-negative integers")
    if self.validation_ppl and self.validation_text:
      raise InputError("give --validation_ppl or --validation_text, not both")


def default_bigbench_dir() -> str:
  """Where tools/fetch_bigbench.py puts the tasks by default."""
  return files.user_cache_dir("bigbench", "benchmark_tasks")


# Tasks and requests ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Item:
  """One example's requests in one k-shot setting."""
  k: int
  task: str
  requests: bb.ExampleRequests


@dataclasses.dataclass
class TaskList:
  """tasks: what is evaluated; failures {task: error} (malformed, skipped); dropped {task:
  reason} (the selection rule); notes: lines for summary.md."""
  tasks: list[bb.Task]
  failures: dict[str, str]
  dropped: dict[str, str]
  notes: list[str]


def load_tasks(bigbench_dir: str | None, task_names: Sequence[str] | None,
               cloze_texts: Sequence[str] = (), *, cloze_examples: int = 200, seed: int = 0
               ) -> TaskList:
  """The run's tasks (module docstring). InputError for an unknown task name (naming the
  closest known ones) and when nothing is left to evaluate."""
  out = TaskList([], {}, {}, [])
  explicit = bigbench_dir is not None
  root = os.path.expanduser(bigbench_dir) if explicit else default_bigbench_dir()
  if bigbench_dir == "":  # explicitly none: cloze tasks only, even if a fetched copy exists
    if not cloze_texts:
      raise InputError("--bigbench_dir='' disables BIG-bench, and no --cloze_text was given: "
                       "nothing to evaluate")
    out.notes.append("BIG-bench disabled (empty --bigbench_dir)")
  elif os.path.isdir(root):
    available = bb.task_names(root)
    unknown = [n for n in task_names or () if n not in available]
    if unknown:
      raise InputError("--tasks: " + "; ".join(
          f"no task {n!r} in {root} (closest: "
          f"{', '.join(difflib.get_close_matches(n, available, n=3, cutoff=0.5)) or 'none'})"
          for n in unknown) + f"; {len(available)} tasks there")
    loaded, out.failures = bb.load_tasks(root, task_names)
    for t in loaded:
      problems = bb.selection_problems(t)
      if not task_names and not bb.paper_selection(t):
        out.dropped[t.name] = "; ".join(problems)
      elif problems and not bb.paper_selection(t):
        out.notes.append(f"task {t.name} fails the paper's selection rule ({'; '.join(problems)});"
                         f" its multiple-choice examples are evaluated because --tasks names it")
    out.tasks += [t.multiple_choice() for t in loaded if t.name not in out.dropped]
    for t in [t for t in out.tasks if not t.examples]:
      out.failures[t.name] = "no multiple-choice examples"
    out.tasks = [t for t in out.tasks if t.examples]
    out.notes.append(f"BIG-bench tasks from {root}: {len(out.tasks)} evaluated"
                     + ("" if task_names else f" (the paper's selection rule; {len(out.dropped)} "
                        f"not selected)"))
  elif explicit or not cloze_texts:
    bb.task_names(root)  # raises FileNotFoundError saying how to fetch the tasks
  else:
    out.notes.append(f"no BIG-bench tasks: {root} does not exist (python -m tools.fetch_bigbench)")
  for path in cloze_texts:
    text = "\n".join(inputs.read_corpus(path, "cloze text").texts)
    stem = os.path.splitext(os.path.basename(path))[0]
    for t in cloze.cloze_tasks(text, n_examples=cloze_examples, seed=seed):
      name = t.name if len(cloze_texts) == 1 else f"{t.name}_{stem}"
      out.tasks.append(dataclasses.replace(t, name=name))
    out.notes.append(f"cloze tasks from {path}")
  if not out.tasks:
    raise InputError("no task to evaluate: every task failed to load or was not selected:\n  "
                     + "\n  ".join(f"{k}: {v}" for k, v in sorted({**out.failures,
                                                                   **out.dropped}.items())))
  return out


def make_items(tasks: Sequence[bb.Task], k_shots: Sequence[int], seed: int,
               max_examples: int | None) -> list[Item]:
  return [Item(k, t.name, r) for k in k_shots for t in tasks
          for r in bb.requests_for(t, k, seed, max_examples)]


def items_digest(items: Sequence[Item]) -> str:
  """sha256 over every request of every item (what the stored numbers depend on)."""
  h = hashlib.sha256()
  for it in items:
    h.update(json.dumps([it.k, it.task, it.requests.context, it.requests.continuations]).encode())
  return h.hexdigest()


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
  """The harness's encoding: context and context + continuation encoded as strings (after the
  convention's prefix, e.g. OPT's </s>), the continuation is the whole encoding after the
  context's tokens; a context that encodes to nothing (no prefix: Pythia, OLMo, lm_eval) is the
  tokenizer's start token, as in Scorer.loglikelihood and HFLM."""
  contexts = sorted({it.requests.context for it in items})
  ctx_ids = dict(zip(contexts, tokenizer.encode_batch(contexts)))
  wholes = [it.requests.context + c for it in items for c in it.requests.continuations]
  whole_ids = iter(tokenizer.encode_batch(wholes))
  pairs, kept = [], []
  for it in items:
    ctx = ctx_ids[it.requests.context]
    conts = [next(whole_ids)[len(ctx):] for _ in it.requests.continuations]
    ctx = ctx or [tokenizer.start_id]
    ok = all(1 <= len(c) <= max_length for c in conts)
    kept.append(ok)
    if ok:
      pairs += [(ctx, c) for c in conts]
  return Encoded(pairs, np.array(kept, bool))


def task_rows(items: Sequence[Item], enc: Encoded, logprobs: np.ndarray
              ) -> list[dict[str, Any]]:
  """Per (k, task) metrics (icl.task_metrics) from the flat per-option log-probs of `enc`; a task
  whose every example is too long has no row (skipped_examples counts the others)."""
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
    raise InputError(f"{len(logprobs)} option log-probs for {o} options: stale stored results?")
  return [{"k_shot": k, "task": task, **icl.task_metrics(lp, nt, nc, sc), "skipped_examples": skip}
          for (k, task), (lp, nt, nc, sc, skip) in groups.items() if lp]


# The run -----------------------------------------------------------------------------------------

def run(settings: Settings, *, progress: bool = True, run_info: dict | None = None) -> Outcome:
  """Evaluates every checkpoint of the suite on the tasks, writes icl_results.csv and the
  analysis (module docstring). Outcome.table: the results table (None on processes other than
  the main one)."""
  s = settings
  if s.lm_eval_results:
    return run_import(s)
  ctx = Experiment(NAME, s, progress=progress, run_info=run_info)
  tasks = load_tasks(s.bigbench_dir, s.tasks, s.cloze_text or (), cloze_examples=s.cloze_examples,
                     seed=s.seed)
  items = make_items(tasks.tasks, s.k_shot, s.seed, s.max_examples or None)
  # Read before scoring: a bad file fails now, not after the sweep.
  val = (perplexity.read_validation_ppl(s.validation_ppl, ctx.suite, s.validation_corpus)
         if s.validation_ppl else {})
  val_scorer = (perplexity.CorpusScorer(inputs.read_corpora(s.validation_text, "validation text"))
                if s.validation_text else None)
  max_length = ctx.max_positions
  encoded: dict[str, Encoded] = {}   # one encoding per tokenizer
  for name, fp in ctx.fingerprints.items():
    if fp not in encoded:
      encoded[fp] = encode(items, ctx.tokenizers[name], max_length)
  key = ctx.key(items_digest(items), max_length, val_scorer and val_scorer.digest())

  def evaluate(model, step, config, params):
    enc = encoded[ctx.fingerprints[model.name]]
    scorer = ctx.scorer(model, config, params)
    results = scorer.loglikelihood_tokens(enc.pairs)
    arrays = {"logprob": np.array([r[0] for r in results], np.float64),
              "greedy": np.array([r[1] for r in results], bool)}
    num_tokens = int(sum(len(c) for _, c in enc.pairs))
    if val_scorer:
      val_arrays, val_tokens = val_scorer(scorer, ctx.tokenizers[model.name], "validation/")
      arrays.update(val_arrays)
      num_tokens += val_tokens
    return arrays, {"num_tokens": num_tokens, "num_requests": len(enc.pairs)}

  ctx.say(f"{ctx.describe_suite()}; {len(tasks.tasks)} tasks, k-shot "
          f"{','.join(map(str, s.k_shot))}: {len(items):,} examples, "
          f"{sum(len(it.requests.continuations) for it in items):,} option requests per checkpoint")
  ctx.sweep(evaluate, key, max_length=max_length, share_prefix=s.share_prefix)
  evaluated = [f"{len(tasks.tasks)} tasks x k-shot {','.join(map(str, s.k_shot))}: "
               f"{len(items):,} examples per checkpoint"]
  ctx.skipped += _skip_lines(tasks)
  if not ctx.is_main:
    return ctx.outcome(None, evaluated=evaluated)

  ppl_of = ((lambda m, step, arrays: val_scorer.ppl(arrays, "validation/")) if val_scorer else
            (lambda m, step, arrays: val.get((m.name, step), np.nan)))
  table, too_long = results_table(ctx, key, items, encoded, ppl_of)
  ctx.write_csv(RESULTS_CSV, table)
  notes = [*tasks.notes, *_validation_notes(ctx, val), *too_long,
           f"seed {s.seed}; at most {s.max_examples or 'all'} examples per task; options scored "
           f"by summed log-prob (accuracy) and per character (accuracy_norm)"]
  analyses = []
  for i, k in enumerate(s.k_shot):
    sub_dir = ctx.out_dir if i == 0 else ctx.path(f"k{k}shot")
    a, plot_notes = analyze_and_report(
        table[table["k_shot"] == k], sub_dir, notes=[f"{k}-shot prompts"] + notes,
        failures=tasks.failures, dropped=tasks.dropped, n_bins=s.n_bins or None, top_k=s.top_k,
        plots=s.plots)
    analyses.append(a)
    icl.export_lm_eval(table[table["k_shot"] == k], os.path.join(sub_dir, LM_EVAL_DIR),
                       ctx.suite.models, k_shot=k)
    if i == 0:
      ctx.skipped += plot_notes
  return ctx.outcome(table, analysis=analyses[0], evaluated=evaluated,
                     results=icl.headline(analyses[0], s.k_shot[0]),
                     files_=[RESULTS_CSV, "correlations.csv", "summary.md", f"{LM_EVAL_DIR}/",
                             *(["plots/"] if s.plots else []),
                             *(f"k{k}shot/" for k in s.k_shot[1:])])


def results_table(ctx: Experiment, key, items: Sequence[Item], encoded: dict[str, Encoded],
                  ppl_of) -> tuple[pd.DataFrame, list[str]]:
  """(the icl_results table of every checkpoint, one note per task with examples longer than
  the window); ppl_of(model, step, stored arrays) -> its validation perplexity."""
  rows = []
  for m, step in ctx.checkpoints(key):
    arrays, _ = ctx.read(key, m, step)
    base = {"model": m.name, "step": step, "params": m.params, "tokens": m.tokens(step),
            "flops": m.flops(step), "validation_ppl": ppl_of(m, step, arrays)}
    rows += [{**base, **r} for r in task_rows(items, encoded[ctx.fingerprints[m.name]],
                                              arrays["logprob"])]
  if not rows:
    raise InputError(f"every example of every task is longer than the {ctx.max_positions}-token "
                     f"window: nothing to analyse")
  table = pd.DataFrame(rows)
  skipped = table.groupby(["k_shot", "task"])["skipped_examples"].max()
  skipped = skipped[skipped > 0]
  missing = sorted({(it.k, it.task) for it in items} - set(zip(table["k_shot"], table["task"])))
  window = f"{ctx.max_positions}-token window"
  notes = [f"{int(v)} examples of {t} (k={k}) skipped: an option is longer than the {window}"
           for (k, t), v in skipped.items()]
  notes += [f"every example of {t} (k={k}) is longer than the {window}: no metrics"
            for k, t in missing]
  if notes:
    some = sorted({t for _, t in skipped.index})
    every = sorted({t for _, t in missing})
    ctx.skipped.append(
        f"longer than the {window}: {int(skipped.sum())} examples of {len(some)} task(s)"
        + (f", every example of {', '.join(every)}" if every else "")
        + " (summary.md lists them per k-shot)")
  table = icl.check_results(table[list(icl.RESULT_COLUMNS) + ["k_shot"]], "icl_results")
  return table.sort_values(["k_shot", "model", "step", "task"], ignore_index=True), notes


def _validation_notes(ctx: Experiment, val: dict) -> list[str]:
  s = ctx.settings
  if s.validation_text:
    return [f"validation perplexity: token-weighted over {list(s.validation_text)}"]
  if not s.validation_ppl:
    return ["no --validation_ppl or --validation_text: perplexity correlations unavailable"]
  absent = perplexity.missing_checkpoints(val, ctx.suite)
  if absent:
    ctx.skipped.append(f"no validation perplexity for {len(absent)} checkpoint(s) in "
                       f"{s.validation_ppl} ({', '.join(absent[:3])}...): NaN")
  return [f"validation perplexity from {s.validation_ppl}"]


def _skip_lines(tasks: TaskList) -> list[str]:
  lines = [f"task {name}: {why}" for name, why in sorted(tasks.failures.items())]
  if tasks.dropped:
    shown = ", ".join(sorted(tasks.dropped)[:5]) + (" ..." if len(tasks.dropped) > 5 else "")
    lines.append(f"{len(tasks.dropped)} BIG-bench task(s) not selected by the paper's rule "
                 f"({shown}; summary.md gives each reason)")
  return lines


def analyze_and_report(results: pd.DataFrame, out_dir: str, *, notes: Sequence[str] = (),
                       failures: dict[str, str] | None = None,
                       dropped: dict[str, str] | None = None, n_bins: int | None = 10,
                       top_k: int = 5, plots: bool = True) -> tuple[icl.Analysis, list[str]]:
  """Tables, plots and summary.md of one results table into out_dir; returns the analysis and
  the plots skipped for lack of data (each with its reason)."""
  a = icl.analyze(results, n_bins=n_bins, top_k=top_k)
  for name, table in a.tables().items():
    files.write_csv(table, os.path.join(out_dir, f"{name}.csv"))
  skipped: list[str] = []
  if plots:
    from experiments.analysis import icl_plots  # pylint: disable=import-outside-toplevel
    _, skipped = icl_plots.plot_all(a, out_dir)
  files.write_text(os.path.join(out_dir, "summary.md"),
                   icl.summary_markdown(a, notes=[*notes, *skipped], failures=failures,
                                        dropped=dropped))
  return a, skipped


def run_import(settings: Settings) -> Outcome:
  """The analysis on lm-evaluation-harness result files (icl.import_lm_eval): writes
  icl_results.csv (k_shot empty), the tables, plots and summary.md into --out."""
  from opt_jax import suite as suite_lib  # pylint: disable=import-outside-toplevel

  s = settings
  if not s.tasks:
    raise InputError("--tasks must name the lm-evaluation-harness tasks to analyse")
  # Nothing is read from the checkpoints: a manifest of names, sizes and tokens per step is enough.
  suite = suite_lib.load_suite(s.suite, check_paths=False, require_checkpoints=False)
  table, problems = icl.import_lm_eval(s.lm_eval_results, suite.models, s.tasks, s.metric,
                                       s.ppl_task)
  files.write_csv(table, os.path.join(s.out, RESULTS_CSV))
  notes = [f"lm-evaluation-harness results from {s.lm_eval_results}: metric {s.metric!r}, "
           f"validation perplexity from task {s.ppl_task!r}; no random baselines or option "
           f"perplexities"]
  notes += [f"import problem: {p}" for p in problems]
  a, plot_notes = analyze_and_report(table, s.out, notes=notes, n_bins=s.n_bins or None,
                                     top_k=s.top_k, plots=s.plots)
  summary = cli.Summary(NAME, evaluated=[f"{len(table)} result rows from {s.lm_eval_results}"],
                        results=icl.headline(a, None), skipped=[*problems, *plot_notes],
                        out_dir=os.path.abspath(s.out),
                        files=[RESULTS_CSV, "correlations.csv", "summary.md"])
  return Outcome(table, summary, a)


if __name__ == "__main__":
  context.main(Settings, run)
