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
   prompt, a passage's over all its tokens after the start token (the family's prefix, e.g. OPT's
   </s>, or its end-of-text token): ppl = exp(sum NLL / tokens) over the set.
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
max_position_embeddings - max_new_tokens keep the start token and their last tokens, counted and
reported; prompt files and corpora that are empty or malformed raise errors naming the file and
line.

Decoding runs on the mesh like scoring does (--mesh): the decoding models are restored straight
into the mesh's layout and generate / joint_generate run sharded, with the same tokens as on one
device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np
import pandas as pd

from experiments import context, perplexity
from experiments.analysis import sequences as A
from experiments.context import Experiment, ExperimentSettings, Outcome
from experiments.tasks import perturb
from opt_jax import cli, files, inputs
from opt_jax.errors import InputError

NAME = "sequence_generation"
CSV_NAME = "sequence_ppl.csv"
SETS_DIR = "sets"
FORMAT = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(ExperimentSettings):
  """Everything a run depends on (see the module docstring)."""
  corpus: tuple[str, ...] = cli.option(
      help="Validation corpus: .jsonl (JSON lines with a \"text\" field) or any other file (one "
           "plain-text document).", key=False)          # its text is in the keys
  prompts: str | None = cli.option(
      None, "Prompt file (.jsonl: a \"prompt\" or \"text\" string per line; any other file: one "
            "prompt per non-empty line); default: --num_prompts spans drawn from the corpus.",
      key=False)                                        # its contents are in the sets' key
  num_prompts: int = cli.option(32, "Prompts drawn from the corpus.", ge=1)
  prompt_tokens: int = cli.option(32, "Tokens per drawn prompt.", ge=1)
  max_new_tokens: int = cli.option(64, "Tokens generated per prompt.", ge=1)
  small: str | None = cli.option(None, "Small model of the joint decoder (default: smallest).")
  large: str | None = cli.option(None, "Large model of the joint decoder (default: largest).")
  sample_models: tuple[str, ...] | None = cli.option(
      None, "Models to sample plain sets from (default: all).")
  top_p: float = cli.option(0.9, "Nucleus sampling mass.", gt=0, le=1)
  temperature: float = cli.option(1.0, "Sampling temperature.", gt=0)
  seed: int = cli.option(0, "Seed of prompts, passages, noise and sampling.", ge=0)
  noise_rates: tuple[float, ...] = cli.option((0.1, 0.3, 0.5), "Token noise rates.", ge=0, le=1)
  shuffle_window: int = cli.option(4, "Tokens per shuffling window.", ge=1)
  num_passages: int = cli.option(32, "Corpus passages to perturb.", ge=1)
  passage_tokens: int = cli.option(128, "Tokens per passage.", ge=1)
  swaps_per_kind: int = cli.option(2, "Entity and number swaps per passage.", ge=0)
  validation_ppl: str | None = cli.option(
      None, "validation_ppl.csv (or its folder) of --suite; default: computed from --corpus.",
      key=False)
  cross_suite: str | None = cli.option(
      None, "A second suite manifest that also scores every set.", key=False)
  cross_validation_ppl: str | None = cli.option(
      None, "validation_ppl.csv of --cross_suite.", key=False)
  context_length: int | None = cli.option(None, "Scoring window (default: max positions).", ge=2)
  stride: int | None = cli.option(None, "Scoring stride (default: context_length).", ge=1)
  generation_batch_size: int = cli.option(32, "Prompts per decode.", ge=1, key=False)
  tolerance: float = cli.option(0.05, "Relative change that counts as a fall or rise.", ge=0,
                                key=False)
  plots: bool = cli.option(True, "Draw the plots (PNG and PDF).", key=False)


# Settings that change the scores of the sets, not the sets themselves.
SCORING_ONLY = ("context_length", "stride")


