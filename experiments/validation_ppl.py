r"""Validation perplexity of every checkpoint of a suite: the x-axis of every later plot.

  python -m experiments.validation_ppl --suite=suite.json --corpus=valid.txt,wiki.jsonl \
      --out=out/validation_ppl [--mesh=data:-1] [--context_length=2048 --stride=1024] \
      [--batch_size=8] [--dtype=bfloat16]

Every text of every corpus is scored by every checkpoint with `Scorer.loglikelihood_rolling`
(each token after the leading </s> scored once, sliding windows of context_length with the given
stride). Per checkpoint and corpus: nll = total negative log-likelihood / number of scored tokens
(mean nats per token, token-weighted over documents) and ppl = exp(nll). With several corpora a
pooled row with corpus "all" (token-weighted over every corpus) is added.

Outputs in --out:
  validation_ppl.csv   model, step, params, tokens, flops, corpus, nll, ppl, num_tokens
  validation_ppl_vs_steps.{png,pdf}, validation_ppl_vs_flops.{png,pdf}   one line per size
  store/               per-checkpoint results (resumable: a re-run scores only what is missing)
  runs/                run manifests (flags, suite, versions, times)

Results are keyed by a fingerprint of the corpora's contents and the scoring settings, so a run
with other corpora or another context length never reuses stale numbers.

Other experiments reuse `compute_validation_ppl` / `read_validation_ppl` for their x-axis.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from opt_jax import files

CSV_NAME = "validation_ppl.csv"
COLUMNS = ["model", "step", "params", "tokens", "flops", "corpus", "nll", "ppl", "num_tokens"]
POOLED = "all"


@dataclasses.dataclass(frozen=True)
class Corpus:
  """name: the CSV's corpus column (file name without extension); texts: one per document."""
  name: str
  path: str
  texts: tuple[str, ...]


