r"""Token-level loss trajectories across model sizes (Xia et al. 2023, section 3).

  python -m experiments.token_trajectories --suite=suite.json --corpus=book.txt --out=out/tt \
      --context_length=1024 --stride=512 --mesh=data:-1

Scores every token of the corpus with every checkpoint of every size (Scorer.rolling_tokens
through opt_jax.sweep: resumable, one compiled program per size), assembles per size a
[num_tokens, num_checkpoints] float32 loss matrix (nats) with token ids and positions, then runs
experiments.analysis.trajectories.analyze: trends per start fraction, agreement between sizes at
matched steps and matched validation perplexity, double descent; CSV tables, plots, summary.md.

Layout of --out:
  results/token_trajectories/<tag>/<model>/<step>.npz   per-checkpoint log-probs (the sweep's store)
  results/token_trajectories_matrix/<tag>/<model>.npz   losses [N, C] f32, steps, token_ids,
                                                        positions, documents
  runs/*.json                                           run manifests (flags, suite, versions)
  *.csv, summary.md, plots/                             the analysis
<tag> hashes the tokenised corpus, tokenizer, context length and stride: a run on another corpus or
window never reuses stale results.

This file is the library function `run` (tests call it) plus thin absl flags (`main`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Sequence

import numpy as np

from experiments.analysis import trajectories, trends

log = logging.getLogger(__name__)

EXPERIMENT = "token_trajectories"


@dataclasses.dataclass
class Corpus:
  """The tokenised corpus. documents[d] = [</s>, ...] ids of document d (the </s> is not scored).

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


def read_texts(paths: Sequence[str]) -> tuple[list[str], list[str]]:
  """(names, texts): a .txt file is one document; a .jsonl file one document per line ("text")."""
  if not paths:
    raise ValueError("no corpus given: pass --corpus with one or more .txt or .jsonl files")
  names, texts = [], []
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"corpus file not found: {path}")
    if path.endswith(".jsonl"):
      with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
          if not line.strip():
            continue
          try:
            text = json.loads(line)["text"]
          except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {i + 1}: expected a JSON object with a \"text\" string "
                             f"({e})") from None
          names.append(f"{path}:{i + 1}")
          texts.append(text)
    else:
      with open(path, encoding="utf-8") as f:
        names.append(path)
        texts.append(f.read())
  if not texts:
    raise ValueError(f"empty corpus: {list(paths)} hold no documents")
  return names, texts


def tokenize_corpus(names: Sequence[str], texts: Sequence[str], tokenizer) -> Corpus:
  """Encodes each text (OPT: </s> prepended); empty documents are an error naming the file."""
  empty = [n for n, t in zip(names, texts) if not t.strip()]
  if empty:
    raise ValueError(f"empty corpus document(s): {empty[:5]}; every document must contain text")
  documents = tokenizer.encode_batch(list(texts))
  token_ids = np.concatenate([np.asarray(d[1:], np.int32) for d in documents])
  positions = np.concatenate([np.arange(1, len(d), dtype=np.int32) for d in documents])
  document = np.concatenate([np.full(len(d) - 1, i, np.int32) for i, d in enumerate(documents)])
  return Corpus(list(names), documents, token_ids, positions, document)


def corpus_tag(corpus: Corpus, tokenizer_fingerprint: str, context_length: int, stride: int) -> str:
  """Short hash naming the scored data in the results store."""
  h = hashlib.sha256()
  h.update(f"{tokenizer_fingerprint}|{context_length}|{stride}|{len(corpus.documents)}".encode())
  for doc in corpus.documents:
    h.update(np.asarray(doc, np.int64).tobytes() + b"|")
  return h.hexdigest()[:16]


