r"""Sequence-level trajectories (Xia et al. 2023, section 4): generated, noisy and wrong text.

  python -m experiments.sequence_generation --suite=suite.json --corpus=valid.txt --out=out/seq \
      [--prompts=prompts.txt | --num_prompts=32 --prompt_tokens=32] [--small=NAME --large=NAME] \
      [--max_new_tokens=64 --top_p=0.9 --temperature=1.0 --seed=0] [--noise_rates=0.1,0.3,0.5] \
      [--validation_ppl=out/validation_ppl] [--cross_suite=other.json] [--mesh=data:-1]

1. Sets of sequences, stored as text and token ids in --out/sets/<set>.jsonl:
   generated, from prompts (a --prompts file, or --num_prompts spans of --prompt_tokens tokens
   drawn from the corpus by --seed), continuations of --max_new_tokens tokens (fixed length: eos
   does not stop them, so every sequence perplexity averages the same number of tokens) sampled
   with temperature and nucleus top-p by the final checkpoints of the suite's models:
     large_minus_small   q = max(p_large - p_small, 0) renormalised   (opt_jax.generation)
     small_minus_large   q = max(p_small - p_large, 0) renormalised   (the small-preferred set)
     sample_<model>      plain sampling from each model (--sample_models, default every model)
   perturbed, from --num_passages spans of --passage_tokens tokens of the corpus
   (experiments/tasks/perturb.py):
     clean, replace_<rate>, shuffle_<rate> (token noise), facts_original / facts_swapped (the
     passages where entities or numbers could be swapped, before and after).
   A re-run with the same settings reuses the stored sets (sets/manifest.json records them).
2. Trajectories: every set scored by every checkpoint of every size (opt_jax.sweep; resumable)
   with Scorer.rolling_tokens: a generated sequence's perplexity is over its continuation given the
   prompt, a passage's over all its tokens after </s>: ppl = exp(sum NLL / tokens) over the set.
   Validation perplexity per checkpoint from --validation_ppl (the CSV experiments/validation_ppl.py
   writes, or its folder) or, without it, computed in the same sweep from --corpus exactly as that
   binary does (rolling windows, token-weighted over documents).
3. Across families: --cross_suite scores the same sets with a second suite; when a model's
   tokenizer differs from the one a set was made with (fingerprints), the set is re-tokenised from
   its text (a continuation whose text is empty under the other tokenizer is dropped, counted).

Outputs in --out: sequence_ppl.csv (experiments/analysis/sequences.COLUMNS), plots/*.png|pdf
(sequence perplexity against validation perplexity and against FLOPs, one line per size, one
panel per set), summary.md (the fall-then-rise question with numbers), sets/, store/, runs/.

Bad input: models of different tokenizers in one joint decoder raise before anything is
generated (generation.check_joint_models names them); steps of a joint decoder without positive
mass fall back to one model's distribution (large for large_minus_small, small for
small_minus_large) and are counted in sets/manifest.json and summary.md; prompts longer than
max_position_embeddings - max_new_tokens keep </s> and their last tokens, counted and reported;
prompt files and corpora that are empty or malformed raise errors naming the file and line.

This file is the library function `run` (tests call it) plus thin absl flags (`main`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Sequence

import numpy as np
import pandas as pd

from experiments.analysis import sequences as A
from experiments.tasks import perturb
from opt_jax import files

log = logging.getLogger(__name__)

EXPERIMENT = "sequence_generation"
CSV_NAME = "sequence_ppl.csv"
SETS_DIR = "sets"
FORMAT = 1
# OPT's special ids (<s>, <pad>, </s>, <unk>): never drawn as replacement tokens.
_SPECIAL_IDS = frozenset((0, 1, 2, 3))


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a run depends on besides the suites (see the module docstring)."""
  corpus: tuple[str, ...]
  prompts: str | None = None
  num_prompts: int = 32
  prompt_tokens: int = 32
  max_new_tokens: int = 64
  small: str | None = None          # default: the suite's smallest model (by params)
  large: str | None = None          # default: the largest
  sample_models: tuple[str, ...] | None = None   # default: every model
  top_p: float = 0.9
  temperature: float = 1.0
  seed: int = 0
  noise_rates: tuple[float, ...] = (0.1, 0.3, 0.5)
  shuffle_window: int = 4
  num_passages: int = 32
  passage_tokens: int = 128
  swaps_per_kind: int = 2
  validation_ppl: str | None = None
  cross_suite: str | None = None
  cross_validation_ppl: str | None = None
  context_length: int | None = None
  stride: int | None = None
  batch_size: int = 8
  generation_batch_size: int = 32
  dtype: str = "float32"
  tolerance: float = 0.05


