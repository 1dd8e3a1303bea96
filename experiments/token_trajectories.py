r"""Token-level loss trajectories across model sizes (Xia et al. 2023, section 3).

  python -m experiments.token_trajectories --suite=suite.json --corpus=book.txt --out=out/tt \
      --context_length=1024 --stride=512 --mesh=data:-1

Scores the corpus (by default the paper's: the first 2048 tokens of each of the first 50
documents) with every checkpoint of every size (Scorer.rolling_tokens through opt_jax.sweep:
resumable, one compiled program per size), assembles per size a [num_tokens, num_checkpoints]
float32 loss matrix (nats) with token ids and positions, then runs
experiments.analysis.trajectories.analyze: the paper's trend labels per start fraction
(0.1 ... 0.7), exp(mean loss) group curves, tokens chosen by reference sizes followed in every size, group-level
double descent; and the extras (agreement between sizes at matched steps and matched validation
perplexity, the per-token double-descent detector); CSV tables, plots, summary.md. The analysis
settings are checked against the suite's steps before any scoring.

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
  # The tokenised corpus's digest is in the key: these two need not be.
  max_documents: int = cli.option(
      50, "Score only the first M documents of the corpus (0: all; the paper: 50).", ge=0,
      key=False)
  document_tokens: int = cli.option(
      2048, "Score only the first N tokens of each document (0: all; the paper: 2048).", ge=0,
      key=False)
  max_tokens: int = cli.option(0, "Then score only the first N tokens in all (0: no cap).", ge=0)
  # Analysis only (applied to the stored results): not part of the key.
  start_fractions: tuple[float, ...] = cli.option(
      trajectories.START_FRACTIONS, "Trend fits start at the checkpoint nearest fraction x last "
      "step (the paper's Figure 2: 0.1 ... 0.7).", ge=0, le=1, key=False)
  alpha: float = cli.option(0.05, "Significance level of the slope t-test.", gt=0, lt=1,
                            key=False)
  quantity: str = cli.option("perplexity", "Per-token quantity whose trend is fitted.",
                             choices=trajectories.QUANTITIES, key=False)
  reference_models: tuple[str, ...] | None = cli.option(
      None, "Sizes (names or aliases) whose selected tokens are followed in every size (default: "
            "every size; the paper: 1.3b and 175b).", key=False)
  selection_fraction: float = cli.option(
      0.1, "Reference sizes select their tokens from the checkpoint nearest this fraction of "
           "their last step.", ge=0, le=1, key=False)
  group_min_change: float = cli.option(
      0.05, "Group-level double descent: the group curve rises and then falls by at least this "
            "relative amount.", gt=0, key=False)
  ema: float = cli.option(0.7, "Per-token double-descent detector (an extra): EMA weight of the "
                          "smoothing (0: none).", ge=0, lt=1, key=False)
  min_rise: float = cli.option(0.5, "Per-token double-descent detector: each fall/rise changes the "
                               "smoothed perplexity by at least this relative amount.", gt=0,
                               key=False)
  validation_ppl: str | None = cli.option(
      None, "validation_ppl.csv (or its folder) of experiments/validation_ppl.py (default: the "
            "perplexity of this corpus).", key=False)
  validation_corpus: str | None = cli.option(None, "Corpus of --validation_ppl to use.", key=False)
  num_examples: int = cli.option(5, "Per-token double-descent examples per size and start "
                                 "fraction.", ge=0, key=False)
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


def select_tokens(corpus: Corpus, max_documents: int = 0, document_tokens: int = 0,
                  max_tokens: int = 0) -> Corpus:
  """The first max_documents documents, each cut to its first document_tokens scored tokens, then
  the first max_tokens scored tokens in all (whole documents, the last one cut); 0: no limit."""
  documents = corpus.documents[:max_documents or None]
  if document_tokens:
    documents = [doc[:document_tokens + 1] for doc in documents]
  if max_tokens:
    cut, left = [], max_tokens
    for doc in documents:
      if left <= 0:
        break
      cut.append(doc[:left + 1])
      left -= len(cut[-1]) - 1
    documents = cut
  token_ids = [np.asarray(d[1:], np.int32) for d in documents]
  return Corpus(corpus.names[:len(documents)], [list(d) for d in documents],
                np.concatenate(token_ids) if token_ids else np.zeros(0, np.int32),
                np.concatenate([np.arange(1, len(d), dtype=np.int32) for d in documents])
                if documents else np.zeros(0, np.int32),
                np.concatenate([np.full(len(d) - 1, i, np.int32) for i, d in enumerate(documents)])
                if documents else np.zeros(0, np.int32))


def _references(suite, names) -> list[str] | None:
  """Suite names of --reference_models (names or aliases); None: every size."""
  if not names:
    return None
  try:
    return [m.name for m in suite.select(list(names)).models]
  except KeyError as e:
    raise InputError(f"--reference_models: {e.args[0]}") from None


def _check_analysis(suite, s: "Settings", references) -> None:
  """Fails before any scoring when the analysis could not run on the suite's steps."""
  problems = trajectories.check_settings(suite.models, s.start_fractions, s.selection_fraction,
                                         references or [])
  if problems:
    raise InputError("--start_fractions / --selection_fraction / --reference_models: "
                     + "\n  ".join(["the analysis cannot run on this suite:", *problems]))