def load_corpus(path: str | os.PathLike, name: str | None = None) -> Corpus:
  """A .txt file is one document; .jsonl has one document per line: {"text": ...} or a string.

  Raises ValueError naming the file (and line) for empty corpora or malformed lines.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"corpus file not found: {path}")
  with open(path, encoding="utf-8") as f:
    content = f.read()
  texts: list[str] = []
  if path.endswith(".jsonl"):
    for i, line in enumerate(content.splitlines(), 1):
      if not line.strip():
        continue
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
      text = item.get("text") if isinstance(item, dict) else item
      if not isinstance(text, str):
        raise ValueError(f"{path}:{i}: expected a JSON string or an object with a string "
                         f"\"text\" field, got {line[:80]!r}")
      if text.strip():
        texts.append(text)
  elif path.endswith(".txt"):
    if content.strip():
      texts.append(content)
  else:
    raise ValueError(f"{path}: unknown corpus format; expected .txt (one document) or .jsonl "
                     "(one {\"text\": ...} per line)")
  if not texts:
    raise ValueError(f"{path}: the corpus has no non-empty document")
  default = os.path.splitext(os.path.basename(path))[0]
  return Corpus(name=name or default, path=path, texts=tuple(texts))


def load_corpora(paths: Sequence[str | os.PathLike]) -> list[Corpus]:
  """load_corpus of each path; names made unique (a.txt and dir2/a.txt -> a, a_2)."""
  if not paths:
    raise ValueError("no corpus given: pass at least one .txt or .jsonl file")
  corpora, used = [], set()
  for p in paths:
    c = load_corpus(p)
    name, k = c.name, 1
    while name in used or name == POOLED:
      k += 1
      name = f"{c.name}_{k}"
    used.add(name)
    corpora.append(dataclasses.replace(c, name=name))
  return corpora


def fingerprint(corpora: Sequence[Corpus], context_length: int | None, stride: int | None,
                dtype: str) -> str:
  """12 hex digits identifying what the numbers depend on (texts, windows, compute dtype)."""
  h = hashlib.sha256()
  h.update(json.dumps({"context_length": context_length, "stride": stride, "dtype": dtype}
                      ).encode())
  for c in corpora:
    h.update(c.name.encode() + b"\0")
    for t in c.texts:
      h.update(hashlib.sha256(t.encode()).digest())
  return h.hexdigest()[:12]


def corpus_scorer(corpora: Sequence[Corpus], context_length: int | None, stride: int | None):
  """score(scorer, tokenizer) -> (arrays, num_tokens): per corpus and document, the summed
  negative log-likelihood (float64 nats) and the number of scored tokens. Each tokenizer encodes
  the corpora once, not once per checkpoint."""
  encoded: dict[str, list[list[list[int]]]] = {}

  def score(scorer, tok) -> tuple[dict[str, np.ndarray], int]:
    fp = tok.fingerprint()
    if fp not in encoded:
      encoded[fp] = [tok.encode_batch(list(c.texts)) for c in corpora]
    arrays, total = {}, 0
    for c, ids in zip(corpora, encoded[fp]):
      lps = scorer.rolling_tokens(ids, context_length, stride)
      arrays[f"{c.name}/nll_sum"] = np.array([-np.sum(x, dtype=np.float64) for x in lps])
      arrays[f"{c.name}/num_tokens"] = np.array([len(x) for x in lps], np.int64)
      total += int(arrays[f"{c.name}/num_tokens"].sum())
    return arrays, total
  return score


def make_evaluator(corpora: Sequence[Corpus], cache: Any, context_length: int | None,
                   stride: int | None):
  """The sweep's evaluate(model, step, config, params): corpus_scorer's arrays per checkpoint."""
  score = corpus_scorer(corpora, context_length, stride)

  def evaluate(model, step, config, params):
    tok = cache.tokenizer(model)
    arrays, total = score(cache.get(config, params, tok), tok)
    return arrays, {"num_tokens": total, "corpora": [c.name for c in corpora]}
  return evaluate


def ppl_table(suite: Any, store: Any, experiment: Sequence[str], corpus_names: Sequence[str]
              ) -> pd.DataFrame:
  """The tidy table of every checkpoint in `store` under `experiment` (COLUMNS)."""
  rows = []
  for m, step, _ in suite.checkpoints():
    key = (*experiment, m.name, step)
    if not store.has(key):
      continue
    arrays, _ = store.read(key)
    base = {"model": m.name, "step": step, "params": m.params, "tokens": m.tokens(step),
            "flops": m.flops(step)}
    pooled_nll, pooled_n = 0.0, 0
    for name in corpus_names:
      nll_sum = float(arrays[f"{name}/nll_sum"].sum())
      n = int(arrays[f"{name}/num_tokens"].sum())
      pooled_nll, pooled_n = pooled_nll + nll_sum, pooled_n + n
      rows.append({**base, "corpus": name, **_nll_ppl(nll_sum, n)})
    if len(corpus_names) > 1:
      rows.append({**base, "corpus": POOLED, **_nll_ppl(pooled_nll, pooled_n)})
  return pd.DataFrame(rows, columns=COLUMNS)


def _nll_ppl(nll_sum: float, n: int) -> dict[str, Any]:
  nll = nll_sum / n if n else math.nan
  return {"nll": nll, "ppl": math.exp(nll) if n else math.nan, "num_tokens": n}


def compute_validation_ppl(suite: Any, corpus_paths: Sequence[str | os.PathLike], out_dir: str, *,
                           mesh: Any = None, context_length: int | None = None,
                           stride: int | None = None, batch_size: int = 8,
                           dtype: str = "float32", prefetch: bool = True, progress: bool = True,
                           plots: bool = True, run_info: Mapping[str, Any] | None = None
                           ) -> pd.DataFrame:
  """Scores every checkpoint of `suite` on every corpus; writes the CSV and plots to out_dir.

  suite: an opt_jax.suite.Suite. context_length: window length in tokens (default: the model's
  max_position_embeddings); stride: new tokens per window (default context_length: disjoint
  windows). dtype: "float32" or "bfloat16" parameters and compute (log-probs are fp32).
  Returns the table (COLUMNS); nll in nats per token, ppl = exp(nll).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from opt_jax import results, sharding, sweep  # pylint: disable=import-outside-toplevel

  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r}: expected float32, bfloat16 or float16")
  corpora = load_corpora(corpus_paths)
  os.makedirs(out_dir, exist_ok=True)
  store = results.ResultStore(os.path.join(out_dir, "store"))
  experiment = ("validation_ppl", fingerprint(corpora, context_length, stride, dtype))
  cache = sweep.ScorerCache(batch_size=batch_size, max_length=context_length,
                            dtype=getattr(jnp, dtype), mesh=mesh)
  info = {"corpora": {c.name: c.path for c in corpora}, "context_length": context_length,
          "stride": stride, "batch_size": batch_size, "dtype": dtype, **dict(run_info or {})}
  sweep.run_sweep(suite, make_evaluator(corpora, cache, context_length, stride), store,
                  experiment=experiment, prefetch=prefetch, mesh=mesh, progress=progress,
                  dtype=None if dtype == "float32" else getattr(jnp, dtype), run_info=info,
                  out_dir=out_dir)
  cache.clear()
  df = ppl_table(suite, store, experiment, [c.name for c in corpora])
  if sharding.is_main_process():
    files.write_csv(df, os.path.join(out_dir, CSV_NAME), float_format="%.8g")
    if plots:
      from experiments.analysis import ppl_plots  # pylint: disable=import-outside-toplevel
      ppl_plots.plot_validation_ppl(df, out_dir)
  return df