def read_validation_ppl(path: str, suite, corpus: str | None = None) -> dict[str, dict[int, float]]:
  """{model name: {step: perplexity}} from experiments/validation_ppl.py's CSV (or its folder).

  Model names in the CSV may be suite names or aliases. corpus: which corpus's rows (default the
  pooled "all" rows, else the only corpus; see validation_ppl.read_validation_ppl).
  """
  from experiments import validation_ppl  # pylint: disable=import-outside-toplevel

  table = validation_ppl.read_validation_ppl(path, corpus)           # {(model, step): ppl}
  out: dict[str, dict[int, float]] = {}
  for m in suite.models:
    out[m.name] = {step: ppl for (name, step), ppl in table.items() if m.matches(name)}
    if not out[m.name]:
      raise ValueError(f"{path}: no validation perplexity for model {m.name!r} (aliases "
                       f"{list(m.aliases)}); models in the file: "
                       f"{sorted({name for name, _ in table})}")
  return out


def _check_windows(suite, start_fractions: Sequence[float]) -> None:
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
    raise ValueError("the trend t-test needs at least 3 checkpoints after the start fraction:\n  "
                     + "\n  ".join(problems))


def run(suite_path: str, corpus_paths: Sequence[str], out_dir: str, *,
        models: Sequence[str] | None = None, context_length: int | None = None,
        stride: int | None = None, mesh_spec: str | None = None, batch_size: int = 8,
        dtype: str = "float32", start_fractions: Sequence[float] = (0.1, 0.3, 0.7),
        alpha: float = 0.05, quantity: str = "perplexity", ema: float = 0.7,
        min_rise: float = 0.5, validation_ppl: str | None = None,
        validation_corpus: str | None = None, max_tokens: int = 0, num_examples: int = 5,
        plots: bool = True, progress: bool = True, run_info: dict | None = None):
  """The whole experiment; returns trajectories.Analysis (None on processes other than the main one).

  context_length: tokens per window (default: the smallest max_position_embeddings of the sizes);
  stride: new tokens scored per window after the first (default context_length: disjoint windows).
  max_tokens: keep only the first max_tokens scored tokens of the corpus (0: all).
  validation_ppl: CSV of experiments/validation_ppl.py; None: the token-weighted perplexity of
  this corpus itself at each checkpoint.
  """
  import jax.numpy as jnp  # the engine is imported here so that `--help` stays fast

  from opt_jax import checkpoint, sharding, suite as suite_lib, sweep
  from opt_jax.results import ResultStore

  suite = suite_lib.load_suite(suite_path).select(list(models) if models else None)
  _check_windows(suite, start_fractions)
  configs = {m.name: checkpoint.load_config(next(iter(m.checkpoints.values())))
             for m in suite.models}
  max_context = min(c.max_position_embeddings for c in configs.values())
  context_length = int(context_length or max_context)
  if not 2 <= context_length <= max_context:
    raise ValueError(f"context_length={context_length} must be in [2, {max_context}] (the smallest "
                     f"max_position_embeddings of the sizes {list(configs)})")
  stride = int(stride or context_length)
  if not 1 <= stride <= context_length:
    raise ValueError(f"stride={stride} must be in [1, context_length={context_length}]")

  mesh = sharding.make_mesh(mesh_spec) if mesh_spec else None
  compute_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype]
  cache = sweep.ScorerCache(batch_size=batch_size, max_length=context_length, dtype=compute_dtype,
                            mesh=mesh)
  tokenizers_ = {m.name: cache.tokenizer(m) for m in suite.models}
  fingerprints = {name: t.fingerprint() for name, t in tokenizers_.items()}
  if len(set(fingerprints.values())) > 1:
    raise ValueError(f"the sizes use different tokenizers {fingerprints}: token trajectories need "
                     f"the same tokens for every size (mismatched token counts otherwise)")
  tokenizer = tokenizers_[suite.models[0].name]

  names, texts = read_texts(list(corpus_paths))
  corpus = tokenize_corpus(names, texts, tokenizer)
  if max_tokens and corpus.num_tokens > max_tokens:
    corpus = _truncate(corpus, max_tokens)
  if corpus.num_tokens < context_length:
    raise ValueError(f"corpus {list(corpus_paths)} has {corpus.num_tokens} tokens, shorter than one "
                     f"window of context_length={context_length}: use a longer text or a smaller "
                     f"--context_length")
  tag = corpus_tag(corpus, fingerprints[suite.models[0].name], context_length, stride)
  log.info("corpus: %d documents, %d tokens scored per checkpoint; tag %s", len(corpus.documents),
           corpus.num_tokens, tag)

  # Read before hours of scoring, so a wrong file or model name fails now.
  val = read_validation_ppl(validation_ppl, suite, validation_corpus) if validation_ppl else None
  store = ResultStore(os.path.join(out_dir, "results"))
  experiment = (EXPERIMENT, tag)

  def evaluate(model, step, config, params):
    scorer = cache.get(config, params, tokenizer)
    logprobs = scorer.rolling_tokens(corpus.documents, context_length, stride)
    flat = np.concatenate(logprobs).astype(np.float32)                     # [N] nats
    return {"logprobs": flat}, {"num_tokens": int(flat.shape[0]), "tag": tag,
                                "context_length": context_length, "stride": stride}

  info = {"suite": os.path.abspath(suite_path),
          "corpus": [os.path.abspath(p) for p in corpus_paths],
          "context_length": context_length, "stride": stride, "mesh": mesh_spec, "dtype": dtype,
          "batch_size": batch_size, "tag": tag, "num_tokens": corpus.num_tokens,
          **(run_info or {})}
  sweep.run_sweep(suite, evaluate, store, experiment=experiment, mesh=mesh, progress=progress,
                  dtype=None if dtype == "float32" else compute_dtype, run_info=info,
                  out_dir=out_dir)
  cache.clear()
  if not sharding.is_main_process():
    return None

  model_trajectories = []
  for m in suite.models:
    losses = np.empty((corpus.num_tokens, len(m.steps)), np.float32)      # [N, C] nats
    for c, step in enumerate(m.steps):
      arrays, _ = store.read((*experiment, m.name, step))
      lp = arrays["logprobs"]
      if lp.shape != (corpus.num_tokens,):
        raise ValueError(f"{store.path((*experiment, m.name, step))}: {lp.shape[0]} token log-probs, "
                         f"expected {corpus.num_tokens} (the corpus's scored tokens): mismatched "
                         f"token counts; delete the file to rescore it")
      losses[:, c] = -lp
    steps = np.asarray(m.steps, np.int64)
    if val is None:
      val_ppl = np.exp(losses.astype(np.float64).mean(0))                  # this corpus, per token
    else:
      val_ppl = np.asarray([val[m.name].get(int(s), math.nan) for s in steps])
      if np.isnan(val_ppl).any():
        log.warning("model %s: no validation perplexity for steps %s", m.name,
                    steps[np.isnan(val_ppl)].tolist())
    store.write((f"{EXPERIMENT}_matrix", tag, m.name),
                {"losses": losses, "steps": steps, "token_ids": corpus.token_ids,
                 "positions": corpus.positions, "documents": corpus.document},
                {"model": m.name, "units": "nats", "context_length": context_length,
                 "stride": stride, "corpus": list(corpus.names)})
    model_trajectories.append(trajectories.ModelTrajectories(
        name=m.name, steps=steps, losses=losses,
        tokens=np.asarray([m.tokens(int(s)) for s in steps], np.float64),
        flops=np.asarray([m.flops(int(s)) for s in steps], np.float64),
        val_ppl=val_ppl, params=m.params))

  def describe(row: int, left: int = 24, right: int = 6) -> str:
    doc = corpus.documents[int(corpus.document[row])]
    p = int(corpus.positions[row])
    before = tokenizer.decode(doc[max(1, p - left):p])
    after = tokenizer.decode(doc[p + 1:p + 1 + right])
    return f"{before}[[{tokenizer.decode([doc[p]], skip_special_tokens=False)}]]{after}"

  say = (lambda message: log.info("analysis: %s", message)) if progress else None
  shown = ", ".join(corpus.names[:3]) + (" ..." if len(corpus.names) > 3 else "")
  notes = [f"Corpus: {shown} ({len(corpus.documents)} documents, {corpus.num_tokens} tokens); "
           f"context_length {context_length}, stride {stride}.",
           "Validation perplexity: " + (f"{validation_ppl}" if validation_ppl else
           "token-weighted perplexity of the scored corpus itself (no --validation_ppl).")]
  return trajectories.analyze(
      model_trajectories, corpus.token_ids, corpus.positions, out_dir=out_dir,
      start_fractions=start_fractions, alpha=alpha, quantity=quantity, ema=ema, min_rise=min_rise,
      num_examples=num_examples, describe_token=describe, plots=plots, progress=say, notes=notes)


