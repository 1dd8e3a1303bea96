r"""Validation perplexity of every checkpoint of a suite: the x-axis of every later plot.

  python -m experiments.validation_ppl --suite=suite.json --corpus=valid.txt,wiki.jsonl \
      --out=out/validation_ppl [--mesh=data:-1] [--context_length=2048 --stride=1024] \
      [--batch_size=8] [--dtype=bfloat16]

Every document of every corpus (opt_jax.inputs: .jsonl is JSON lines with a "text" field, any
other file one plain-text document) is scored by every checkpoint with `Scorer.rolling_tokens`
(each token after the leading </s> scored once, windows of context_length with the given
stride). Per checkpoint and corpus: nll = total negative log-likelihood / number of scored tokens
(mean nats per token, token-weighted over documents) and ppl = exp(nll). With several corpora a
pooled row with corpus "all" (token-weighted over every corpus) is added.

Outputs in --out:
  validation_ppl.csv   model, step, params, tokens, flops, corpus, nll, ppl, num_tokens,
                       ppl_vs_neighbours, breaks_from_neighbours (the break rule of
                       experiments/analysis/ppl_breaks.py: a checkpoint much worse than both
                       neighbours on a log-step axis, or a last one much worse than the previous)
  summary.md           the last checkpoints' perplexities and the checkpoints that break
  validation_ppl_vs_steps.{png,pdf}, validation_ppl_vs_flops.{png,pdf}   one line per size,
                       checkpoints that break marked with red crosses
  store/               per-checkpoint results (resumable: a re-run scores only what is missing)
  runs/                run manifests (settings, suite, versions, times)

Results are keyed by the corpora's contents, the windows, the dtype and the tokenizer, so a run
with other corpora, windows or dtype never reuses stale numbers. Other experiments read the CSV
with experiments.perplexity.read_validation_ppl.
"""

from __future__ import annotations

import dataclasses

from experiments import context, perplexity
from experiments.analysis import ppl_breaks
from experiments.context import Experiment, ExperimentSettings, Outcome
from opt_jax import cli, inputs

NAME = "validation_ppl"
CSV_NAME = perplexity.CSV_NAME
SUMMARY_NAME = "summary.md"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(ExperimentSettings):
  corpus: tuple[str, ...] = cli.option(
      help="One or more text files: .jsonl (JSON lines with a \"text\" field) or any other file "
           "(one plain-text document).", key=False)   # their contents are in the key
  context_length: int | None = cli.option(
      None, "Window length in tokens (default: each model's max_position_embeddings).", ge=2)
  stride: int | None = cli.option(None, "New tokens per window (default: context_length).", ge=1)
  plots: bool = cli.option(True, "Draw the plots (PNG and PDF).", key=False)


def run(settings: Settings, *, progress: bool = True, run_info: dict | None = None) -> Outcome:
  """Scores every checkpoint on every corpus; writes the CSV and plots (module docstring).
  Outcome.table: the table (perplexity.COLUMNS), nll in nats per token, ppl = exp(nll)."""
  ctx = Experiment(NAME, settings, progress=progress, run_info=run_info)
  corpora = inputs.read_corpora(settings.corpus, reserved=(perplexity.POOLED,))
  scorer = perplexity.CorpusScorer(corpora, *ctx.window(settings.context_length, settings.stride))
  key = ctx.key(scorer.digest())

  def evaluate(model, step, config, params):
    arrays, total = scorer(ctx.scorer(model, config, params), ctx.tokenizers[model.name])
    return arrays, {"num_tokens": total, "corpora": [c.name for c in corpora]}

  ctx.say(f"{ctx.describe_suite()}; "
          f"{cli.plural(sum(len(c.documents) for c in corpora), 'document')} of "
          f"{cli.plural(len(corpora), 'corpus file')}")
  ctx.sweep(evaluate, key, max_length=settings.context_length)
  table = perplexity.ppl_table(ctx.checkpoints(key), lambda m, s: ctx.read(key, m, s), scorer)
  table = ppl_breaks.flag_breaks(table)
  written = [ctx.write_csv(CSV_NAME, table, float_format="%.8g")]
  results = headline(table)
  ctx.write_text(SUMMARY_NAME, "# Validation perplexity\n\n" + "".join(f"- {r}\n" for r in results)
                 + "\n" + ppl_breaks.breaks_markdown(table))
  if settings.plots and ctx.is_main:
    from experiments.analysis import ppl_plots  # pylint: disable=import-outside-toplevel
    written += ppl_plots.plot_validation_ppl(table, ctx.out_dir)
  ctx.skipped += [f"{c.skipped} empty document(s) of {c.path}" for c in corpora if c.skipped]
  return ctx.outcome(table if ctx.is_main else None, results=results,
                     files_=[CSV_NAME, SUMMARY_NAME, "validation_ppl_vs_{steps,flops}.{png,pdf}"]
                     if settings.plots else [CSV_NAME, SUMMARY_NAME],
                     evaluated=[f"{table['num_tokens'].max():,} tokens per checkpoint"
                                if len(table) else "no tokens"])


def headline(table) -> list[str]:
  """'validation perplexity at the last checkpoint: tiny-a 152.3 (step 40), ...'."""
  if table.empty:
    return []
  corpus = perplexity.POOLED if (table["corpus"] == perplexity.POOLED).any() else \
      table["corpus"].iloc[0]
  last = table[table["corpus"] == corpus].sort_values("step").groupby("model", sort=False).last()
  last = last.sort_values("params")
  lines = ["validation perplexity at each size's last checkpoint"
           + (f" ({corpus})" if corpus == perplexity.POOLED else "") + ": "
           + ", ".join(f"{m} {r.ppl:.4g} (step {int(r.step)})" for m, r in last.iterrows())]
  if ppl_breaks.BREAK_COLUMNS[1] in table:
    bad = table[table[ppl_breaks.BREAK_COLUMNS[1]] & (table["corpus"] == corpus)]
    if not bad.empty:
      lines.append(f"{len(bad)} checkpoint(s) break from their neighbours (see summary.md): "
                   + ", ".join(f"{r.model} step {int(r.step)}" for r in bad.itertuples()))
  return lines


if __name__ == "__main__":
  context.main(Settings, run)
