r"""The downstream ICL sweep as a user runs it: opt_jax's binary vs an lm-evaluation-harness loop.

  python benchmarks/icl_sweep_vs_lmeval.py            # needs lm_eval: pip install -e .[bench]
  python benchmarks/icl_sweep_vs_lmeval.py --settings=small --rounds=3 --cache=both
  python benchmarks/icl_sweep_vs_lmeval.py --settings=small --breakdown_only

Checkpoints (made here, under --work_dir): 2 sizes x 2 steps of tiny OPT models (4 x 256 and
6 x 512 by default, head_dim 64, 2048 positions) with random weights, a byte-level BPE trained on
the tasks' text with OPT's special tokens, saved as opt_jax checkpoints plus a suite manifest,
and each converted to HF format by `python -m tools.convert_checkpoint --to=hf`.

Requests: BIG-bench multiple-choice tasks from --bigbench_dir (read in place), k-shot prompts,
built by experiments/tasks/icl.py's functions (load_tasks, make_items, encode), so both
sides score exactly the same (context, continuation) strings. Before timing, lm-eval's own
encoding (HFLM._encode_pair) of every request is checked to equal opt_jax's token ids.

Settings: `small` = --max_examples examples of each of --tasks per checkpoint (3 x 16 = 48 by
default); `full` = every example of --full_task.

Sides, each a whole process timed from the parent (imports, restores, compiles included):
  opt_jax: `python -m experiments.downstream_icl --suite=... --bigbench_dir=... --tasks=...
           --k_shot=K --max_examples=N --batch_size=B --out=FRESH_DIR --compilation_cache=`
           (today's flags, plots on, the persistent compilation cache off: a first run);
           opt_jax+cache: the same with `--compilation_cache=DIR`, a folder warmed by one untimed
           run: a second run of the binary, as users get by default (opt_jax.cli turns the
           cache on).
  lm_eval: one Python process that, for each HF checkpoint, builds lm_eval's HFLM (batch B, CPU,
           fp32) and calls HFLM.loglikelihood on the same requests (Instance objects).
Rounds interleave the sides (order alternating); wall times are medians; the ratio is
lm_eval / opt_jax (> 1: opt_jax is faster), also as the median of per-round ratios. The load
average is printed with every figure. Per task and checkpoint the accuracies of both sides must
be equal (lm_eval's log-likelihoods go through the binary's own metric code); the largest
log-prob difference is reported.

Breakdown (`--breakdown`, small setting): the opt_jax run once more in one process with timers
around imports, task loading, tokenising, restores (a background thread, overlapping), scoring,
JAX tracing/lowering/compiling (jax.monitoring events) and the analysis/plots.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BIGBENCH = os.path.join(REPO, "..", "shared", "data", "bigbench")
SIZES = {  # name: (layers, hidden); heads of 64, ffn 4 x hidden
    "bench-4x256": (4, 256),
    "bench-6x512": (6, 512),
}
STEPS = (1000, 2000)
# Random checkpoints of one size share their initial norms and biases (ones and zeros), which the
# experiments' integrity pre-check rightly reports as identical tensors across steps.
_SKIP_INTEGRITY = ("--skip_integrity_check",)


def _loadavg() -> float:
  return os.getloadavg()[0]


# Setup: tokenizer, opt_jax checkpoints, suite, HF copies ---------------------------------------

def _configs(vocab_size: int):
  from opt_jax import families
  opt = families.get("opt")
  return {name: opt.config(vocab_size=vocab_size, hidden_size=d, num_hidden_layers=n,
                           num_attention_heads=d // 64, ffn_dim=4 * d, max_position_embeddings=2048)
          for name, (n, d) in SIZES.items()}


def _train_tokenizer(texts: list[str], directory: str, vocab_size: int) -> str:
  """Byte-level BPE with OPT's specials (<s>=0 <pad>=1 </s>=2 <unk>=3). Its post-processor
  prepends </s> as OPT's HF tokenizer does, so HF's tokenizer (hence HFLM) adds the same first
  token that opt_jax's tokenizer adds itself (it ignores post-processors)."""
  from tokenizers import processors

  from experiments.tasks import corpus
  tok = corpus.bpe_tokenizer(texts, vocab_size, min_frequency=0)
  tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "tokenizer.json")
  tok.save(path)
  return path