def _truncate(corpus: Corpus, max_tokens: int) -> Corpus:
  """The first max_tokens scored tokens (whole documents, the last one cut)."""
  documents, left = [], max_tokens
  for doc in corpus.documents:
    if left <= 0:
      break
    documents.append(doc[:left + 1])
    left -= len(documents[-1]) - 1
  keep = corpus.document < len(documents)
  token_ids = corpus.token_ids[keep][:max_tokens]
  return Corpus(corpus.names[:len(documents)], documents, token_ids,
                corpus.positions[keep][:max_tokens], corpus.document[keep][:max_tokens])


# --- binary -----------------------------------------------------------------------------------

def main(argv):
  from absl import flags

  from opt_jax import sharding

  del argv
  f = flags.FLAGS
  sharding.initialize_distributed()   # a no-op on one host; multi-host: every process runs this
  run(f.suite, f.corpus, f.out, models=f.models, context_length=f.context_length or None,
      stride=f.stride or None, mesh_spec=f.mesh or None, batch_size=f.batch_size, dtype=f.dtype,
      start_fractions=[float(x) for x in f.start_fractions], alpha=f.alpha, quantity=f.quantity,
      ema=f.ema, min_rise=f.min_rise, validation_ppl=f.validation_ppl,
      validation_corpus=f.validation_corpus, max_tokens=f.max_tokens,
      num_examples=f.num_examples, plots=f.plots,
      run_info={"flags": {name: getattr(f, name) for name in _FLAG_NAMES}})