@dataclasses.dataclass
class SequenceSet:
  """Sequences to score. ids[i] are scored given context_ids[i] (which starts with </s>);
  contexts/texts are the same as text, for tokenizers other than `tokenizer` (a fingerprint)."""
  name: str
  kind: str                      # "generated" or "perturbed"
  tokenizer: str
  contexts: list[str]
  texts: list[str]
  context_ids: list[list[int]]
  ids: list[list[int]]
  extra: list[dict] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.ids)

  def digest(self) -> str:
    h = hashlib.sha256(json.dumps([self.name, self.kind, self.tokenizer, self.contexts,
                                   self.texts, self.context_ids, self.ids]).encode())
    return h.hexdigest()[:16]


# Files ----------------------------------------------------------------------------------------

def save_set(s: SequenceSet, directory: str) -> str:
  """Writes directory/<name>.jsonl, one sequence per line (atomic); returns the path."""
  lines = []
  for i in range(len(s)):
    row = {"index": i, "set": s.name, "kind": s.kind, "context": s.contexts[i],
           "text": s.texts[i], "context_ids": s.context_ids[i], "ids": s.ids[i],
           "tokenizer": s.tokenizer}
    row.update(s.extra[i] if s.extra else {})
    lines.append(json.dumps(row, ensure_ascii=False))
  path = os.path.join(directory, f"{s.name}.jsonl")
  files.write_text(path, "\n".join(lines) + "\n")
  return path


def load_set(path: str) -> SequenceSet:
  rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
  if not rows:
    raise ValueError(f"{path}: empty sequence set")
  core = ("index", "set", "kind", "context", "text", "context_ids", "ids", "tokenizer")
  return SequenceSet(rows[0]["set"], rows[0]["kind"], rows[0]["tokenizer"],
                     [r["context"] for r in rows], [r["text"] for r in rows],
                     [r["context_ids"] for r in rows], [r["ids"] for r in rows],
                     [{k: v for k, v in r.items() if k not in core} for r in rows])


