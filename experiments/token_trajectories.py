r"""Token-level loss trajectories across model sizes (Xia et al. 2023, section 3).

  python -m experiments.token_trajectories --suite=suite.json --corpus=book.txt --out=out/tt \
      --context_length=1024 --stride=512 --mesh=data:-1

Scores every token of the corpus with every checkpoint of every size (Scorer.rolling_tokens
through opt_jax.sweep: resumable, one compiled program per size), assembles per size a
[num_tokens, num_checkpoints] float32 loss matrix (nats) with token ids and positions, then runs
experiments.analysis.trajectories.analyze: trends per start fraction, agreement between sizes at
matched steps and matched validation perplexity, double descent; CSV tables, plots, summary.md.

Layout of --out:
  store/token_trajectories/<tag>/<model>/<step>.npz     per-checkpoint log-probs (resumable)
  store/token_trajectories_matrix/<tag>/<model>.npz     losses [N, C] f32, steps, token_ids,
                                                        positions, documents
  runs/*.json                                           run manifests (settings, suite, versions)
  *.csv, summary.md, plots/                             the analysis
<tag> hashes the tokenised corpus, the tokenizer, the windows, the compute dtype and every other
setting that changes a number: a run on another corpus, window or dtype never reuses stale results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

from experiments import context, perplexity
from experiments.analysis import trajectories, trends
from experiments.context import Experiment, ExperimentSettings, Outcome
from opt_jax import cli, inputs
from opt_jax.errors import InputError

NAME = "token_trajectories"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(ExperimentSettings):
  corpus: tuple[str, ...] = cli.option(
      help="Text files: .jsonl (JSON lines with a \"text\" field, one document each) or any other "
           "file (one plain-text document).", key=False)   # the tokenised corpus is in the key
  context_length: int | None = cli.option(
      None, "Tokens per window (default: the smallest max_position_embeddings of the sizes).", ge=2)
  stride: int | None = cli.option(
      None, "New tokens per window after the first (default: context_length).", ge=1)
  max_tokens: int = cli.option(0, "Score only the first N tokens of the corpus (0: all).", ge=0)
  # Analysis only (applied to the stored results): not part of the key.
  start_fractions: tuple[float, ...] = cli.option(
      (0.1, 0.3, 0.7), "Trend fits start at the checkpoint nearest fraction x last step.",
      ge=0, le=1, key=False)
  alpha: float = cli.option(0.05, "Significance level of the slope t-test.", gt=0, lt=1,
                            key=False)
  quantity: str = cli.option("perplexity", "Per-token quantity whose trend is fitted.",
                             choices=trajectories.QUANTITIES, key=False)
  ema: float = cli.option(0.7, "EMA weight of the double-descent smoothing (0: none).", ge=0, lt=1,
                          key=False)
  min_rise: float = cli.option(0.5, "Double descent: each fall/rise changes the smoothed "
                               "perplexity by at least this relative amount.", gt=0, key=False)
  validation_ppl: str | None = cli.option(
      None, "validation_ppl.csv (or its folder) of experiments/validation_ppl.py (default: the "
            "perplexity of this corpus).", key=False)
  validation_corpus: str | None = cli.option(None, "Corpus of --validation_ppl to use.", key=False)
  num_examples: int = cli.option(5, "Double-descent examples per size and start fraction.", ge=0,
                                 key=False)
  plots: bool = cli.option(True, "Draw the plots (PNG and PDF).", key=False)


@dataclasses.dataclass
class Corpus:
  """The tokenised corpus. documents[d]: ids of document d (`Tokenizer.encode_documents`), whose
  first id is not scored (OPT's </s>; for a family without a prefix, the text's first token).

  Scored tokens, in order, are documents[d][1:] for every d: token_ids [N], positions [N] (index
  within its document's ids, >= 1), document [N].
  """

  names: list[str]
  documents: list[list[int]]
  token_ids: np.ndarray
  positions: np.ndarray
  document: np.ndarray

  @property
  def num_tokens(self) -> int:
    return int(self.token_ids.shape[0])


def tokenize_corpus(names, texts, tokenizer) -> Corpus:
  """Encodes each text for rolling scoring (`Tokenizer.encode_documents`: its first id, e.g. OPT's
  </s>, is context only); texts are non-empty (opt_jax.inputs drops empty ones)."""
  documents = tokenizer.encode_documents(list(texts))
  token_ids = np.concatenate([np.asarray(d[1:], np.int32) for d in documents])
  positions = np.concatenate([np.arange(1, len(d), dtype=np.int32) for d in documents])
  document = np.concatenate([np.full(len(d) - 1, i, np.int32) for i, d in enumerate(documents)])
  return Corpus(list(names), documents, token_ids, positions, document)


def describe_token(corpus: Corpus, tokenizer, row: int, left: int = 24, right: int = 6) -> str:
  """Scored token `row` in its text: 'up to `left` tokens before[[the token]]`right` after'.
  The context starts at the document's first id: a prefix such as OPT's </s> decodes to
  nothing, and without one (Pythia, OLMo) it is the text's first token."""
  doc = corpus.documents[int(corpus.document[row])]
  p = int(corpus.positions[row])
  before = tokenizer.decode(doc[max(0, p - left):p])
  after = tokenizer.decode(doc[p + 1:p + 1 + right])
  return f"{before}[[{tokenizer.decode([doc[p]], skip_special_tokens=False)}]]{after}"


def _truncate(corpus: Corpus, max_tokens: int) -> Corpus:
  """The first max_tokens scored tokens (whole documents, the last one cut)."""
  documents, left = [], max_tokens
  for doc in corpus.documents:
    if left <= 0:
      break
    documents.append(doc[:left + 1])
    left -= len(documents[-1]) - 1
  keep = corpus.document < len(documents)
  return Corpus(corpus.names[:len(documents)], documents, corpus.token_ids[keep][:max_tokens],
                corpus.positions[keep][:max_tokens], corpus.document[keep][:max_tokens])


def _check_windows(suite, start_fractions) -> None:
  """Fails before any scoring when a start fraction keeps fewer than 3 checkpoints of a size."""
  problems = []
  for m in suite.models:
    steps = np.asarray(m.steps, np.float64)
    for f in start_fractions:
      kept = steps.shape[0] - trends.start_index(steps, f) if steps.size else 0
      if kept < 3:
        problems.append(f"model {m.name!r} (steps {m.steps}): start fraction {f} keeps {kept} "
                        f"checkpoint(s)")
  if problems:
    raise InputError("--start_fractions: the trend t-test needs at least 3 checkpoints after the "
                     "start fraction:\n  " + "\n  ".join(problems))


def run(settings: Settings, *, progress: bool = True, run_info: dict | None = None) -> Outcome:
  """The whole experiment (module docstring). Outcome.analysis: trajectories.Analysis (None on
  processes other than the main one)."""
  s = settings
  ctx = Experiment(NAME, s, progress=progress, run_info=run_info)
  _check_windows(ctx.suite, s.start_fractions)
  context_length, stride = ctx.window(s.context_length, s.stride)
  context_length = context_length or ctx.max_positions
  stride = stride or context_length
  tokenizer = ctx.one_tokenizer("token trajectories need the same tokens for every size")
  files = inputs.read_corpora(s.corpus)
  docs = inputs.documents(files)
  corpus = tokenize_corpus([d.source for d in docs], [d.text for d in docs], tokenizer)
  if s.max_tokens and corpus.num_tokens > s.max_tokens:
    corpus = _truncate(corpus, s.max_tokens)
  if corpus.num_tokens < context_length:
    raise InputError(f"--corpus {', '.join(s.corpus)} has {corpus.num_tokens} tokens, shorter "
                     f"than one window of context_length={context_length}: use a longer text or "
                     f"a smaller --context_length")
  # Read before hours of scoring, so a wrong file or model name fails now.
  val = (perplexity.read_validation_ppl(s.validation_ppl, ctx.suite, s.validation_corpus)
         if s.validation_ppl else None)
  key = ctx.key(_digest(corpus.documents), context_length, stride)

  def evaluate(model, step, config, params):
    logprobs = ctx.scorer(model, config, params).rolling_tokens(corpus.documents, context_length,
                                                                stride)
    flat = np.concatenate(logprobs).astype(np.float32)                     # [N] nats
    return {"logprobs": flat}, {"num_tokens": int(flat.shape[0]), "context_length": context_length,
                                "stride": stride}

  ctx.say(f"{ctx.describe_suite()}; {corpus.num_tokens:,} tokens of {len(corpus.documents)} "
          f"document(s), windows of {context_length} advancing by {stride}")
  ctx.sweep(evaluate, key, max_length=context_length)
  ctx.skipped += [f"{c.skipped} empty document(s) of {c.path}" for c in files if c.skipped]
  evaluated = [f"{corpus.num_tokens:,} tokens of {len(corpus.documents)} document(s) per "
               f"checkpoint"]
  if not ctx.is_main:
    return ctx.outcome(None, evaluated=evaluated)
  models = [_matrix(ctx, key, m, corpus, val, (context_length, stride)) for m in ctx.suite.models]

  result = trajectories.analyze(
      models, corpus.token_ids, corpus.positions, start_fractions=s.start_fractions,
      alpha=s.alpha, quantity=s.quantity, ema=s.ema, min_rise=s.min_rise,
      num_examples=s.num_examples,
      describe_token=lambda row: describe_token(corpus, tokenizer, row),
      progress=lambda message: ctx.say(f"analysis: {message}"))
  shown = ", ".join(corpus.names[:3]) + (" ..." if len(corpus.names) > 3 else "")
  notes = [f"Corpus: {shown} ({len(corpus.documents)} documents, {corpus.num_tokens} tokens); "
           f"context_length {context_length}, stride {stride}.",
           "Validation perplexity: " + (f"{s.validation_ppl}" if s.validation_ppl else
           "token-weighted perplexity of the scored corpus itself (no --validation_ppl).")]
  written = _write(ctx, result, models, notes, s.plots)
  return ctx.outcome(result.percentages, analysis=result, evaluated=evaluated,
                     results=headline(result), files_=written)


def _matrix(ctx: Experiment, key, m, corpus: Corpus, val, windows
            ) -> trajectories.ModelTrajectories:
  """One size's [N, C] loss matrix from the store (also stored as one file)."""
  kept = [step for model, step in ctx.checkpoints(key) if model.name == m.name]
  losses = np.empty((corpus.num_tokens, len(kept)), np.float32)            # [N, C] nats
  for c, step in enumerate(kept):
    lp = ctx.read(key, m, step)[0]["logprobs"]
    if lp.shape != (corpus.num_tokens,):
      raise InputError(f"{ctx.store.path((*key, m.name, step))}: {lp.shape[0]} token log-probs, "
                       f"expected {corpus.num_tokens} (the corpus's scored tokens): mismatched "
                       f"token counts; delete the file to rescore it")
    losses[:, c] = -lp
  steps = np.asarray(kept, np.int64)
  if val is None:
    val_ppl = np.exp(losses.astype(np.float64).mean(0))                    # this corpus, per token
  else:
    val_ppl = np.asarray([val.get((m.name, int(step)), math.nan) for step in steps])
    if np.isnan(val_ppl).any():
      ctx.skipped.append(f"model {m.name}: no validation perplexity for steps "
                         f"{steps[np.isnan(val_ppl)].tolist()} (left out of matched-perplexity "
                         f"comparisons)")
  ctx.store.write((f"{NAME}_matrix", key[1], m.name),
                  {"losses": losses, "steps": steps, "token_ids": corpus.token_ids,
                   "positions": corpus.positions, "documents": corpus.document},
                  {"model": m.name, "units": "nats", "corpus": list(corpus.names),
                   "context_length": int(windows[0]), "stride": int(windows[1])})
  return trajectories.ModelTrajectories(
      name=m.name, steps=steps, losses=losses,
      tokens=np.asarray([m.tokens(int(s)) for s in steps], np.float64),
      flops=np.asarray([m.flops(int(s)) for s in steps], np.float64), val_ppl=val_ppl,
      params=m.params)


def _write(ctx: Experiment, result, models, notes, plots: bool) -> list[str]:
  """The analysis's CSVs, plots and summary.md into the output folder; returns the main ones."""
  for fraction in result.settings["start_fractions"]:
    # 9 significant digits: a third smaller and faster to write than repr-exact floats.
    ctx.write_csv(f"token_labels_f{fraction:g}.csv", result.token_labels(models, fraction),
                  float_format="%.9g")
  for stem, table in result.tables().items():
    ctx.write_csv(f"{stem}.csv", table)
  if plots:
    from experiments.analysis import trajectory_plots  # pylint: disable=import-outside-toplevel
    ctx.say("analysis: plots")
    trajectory_plots.plot_all(result, models, ctx.path("plots"))
  ctx.write_text("summary.md", trajectories.summary_markdown(result, models, notes=notes))
  return ["summary.md", *(f"{stem}.csv" for stem in result.tables()), "token_labels_f*.csv",
          *(["plots/"] if plots else [])]


def _digest(documents) -> str:
  """sha256 of the token ids of every document (their boundaries included)."""
  h = hashlib.sha256()
  for doc in documents:
    h.update(np.asarray(doc, np.int64).tobytes() + b"|")
  return h.hexdigest()


def headline(result) -> list[str]:
  """Trend shares per size at the first start fraction, and agreement at matched perplexity."""
  pct = result.percentages
  f = pct["start_fraction"].iloc[0]
  sub = pct[pct["start_fraction"] == f].pivot_table(index="model", columns="label",
                                                   values="percent", sort=False)
  lines = [f"start fraction {f:g}: " + "; ".join(
      f"{m} " + ", ".join(f"{sub.loc[m, label]:.1f}% {label}" for label in trends.LABELS[:3]
                          if label in sub.columns) for m in sub.index)]
  matched = result.agreement[result.agreement["comparison"] == "matched_ppl"]
  kappas = [f"{r.model_a}/{r.model_b} {r.kappa:.3f}" for r in matched.itertuples()
            if np.isfinite(r.kappa)]
  if kappas:
    lines.append("Cohen's kappa of trend labels at matched validation perplexity: "
                 + ", ".join(kappas))
  return lines


if __name__ == "__main__":
  context.main(Settings, run)
