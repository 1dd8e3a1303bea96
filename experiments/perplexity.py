"""Validation perplexity: scoring corpora in a sweep, the validation_ppl.csv table, and its lookup.

Every experiment's x axis is the validation perplexity of each checkpoint. It comes from one of
  * `read_validation_ppl`: the CSV experiments/validation_ppl.py writes (or its folder), mapped
    to the suite's model names (CSV names may be suite names or aliases);
  * `CorpusScorer`: corpora scored by the same sweep (each token after the leading </s> scored
    once in windows of context_length advancing by stride; nll = total NLL / scored tokens,
    token-weighted over documents; ppl = exp(nll)).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from opt_jax import inputs
from opt_jax.errors import InputError, MissingFileError

CSV_NAME = "validation_ppl.csv"
COLUMNS = ["model", "step", "params", "tokens", "flops", "corpus", "nll", "ppl", "num_tokens"]
POOLED = "all"


class CorpusScorer:
  """Scores corpora with a Scorer: per corpus and document, the summed NLL (float64 nats) and
  the number of scored tokens. Each tokenizer encodes the corpora once, not once per checkpoint.

  Stored arrays (under `prefix`): "<corpus name>/nll_sum" [documents], "<name>/num_tokens".
  """

  def __init__(self, corpora: Sequence[inputs.Corpus], context_length: int | None = None,
               stride: int | None = None):
    self.corpora = list(corpora)
    self.context_length, self.stride = context_length, stride
    self._encoded: dict[str, list[list[int]]] = {}

  def digest(self) -> dict[str, Any]:
    """What the numbers depend on besides the model: names, texts and windows."""
    return {"corpora": {c.name: inputs.digest_texts(c.texts) for c in self.corpora},
            "context_length": self.context_length, "stride": self.stride}

  def token_lists(self, tok) -> list[list[int]]:
    """Every document of every corpus encoded by `tok` for rolling scoring
    (`Tokenizer.encode_documents`: the first id, e.g. OPT's </s>, is context only), in order."""
    fp = tok.fingerprint()
    if fp not in self._encoded:
      self._encoded[fp] = tok.encode_documents([t for c in self.corpora for t in c.texts])
    return self._encoded[fp]

  def arrays(self, logprobs: Sequence[np.ndarray], prefix: str = "") -> tuple[dict, int]:
    """(arrays, scored tokens) from the per-document log-probs of `token_lists`, in order."""
    out, total, i = {}, 0, 0
    for c in self.corpora:
      lps = logprobs[i:i + len(c.documents)]
      i += len(c.documents)
      out[f"{prefix}{c.name}/nll_sum"] = np.array([-np.sum(x, dtype=np.float64) for x in lps])
      out[f"{prefix}{c.name}/num_tokens"] = np.array([len(x) for x in lps], np.int64)
      total += int(out[f"{prefix}{c.name}/num_tokens"].sum())
    return out, total

  def __call__(self, scorer, tok, prefix: str = "") -> tuple[dict, int]:
    lps = scorer.rolling_tokens(self.token_lists(tok), self.context_length, self.stride)
    return self.arrays(lps, prefix)

  def nll(self, arrays: dict, corpus: inputs.Corpus | None = None, prefix: str = ""
          ) -> tuple[float, int]:
    """(summed NLL, scored tokens) of one corpus, or of every corpus pooled (corpus None)."""
    names = [corpus.name] if corpus is not None else [c.name for c in self.corpora]
    return (sum(float(arrays[f"{prefix}{n}/nll_sum"].sum()) for n in names),
            sum(int(arrays[f"{prefix}{n}/num_tokens"].sum()) for n in names))

  def ppl(self, arrays: dict, prefix: str = "") -> float:
    """Pooled perplexity exp(total NLL / total tokens) of every corpus (NaN without tokens)."""
    return nll_ppl(*self.nll(arrays, prefix=prefix))["ppl"]


def nll_ppl(nll_sum: float, n: int) -> dict[str, Any]:
  """{"nll": mean nats per token, "ppl": exp(nll), "num_tokens": n}; NaN when n == 0."""
  nll = nll_sum / n if n else math.nan
  return {"nll": nll, "ppl": math.exp(nll) if n else math.nan, "num_tokens": n}


def ppl_table(checkpoints: Any, read: Any, scorer: CorpusScorer) -> pd.DataFrame:
  """The tidy table (COLUMNS) of the (model, step) `checkpoints`: one row per corpus, plus a
  pooled row with corpus "all" when there are several. read(model, step) -> (arrays, meta)."""
  rows = []
  for m, step in checkpoints:
    arrays, _ = read(m, step)
    base = {"model": m.name, "step": step, "params": m.params, "tokens": m.tokens(step),
            "flops": m.flops(step)}
    for c in scorer.corpora:
      rows.append({**base, "corpus": c.name, **nll_ppl(*scorer.nll(arrays, c))})
    if len(scorer.corpora) > 1:
      rows.append({**base, "corpus": POOLED, **nll_ppl(*scorer.nll(arrays))})
  return pd.DataFrame(rows, columns=COLUMNS)


def read_validation_ppl(path: str | os.PathLike, suite: Any, corpus: str | None = None
                        ) -> dict[tuple[str, int], float]:
  """{(model, step): ppl} for the suite's checkpoints from a validation_ppl.csv (or its folder).

  corpus: which corpus's rows (default the pooled "all" rows when present, else the only corpus).
  CSV model names may be the suite's names or aliases; rows of other models are ignored.
  Checkpoints without a row are absent from the result (callers use NaN). InputError when the
  file lacks columns, the corpus is ambiguous or unknown, or a model of the suite has no row at
  all (a CSV of another suite).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, CSV_NAME)
  if not os.path.isfile(path):
    raise MissingFileError(f"validation perplexity file not found: {path} (written by "
                           f"python -m experiments.validation_ppl)")
  try:
    df = pd.read_csv(path)
  except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: not a readable CSV ({e})") from None
  missing = [c for c in ("model", "step", "corpus", "ppl") if c not in df.columns]
  if missing:
    raise InputError(f"{path}: missing column(s) {missing}; expected {COLUMNS}")
  names = list(dict.fromkeys(df["corpus"]))
  if corpus is None:
    if POOLED in names:
      corpus = POOLED
    elif len(names) == 1:
      corpus = names[0]
    else:
      raise InputError(f"{path}: several corpora {names}; say which one (--validation_corpus)")
  if corpus not in names:
    raise InputError(f"{path}: no corpus {corpus!r}; corpora: {names}")
  sub = df[df["corpus"] == corpus]
  out: dict[tuple[str, int], float] = {}
  for m in suite.models:
    rows = {int(s): float(p) for name, s, p in zip(sub["model"], sub["step"], sub["ppl"])
            if m.matches(str(name))}
    if not rows:
      raise InputError(f"{path}: no validation perplexity for model {m.name!r} (aliases "
                       f"{list(m.aliases)}); models in the file: "
                       f"{sorted(set(map(str, sub['model'])))}")
    out.update({(m.name, step): ppl for step, ppl in rows.items()})
  return out


def missing_checkpoints(table: dict[tuple[str, int], float], suite: Any) -> list[str]:
  """'model@step' of the suite's checkpoints that `table` has no perplexity for."""
  return [f"{m.name}@{s}" for m, s, _ in suite.checkpoints() if (m.name, s) not in table]