def _random_params(config, seed: int, std: float):
  import jax
  import numpy as np

  from opt_jax.model import param_shapes
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(shape.shape, np.float32)
    if "bias" in name:
      return np.zeros(shape.shape, np.float32)
    return (std * rng.standard_normal(shape.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


def setup(work: str, bigbench_dir: str, vocab_size: int, std: float) -> dict:
  """Writes work/{tok,ckpt,hf,suite.json} once (reused when work/setup.json exists)."""
  marker = os.path.join(work, "setup.json")
  if os.path.exists(marker):
    with open(marker) as f:
      return json.load(f)
  from experiments.tasks import bigbench as bb
  from opt_jax.checkpoints import orbax_format

  texts = []
  for name in sorted(os.listdir(bigbench_dir))[:40]:   # enough English text for an 8k BPE
    try:
      task = bb.load_task(os.path.join(bigbench_dir, name))
    except (OSError, ValueError):
      continue
    texts += [e.input + " " + " ".join(e.options) for e in task.examples]
  tok_file = _train_tokenizer(texts, os.path.join(work, "tok"), vocab_size)
  models, hf_dirs = [], {}
  for i, (name, config) in enumerate(_configs(vocab_size).items()):
    ckpts = {}
    for j, step in enumerate(STEPS):
      rel = f"ckpt/{name}/step{step}"
      orbax_format.save(os.path.join(work, rel), _random_params(config, 10 * i + j, std), config,
                        tokenizer_files=[tok_file])
      ckpts[str(step)] = rel
      hf = os.path.join(work, "hf", name, f"step{step}")
      subprocess.run([sys.executable, "-m", "tools.convert_checkpoint", "--to=hf",
                      f"--input={os.path.join(work, rel)}", f"--output={hf}"], cwd=REPO, check=True,
                     stdout=subprocess.DEVNULL)
      hf_dirs[f"{name}/{step}"] = hf
    models.append({"name": name, "params": config.num_params(), "tokens_per_step": 8 * 2048,
                   "checkpoints": ckpts})
  suite = os.path.join(work, "suite.json")
  with open(suite, "w") as f:
    json.dump({"name": "bench", "models": models}, f, indent=2)
  # A user's sweep has validation perplexities (the x axis of every plot): computed once here,
  # untimed, on text of tasks outside the benchmark's defaults.
  corpus = os.path.join(work, "validation.txt")
  with open(corpus, "w") as f:
    f.write("\n\n".join(texts[:300]))
  subprocess.run([sys.executable, "-m", "experiments.validation_ppl", f"--suite={suite}",
                  f"--corpus={corpus}", f"--out={os.path.join(work, 'vppl')}",
                  "--context_length=512", *_SKIP_INTEGRITY], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  info = {"suite": suite, "hf": hf_dirs, "vocab_size": vocab_size,
          "validation_ppl": os.path.join(work, "vppl", "validation_ppl.csv")}
  with open(marker, "w") as f:
    json.dump(info, f, indent=2)
  return info


# Requests, from the binary's own prompt building ------------------------------------------------

def build_requests(bigbench_dir: str, tasks: list[str], k: int, max_examples: int | None,
                   suite: str, seed: int = 0):
  """(items, encoded, string requests) exactly as experiments.downstream_icl.run builds them."""
  from experiments.tasks import icl as icl_tasks
  from opt_jax import suite as suite_lib
  from opt_jax.checkpoints import checkpoint
  from opt_jax.tokenizer import load_tokenizer

  task_list = icl_tasks.load_tasks(bigbench_dir, tasks)
  if task_list.failures:
    raise ValueError(f"tasks failed to load: {task_list.failures}")
  items = icl_tasks.make_items(task_list.tasks, [k], seed, max_examples)
  s = suite_lib.load_suite(suite)
  first = next(iter(s.models[0].checkpoints.values()))
  max_length = min(checkpoint.load_config(next(iter(m.checkpoints.values())))
                   .max_position_embeddings for m in s.models)
  enc = icl_tasks.encode(items, load_tokenizer(first), max_length)
  strings = [(it.requests.context, c) for it, ok in zip(items, enc.kept) if ok
             for c in it.requests.continuations]
  assert len(strings) == len(enc.pairs)
  return items, enc, strings


# lm_eval side (runs in its own process) ----------------------------------------------------------

def lm_eval_worker(requests_file: str, hf_dirs: list[str], batch_size: int, out: str,
                   verify: bool) -> None:
  import torch
  from lm_eval.api.instance import Instance
  from lm_eval.models.huggingface import HFLM

  with open(requests_file) as f:
    req = json.load(f)
  strings = [tuple(r) for r in req["strings"]]
  if verify:  # untimed check: HFLM's encoding is opt_jax's, token for token
    lm = HFLM(pretrained=hf_dirs[0], batch_size=batch_size, device="cpu", dtype="float32")
    bad = [i for i, ((c, x), (ci, xi)) in enumerate(zip(strings, req["pairs"]))
           if list(map(list, lm._encode_pair(c, x))) != [ci, xi]]
    with open(out, "w") as f:
      json.dump({"mismatches": bad[:20], "n_mismatches": len(bad), "n": len(strings),
                 "torch_threads": torch.get_num_threads()}, f)
    return
  results = {}
  for path in hf_dirs:
    lm = HFLM(pretrained=path, batch_size=batch_size, device="cpu", dtype="float32")
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=s, idx=i)
                 for i, s in enumerate(strings)]
    results[path] = [float(lp) for lp, _ in lm.loglikelihood(instances, disable_tqdm=True)]
    del lm
  with open(out, "w") as f:
    json.dump(results, f)


# Breakdown of one opt_jax run (its own process) ---------------------------------------------------

def breakdown_worker(argv: list[str], out: str) -> None:
  t_start = time.perf_counter()
  import collections
  import threading
  timers: dict[str, float] = collections.defaultdict(float)
  counts: dict[str, int] = collections.defaultdict(int)
  lock = threading.Lock()

  def add(name, seconds):
    with lock:
      timers[name] += seconds
      counts[name] += 1

  t = time.perf_counter()
  import jax
  from jax import monitoring
  add("import jax", time.perf_counter() - t)
  t = time.perf_counter()
  from experiments import context as icl_context
  from experiments import downstream_icl as icl_bin
  from experiments.analysis import icl_plots
  from experiments.tasks import icl as icl_tasks
  from opt_jax import scoring, sweep, tokenizer  # noqa: F401 (imported by run)
  from opt_jax.checkpoints import checkpoint  # noqa: F401 (imported by run)
  add("import opt_jax, experiments, pandas, matplotlib", time.perf_counter() - t)

  events = {"/jax/core/compile/jaxpr_trace_duration": "jax: trace",
            "/jax/core/compile/jaxpr_to_mlir_module_duration": "jax: lower to MLIR",
            "/jax/core/compile/backend_compile_duration": "jax: XLA compile",
            "/jax/compilation_cache/cache_retrieval_time_sec": "jax: persistent cache read"}

  def on_event(event, duration, **_):
    if event in events:
      add(events[event], duration)
  monitoring.register_event_duration_secs_listener(on_event)

  def timed(owner, attr, name):
    fn = getattr(owner, attr)

    def wrapper(*a, **k):
      t0 = time.perf_counter()
      try:
        return fn(*a, **k)
      finally:
        add(name, time.perf_counter() - t0)
    setattr(owner, attr, wrapper)

  timed(checkpoint, "restore", "restore (background thread)")
  timed(icl_tasks, "load_tasks", "load tasks")
  timed(icl_tasks, "make_items", "build prompts")
  timed(icl_tasks, "encode", "tokenise")
  timed(scoring.Scorer, "loglikelihood_tokens", "scoring (incl. its compiles)")
  timed(scoring.Scorer, "__init__", "Scorer() incl. device_put")
  timed(scoring.Scorer, "set_params", "set_params")
  timed(icl_bin, "analyze_and_report", "analysis + plots + summary")
  timed(icl_plots, "plot_all", "plots")
  timed(sweep, "run_sweep", "sweep (restore wait + scoring + store)")

  t = time.perf_counter()
  sys.argv = ["downstream_icl"] + argv
  try:   # the binary itself: flags -> Settings -> run, its cache flag and closing summary
    icl_context.main(icl_bin.Settings, icl_bin.run)
  except SystemExit as e:
    if e.code:
      raise
  add("run() total", time.perf_counter() - t)
  add("in-process total", time.perf_counter() - t_start)
  with open(out, "w") as f:
    json.dump({"seconds": dict(timers), "counts": dict(counts),
               "jax_cache_dir": jax.config.jax_compilation_cache_dir}, f, indent=2)


# Parent ----------------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict | None = None, log: str | None = None) -> float:
  t = time.perf_counter()
  with open(log or os.devnull, "w") as f:
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=f, stderr=subprocess.STDOUT)
  return time.perf_counter() - t