@dataclasses.dataclass
class SequenceSet:
  """Sequences to score. ids[i] are scored given context_ids[i] (which starts with the
  tokenizer's start token, e.g. OPT's </s>, Pythia's <|endoftext|>);
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
    raise InputError(f"{path}: empty sequence set; delete the sets folder to rebuild it")
  core = ("index", "set", "kind", "context", "text", "context_ids", "ids", "tokenizer")
  return SequenceSet(rows[0]["set"], rows[0]["kind"], rows[0]["tokenizer"],
                     [r["context"] for r in rows], [r["text"] for r in rows],
                     [r["context_ids"] for r in rows], [r["ids"] for r in rows],
                     [{k: v for k, v in r.items() if k not in core} for r in rows])


def read_prompts(path: str) -> list[str]:
  """Prompts from a .jsonl file ({"prompt"|"text": ...} or a JSON string per line) or any other
  file (one prompt per non-empty line), UTF-8. Errors name the file and line."""
  content = inputs.read_text(path, "prompt file")
  prompts = []
  for i, line in enumerate(content.splitlines(), 1):
    if not line.strip():
      continue
    if not path.endswith(inputs.JSONL):
      prompts.append(line)
      continue
    try:
      item = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}:{i}: not valid JSON ({e})") from None
    text = item.get("prompt", item.get("text")) if isinstance(item, dict) else item
    if not isinstance(text, str) or not text.strip():
      raise InputError(f"{path}:{i}: expected a non-empty string or an object with a "
                       f"\"prompt\" or \"text\" string, got {line.strip()[:80]!r}")
    prompts.append(text)
  if not prompts:
    raise InputError(f"{path}: no prompt (the file is empty or has no non-empty line)")
  return prompts


# Building the sets ----------------------------------------------------------------------------

def draw_spans(docs: Sequence[Sequence[int]], num: int, length: int, rng: np.random.Generator,
               what: str = "corpus") -> list[list[int]]:
  """`num` spans of `length` token ids, start positions uniform over every position of every
  document (token ids without the leading </s>) where a whole span fits."""
  fits = np.array([max(len(d) - length + 1, 0) for d in docs], np.int64)
  if fits.sum() == 0:
    raise InputError(f"{what}: no document has {length} tokens (longest: "
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


def make_prompts(settings: Settings, tok, docs: Sequence[str], max_tokens: int
                 ) -> tuple[list[str], list[list[int]], int]:
  """(prompt texts, prompt ids [start, ...], number truncated to max_tokens). Every prompt starts
  with the tokenizer's start token (the family's prefix, e.g. OPT's </s>, or its end-of-text
  token for families without one), so that its first text token is conditioned on something."""
  if settings.prompts:
    texts = read_prompts(settings.prompts)
    ids = [[tok.start_id] + b for b in tok.encode_batch(texts, add_bos=False)]
  else:
    body = draw_spans(tok.encode_batch(list(docs), add_bos=False), settings.num_prompts,
                      settings.prompt_tokens, perturb.rng_for(settings.seed, "prompts"),
                      "corpus (prompts)")
    ids = [[tok.start_id] + b for b in body]
    texts = [_decode(tok, b) for b in body]
  truncated = 0
  for i, p in enumerate(ids):
    if len(p) > max_tokens:   # keep the start token and the most recent tokens
      ids[i] = [p[0]] + p[len(p) - max_tokens + 1:]
      texts[i] = _decode(tok, ids[i][1:])
      truncated += 1
  return texts, ids, truncated


def _final(model) -> tuple[int, str]:
  step = max(model.checkpoints)
  return step, model.checkpoints[step]


def _model(ctx: Experiment, name: str | None, default):
  if not name:
    return default
  try:
    return ctx.suite.model(name)
  except KeyError as e:
    raise InputError(e.args[0]) from None


def generated_sets(ctx: Experiment, docs: Sequence[str]) -> tuple[list[SequenceSet],
                                                                  dict[str, Any]]:
  """Sets (a), (b), (c) from the final checkpoints, decoded on ctx.mesh; also generation stats
  for the manifest."""
  from opt_jax import checkpoint, generation, sharding  # pylint: disable=import-outside-toplevel

  settings = ctx.settings
  by_size = sorted(ctx.suite.models, key=lambda m: m.params)
  small, large = _model(ctx, settings.small, by_size[0]), _model(ctx, settings.large, by_size[-1])
  if small.name == large.name:
    raise InputError(f"--small and --large are the same model ({small.name}); the suite needs two "
                     "sizes, or name them with --small/--large")
  sample = ([_model(ctx, n, None) for n in settings.sample_models] if settings.sample_models
            else by_size)

  def load(model):
    step, path = _final(model)
    config = ctx.configs[model.name]
    # Restored straight into the mesh's layout: a large model never sits whole on one device.
    shardings = sharding.param_shardings(config, ctx.mesh) if ctx.mesh is not None else None
    return (config, checkpoint.restore(path, shardings=shardings, dtype=ctx.dtype),
            ctx.tokenizers[model.name], step)

  lc, sc = ctx.configs[large.name], ctx.configs[small.name]
  ltok, stok = ctx.tokenizers[large.name], ctx.tokenizers[small.name]
  try:
    generation.check_joint_models([lc, sc], [ltok, stok], [large.name, small.name])
  except ValueError as e:
    raise InputError(str(e)) from None
  max_new = settings.max_new_tokens
  max_prompt = min(lc.max_position_embeddings, sc.max_position_embeddings) - max_new
  if max_prompt < 2:
    raise InputError(f"--max_new_tokens={max_new} leaves no room for a prompt in a context of "
                     f"{min(lc.max_position_embeddings, sc.max_position_embeddings)} positions")
  texts, prompt_ids, truncated = make_prompts(settings, ltok, docs, max_prompt)
  # Small and large stay in memory for the joint sets; other sizes are loaded one at a time.
  loaded = {large.name: load(large), small.name: load(small)}
  (_, lp, _, lstep), (_, sp, _, sstep) = loaded[large.name], loaded[small.name]
  common = dict(max_new_tokens=max_new, sampler="sample", temperature=settings.temperature,
                top_p=settings.top_p, eos_id=None, dtype=ctx.dtype,
                batch_size=settings.generation_batch_size, mesh=ctx.mesh)
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

  ctx.say(f"decoding {len(prompt_ids)} prompts x {max_new} tokens: {large.name} - {small.name}, "
          f"{small.name} - {large.name}, then samples of {', '.join(m.name for m in sample)}")
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
    ids = (prompt_ids if tok.fingerprint() == ltok.fingerprint() else
           [[tok.start_id] + b for b in tok.encode_batch(texts, add_bos=False)])
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
  body = draw_spans(tok.encode_batch(list(docs), add_bos=False), settings.num_passages,
                    settings.passage_tokens, perturb.rng_for(settings.seed, "passages"),
                    "corpus (passages)")
  fp = tok.fingerprint()
  bos = tok.start_id
  special = tok.special_ids | {bos}   # never drawn as replacement tokens
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


def build_sets(ctx: Experiment, docs: Sequence[str]) -> tuple[list[SequenceSet], dict]:
  """The generated and perturbed sets from the corpus documents `docs`, reused from
  out/sets when everything they depend on is unchanged."""
  settings = ctx.settings
  key = hashlib.sha256(json.dumps({
      "format": FORMAT,
      "settings": {k: v for k, v in cli.key(settings).items() if k not in SCORING_ONLY},
      "prompt_file": (files.sha256_file(settings.prompts)
                      if settings.prompts and os.path.isfile(settings.prompts) else None),
      "corpus": hashlib.sha256("\0".join(docs).encode()).hexdigest(),
      "checkpoints": {m.name: _final(m)[1] for m in ctx.suite.models}}, sort_keys=True,
      default=str).encode()).hexdigest()[:16]
  directory = ctx.path(SETS_DIR)
  manifest_path = os.path.join(directory, "manifest.json")
  if os.path.isfile(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    if manifest.get("key") == key:
      ctx.say(f"reusing the sequence sets in {directory}")
      return [load_set(os.path.join(directory, f"{n}.jsonl")) for n in manifest["sets"]], manifest
  sets, gen_stats = generated_sets(ctx, docs)
  small = _model(ctx, settings.small, min(ctx.suite.models, key=lambda m: m.params))
  more, pert_stats = perturbed_sets(settings, ctx.tokenizers[small.name], docs)
  sets += more
  manifest = {"key": key, "sets": [s.name for s in sets], "generation": gen_stats,
              "perturbation": pert_stats, "digests": {s.name: s.digest() for s in sets}}
  if ctx.is_main:
    for s in sets:
      save_set(s, directory)
    files.write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")  # last: marks completion
  return sets, manifest


# Scoring --------------------------------------------------------------------------------------

def scoring_inputs(s: SequenceSet, tok) -> tuple[list[list[int]], list[int]]:
  """(full token lists context + target, number of target tokens) for `tok`; the ids as stored
  when `tok` is the set's tokenizer, else the texts re-tokenised (n = 0: nothing to score)."""
  if tok.fingerprint() == s.tokenizer:
    return [c + x for c, x in zip(s.context_ids, s.ids)], [len(x) for x in s.ids]
  ctx = [[tok.start_id] + c for c in tok.encode_batch(s.contexts, add_bos=False)]
  tgt = tok.encode_batch(s.texts, add_bos=False)
  return [c + x for c, x in zip(ctx, tgt)], [len(x) for x in tgt]


