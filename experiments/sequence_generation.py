r"""Sequence level (Xia et al. 2023, section 4): generated and corrupted text, scored at the final
checkpoints against model size and along training.

  python -m experiments.sequence_generation --suite=suite.json --corpus=valid.jsonl --out=out/seq \
      [--small=NAME --large=NAME] [--configurations=1:-1,1:0,1:1,0:1,-1:1] \
      [--methods=greedy,nucleus --top_p=0.9] [--num_prompts=32 --prompt_tokens=5] \
      [--max_new_tokens=50] [--noise_rates=0.2,0.4,0.6,0.8,1.0 --passage_tokens=100] \
      [--validation_ppl=out/validation_ppl] [--cross_suite=other.json] [--mesh=data:-1]

The defaults are the paper's experiment (experiments/tasks/sequences.py builds the sets):
1. Generated sets: the final checkpoints of the smallest and largest model (--small, --large)
   decode together from p' = max(l1 * p_small + l2 * p_large, 0), renormalised, for each
   configuration (l1, l2) of --configurations (the paper's five: p_s - p_l, p_s, p_s + p_l, p_l,
   p_l - p_s), with greedy search and with nucleus sampling (top-p 0.9): sets `ps-pl_greedy`,
   `ps-pl_nucleus`, `ps_greedy`, ... Prompts: the first --prompt_tokens=5 tokens of the corpus
   documents in order, one per document, --num_prompts of them (--prompt_source=spans draws spans
   at random positions instead, for a corpus of few long documents; --prompts reads a file);
   --max_new_tokens=50 new tokens each (eos does not stop them).
2. Corrupted sets: --num_passages spans of --passage_tokens=100 tokens of the corpus, clean and
   with round(rate x 100) tokens replaced by random non-special ids for each --noise_rates rate
   (0.2 ... 1.0): `clean`, `replace_0.2`, ...
   Extras, off by default: --shuffle_rates (window shuffling, `shuffle_<rate>`), --swaps_per_kind
   (swapped entities and numbers, `facts_original` / `facts_swapped`), --sample_models (plain
   samples of other sizes, `sample_<model>`).
   Sets are stored as text and token ids in --out/sets/<set>.jsonl; a re-run with the same
   settings reuses them (sets/manifest.json records them, with the decode time).
3. Every set scored by every checkpoint of every size (opt_jax.sweep; resumable) with
   Scorer.rolling_tokens: a generated sequence's perplexity is over its continuation given the
   prompt, a passage's over all its tokens after the start token; ppl = exp(sum NLL / tokens) over
   the set. Validation perplexity per checkpoint from --validation_ppl (the CSV of
   experiments/validation_ppl.py, or its folder) or computed in the same sweep from --corpus.
   --cross_suite scores the same sets with a second suite (another family: a set is re-tokenised
   from its text where the tokenizer differs; a continuation whose text is empty is dropped).

Outputs in --out: sequence_ppl.csv (every checkpoint; experiments/analysis/sequences.COLUMNS),
final_checkpoints.csv (each size's last checkpoint: the scaling table, FINAL_COLUMNS), plots/
(perplexity at the final checkpoints against parameters: one panel per decoding method with one
line per configuration, Figure 6 row 1, and one of the corruption rates, Figure 5 left; one file
per scoring suite, the --cross_suite one being Figure 7; and the trajectories against validation
perplexity and FLOPs), summary.md (the paper's two questions answered with numbers), sets/,
store/, runs/.

Bad input fails before anything is decoded: models of different tokenizers in one joint decoder
(generation.check_joint_models names them), configurations without a positive weight, unreadable
prompt files and corpora, a validation CSV without a checkpoint, and the suite integrity
pre-check (experiments/context.py). A step of a joint decoder without positive mass takes the
distribution of the model with the larger weight, counted in sets/manifest.json and summary.md;
prompts longer than max_position_embeddings - max_new_tokens keep the start token and their last
tokens, counted. Decoding runs on the mesh like scoring does (--mesh), with the same tokens.
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
from experiments.tasks import sequences as T
from experiments.tasks.sequences import SequenceSet, load_set, read_prompts
from opt_jax import cli, files, inputs
from opt_jax.errors import InputError

NAME = "sequence_generation"
CSV_NAME = "sequence_ppl.csv"
FINAL_CSV = "final_checkpoints.csv"
SETS_DIR = "sets"
FORMAT = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(ExperimentSettings):
  """Everything a run depends on (see the module docstring)."""
  corpus: tuple[str, ...] = cli.option(
      help="Validation corpus: .jsonl (JSON lines with a \"text\" field) or any other file (one "
           "plain-text document).", key=False)          # its text is in the keys
  prompts: str | None = cli.option(
      None, "Prompt file (.jsonl: a \"prompt\" or \"text\" string per line; any other file: one "
            "prompt per non-empty line); default: prompts from the corpus (--prompt_source).",
      key=False)                                        # its contents are in the sets' key
  prompt_source: str = cli.option(
      "documents", "Prompts from the corpus: 'documents' (the first --prompt_tokens tokens of "
                   "each document, in order: the paper's) or 'spans' (drawn at random positions "
                   "by --seed).", choices=("documents", "spans"))
  num_prompts: int = cli.option(32, "Prompts taken from the corpus.", ge=1)
  prompt_tokens: int = cli.option(5, "Tokens per corpus prompt.", ge=1)
  max_new_tokens: int = cli.option(50, "Tokens generated per prompt.", ge=1)
  small: str | None = cli.option(None, "Small model of the joint decoder (default: smallest).")
  large: str | None = cli.option(None, "Large model of the joint decoder (default: largest).")
  configurations: tuple[str, ...] = cli.option(
      T.PAPER_CONFIGURATIONS, "Mixtures l1:l2 of l1 * p_small + l2 * p_large (entries <= 0 "
                              "dropped, renormalised).")
  methods: tuple[str, ...] = cli.option(T.METHODS, "Decoding methods.", choices=T.METHODS)
  sample_models: tuple[str, ...] = cli.option(
      (), "Extra: models to sample plain sets from (sample_<model>).")
  top_p: float = cli.option(0.9, "Nucleus sampling mass.", gt=0, le=1)
  temperature: float = cli.option(1.0, "Sampling temperature.", gt=0)
  seed: int = cli.option(0, "Seed of prompts, passages, noise and sampling.", ge=0)
  noise_rates: tuple[float, ...] = cli.option(
      (0.2, 0.4, 0.6, 0.8, 1.0), "Shares of each passage's tokens replaced by random tokens.",
      ge=0, le=1)
  shuffle_rates: tuple[float, ...] = cli.option(
      (), "Extra: shares of shuffled windows (shuffle_<rate> sets).", ge=0, le=1)
  shuffle_window: int = cli.option(4, "Tokens per shuffling window.", ge=2)
  num_passages: int = cli.option(32, "Corpus passages to corrupt.", ge=1)
  passage_tokens: int = cli.option(100, "Tokens per passage.", ge=1)
  swaps_per_kind: int = cli.option(
      0, "Extra: entity and number swaps per passage (facts_original / facts_swapped sets).", ge=0)
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


def _pair(ctx: Experiment):
  """(small, large) suite models of the joint decoder; errors name the flag at fault."""
  by_size = sorted(ctx.suite.models, key=lambda m: m.params)
  small = _model(ctx, ctx.settings.small, by_size[0])
  large = _model(ctx, ctx.settings.large, by_size[-1])
  if small.name == large.name:
    raise InputError(f"--small and --large are the same model ({small.name}); the suite needs two "
                     "sizes, or name them with --small/--large")
  return small, large


def generated_sets(ctx: Experiment, docs: Sequence[str]) -> tuple[list[SequenceSet],
                                                                  dict[str, Any]]:
  """The generated sets from the final checkpoints of --small and --large, decoded on ctx.mesh,
  and the generation stats for the manifest."""
  from opt_jax import generation, sharding  # pylint: disable=import-outside-toplevel
  from opt_jax.checkpoints import checkpoint  # pylint: disable=import-outside-toplevel

  s = ctx.settings
  small, large = _pair(ctx)
  sample = [_model(ctx, n, None) for n in s.sample_models]
  sc, lc = ctx.configs[small.name], ctx.configs[large.name]
  stok, ltok = ctx.tokenizers[small.name], ctx.tokenizers[large.name]
  try:
    generation.check_joint_models([sc, lc], [stok, ltok], [small.name, large.name])
  except ValueError as e:
    raise InputError(str(e)) from None
  max_new = s.max_new_tokens
  context_size = min(lc.max_position_embeddings, sc.max_position_embeddings)
  if context_size - max_new < 2:
    raise InputError(f"--max_new_tokens={max_new} leaves no room for a prompt in a context of "
                     f"{context_size} positions")
  prompts = T.make_prompts(stok, docs, max_tokens=context_size - max_new, prompt_file=s.prompts,
                           source=s.prompt_source, num_prompts=s.num_prompts,
                           prompt_tokens=s.prompt_tokens, seed=s.seed)

  def load(model):
    step, path = _final(model)
    config = ctx.configs[model.name]
    # Restored straight into the mesh's layout: a large model never sits whole on one device.
    shardings = sharding.param_shardings(config, ctx.mesh) if ctx.mesh is not None else None
    return config, checkpoint.restore(path, shardings=shardings, dtype=ctx.dtype), step

  (_, sp, sstep), (_, lp, lstep) = load(small), load(large)
  configurations = T.parse_configurations(s.configurations)
  ctx.say(f"decoding {len(prompts.ids)} prompts x {max_new} tokens with {small.name} (small) and "
          f"{large.name} (large): {len(configurations)} configurations x {', '.join(s.methods)}")
  sets, stats = T.decode_sets(
      [(sc, sp), (lc, lp)], stok, prompts, configurations, s.methods, max_new_tokens=max_new,
      top_p=s.top_p, temperature=s.temperature, seed=s.seed, batch_size=s.generation_batch_size,
      mesh=ctx.mesh, names=[small.name, large.name], say=ctx.say)
  del sp, lp
  stats.update(prompts=len(prompts.ids), prompt_source=prompts.source,
               prompts_truncated=prompts.truncated, short_documents=prompts.short_documents,
               max_prompt_tokens=context_size - max_new, small=f"{small.name}@{sstep}",
               large=f"{large.name}@{lstep}")
  for k, model in enumerate(sample):   # extras: plain samples, one model in memory at a time
    config, params, _ = load(model)
    tok = ctx.tokenizers[model.name]
    # Its own encoding of the prompt texts if its tokenizer differs; its own context length.
    ids = (prompts.ids if tok.fingerprint() == stok.fingerprint() else
           [[tok.start_id] + b for b in tok.encode_batch(prompts.texts, add_bos=False)])
    room = config.max_position_embeddings - max_new
    ids = [p if len(p) <= room else [p[0]] + p[len(p) - room + 1:] for p in ids]
    outs = generation.generate(config, params, ids, max_new_tokens=max_new, sampler="sample",
                               top_p=s.top_p, temperature=s.temperature, eos_id=None,
                               seed=s.seed + 100 + k, batch_size=s.generation_batch_size,
                               mesh=ctx.mesh)
    name = f"sample_{model.name}"
    sets.append(T.sample_set(name, tok, prompts.texts, ids, outs))
    stats["sets"][name] = {"sequences": len(outs), "tokens": sum(map(len, outs))}
    del params
  return sets, stats


def build_sets(ctx: Experiment, docs: Sequence[str]) -> tuple[list[SequenceSet], dict]:
  """The generated and corrupted sets from the corpus documents `docs`, reused from
  out/sets when everything they depend on is unchanged."""
  s = ctx.settings
  key = hashlib.sha256(json.dumps({
      "format": FORMAT,
      "settings": {k: v for k, v in cli.key(s).items() if k not in SCORING_ONLY},
      "prompt_file": (files.sha256_file(s.prompts)
                      if s.prompts and os.path.isfile(s.prompts) else None),
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
      manifest["reused"] = True
      return [load_set(os.path.join(directory, f"{n}.jsonl")) for n in manifest["sets"]], manifest
  sets, gen_stats = generated_sets(ctx, docs)
  small, _ = _pair(ctx)
  more, pert_stats = T.perturbed_sets(
      ctx.tokenizers[small.name], docs, seed=s.seed, num_passages=s.num_passages,
      passage_tokens=s.passage_tokens, noise_rates=s.noise_rates, shuffle_rates=s.shuffle_rates,
      shuffle_window=s.shuffle_window, swaps_per_kind=s.swaps_per_kind)
  sets += more
  manifest = {"key": key, "sets": [x.name for x in sets], "generation": gen_stats,
              "perturbation": pert_stats, "digests": {x.name: x.digest() for x in sets}}
  if ctx.is_main:
    for x in sets:
      T.save_set(x, directory)
    files.write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")  # last: marks completion
  return sets, manifest


# Scoring --------------------------------------------------------------------------------------

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
      inputs_[fp] = [T.scoring_inputs(s, tok) for s in sets]
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
  """Builds the sets, scores them with every suite, writes the CSVs, plots and summary.md.
  Outcome.table: the trajectory table (A.COLUMNS)."""
  s = settings
  ctx = Experiment(NAME, s, progress=progress, run_info=run_info)
  ctx.window(s.context_length, s.stride)
  few = [f"{m.name} ({len(m.steps)})" for m in ctx.suite.models if len(m.steps) < 2]
  if few:   # a trajectory's fall and rise need two checkpoints at least
    raise InputError(f"--suite={s.suite}: every model needs at least 2 checkpoints; "
                     f"{', '.join(few)} {'has' if len(few) == 1 else 'have'} fewer")
  T.parse_configurations(s.configurations)
  _pair(ctx)
  for name in s.sample_models:
    _model(ctx, name, None)
  suites = [(ctx, ctx.suite.name, s.validation_ppl)]
  if s.cross_suite:
    cross = ctx.with_suite(s.cross_suite)
    cross.window(s.context_length, s.stride)
    label = cross.suite.name if cross.suite.name != ctx.suite.name else f"{cross.suite.name}_2"
    suites.append((cross, label, s.cross_validation_ppl))
  corpora = inputs.read_corpora(s.corpus)
  docs = [t for c in corpora for t in c.texts]
  # Read and checked before decoding: a wrong file or a bad checkpoint fails now.
  valid = [perplexity.read_validation_ppl(csv, c.suite) if csv else None for c, _, csv in suites]
  if s.prompts:
    read_prompts(s.prompts)
  for c, _, _ in suites:
    c.check_integrity()
  sets, manifest = build_sets(ctx, docs)
  df = pd.concat([score_suite(c, label, sets, v, corpora)
                  for (c, label, _), v in zip(suites, valid)], ignore_index=True)
  for (c, label, csv), v in zip(suites, valid):
    absent = perplexity.missing_checkpoints(v, c.suite) if v is not None else []
    if absent:
      ctx.skipped.append(f"{label}: no validation perplexity for {', '.join(absent)} in {csv}")
  ctx.skipped += [f"{c.skipped} empty document(s) of {c.path}" for c in corpora if c.skipped]
  gen = manifest["generation"]
  if gen["prompt_source"] == "documents" and gen["prompts"] < s.num_prompts:
    ctx.skipped.append(f"{gen['prompts']} prompt(s) instead of --num_prompts={s.num_prompts}: the "
                       f"corpus has no more documents of {s.prompt_tokens} tokens "
                       f"({gen['short_documents']} shorter ones passed over)")
  evaluated = [f"{len(sets)} sets ({gen['prompts']} prompts x {s.max_new_tokens} new tokens, "
               f"decoded in {gen['decode_seconds']:.1f} s; "
               f"{manifest['perturbation']['passages']} corrupted passages)"]
  if not ctx.is_main:
    return ctx.outcome(None, evaluated=evaluated)
  final = A.final_table(df)
  ctx.write_csv(CSV_NAME, df, float_format="%.8g")
  ctx.write_csv(FINAL_CSV, final, float_format="%.8g")
  if s.plots:
    ctx.skipped += A.write_plots(df, ctx.path("plots"))[1]
  info = _summary_info(ctx, [label for _, label, _ in suites], manifest)
  ctx.write_text("summary.md", A.summary_markdown(df, ctx.suite.name, info, s.tolerance))
  when = ", in the run that made the reused sets" if manifest.get("reused") else ""
  results = [A.headline(df, ctx.suite.name, s.tolerance),
             f"decode time: {gen['decode_seconds']:.1f} s for "
             f"{sum(1 for x in gen['sets'].values() if 'method' in x)} joint sets (compilation "
             f"included{when})"]
  return ctx.outcome(df, evaluated=evaluated, results=results,
                     files_=[CSV_NAME, FINAL_CSV, "summary.md", "sets/",
                             *(["plots/"] if s.plots else [])])


def _summary_info(ctx: Experiment, labels, manifest: dict) -> dict[str, str]:
  settings, suite = ctx.settings, ctx.suite
  gen, pert = manifest["generation"], manifest["perturbation"]
  fallback = {n: x["fallback_steps"] for n, x in gen["sets"].items() if "fallback_steps" in x}
  noise = [f"replacement {list(settings.noise_rates)}"]
  if settings.shuffle_rates:
    noise.append(f"shuffling {list(settings.shuffle_rates)} (window {settings.shuffle_window})")
  if settings.swaps_per_kind:
    noise.append(f"{pert['passages_with_swaps']} passages with entity/number swaps")
  return {
      "suite": f"{suite.name} ({', '.join(m.name for m in suite.models)}; "
               f"{len(suite)} checkpoints)",
      "scored by": ", ".join(labels),
      "generation": f"small {gen['small']}, large {gen['large']}; configurations (l1, l2) of "
                    f"l1 * p_small + l2 * p_large: {', '.join(settings.configurations)}; "
                    f"{', '.join(settings.methods)} (top-p {settings.top_p}, temperature "
                    f"{settings.temperature}, seed {settings.seed}); {gen['prompts']} prompts "
                    f"({gen['prompt_source']}, {settings.prompt_tokens} tokens), "
                    f"{settings.max_new_tokens} new tokens",
      "decode time": f"{gen['decode_seconds']:.1f} s (every joint set, compilation included)",
      "prompts truncated to fit the context":
          f"{gen['prompts_truncated']} (kept the start token and the last "
          f"{gen['max_prompt_tokens'] - 1} tokens)",
      "joint steps without positive mass (took the larger weight's model)": json.dumps(fallback),
      "corrupted passages": f"{pert['passages']} x {pert['passage_tokens']} tokens; "
                            + "; ".join(noise),
      "validation perplexity": (settings.validation_ppl or
                                f"computed from {', '.join(settings.corpus)}"),
  }


if __name__ == "__main__":
  context.main(Settings, run)