def _cache_flag(cache_dir: str | None) -> str:
  """The binaries' own switch (opt_jax.cli): off, or JAX's persistent cache in cache_dir."""
  return f"--compilation_cache={cache_dir or ''}"


def compare(items, enc, opt_out: str, lm_results: dict, hf_dirs: dict) -> dict:
  """Per (model, step, task): accuracy of each side (the binary's metric code), max |dlogprob|."""
  import numpy as np
  import pandas as pd

  from experiments import downstream_icl as icl_bin
  from experiments.tasks import icl as icl_tasks
  from opt_jax.results import ResultStore

  table = pd.read_csv(os.path.join(opt_out, "icl_results.csv"))
  store = ResultStore(os.path.join(opt_out, "store"))
  tags = {k[1] for k in store.keys((icl_bin.NAME,))}   # a fresh --out: this run's one tag
  if len(tags) != 1:
    raise RuntimeError(f"expected one result tag in {opt_out}/store, found {sorted(tags)}")
  tag = tags.pop()
  rows, max_diff = [], 0.0
  for key, path in hf_dirs.items():
    model, step = key.split("/")
    ours = store.read((icl_bin.NAME, tag, model, int(step)))[0]["logprob"]
    theirs = np.array(lm_results[path], np.float64)
    max_diff = max(max_diff, float(np.abs(ours - theirs).max()))
    for r in icl_tasks.task_rows(items, enc, theirs):
      mine = table[(table.model == model) & (table.step == int(step)) & (table.task == r["task"])]
      rows.append({"model": model, "step": int(step), "task": r["task"],
                   "acc_opt_jax": float(mine.accuracy.iloc[0]), "acc_lm_eval": r["accuracy"]})
  equal = all(abs(r["acc_opt_jax"] - r["acc_lm_eval"]) < 1e-12 for r in rows)
  return {"rows": rows, "accuracies_equal": equal, "max_abs_logprob_diff": max_diff}