def read_prompts(path: str) -> list[str]:
  """Prompts from a .txt file (one per non-empty line) or .jsonl ({"prompt"|"text": ...} or a
  JSON string per line). Errors name the file and line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file not found: {path}")
  prompts = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      if path.endswith(".jsonl"):
        try:
          item = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        text = item.get("prompt", item.get("text")) if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
          raise ValueError(f"{path}:{i}: expected a non-empty string or an object with a "
                           f"\"prompt\" or \"text\" string, got {line.strip()[:80]!r}")
        prompts.append(text)
      elif path.endswith(".txt"):
        prompts.append(line.rstrip("\n"))
      else:
        raise ValueError(f"{path}: unknown prompt file format; expected .txt (one prompt per line)"
                         " or .jsonl")
  if not prompts:
    raise ValueError(f"{path}: no prompt (the file has no non-empty line)")
  return prompts


# Building the sets ----------------------------------------------------------------------------

def draw_spans(docs: Sequence[Sequence[int]], num: int, length: int, rng: np.random.Generator,
               what: str = "corpus") -> list[list[int]]:
  """`num` spans of `length` token ids, start positions uniform over every position of every
  document (token ids without the leading </s>) where a whole span fits."""
  fits = np.array([max(len(d) - length + 1, 0) for d in docs], np.int64)
  if fits.sum() == 0:
    raise ValueError(f"{what}: no document has {length} tokens (longest: "
                     f"{max((len(d) for d in docs), default=0)}); use shorter spans")
  picks = rng.choice(int(fits.sum()), size=num, replace=num > fits.sum())
  bounds = np.cumsum(fits)
  out = []
  for p in sorted(picks.tolist()):
    d = int(np.searchsorted(bounds, p, side="right"))
    start = p - (int(bounds[d - 1]) if d else 0)
    out.append([int(t) for t in docs[d][start:start + length]])
  return out


def _decode(tok, ids: Sequence[int]) -> str:
  # OPT's model vocabulary (50272) is larger than its tokenizer's (50265): unknown ids have no text.
  return tok.decode([i for i in ids if i < tok.vocab_size])


def _corpus_docs(corpus_paths: Sequence[str]) -> list[str]:
  from experiments import validation_ppl  # pylint: disable=import-outside-toplevel
  return [t for c in validation_ppl.load_corpora(corpus_paths) for t in c.texts]


def make_prompts(settings: Settings, tok, docs: Sequence[str], max_tokens: int
                 ) -> tuple[list[str], list[list[int]], int]:
  """(prompt texts, prompt ids [</s>, ...], number truncated to max_tokens)."""
  if settings.prompts:
    texts = read_prompts(settings.prompts)
    ids = tok.encode_batch(texts)
  else:
    body = draw_spans([d[1:] for d in tok.encode_batch(list(docs))], settings.num_prompts,
                      settings.prompt_tokens, perturb.rng_for(settings.seed, "prompts"),
                      "corpus (prompts)")
    ids = [[tok.bos_id] + b for b in body]
    texts = [_decode(tok, b) for b in body]
  truncated = 0
  for i, p in enumerate(ids):
    if len(p) > max_tokens:   # keep </s> and the most recent tokens
      ids[i] = [p[0]] + p[len(p) - max_tokens + 1:]
      texts[i] = _decode(tok, ids[i][1:])
      truncated += 1
  return texts, ids, truncated


def _final(model) -> tuple[int, str]:
  step = max(model.checkpoints)
  return step, model.checkpoints[step]


def generated_sets(suite, settings: Settings, docs: Sequence[str]) -> tuple[list[SequenceSet],
                                                                           dict[str, Any]]:
  """Sets (a), (b), (c) from the final checkpoints; also generation stats for the manifest."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from opt_jax import checkpoint, generation  # pylint: disable=import-outside-toplevel
  from opt_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

  by_size = sorted(suite.models, key=lambda m: m.params)
  small = suite.model(settings.small) if settings.small else by_size[0]
  large = suite.model(settings.large) if settings.large else by_size[-1]
  if small.name == large.name:
    raise ValueError(f"small and large are the same model ({small.name}); the suite needs two "
                     "sizes, or name them with small/large")
  dtype = getattr(jnp, settings.dtype)

  def load(model):
    step, path = _final(model)
    return (checkpoint.load_config(path), checkpoint.restore(path, dtype=dtype),
            load_tokenizer(path), step)

  # Small and large stay in memory for the joint sets; other sizes are loaded one at a time.
  loaded = {large.name: load(large), small.name: load(small)}
  (lc, lp, ltok, lstep), (sc, sp, stok, sstep) = loaded[large.name], loaded[small.name]
  generation.check_joint_models([lc, sc], [ltok, stok], [large.name, small.name])
  sample = ([suite.model(n) for n in settings.sample_models] if settings.sample_models
            else by_size)
  max_new = settings.max_new_tokens
  max_prompt = min(lc.max_position_embeddings, sc.max_position_embeddings) - max_new
  if max_prompt < 2:
    raise ValueError(f"max_new_tokens={max_new} leaves no room for a prompt in a context of "
                     f"{min(lc.max_position_embeddings, sc.max_position_embeddings)} positions")
  texts, prompt_ids, truncated = make_prompts(settings, ltok, docs, max_prompt)
  common = dict(max_new_tokens=max_new, sampler="sample", temperature=settings.temperature,
                top_p=settings.top_p, eos_id=None, dtype=dtype,
                batch_size=settings.generation_batch_size)
  stats: dict[str, Any] = {"prompts": len(prompt_ids), "prompts_truncated": truncated,
                           "max_prompt_tokens": max_prompt, "small": f"{small.name}@{sstep}",
                           "large": f"{large.name}@{lstep}", "sets": {}}
  sets = []

  def add(name, tok, outs, fallback=None):
    sets.append(SequenceSet(name, "generated", tok.fingerprint(), list(texts),
                            [_decode(tok, o) for o in outs], [list(p) for p in prompt_ids],
                            [list(o) for o in outs],
                            [{"prompt_index": i} for i in range(len(outs))]))
    stats["sets"][name] = {"sequences": len(outs), "tokens": sum(map(len, outs))}
    if fallback is not None:
      stats["sets"][name].update(fallback_steps=fallback["fallback_steps"],
                                 fallback_steps_per_prompt=fallback["fallback_steps_per_prompt"])

  pair = [(lc, lp), (sc, sp)]
  outs, st = generation.joint_generate(pair, (1.0, -1.0), prompt_ids, seed=settings.seed,
                                       tokenizers=[ltok, stok], names=[large.name, small.name],
                                       **common)
  add("large_minus_small", ltok, outs, st)
  # Same models and compiled program, weights (-1, 1): p_small - p_large, small as fallback.
  outs, st = generation.joint_generate(pair, (-1.0, 1.0), prompt_ids, seed=settings.seed + 1,
                                       fallback_model=1, tokenizers=[ltok, stok],
                                       names=[large.name, small.name], **common)
  add(A.SMALL_PREFERRED, stok, outs, st)
  # Free the joint pair's params (these names and `loaded` both hold them), keeping only the
  # model sampled first: the others are restored in turn, never held while other sizes load.
  del pair, lp, sp
  loaded = {name: v for name, v in loaded.items() if sample and name == sample[0].name}
  for k, model in enumerate(sample):
    config, params, tok, _ = loaded.pop(model.name, None) or load(model)
    # Its own encoding of the prompt texts if its tokenizer differs; its own context length.
    ids = prompt_ids if tok.fingerprint() == ltok.fingerprint() else tok.encode_batch(texts)
    room = config.max_position_embeddings - max_new
    ids = [p if len(p) <= room else [p[0]] + p[len(p) - room + 1:] for p in ids]
    outs = generation.generate(config, params, ids, seed=settings.seed + 2 + k, **common)
    add(f"sample_{model.name}", tok, outs)
    sets[-1].context_ids = [list(p) for p in ids]
    del params
  loaded.clear()
  return sets, stats