def make_evaluator(ctx: Experiment, sets: Sequence[SequenceSet],
                   valid: perplexity.CorpusScorer | None):
  """The sweep's evaluate(): per set and sequence the summed NLL (float64 nats) of its target
  tokens and their number; with `valid`, the validation corpus's arrays under "validation/"."""
  inputs_: dict[str, Any] = {}
  settings = ctx.settings

  def evaluate(model, step, config, params):
    tok = ctx.tokenizers[model.name]
    scorer = ctx.scorer(model, config, params)
    fp = tok.fingerprint()
    if fp not in inputs_:
      inputs_[fp] = [scoring_inputs(s, tok) for s in sets]
    per_set = inputs_[fp]
    lists = [f for full, ns in per_set for f, n in zip(full, ns) if n > 0]
    # The validation documents go in the same call: one batched pass over everything.
    extra = valid.token_lists(tok) if valid else []
    lps = scorer.rolling_tokens(lists + extra, settings.context_length, settings.stride)
    it = iter(lps[:len(lists)])
    arrays, total = {}, 0
    for s, (full, ns) in zip(sets, per_set):
      nll = np.zeros(len(ns))
      for i, n in enumerate(ns):
        if n > 0:
          nll[i] = -np.sum(next(it)[-n:], dtype=np.float64)
      arrays[f"{s.name}/nll_sum"] = nll
      arrays[f"{s.name}/num_tokens"] = np.asarray(ns, np.int64)
      total += sum(ns)
    if valid:
      arrays.update(valid.arrays(lps[len(lists):], "validation/")[0])
    return arrays, {"num_tokens": total}
  return evaluate