def run_setting(name: str, args, info: dict, tasks: list[str], max_examples: int | None,
                rounds: int, work: str, results: dict) -> None:
  items, enc, strings = build_requests(args.bigbench_dir, tasks, args.k_shot, max_examples,
                                       info["suite"])
  hf_dirs = info["hf"]
  req_file = os.path.join(work, f"requests_{name}.json")
  with open(req_file, "w") as f:
    json.dump({"strings": strings, "pairs": enc.pairs}, f)
  lm_cmd = [args.lm_eval_python, os.path.abspath(__file__), "--worker=lm_eval",
            f"--requests={req_file}", f"--hf_dirs={','.join(hf_dirs.values())}",
            f"--batch_size={args.batch_size}"]
  check = os.path.join(work, f"verify_{name}.json")
  _run(lm_cmd + ["--verify", f"--out={check}"])
  with open(check) as f:
    verify = json.load(f)
  if verify["n_mismatches"]:
    raise RuntimeError(f"{name}: lm_eval encodes {verify['n_mismatches']} of {verify['n']} "
                       f"requests differently from opt_jax (first: {verify['mismatches'][:3]})")
  n_items = int(enc.kept.sum())
  flags_ = [f"--suite={info['suite']}", f"--bigbench_dir={args.bigbench_dir}",
            f"--tasks={','.join(tasks)}", f"--k_shot={args.k_shot}",
            f"--max_examples={max_examples or 0}", f"--batch_size={args.batch_size}",
            f"--validation_ppl={info['validation_ppl']}", *_SKIP_INTEGRITY]
  opt_cmd = [args.opt_jax_python, "-m", "experiments.downstream_icl", *flags_]
  sides = ["lm_eval", "opt_jax"]
  cache_dir = os.path.join(work, f"jax_cache_{name}")
  if args.cache in ("on", "both"):
    shutil.rmtree(cache_dir, ignore_errors=True)
    out = tempfile.mkdtemp(dir=work, prefix=f"warm_{name}_")
    _run(opt_cmd + [f"--out={out}", _cache_flag(cache_dir)])   # fills the cache, untimed
    shutil.rmtree(out)
    sides = ["lm_eval", "opt_jax+cache"] if args.cache == "on" else sides + ["opt_jax+cache"]
  times: dict[str, list[float]] = {s: [] for s in sides}
  loads: list[float] = []
  comparison = None
  for r in range(rounds):
    order = sides if r % 2 == 0 else sides[::-1]
    for side in order:
      loads.append(_loadavg())
      out = tempfile.mkdtemp(dir=work, prefix=f"{name}_{side}_")
      if side == "lm_eval":
        lm_out = os.path.join(out, "lm_eval.json")
        times[side].append(_run(lm_cmd + [f"--out={lm_out}"]))
        with open(lm_out) as f:
          lm_results = json.load(f)
        shutil.rmtree(out)
      else:
        cache = _cache_flag(cache_dir if side.endswith("+cache") else None)
        times[side].append(_run(opt_cmd + [f"--out={out}", cache],
                                log=os.path.join(work, f"log_{name}_{side}.txt")))
        if r == 0 and side == sides[1]:
          keep = out           # compared with lm_eval below
        else:
          shutil.rmtree(out)
      print(f"  {name} round {r + 1} {side}: {times[side][-1]:.1f} s (load {loads[-1]:.1f})",
            flush=True)
    if comparison is None:
      comparison = compare(items, enc, keep, lm_results, hf_dirs)
    shutil.rmtree(keep, ignore_errors=True)
  loads.append(_loadavg())
  med = {s: statistics.median(v) for s, v in times.items()}
  res = {"tasks": tasks, "examples_per_checkpoint": n_items,
         "requests_per_checkpoint": len(strings),
         "checkpoints": len(hf_dirs), "k_shot": args.k_shot, "batch_size": args.batch_size,
         "times_s": times, "median_s": med, "loadavg": loads,
         "ratio_lm_eval_over": {s: med["lm_eval"] / med[s] for s in med if s != "lm_eval"},
         "ratio_paired_median": {s: statistics.median(a / b for a, b in zip(times["lm_eval"],
                                                                            times[s]))
                                 for s in med if s != "lm_eval"},
         "accuracies_equal": comparison["accuracies_equal"],
         "max_abs_logprob_diff": comparison["max_abs_logprob_diff"],
         "accuracy_rows": comparison["rows"]}
  results["settings"][name] = res
  print(f"{name}: {n_items} examples x {len(hf_dirs)} checkpoints ({len(strings)} requests per "
        f"checkpoint), load {min(loads):.1f}-{max(loads):.1f}")
  for s in med:
    extra = "" if s == "lm_eval" else (f"  lm_eval/{s} = {res['ratio_lm_eval_over'][s]:.2f}x "
                                       f"(paired {res['ratio_paired_median'][s]:.2f}x)")
    print(f"  {s:14s} median {med[s]:7.1f} s{extra}")
  print(f"  accuracies equal per task and checkpoint: {comparison['accuracies_equal']}; "
        f"max |log-prob difference| {comparison['max_abs_logprob_diff']:.2e}")
  if not comparison["accuracies_equal"]:
    for row in comparison["rows"]:
      print("   ", row)