def perturbed_sets(settings: Settings, tok, docs: Sequence[str]) -> tuple[list[SequenceSet],
                                                                         dict[str, Any]]:
  """clean, replace_<rate>, shuffle_<rate>, facts_original, facts_swapped from corpus spans."""
  body = draw_spans([d[1:] for d in tok.encode_batch(list(docs))], settings.num_passages,
                    settings.passage_tokens, perturb.rng_for(settings.seed, "passages"),
                    "corpus (passages)")
  fp = tok.fingerprint()
  bos = tok.bos_id
  special = _SPECIAL_IDS | {bos, tok.pad_id}
  pool = np.array([i for i in range(tok.vocab_size) if i not in special])

  def make(name, ids_list, texts=None, extra=None):
    texts = texts if texts is not None else [_decode(tok, x) for x in ids_list]
    n = len(ids_list)
    return SequenceSet(name, "perturbed", fp, [""] * n, texts, [[bos] for _ in range(n)],
                       [list(x) for x in ids_list], extra or [])

  clean_texts = [_decode(tok, b) for b in body]
  sets = [make("clean", body, clean_texts)]
  for rate in settings.noise_rates:
    sets.append(make(f"replace_{rate:g}", [
        perturb.replace_tokens(b, rate, pool, perturb.rng_for(settings.seed, "replace", i),
                               keep_first=0) for i, b in enumerate(body)]))
    sets.append(make(f"shuffle_{rate:g}", [
        perturb.shuffle_windows(b, rate, settings.shuffle_window,
                                perturb.rng_for(settings.seed, "shuffle", i), keep_first=0)
        for i, b in enumerate(body)]))
  swapped = [(i, perturb.swap_facts(t, perturb.rng_for(settings.seed, "facts", i),
                                    swaps_per_kind=settings.swaps_per_kind))
             for i, t in enumerate(clean_texts)]
  swapped = [(i, s) for i, s in swapped if s.swaps]
  stats = {"passages": len(body), "passage_tokens": settings.passage_tokens,
           "passages_with_swaps": len(swapped)}
  if swapped:
    extra = [{"passage_index": i, "swaps": [list(x) for x in s.swaps]} for i, s in swapped]
    sets.append(make("facts_original", [body[i] for i, _ in swapped],
                     [clean_texts[i] for i, _ in swapped], extra))
    sets.append(make("facts_swapped", [tok.encode(s.text, add_bos=False) for _, s in swapped],
                     [s.text for _, s in swapped], extra))
  return sets, stats