def score_suite(ctx: Experiment, label: str, sets: Sequence[SequenceSet],
                valid_table: dict | None, corpora: Sequence[inputs.Corpus]) -> pd.DataFrame:
  """Sweeps ctx's suite over every set; rows of the trajectory table (A.COLUMNS). Without
  valid_table (a validation_ppl.csv lookup) the validation perplexity is the corpora's, scored
  in the same sweep."""
  s = ctx.settings
  valid = None if valid_table is not None else perplexity.CorpusScorer(corpora, s.context_length,
                                                                       s.stride)
  key = (*ctx.key([st.digest() for st in sets], valid and valid.digest()), label)
  ctx.sweep(make_evaluator(ctx, sets, valid), key, label=label, max_length=s.context_length)
  rows = []
  for m, step in ctx.checkpoints(key):
    arrays, _ = ctx.read(key, m, step)
    vppl = (valid_table.get((m.name, step), float("nan")) if valid_table is not None
            else valid.ppl(arrays, "validation/"))
    for st in sets:
      nll_sum = float(arrays[f"{st.name}/nll_sum"].sum())
      n = int(arrays[f"{st.name}/num_tokens"].sum())
      nll = nll_sum / n if n else float("nan")
      rows.append({"scored_by": label, "set": st.name, "kind": st.kind, "model": m.name,
                   "params": m.params, "step": step, "tokens": m.tokens(step),
                   "flops": m.flops(step), "valid_ppl": vppl, "nll": nll, "ppl": float(np.exp(nll)),
                   "num_tokens": n,
                   "num_sequences": int((arrays[f"{st.name}/num_tokens"] > 0).sum())})
  return pd.DataFrame(rows, columns=A.COLUMNS)