def run_breakdown(args, info: dict, tasks: list[str], max_examples: int, work: str,
                  results: dict) -> None:
  flags_ = [f"--suite={info['suite']}", f"--bigbench_dir={args.bigbench_dir}",
            f"--tasks={','.join(tasks)}", f"--k_shot={args.k_shot}",
            f"--max_examples={max_examples}", f"--batch_size={args.batch_size}",
            f"--validation_ppl={info['validation_ppl']}", *_SKIP_INTEGRITY]
  out = {}
  variants = [("no cache", None)]
  if args.cache in ("on", "both"):
    cache = os.path.join(work, "jax_cache_small")
    if not os.path.isdir(cache):  # warm it with one untimed run of the binary
      run_dir = tempfile.mkdtemp(dir=work, prefix="warm_")
      _run([args.opt_jax_python, "-m", "experiments.downstream_icl", *flags_,
            f"--out={run_dir}", _cache_flag(cache)])
      shutil.rmtree(run_dir)
    variants.append(("warm persistent cache", cache))
  for label, cache in variants:
    run_dir = tempfile.mkdtemp(dir=work, prefix="breakdown_")
    report = os.path.join(run_dir, "breakdown.json")
    load = _loadavg()
    wall = _run([args.opt_jax_python, os.path.abspath(__file__), "--worker=breakdown",
                 f"--out={report}", "--", *flags_, f"--out={os.path.join(run_dir, 'out')}",
                 _cache_flag(cache)], log=os.path.join(work, f"log_breakdown_{len(out)}.txt"))
    with open(report) as f:
      b = json.load(f)
    b["process_wall_s"] = wall
    b["loadavg"] = load
    out[label] = b
    shutil.rmtree(run_dir)
    print(f"breakdown of one opt_jax run ({label}; small setting), wall {wall:.1f} s, load "
          f"{load:.1f}:")
    print(f"  {'interpreter start-up (wall - in-process)':48s} "
          f"{wall - b['seconds']['in-process total']:6.1f} s")
    for k, v in b["seconds"].items():
      print(f"  {k:48s} {v:6.1f} s" + (f"  (x{b['counts'][k]})" if b["counts"][k] > 1 else ""))
  results["breakdown"] = out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--bigbench_dir", default=DEFAULT_BIGBENCH)
  p.add_argument("--tasks", default="ruin_names,physics,metaphor_understanding",
                 help="tasks of the small setting")
  p.add_argument("--max_examples", type=int, default=16, help="examples per task, small setting")
  p.add_argument("--full_task", default="ruin_names", help="the task of the full setting")
  p.add_argument("--settings", default="small,full", help="small, full or both")
  p.add_argument("--k_shot", type=int, default=2)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--rounds", type=int, default=3, help="rounds of the small setting")
  p.add_argument("--full_rounds", type=int, default=1, help="rounds of the full setting")
  p.add_argument("--cache", choices=["off", "on", "both"], default="both",
                 help="opt_jax without / with a warm JAX persistent compilation cache")
  p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                 help="time the parts of one opt_jax run (small setting)")
  p.add_argument("--breakdown_only", action="store_true")
  p.add_argument("--vocab_size", type=int, default=8192)
  p.add_argument("--std", type=float, default=0.02, help="std of the random weights")
  p.add_argument("--work_dir", default=None, help="checkpoints etc. (default: a temporary folder)")
  p.add_argument("--lm_eval_python", default=sys.executable)
  p.add_argument("--opt_jax_python", default=sys.executable)
  p.add_argument("--json", default=None, help="also write the results here")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--requests", default=None, help=argparse.SUPPRESS)
  p.add_argument("--hf_dirs", default=None, help=argparse.SUPPRESS)
  p.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--out", default=None, help=argparse.SUPPRESS)
  args, rest = p.parse_known_args()
  sys.path.insert(0, REPO)
  if args.worker == "lm_eval":
    lm_eval_worker(args.requests, args.hf_dirs.split(","), args.batch_size, args.out, args.verify)
    return
  if args.worker == "breakdown":
    breakdown_worker([a for a in rest if a != "--"], args.out)
    return
  if rest:
    p.error(f"unknown arguments {rest}")
  args.bigbench_dir = os.path.abspath(args.bigbench_dir)
  work = args.work_dir or tempfile.mkdtemp(prefix="icl_bench_")
  os.makedirs(work, exist_ok=True)
  results: dict = {"settings": {}, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
  try:
    t = time.perf_counter()
    info = setup(work, args.bigbench_dir, args.vocab_size, args.std)
    print(f"setup {time.perf_counter() - t:.0f} s in {work}", flush=True)
    settings = [s for s in args.settings.split(",") if s]
    small_tasks = args.tasks.split(",")
    if not args.breakdown_only:
      if "small" in settings:
        run_setting("small", args, info, small_tasks, args.max_examples, args.rounds, work, results)
      if "full" in settings:
        run_setting("full", args, info, [args.full_task], None, args.full_rounds, work, results)
    if args.breakdown or args.breakdown_only:
      run_breakdown(args, info, small_tasks, args.max_examples, work, results)
  finally:
    if not args.work_dir:
      shutil.rmtree(work, ignore_errors=True)
  results["loadavg_end"] = os.getloadavg()
  if args.json:
    with open(args.json + ".tmp", "w") as f:
      json.dump(results, f, indent=2)
    os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
  main()