def read_validation_ppl(path: str | os.PathLike, corpus: str | None = None, *, suite: Any = None
                        ) -> dict[tuple[str, int], float]:
  """{(model, step): ppl} from a validation_ppl.csv (a file, or the folder holding it).

  corpus: which corpus's perplexity; default the pooled "all" row when present, else the only
  corpus (ValueError when several corpora and no pooled row).
  suite: if given, the CSV's model names (suite names or aliases) are mapped to the suite's names
  and rows of models outside the suite are dropped.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, CSV_NAME)
  df = pd.read_csv(path)
  missing = [c for c in ("model", "step", "corpus", "ppl") if c not in df.columns]
  if missing:
    raise ValueError(f"{path}: missing column(s) {missing}; expected {COLUMNS}")
  names = list(dict.fromkeys(df["corpus"]))
  if corpus is None:
    if POOLED in names:
      corpus = POOLED
    elif len(names) == 1:
      corpus = names[0]
    else:
      raise ValueError(f"{path}: several corpora {names}; say which one (corpus=...)")
  if corpus not in names:
    raise ValueError(f"{path}: no corpus {corpus!r}; corpora: {names}")
  sub = df[df["corpus"] == corpus]
  table = {(str(m), int(s)): float(p) for m, s, p in zip(sub["model"], sub["step"], sub["ppl"])}
  if suite is None:
    return table
  return {(m.name, step): ppl for (name, step), ppl in table.items()
          for m in suite.models if m.matches(name)}


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel

  from opt_jax import sharding, suite  # pylint: disable=import-outside-toplevel

  del argv
  f = flags.FLAGS
  sharding.initialize_distributed()
  s = suite.load_suite(f.suite).select(f.models)
  mesh = sharding.make_mesh(f.mesh) if f.mesh else None
  df = compute_validation_ppl(
      s, f.corpus, f.out, mesh=mesh, context_length=f.context_length, stride=f.stride,
      batch_size=f.batch_size, dtype=f.dtype, prefetch=f.prefetch,
      run_info={k: getattr(f, k) for k in ("suite", "corpus", "out", "mesh", "context_length",
                                           "stride", "batch_size", "dtype", "models", "prefetch")})
  if sharding.is_main_process():
    print(df.to_string(index=False))
    print(f"wrote {os.path.join(f.out, CSV_NAME)}")


def _define_flags() -> None:
  # Defined only when run as a binary, so other experiments can import this module (and define
  # flags of the same names) without clashes.
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("suite", None, "Suite manifest (.json/.yaml).", required=True)
  flags.DEFINE_list("corpus", None, "One or more .txt (one document) or .jsonl files.",
                    required=True)
  flags.DEFINE_string("out", None, "Output folder.", required=True)
  flags.DEFINE_string("mesh", "", "Device mesh spec, e.g. 'data:-1' or 'data:2,model:4'; "
                      "empty: one device.")
  flags.DEFINE_integer("context_length", None, "Window length in tokens (default: the model's "
                       "max_position_embeddings).")
  flags.DEFINE_integer("stride", None, "New tokens per window (default: context_length).")
  flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                    "Parameter and compute dtype (log-probs are fp32).")
  flags.DEFINE_list("models", None, "Only these models of the suite (names or aliases).")
  flags.DEFINE_bool("prefetch", True, "Restore the next checkpoint while evaluating.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  _define_flags()
  app.run(main)