def build_sets(suite, settings: Settings, out_dir: str, docs: Sequence[str]
               ) -> tuple[list[SequenceSet], dict]:
  """The generated and perturbed sets from the corpus documents `docs`, reused from
  out_dir/sets when the settings match."""
  from opt_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

  key_fields = {k: v for k, v in dataclasses.asdict(settings).items()
                if k not in ("validation_ppl", "cross_suite", "cross_validation_ppl",
                             "context_length", "stride", "batch_size", "tolerance")}
  key = hashlib.sha256(json.dumps({
      "format": FORMAT, "settings": key_fields,
      "prompt_file": (files.sha256_file(settings.prompts)
                      if settings.prompts and os.path.isfile(settings.prompts) else None),
      "corpus": hashlib.sha256("\0".join(docs).encode()).hexdigest(),
      "checkpoints": {m.name: _final(m)[1] for m in suite.models}}, sort_keys=True,
      default=str).encode()).hexdigest()[:16]
  directory = os.path.join(out_dir, SETS_DIR)
  manifest_path = os.path.join(directory, "manifest.json")
  if os.path.isfile(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    if manifest.get("key") == key:
      log.info("reusing the sequence sets in %s", directory)
      return [load_set(os.path.join(directory, f"{n}.jsonl")) for n in manifest["sets"]], manifest
  sets, gen_stats = generated_sets(suite, settings, docs)
  small_path = _final(suite.model(settings.small) if settings.small
                      else min(suite.models, key=lambda m: m.params))[1]
  more, pert_stats = perturbed_sets(settings, load_tokenizer(small_path), docs)
  sets += more
  for s in sets:
    save_set(s, directory)
  manifest = {"key": key, "sets": [s.name for s in sets], "generation": gen_stats,
              "perturbation": pert_stats,
              "digests": {s.name: s.digest() for s in sets}}
  files.write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")   # last: marks completion
  return sets, manifest


# Scoring --------------------------------------------------------------------------------------

def scoring_inputs(s: SequenceSet, tok) -> tuple[list[list[int]], list[int]]:
  """(full token lists context + target, number of target tokens) for `tok`; the ids as stored
  when `tok` is the set's tokenizer, else the texts re-tokenised (n = 0: nothing to score)."""
  if tok.fingerprint() == s.tokenizer:
    return [c + x for c, x in zip(s.context_ids, s.ids)], [len(x) for x in s.ids]
  ctx = tok.encode_batch(s.contexts)
  tgt = tok.encode_batch(s.texts, add_bos=False)
  return [c + x for c, x in zip(ctx, tgt)], [len(x) for x in tgt]


def make_evaluator(sets: Sequence[SequenceSet], valid_docs: Sequence[str] | None, cache,
                   context_length: int | None, stride: int | None):
  """The sweep's evaluate(): per set and sequence the summed NLL (float64 nats) of its target
  tokens and their number; with valid_docs, the same for the validation documents."""
  inputs: dict[str, Any] = {}

  def evaluate(model, step, config, params):
    tok = cache.tokenizer(model)
    scorer = cache.get(config, params, tok)
    fp = tok.fingerprint()
    if fp not in inputs:
      per_set = [scoring_inputs(s, tok) for s in sets]
      valid = tok.encode_batch(list(valid_docs)) if valid_docs else []
      inputs[fp] = per_set, valid
    per_set, valid = inputs[fp]
    lists = [f for full, ns in per_set for f, n in zip(full, ns) if n > 0]
    lps = iter(scorer.rolling_tokens(lists + valid, context_length, stride))
    arrays, total = {}, 0
    for s, (full, ns) in zip(sets, per_set):
      nll = np.zeros(len(ns))
      for i, n in enumerate(ns):
        if n > 0:
          nll[i] = -np.sum(next(lps)[-n:], dtype=np.float64)
      arrays[f"{s.name}/nll_sum"] = nll
      arrays[f"{s.name}/num_tokens"] = np.asarray(ns, np.int64)
      total += sum(ns)
    if valid:
      lv = [next(lps) for _ in valid]
      arrays["validation/nll_sum"] = np.array([-np.sum(x, dtype=np.float64) for x in lv])
      arrays["validation/num_tokens"] = np.array([len(x) for x in lv], np.int64)
    return arrays, {"num_tokens": total}
  return evaluate


def _valid_ppl_from_csv(path: str, suite) -> dict[tuple[str, int], float]:
  from experiments import validation_ppl  # pylint: disable=import-outside-toplevel
  table = validation_ppl.read_validation_ppl(path, suite=suite)   # CSV names or aliases
  missing = [(m.name, s) for m, s, _ in suite.checkpoints() if (m.name, s) not in table]
  if missing:
    raise ValueError(f"{path}: no validation perplexity for {len(missing)} checkpoint(s) of suite "
                     f"{suite.name!r}, e.g. {missing[:3]}; run experiments.validation_ppl on this "
                     "suite, or leave validation_ppl unset to compute it from the corpus")
  return table


def score_suite(suite, label: str, sets: Sequence[SequenceSet], settings: Settings, out_dir: str,
                valid_csv: str | None, *, mesh=None, progress: bool = True,
                docs: Sequence[str] | None = None) -> pd.DataFrame:
  """Sweeps `suite` over every set; rows of the trajectory table (A.COLUMNS). Without valid_csv
  the validation perplexity comes from the corpus documents (`docs`, read from settings.corpus
  when not given)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from opt_jax import results, sweep  # pylint: disable=import-outside-toplevel

  valid_table = _valid_ppl_from_csv(valid_csv, suite) if valid_csv else None
  valid_docs = None if valid_table else (docs if docs is not None
                                         else _corpus_docs(settings.corpus))
  tag = hashlib.sha256(json.dumps({
      "sets": [s.digest() for s in sets], "context_length": settings.context_length,
      "stride": settings.stride, "dtype": settings.dtype,
      "valid": hashlib.sha256("\0".join(valid_docs).encode()).hexdigest() if valid_docs else None,
  }).encode()).hexdigest()[:12]
  store = results.ResultStore(os.path.join(out_dir, "store"))
  experiment = (EXPERIMENT, label, tag)
  dtype = getattr(jnp, settings.dtype)
  cache = sweep.ScorerCache(batch_size=settings.batch_size, max_length=settings.context_length,
                            dtype=dtype, mesh=mesh)
  sweep.run_sweep(suite, make_evaluator(sets, valid_docs, cache, settings.context_length,
                                        settings.stride),
                  store, experiment=experiment, mesh=mesh, progress=progress,
                  dtype=None if settings.dtype == "float32" else dtype, out_dir=out_dir,
                  run_info={"settings": dataclasses.asdict(settings), "scored_by": label})
  cache.clear()
  rows = []
  for m, step, _ in suite.checkpoints():
    arrays, _ = store.read((*experiment, m.name, step))
    if valid_table is not None:
      vppl = valid_table[(m.name, step)]
    else:
      vppl = float(np.exp(arrays["validation/nll_sum"].sum() /
                          arrays["validation/num_tokens"].sum()))
    for s in sets:
      nll_sum = float(arrays[f"{s.name}/nll_sum"].sum())
      n = int(arrays[f"{s.name}/num_tokens"].sum())
      nll = nll_sum / n if n else float("nan")
      rows.append({"scored_by": label, "set": s.name, "kind": s.kind, "model": m.name,
                   "params": m.params, "step": step, "tokens": m.tokens(step),
                   "flops": m.flops(step), "valid_ppl": vppl, "nll": nll, "ppl": float(np.exp(nll)),
                   "num_tokens": n,
                   "num_sequences": int((arrays[f"{s.name}/num_tokens"] > 0).sum())})
  return pd.DataFrame(rows, columns=A.COLUMNS)


def run(suite_path: str, out_dir: str, settings: Settings, *, mesh=None, progress: bool = True,
        plots: bool = True) -> pd.DataFrame:
  """Builds the sets, scores them with every suite, writes CSV, plots and summary.md."""
  from opt_jax import sharding  # pylint: disable=import-outside-toplevel
  from opt_jax.suite import load_suite  # pylint: disable=import-outside-toplevel

  if not settings.corpus:
    raise ValueError("no corpus given: pass at least one .txt or .jsonl validation corpus")
  suite = load_suite(suite_path)
  os.makedirs(out_dir, exist_ok=True)
  docs = _corpus_docs(settings.corpus)
  sets, manifest = build_sets(suite, settings, out_dir, docs)
  labels = [suite.name]
  tables = [score_suite(suite, suite.name, sets, settings, out_dir, settings.validation_ppl,
                        mesh=mesh, progress=progress, docs=docs)]
  if settings.cross_suite:
    cross = load_suite(settings.cross_suite)
    label = cross.name if cross.name != suite.name else f"{cross.name}_2"
    labels.append(label)
    tables.append(score_suite(cross, label, sets, settings, out_dir,
                              settings.cross_validation_ppl, mesh=mesh, progress=progress,
                              docs=docs))
  df = pd.concat(tables, ignore_index=True)
  if not sharding.is_main_process():
    return df
  files.write_csv(df, os.path.join(out_dir, CSV_NAME), float_format="%.8g")
  if plots:
    A.write_plots(df, os.path.join(out_dir, "plots"))
  files.write_text(os.path.join(out_dir, "summary.md"),
                   A.summary_markdown(df, suite.name,
                                      _summary_info(suite, labels, settings, manifest),
                                      settings.tolerance))
  return df


def _summary_info(suite, labels, settings: Settings, manifest: dict) -> dict[str, str]:
  gen, pert = manifest["generation"], manifest["perturbation"]
  fallback = {n: s["fallback_steps"] for n, s in gen["sets"].items() if "fallback_steps" in s}
  source = f"file {settings.prompts}" if settings.prompts else "drawn from the corpus"
  return {
      "suite": f"{suite.name} ({', '.join(m.name for m in suite.models)}; "
               f"{len(suite)} checkpoints)",
      "scored by": ", ".join(labels),
      "generation": f"small {gen['small']}, large {gen['large']}, {gen['prompts']} prompts "
                    f"({source}), {settings.max_new_tokens} new tokens, top-p {settings.top_p}, "
                    f"temperature {settings.temperature}, seed {settings.seed}",
      "prompts truncated to fit the context": f"{gen['prompts_truncated']} (kept </s> and the "
                                              f"last {gen['max_prompt_tokens'] - 1} tokens)",
      "joint steps without positive mass (fell back to one model)": json.dumps(fallback),
      "perturbed passages": f"{pert['passages']} x {pert['passage_tokens']} tokens; noise rates "
                            f"{list(settings.noise_rates)} (window {settings.shuffle_window}); "
                            f"{pert['passages_with_swaps']} passages with entity/number swaps",
      "validation perplexity": (settings.validation_ppl or
                                f"computed from {', '.join(settings.corpus)}"),
  }


# Binary ---------------------------------------------------------------------------------------

def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel

  from opt_jax import sharding  # pylint: disable=import-outside-toplevel

  del argv
  f = flags.FLAGS
  sharding.initialize_distributed()
  settings = Settings(
      corpus=tuple(f.corpus), prompts=f.prompts, num_prompts=f.num_prompts,
      prompt_tokens=f.prompt_tokens, max_new_tokens=f.max_new_tokens, small=f.small,
      large=f.large, sample_models=tuple(f.sample_models) if f.sample_models else None,
      top_p=f.top_p, temperature=f.temperature, seed=f.seed,
      noise_rates=tuple(float(r) for r in f.noise_rates), shuffle_window=f.shuffle_window,
      num_passages=f.num_passages, passage_tokens=f.passage_tokens,
      swaps_per_kind=f.swaps_per_kind, validation_ppl=f.validation_ppl,
      cross_suite=f.cross_suite, cross_validation_ppl=f.cross_validation_ppl,
      context_length=f.context_length, stride=f.stride, batch_size=f.batch_size,
      generation_batch_size=f.generation_batch_size, dtype=f.dtype, tolerance=f.tolerance)
  mesh = sharding.make_mesh(f.mesh) if f.mesh else None
  run(f.suite, f.out, settings, mesh=mesh)
  if sharding.is_main_process():
    print(open(os.path.join(f.out, "summary.md")).read())


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  d = Settings(corpus=())
  flags.DEFINE_string("suite", None, "Suite manifest (.json/.yaml).", required=True)
  flags.DEFINE_list("corpus", None, "Validation corpus: .txt (one document) or .jsonl files.",
                    required=True)
  flags.DEFINE_string("out", None, "Output folder.", required=True)
  flags.DEFINE_string("prompts", None, "Prompt file (.txt one per line, or .jsonl); default: "
                      "--num_prompts spans drawn from the corpus.")
  flags.DEFINE_integer("num_prompts", d.num_prompts, "Prompts drawn from the corpus.")
  flags.DEFINE_integer("prompt_tokens", d.prompt_tokens, "Tokens per drawn prompt.")
  flags.DEFINE_integer("max_new_tokens", d.max_new_tokens, "Tokens generated per prompt.")
  flags.DEFINE_string("small", None, "Small model of the joint decoder (default: smallest).")
  flags.DEFINE_string("large", None, "Large model of the joint decoder (default: largest).")
  flags.DEFINE_list("sample_models", None, "Models to sample plain sets from (default: all).")
  flags.DEFINE_float("top_p", d.top_p, "Nucleus sampling mass.")
  flags.DEFINE_float("temperature", d.temperature, "Sampling temperature.")
  flags.DEFINE_integer("seed", d.seed, "Seed of prompts, passages, noise and sampling.")
  flags.DEFINE_list("noise_rates", [str(r) for r in d.noise_rates], "Token noise rates.")
  flags.DEFINE_integer("shuffle_window", d.shuffle_window, "Tokens per shuffling window.")
  flags.DEFINE_integer("num_passages", d.num_passages, "Corpus passages to perturb.")
  flags.DEFINE_integer("passage_tokens", d.passage_tokens, "Tokens per passage.")
  flags.DEFINE_integer("swaps_per_kind", d.swaps_per_kind, "Entity and number swaps per passage.")
  flags.DEFINE_string("validation_ppl", None, "validation_ppl.csv (or its folder) of --suite; "
                      "default: computed from --corpus.")
  flags.DEFINE_string("cross_suite", None, "A second suite manifest that also scores every set.")
  flags.DEFINE_string("cross_validation_ppl", None, "validation_ppl.csv of --cross_suite.")
  flags.DEFINE_integer("context_length", None, "Scoring window (default: max positions).")
  flags.DEFINE_integer("stride", None, "Scoring stride (default: context_length).")
  flags.DEFINE_integer("batch_size", d.batch_size, "Scoring rows per forward pass.")
  flags.DEFINE_integer("generation_batch_size", d.generation_batch_size, "Prompts per decode.")
  flags.DEFINE_enum("dtype", d.dtype, ["float32", "bfloat16", "float16"], "Parameter dtype.")
  flags.DEFINE_float("tolerance", d.tolerance, "Relative change that counts as a fall or rise.")
  flags.DEFINE_string("mesh", "", "Device mesh spec, e.g. 'data:-1'; empty: one device.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  _define_flags()
  app.run(main)