def run(settings: Settings, *, progress: bool = True, run_info: dict | None = None) -> Outcome:
  """Builds the sets, scores them with every suite, writes CSV, plots and summary.md.
  Outcome.table: the trajectory table (A.COLUMNS)."""
  s = settings
  ctx = Experiment(NAME, s, progress=progress, run_info=run_info)
  ctx.window(s.context_length, s.stride)
  few = [f"{m.name} ({len(m.steps)})" for m in ctx.suite.models if len(m.steps) < 2]
  if few:   # a trajectory's fall and rise need two checkpoints at least
    raise InputError(f"--suite={s.suite}: every model needs at least 2 checkpoints; "
                     f"{', '.join(few)} {'has' if len(few) == 1 else 'have'} fewer")
  suites = [(ctx, ctx.suite.name, s.validation_ppl)]
  if s.cross_suite:
    cross = ctx.with_suite(s.cross_suite)
    cross.window(s.context_length, s.stride)
    label = cross.suite.name if cross.suite.name != ctx.suite.name else f"{cross.suite.name}_2"
    suites.append((cross, label, s.cross_validation_ppl))
  corpora = inputs.read_corpora(s.corpus)
  docs = [t for c in corpora for t in c.texts]
  # Read before decoding: a wrong file fails now.
  valid = [perplexity.read_validation_ppl(csv, c.suite) if csv else None for c, _, csv in suites]
  sets, manifest = build_sets(ctx, docs)
  df = pd.concat([score_suite(c, label, sets, v, corpora)
                  for (c, label, _), v in zip(suites, valid)], ignore_index=True)
  for (c, label, csv), v in zip(suites, valid):
    absent = perplexity.missing_checkpoints(v, c.suite) if v is not None else []
    if absent:
      ctx.skipped.append(f"{label}: no validation perplexity for {', '.join(absent)} in {csv}")
  ctx.skipped += [f"{c.skipped} empty document(s) of {c.path}" for c in corpora if c.skipped]
  gen = manifest["generation"]
  evaluated = [f"{len(sets)} sets ({gen['prompts']} prompts x {s.max_new_tokens} new tokens; "
               f"{manifest['perturbation']['passages']} perturbed passages)"]
  if not ctx.is_main:
    return ctx.outcome(None, evaluated=evaluated)
  ctx.write_csv(CSV_NAME, df, float_format="%.8g")
  if s.plots:
    ctx.skipped += A.write_plots(df, ctx.path("plots"))[1]
  info = _summary_info(ctx, [label for _, label, _ in suites], manifest)
  ctx.write_text("summary.md", A.summary_markdown(df, ctx.suite.name, info, s.tolerance))
  answer = A.fall_then_rise_answer(A.shapes(df, A.SMALL_PREFERRED, ctx.suite.name, s.tolerance))
  headline = (f"{A.SMALL_PREFERRED} set, does perplexity fall early for every size and rise later "
              f"for the large ones only? {answer.text.replace('**', '')}")
  return ctx.outcome(df, evaluated=evaluated, results=[headline],
                     files_=[CSV_NAME, "summary.md", "sets/", *(["plots/"] if s.plots else [])])


def _summary_info(ctx: Experiment, labels, manifest: dict) -> dict[str, str]:
  settings, suite = ctx.settings, ctx.suite
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
      "prompts truncated to fit the context":
          f"{gen['prompts_truncated']} (kept the start token and the last "
          f"{gen['max_prompt_tokens'] - 1} tokens)",
      "joint steps without positive mass (fell back to one model)": json.dumps(fallback),
      "perturbed passages": f"{pert['passages']} x {pert['passage_tokens']} tokens; noise rates "
                            f"{list(settings.noise_rates)} (window {settings.shuffle_window}); "
                            f"{pert['passages_with_swaps']} passages with entity/number swaps",
      "validation perplexity": (settings.validation_ppl or
                                f"computed from {', '.join(settings.corpus)}"),
  }


if __name__ == "__main__":
  context.main(Settings, run)
