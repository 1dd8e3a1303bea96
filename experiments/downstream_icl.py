r"""Downstream in-context learning across checkpoints and what predicts it (Xia et al. 2023, s. 5).

  python -m experiments.downstream_icl --suite=suite.json --out=out/icl \
      [--bigbench_dir=~/.cache/opt_jax/bigbench/benchmark_tasks] [--tasks=rule | --tasks=a,b] \
      [--k_shot=2] [--cloze_text=book.txt] \
      [--validation_ppl=out/validation_ppl | --validation_text=valid.txt] \
      [--max_examples=0] [--seed=0] [--mesh=data:-1] [--batch_size=8] [--dtype=float32]

  python -m experiments.downstream_icl --lm_eval_results=DIR --suite=MANIFEST \
      --tasks=hellaswag,piqa --metric=acc --ppl_task=lambada_openai --out=DIR

The paper's protocol by default: its 74 BIG-bench tasks (Table 7) found under --bigbench_dir (the
names missing there are listed once in summary.md and the closing summary), 2-shot prompts, and
the option with the highest mean log-prob per token as the prediction. --tasks=rule selects by
the paper's rule instead (73 tasks on bigbench 1.0.0), --tasks=a,b names tasks (an unknown name
is an error naming the closest known ones); --cloze_text adds cloze tasks made from a text.
--bigbench_dir defaults to tools/fetch_bigbench.py's cache; when that is absent and no cloze text
is given the run stops and says how to fetch the tasks; an empty value disables BIG-bench. Task
selection, prompts and requests: experiments.tasks.icl; the analysis: experiments.analysis.icl.

Validation perplexity (the x-axis): --validation_ppl (experiments/validation_ppl.py's CSV or its
folder; --validation_corpus picks a corpus), or --validation_text scored in the same sweep
(token-weighted over the files, windows of the model's length), or missing (NaN: perplexity
correlations and the plots against it are then skipped, and the summary says so).

Outputs in --out:
  icl_results.csv     model, step, params, tokens, flops, validation_ppl, task, n, accuracy (the
                      paper's: per-token normalised), accuracy_summed (lm-eval's acc),
                      accuracy_per_char (lm-eval's acc_norm), correct/incorrect_option_ppl and
                      _tokens, random_baseline, k_shot (experiments.analysis.icl documents each)
  correlations.csv    x, spearman, r2, n (+ p, fit, 95% bootstrap intervals) for the first k_shot;
                      mean_accuracy.csv, correlations_by_metric.csv, predictor_comparison.csv,
                      residuals_by_model.csv, task_groups.csv, final_option_ppl.csv,
                      task_scaling.csv, summary.md, plots/*.{png,pdf} beside it
  lm_eval/            the results as lm-evaluation-harness 0.4 result files, one per checkpoint
                      (<ORG__NAME>/results_step<N>.json, icl.export_lm_eval), for the first k_shot
  k{K}shot/           the same analysis (and lm_eval/) for every further k_shot
  store/, runs/       per-checkpoint results (a re-run scores only what is missing), run manifests
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from experiments import context, perplexity
from experiments.analysis import icl
from experiments.context import Experiment, ExperimentSettings, Outcome
from experiments.tasks import bigbench as bb
from experiments.tasks import icl as icl_tasks
from opt_jax import cli, files, inputs
from opt_jax.errors import InputError

NAME = "downstream_icl"
DEFAULT_K_SHOT = (2,)   # the paper's every figure is 2-shot
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
      None, "BIG-bench tasks to evaluate (default: the paper's 74 of Table 7 found in "
            "--bigbench_dir; 'rule': those passing the paper's selection rule); with "
            "--lm_eval_results: the harness tasks.", key=False)
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
  n_bins: int = cli.option(10, "Bins of the perplexity order for the automatic linearity and "
                           "breakthroughness scores (0: every checkpoint).", ge=0, key=False)
  top_k: int = cli.option(5, "Tasks listed per automatic linearity / breakthroughness ranking.",
                          ge=0, key=False)
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
    if self.tasks and icl_tasks.RULE in self.tasks and len(self.tasks) > 1:
      raise InputError(f"--tasks={','.join(self.tasks)}: {icl_tasks.RULE!r} selects by the "
                       f"paper's rule and cannot be combined with task names")


# The run -----------------------------------------------------------------------------------------

def run(settings: Settings, *, progress: bool = True, run_info: dict | None = None) -> Outcome:
  """Evaluates every checkpoint of the suite on the tasks, writes icl_results.csv and the
  analysis (module docstring). Outcome.table: the results table (None on processes other than
  the main one)."""
  s = settings
  if s.lm_eval_results:
    return run_import(s)
  ctx = Experiment(NAME, s, progress=progress, run_info=run_info)
  tasks = icl_tasks.load_tasks(s.bigbench_dir, s.tasks, s.cloze_text or (),
                               cloze_examples=s.cloze_examples, seed=s.seed)
  items = icl_tasks.make_items(tasks.tasks, s.k_shot, s.seed, s.max_examples or None)
  # Read before scoring: a bad file fails now, not after the sweep.
  val = (perplexity.read_validation_ppl(s.validation_ppl, ctx.suite, s.validation_corpus)
         if s.validation_ppl else {})
  val_scorer = (perplexity.CorpusScorer(inputs.read_corpora(s.validation_text, "validation text"))
                if s.validation_text else None)
  max_length = ctx.max_positions
  encoded: dict[str, icl_tasks.Encoded] = {}   # one encoding per tokenizer
  for name, fp in ctx.fingerprints.items():
    if fp not in encoded:
      encoded[fp] = icl_tasks.encode(items, ctx.tokenizers[name], max_length)
  key = ctx.key(icl_tasks.items_digest(items), max_length, val_scorer and val_scorer.digest())

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
  ctx.skipped += icl_tasks.skip_lines(tasks)
  if not ctx.is_main:
    return ctx.outcome(None, evaluated=evaluated)

  ppl_of = ((lambda m, step, arrays: val_scorer.ppl(arrays, "validation/")) if val_scorer else
            (lambda m, step, arrays: val.get((m.name, step), np.nan)))
  table, too_long = results_table(ctx, key, items, encoded, ppl_of)
  ctx.write_csv(RESULTS_CSV, table)
  notes = [*tasks.notes, *_validation_notes(ctx, val), *too_long,
           f"seed {s.seed}; at most {s.max_examples or 'all'} examples per task"]
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


def results_table(ctx: Experiment, key, items: Sequence[icl_tasks.Item],
                  encoded: dict[str, icl_tasks.Encoded], ppl_of) -> tuple[pd.DataFrame, list[str]]:
  """(the icl_results table of every checkpoint, one note per task with examples longer than
  the window); ppl_of(model, step, stored arrays) -> its validation perplexity."""
  rows = []
  for m, step in ctx.checkpoints(key):
    arrays, _ = ctx.read(key, m, step)
    base = {"model": m.name, "step": step, "params": m.params, "tokens": m.tokens(step),
            "flops": m.flops(step), "validation_ppl": ppl_of(m, step, arrays)}
    rows += [{**base, **r} for r in icl_tasks.task_rows(items, encoded[ctx.fingerprints[m.name]],
                                                        arrays["logprob"])]
  if not rows:
    raise InputError(f"every example of every task is longer than the {ctx.max_positions}-token "
                     f"window: nothing to analyse")
  table = pd.DataFrame(rows)
  skipped = table.groupby(["k_shot", "task"])["skipped_examples"].max()
  skipped = skipped[skipped > 0]
  missing = sorted({(it.k, it.task) for it in items} - set(zip(table["k_shot"], table["task"])))
  window = f"{ctx.max_positions}-token window"
  notes = [f"{int(v)} example{'s' if v != 1 else ''} of {t} (k={k}) skipped: an option is "
           f"longer than the {window}"
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


def analyze_and_report(results: pd.DataFrame, out_dir: str, *, notes: Sequence[str] = (),
                       failures: dict[str, str] | None = None,
                       dropped: dict[str, str] | None = None, n_bins: int | None = 10,
                       top_k: int = 5, plots: bool = True) -> tuple[icl.Analysis, list[str]]:
  """Tables, plots and summary.md of one results table into out_dir (the paper's task groups
  among them); returns the analysis and the plots skipped for lack of data (each with its
  reason)."""
  a = icl.analyze(results, groups=bb.TASK_GROUPS, n_bins=n_bins, top_k=top_k)
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
  notes = [f"lm-evaluation-harness results from {s.lm_eval_results}: accuracy is its metric "
           f"{s.metric!r}, validation perplexity its task {s.ppl_task!r}; no random baselines or "
           f"option perplexities"]
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