_FLAG_NAMES = ("suite", "corpus", "out", "models", "context_length", "stride", "mesh", "batch_size",
               "dtype", "start_fractions", "alpha", "quantity", "ema", "min_rise", "validation_ppl",
               "validation_corpus", "max_tokens", "num_examples", "plots")


def _define_flags():
  from absl import flags

  flags.DEFINE_string("suite", None, "suite manifest (.json/.yaml)", required=True)
  flags.DEFINE_list("corpus", None, "text (.txt: one document) or .jsonl ({\"text\": ...} per line) "
                    "files", required=True)
  flags.DEFINE_string("out", None, "output folder (results store, tables, plots)", required=True)
  flags.DEFINE_list("models", None, "subset of the suite's models (names or aliases)")
  flags.DEFINE_integer("context_length", 0, "tokens per window (0: max_position_embeddings)")
  flags.DEFINE_integer("stride", 0, "new tokens per window after the first (0: context_length)")
  flags.DEFINE_string("mesh", "", "device mesh spec, e.g. data:-1 or data:2,model:4 ('': one device)")
  flags.DEFINE_integer("batch_size", 8, "windows per forward pass")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "compute dtype")
  flags.DEFINE_list("start_fractions", ["0.1", "0.3", "0.7"], "trend fits start at the checkpoint "
                    "nearest fraction x last step")
  flags.DEFINE_float("alpha", 0.05, "significance level of the slope t-test")
  flags.DEFINE_enum("quantity", "perplexity", list(trajectories.QUANTITIES),
                    "per-token quantity whose trend is fitted")
  flags.DEFINE_float("ema", 0.7, "EMA weight of the double-descent smoothing (0: none)")
  flags.DEFINE_float("min_rise", 0.5, "double descent: each fall/rise changes the smoothed "
                     "perplexity by at least this relative amount")
  flags.DEFINE_string("validation_ppl", None, "validation_ppl.csv of experiments/validation_ppl.py "
                      "(default: perplexity of this corpus)")
  flags.DEFINE_string("validation_corpus", None, "corpus column value to use from --validation_ppl")
  flags.DEFINE_integer("max_tokens", 0, "score only the first N tokens of the corpus (0: all)")
  flags.DEFINE_integer("num_examples", 5, "double-descent examples per size and start fraction")
  flags.DEFINE_bool("plots", True, "draw plots (PNG and PDF)")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  logging.basicConfig(level=logging.INFO)
  app.run(main)