def _plural(n: int, word: str) -> str:
  return f"{n:,} {word}{'' if n == 1 else 's'}"


def run(settings: Settings, *, progress: bool = True, run_info: dict | None = None) -> Outcome:
  """The whole experiment (module docstring). Outcome.analysis: trajectories.Analysis (None on
  processes other than the main one)."""
  s = settings
  ctx = Experiment(NAME, s, progress=progress, run_info=run_info)
  references = _references(ctx.suite, s.reference_models)
  _check_analysis(ctx.suite, s, references)
  context_length, stride = ctx.window(s.context_length, s.stride)
  context_length = context_length or ctx.max_positions
  stride = stride or context_length
  tokenizer = ctx.one_tokenizer("token trajectories need the same tokens for every size")
  files = inputs.read_corpora(s.corpus)
  docs = inputs.documents(files)
  corpus = select_tokens(tokenize_corpus([d.source for d in docs], [d.text for d in docs],
                                         tokenizer), s.max_documents, s.document_tokens,
                         s.max_tokens)
  if corpus.num_tokens < context_length:
    raise InputError(f"--corpus {', '.join(s.corpus)} has {corpus.num_tokens} tokens (after "
                     f"--max_documents={s.max_documents}, --document_tokens={s.document_tokens}, "
                     f"--max_tokens={s.max_tokens}), shorter than one window of "
                     f"context_length={context_length}: use a longer text, raise those limits or "
                     f"use a smaller --context_length")
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

  ctx.say(f"{ctx.describe_suite()}; {_plural(corpus.num_tokens, 'token')} of "
          f"{_plural(len(corpus.documents), 'document')}, windows of {context_length} advancing by "
          f"{stride}")
  ctx.sweep(evaluate, key, max_length=context_length)
  ctx.skipped += [f"{c.skipped} empty document(s) of {c.path}" for c in files if c.skipped]
  evaluated = [f"{_plural(corpus.num_tokens, 'token')} of "
               f"{_plural(len(corpus.documents), 'document')} per checkpoint"]
  if not ctx.is_main:
    return ctx.outcome(None, evaluated=evaluated)
  models = [_matrix(ctx, key, m, corpus, val, (context_length, stride)) for m in ctx.suite.models]

  result = trajectories.analyze(
      models, corpus.token_ids, corpus.positions, start_fractions=s.start_fractions,
      alpha=s.alpha, quantity=s.quantity, reference_models=references,
      selection_fraction=s.selection_fraction, group_min_change=s.group_min_change, ema=s.ema,
      min_rise=s.min_rise, num_examples=s.num_examples,
      describe_token=lambda row: describe_token(corpus, tokenizer, row),
      progress=lambda message: ctx.say(f"analysis: {message}"))
  shown = ", ".join(corpus.names[:3]) + (" ..." if len(corpus.names) > 3 else "")
  limits = ", ".join(f"{what} {value}" for what, value in (
      ("first documents", s.max_documents), ("first tokens of each", s.document_tokens),
      ("first tokens in all", s.max_tokens)) if value) or "no limits"
  notes = [f"Corpus: {shown} ({_plural(len(corpus.documents), 'document')}, "
           f"{_plural(corpus.num_tokens, 'token')}; {limits}); context_length {context_length}, "
           f"stride {stride}.",
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
  """Trend shares per size at the first start fraction, group-level double descent, agreement at
  matched perplexity and the analysis time."""
  pct = result.percentages
  f = pct["start_fraction"].iloc[0]
  sub = pct[pct["start_fraction"] == f].pivot_table(index="model", columns="label",
                                                   values="percent", sort=False)
  lines = [f"start fraction {f:g}: " + "; ".join(
      f"{m} " + ", ".join(f"{sub.loc[m, label]:.1f}% {label}" for label in trends.LABELS[:4]
                          if label in sub.columns) for m in sub.index)]
  lines.append(trajectories.group_double_descent_line(result))
  matched = result.agreement[result.agreement["comparison"] == "matched_ppl"]
  kappas = [f"{r.model_a}/{r.model_b} {r.kappa:.3f}" for r in matched.itertuples()
            if np.isfinite(r.kappa)]
  if kappas:
    lines.append("Cohen's kappa of trend labels at matched validation perplexity: "
                 + ", ".join(kappas))
  num_tokens = result.token_ids.shape[0]
  lines.append(f"analysis (labels, curves, tables; plots apart): {result.seconds:.2f} s for "
               f"{_plural(num_tokens, 'token')} x {_plural(len(result.selections), 'size')} x "
               f"{_plural(len(result.settings['start_fractions']), 'start fraction')}")
  return lines


if __name__ == "__main__":
  context.main(Settings, run)
