r"""The sweep a user runs: validation perplexity over the revisions of a Pythia-70m-shaped repo in
the HF cache, opt_jax's binary vs the loop a user would write with HF PyTorch.

  python benchmarks/sweep_vs_hf.py                          # 4 revisions, 30,000 characters
  python benchmarks/sweep_vs_hf.py --revisions=6 --rounds=3 --cache=both

Setup (under --work_dir, reused when present): a byte-level BPE with Pythia's specials trained on
the repository's Markdown (vocabulary --vocab, 8,064 by default), and --revisions random
GPTNeoXForCausalLM checkpoints of Pythia-70m's shape (6 layers, 512 hidden, 8 heads, 2,048
positions; every tensor random, norms near 1) saved with save_pretrained (safetensors, fp32) and
laid out as revisions step1000, step2000, ... of one repo in an HF hub cache (refs/, snapshots/
linking into blobs/, as huggingface_hub writes it); the suite manifest names each snapshot with
its revision and sha (what tools.make_suite writes). The text: the first --chars characters of
the repository's Markdown.

Sides, each a whole process timed from here (imports, restores, compiles included):
  opt_jax: python -m experiments.validation_ppl --suite=S --corpus=TEXT --out=FRESH
           --context_length=2048 --noplots, default flags otherwise (integrity pre-check on,
           prefetch on, batch size 8); --compilation_cache= (off: a first run) and/or a folder
           warmed by one untimed run (--cache=on|off|both).
  hf:      one Python process: for each revision, GPTNeoXForCausalLM.from_pretrained(repo,
           revision=..., cache_dir=CACHE) (offline), AutoTokenizer, then the same disjoint
           windows of 2,048 tokens (lm-eval's loglikelihood_rolling rule: every token after the
           first scored once), one window per forward under torch.no_grad, log_softmax and
           gather, perplexity = exp(mean NLL).
Rounds alternate the order of the sides; figures are medians; ratio = hf / opt_jax (> 1: opt_jax
is faster), also the median of per-round ratios. The perplexities of both sides must agree
(rtol 1e-4). From opt_jax's run manifest and stored results: the sweep's wall time, compile
time, programs compiled, and per checkpoint the restore and evaluation seconds, so the process's
other seconds (start-up, imports, integrity pre-check, tokenising) are what is left.

Kernel (`--kernel_only`, or after the rounds): one process restores the first revision and times
opt_jax's scoring program alone (scoring.score_program, blocked attention) on the text's windows
as the sweep runs them ([rows, 2048], rows = the batch bucket of the real windows) and padded to
the full batch ([8, 2048], what a sweep ran before batch buckets), --kernel_reps times each,
alternating; printed: medians, their ratio, and per checkpoint of the sweep
(sweep wall - compile) / checkpoints / (restore + kernel).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ID = "bench/pythia-70m-shaped"
CONTEXT = 2048
SHAPE = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
             max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
             use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False,
             bos_token_id=0, eos_token_id=0, layer_norm_eps=1e-5)


def _loadavg() -> float:
  return os.getloadavg()[0]


def _markdown_text() -> str:
  paths = [os.path.join(REPO, "README.md"), os.path.join(REPO, "BENCHMARKS.md")]
  paths += sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
  return "\n\n".join(open(p, encoding="utf-8").read() for p in paths if os.path.isfile(p))


# Setup -----------------------------------------------------------------------------------------

def _blob_name(path: str) -> str:
  with open(path, "rb") as f:
    data = f.read()
  if path.endswith((".safetensors", ".bin")):
    return hashlib.sha256(data).hexdigest()
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _add_revision(cache: str, revision: str, source: str) -> tuple[str, str]:
  """The files of `source` as `revision` of REPO_ID in the cache; (snapshot folder, sha)."""
  root = os.path.join(cache, "models--" + REPO_ID.replace("/", "--"))
  sha = hashlib.sha1(f"{REPO_ID}@{revision}".encode()).hexdigest()
  snapshot = os.path.join(root, "snapshots", sha)
  os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
  os.makedirs(snapshot, exist_ok=True)
  os.makedirs(os.path.join(root, "refs"), exist_ok=True)
  for name in sorted(os.listdir(source)):
    target = os.path.join(root, "blobs", _blob_name(os.path.join(source, name)))
    if not os.path.exists(target):
      shutil.copyfile(os.path.join(source, name), target)
    link = os.path.join(snapshot, name)
    if not os.path.lexists(link):
      os.symlink(os.path.relpath(target, snapshot), link)
  with open(os.path.join(root, "refs", revision), "w") as f:
    f.write(sha)
  return snapshot, sha


def setup(work: str, revisions: int, vocab: int, chars: int) -> dict:
  info_path = os.path.join(work, "setup.json")
  if os.path.isfile(info_path):
    with open(info_path) as f:
      info = json.load(f)
    if info["revisions"] == revisions and info["vocab"] == vocab and info["chars"] == chars:
      return info
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, REPO)
  from experiments.tasks import corpus as corpus_lib  # pylint: disable=import-outside-toplevel

  shutil.rmtree(work, ignore_errors=True)
  os.makedirs(work)
  text = _markdown_text()
  tok = corpus_lib.bpe_tokenizer([text], vocab, specials=("<|endoftext|>", "<|padding|>"),
                                 min_frequency=0)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                              eos_token="<|endoftext|>",
                                              unk_token="<|endoftext|>")
  corpus = os.path.join(work, "validation.txt")
  with open(corpus, "w", encoding="utf-8") as f:
    f.write(text[:chars])
  cache = os.path.join(work, "hub")
  checkpoints = {}
  config = transformers.GPTNeoXConfig(vocab_size=vocab, **SHAPE)
  for i in range(revisions):
    step = 1000 * (i + 1)
    torch.manual_seed(i)
    model = transformers.GPTNeoXForCausalLM(config)
    with torch.no_grad():
      for name, p in model.named_parameters():
        if "layernorm" in name or "norm" in name.split(".")[-2]:
          p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight")
                  else 0.02 * torch.randn_like(p))
        else:
          p.normal_(0, 0.02)
    staging = os.path.join(work, "staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    fast.save_pretrained(staging)
    snapshot, sha = _add_revision(cache, f"step{step}", staging)
    checkpoints[str(step)] = {"path": snapshot, "revision": f"step{step}", "sha": sha}
  shutil.rmtree(os.path.join(work, "staging"), ignore_errors=True)
  suite_path = os.path.join(work, "suite.json")
  params = sum(p.numel() for p in model.parameters())
  with open(suite_path, "w") as f:
    json.dump({"name": "bench", "models": [{"name": "pythia-70m-shaped", "params": params,
                                            "tokens_per_step": 2097152,
                                            "checkpoints": checkpoints}]}, f, indent=1)
  info = {"revisions": revisions, "vocab": vocab, "chars": chars, "suite": suite_path,
          "corpus": corpus, "cache": cache, "steps": sorted(int(s) for s in checkpoints),
          "params": params}
  with open(info_path, "w") as f:
    json.dump(info, f)
  return info


# The HF side (a process of its own) -----------------------------------------------------------

def hf_worker(cache: str, corpus: str, steps: list[int], out: str) -> None:
  t0 = time.perf_counter()
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  text = open(corpus, encoding="utf-8").read()
  ppl = {}
  for step in steps:
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO_ID, revision=f"step{step}",
                                                           cache_dir=cache)
    model = transformers.GPTNeoXForCausalLM.from_pretrained(
        REPO_ID, revision=f"step{step}", cache_dir=cache, torch_dtype=torch.float32)
    model.eval()
    ids = tokenizer(text)["input_ids"]
    n, done, nll = len(ids) - 1, 0, 0.0
    with torch.no_grad():
      while done < n:                       # lm-eval's rolling windows, disjoint
        k = min(n - done, CONTEXT)
        end = done + k + 1
        start = max(0, end - 1 - CONTEXT)
        inputs = torch.tensor([ids[start:end - 1]])
        targets = torch.tensor(ids[start + 1:end])
        logp = torch.log_softmax(model(inputs).logits[0].float(), dim=-1)
        nll -= logp[-k:].gather(-1, targets[-k:, None]).sum().item()
        done += k
    ppl[step] = math.exp(nll / n)
  with open(out, "w") as f:
    json.dump({"ppl": ppl, "seconds_inside": time.perf_counter() - t0}, f)


# The kernel alone (a process of its own) --------------------------------------------------------

def kernel_worker(path: str, corpus: str, reps: int, out: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, REPO)
  from opt_jax import programs, scoring, tokenizer  # pylint: disable=import-outside-toplevel
  from opt_jax.checkpoints import checkpoint  # pylint: disable=import-outside-toplevel
  config = checkpoint.load_config(path)
  params = checkpoint.restore(path)
  tok = tokenizer.load_tokenizer(path, config=config)
  (ids,) = tok.encode_documents([open(corpus, encoding="utf-8").read()])
  windows = scoring.rolling_windows(ids, CONTEXT, CONTEXT)
  spec = scoring.ScoreSpec(config, "float32", scoring.resolve_attention("auto", config,
                                                                         jnp.float32))
  fn = scoring.score_program(spec)
  real = programs.bucket(len(windows), 1, 8)

  def batch(rows: int):
    ids = np.full((rows, CONTEXT), config.filler_token_id, np.int32)
    mask = np.zeros((rows, CONTEXT), np.int32)
    targets_ = ids.copy()
    positions = np.full((rows, CONTEXT), -1, np.int32)
    for r, (inputs, targets, _) in enumerate(windows):
      n = len(inputs)
      ids[r, :n], mask[r, :n], targets_[r, :n] = inputs, 1, targets
      positions[r, :n] = np.arange(n)
    return ids, mask, targets_, positions, np.zeros((rows, CONTEXT), np.int32)

  shapes = {real: batch(real), 8: batch(8)}
  for args in shapes.values():
    jax.block_until_ready(fn(params, *args))        # compile outside the timing
  times: dict[int, list[float]] = {b: [] for b in shapes}
  for r in range(reps):
    for b in (list(shapes) if r % 2 == 0 else list(shapes)[::-1]):
      t = time.perf_counter()
      jax.block_until_ready(fn(params, *shapes[b]))
      times[b].append(time.perf_counter() - t)
  with open(out, "w") as f:
    json.dump({"windows": len(windows), "real_rows": real, "times": times}, f)


def _kernel(info: dict, reps: int, work: str) -> dict:
  with open(info["suite"]) as f:
    first = json.load(f)["models"][0]["checkpoints"][str(info["steps"][0])]["path"]
  out = os.path.join(work, "kernel.json")
  _run([sys.executable, os.path.abspath(__file__), "--worker=kernel", first, info["corpus"],
        str(reps), out], os.path.join(work, "kernel.log"), dict(os.environ, JAX_PLATFORMS="cpu"))
  with open(out) as f:
    k = json.load(f)
  real, full = k["times"][str(k["real_rows"])], k["times"]["8"]
  k["real_s"], k["full_s"] = statistics.median(real), statistics.median(full)
  k["ratio"] = statistics.median(f / r for f, r in zip(full, real))
  print(f"kernel, {k['windows']} windows (load {_loadavg():.1f}): [{k['real_rows']}, {CONTEXT}] "
        f"{k['real_s']:.2f} s, [8, {CONTEXT}] {k['full_s']:.2f} s (medians of {reps}); padded / "
        f"real rows {k['ratio']:.2f}x (median of ratios)")
  return k


# Parent -----------------------------------------------------------------------------------------

def _run(cmd: list[str], log: str, env: dict | None = None) -> float:
  t = time.perf_counter()
  with open(log, "w") as f:
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=f, stderr=subprocess.STDOUT)
  return time.perf_counter() - t


def _opt_jax(info: dict, out: str, cache_dir: str | None, root: str, log: str) -> float:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  return _run([sys.executable, "-m", "experiments.validation_ppl", f"--suite={info['suite']}",
               f"--corpus={info['corpus']}", f"--out={out}", f"--context_length={CONTEXT}",
               "--noplots", f"--compilation_cache={cache_dir or ''}"], log, env)


def _opt_jax_details(out: str) -> dict:
  import pandas as pd  # pylint: disable=import-outside-toplevel
  (manifest,) = glob.glob(os.path.join(out, "runs", "*.json"))
  with open(manifest) as f:
    run = json.load(f)
  restores, evals = [], []
  import numpy as np  # pylint: disable=import-outside-toplevel
  for path in glob.glob(os.path.join(out, "store", "**", "*.npz"), recursive=True):
    with np.load(path) as z:
      meta = json.loads(str(z["__meta__"]))
    restores.append(meta["restore_seconds"])
    evals.append(meta["eval_seconds"])
  table = pd.read_csv(os.path.join(out, "validation_ppl.csv"))
  table = table[table["corpus"] == table["corpus"].iloc[0]]
  return {"sweep_wall": run["wall_seconds"], "compile": run.get("compile", {}),
          "restore": statistics.median(restores), "eval": statistics.median(evals),
          "ppl": {int(s): float(p) for s, p in zip(table["step"], table["ppl"])}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(),
                                                         "opt_jax_sweep_vs_hf"))
  parser.add_argument("--revisions", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=8064)
  parser.add_argument("--chars", type=int, default=30000)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--cache", choices=("off", "on", "both"), default="off",
                      help="opt_jax's persistent compilation cache: off (a first run), on (a "
                           "folder warmed by one untimed run), both")
  parser.add_argument("--opt_jax_root", default=REPO,
                      help="the opt_jax tree to time (e.g. an older commit, extracted)")
  parser.add_argument("--kernel_reps", type=int, default=3)
  parser.add_argument("--kernel_only", action="store_true")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args()
  if args.worker == "hf":
    hf_worker(*rest[:2], [int(s) for s in rest[2].split(",")], rest[3])
    return
  if args.worker == "kernel":
    kernel_worker(rest[0], rest[1], int(rest[2]), rest[3])
    return

  info = setup(args.work_dir, args.revisions, args.vocab, args.chars)
  work = tempfile.mkdtemp(prefix="sweep_vs_hf-")
  if args.kernel_only:
    _kernel(info, args.kernel_reps, work)
    shutil.rmtree(work, ignore_errors=True)
    return
  steps = ",".join(map(str, info["steps"]))
  modes = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.cache]
  warm = os.path.join(work, "jax_cache")
  if "on" in modes:
    _opt_jax(info, os.path.join(work, "warm"), warm, args.opt_jax_root,
             os.path.join(work, "warm.log"))
  hf_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  times: dict[str, list[float]] = {"hf": [], **{f"opt_jax/{m}": [] for m in modes}}
  details: dict[str, list[dict]] = {m: [] for m in modes}
  loads, hf_ppl = [], None
  print(f"{info['revisions']} revisions of a {info['params'] / 1e6:.1f}M-parameter "
        f"Pythia-70m-shaped model (vocabulary {info['vocab']}), {info['chars']:,} characters; "
        f"opt_jax from {args.opt_jax_root}", flush=True)
  for r in range(args.rounds):
    sides = ["hf"] + [f"opt_jax/{m}" for m in modes]
    for side in (sides if r % 2 == 0 else sides[::-1]):
      loads.append(_loadavg())
      if side == "hf":
        out = os.path.join(work, f"hf-{r}.json")
        times[side].append(_run([sys.executable, os.path.abspath(__file__), "--worker=hf",
                                 info["cache"], info["corpus"], steps, out],
                                os.path.join(work, f"hf-{r}.log"), hf_env))
        with open(out) as f:
          hf_ppl = {int(s): p for s, p in json.load(f)["ppl"].items()}
      else:
        mode = side.split("/")[1]
        out = os.path.join(work, f"opt_jax-{mode}-{r}")
        times[side].append(_opt_jax(info, out, warm if mode == "on" else None,
                                    args.opt_jax_root, out + ".log"))
        details[mode].append(_opt_jax_details(out))
      print(f"round {r} {side}: {times[side][-1]:.1f} s (load {loads[-1]:.1f})", flush=True)

  n = len(info["steps"])
  kernel = _kernel(info, args.kernel_reps, work)
  print(f"\nmedians over {args.rounds} rounds, {n} checkpoints, load average "
        f"{min(loads):.1f}-{max(loads):.1f}:")
  print(f"  hf (from_pretrained loop): {statistics.median(times['hf']):.1f} s")
  for mode in modes:
    side = f"opt_jax/{mode}"
    ratios = [h / o for h, o in zip(times["hf"], times[side])]
    d = details[mode]
    wall = statistics.median(times[side])
    sweep = statistics.median(x["sweep_wall"] for x in d)
    restore = statistics.median(x["restore"] for x in d)
    ev = statistics.median(x["eval"] for x in d)
    compile_s = statistics.median(x["compile"].get("seconds", 0.0) for x in d)
    programs_ = statistics.median(x["compile"].get("backend_compiles", 0) for x in d)
    worst = max(abs(x["ppl"][s] / hf_ppl[s] - 1) for x in d for s in info["steps"])
    print(f"  {side} (compilation cache {mode}): {wall:.1f} s; ratio hf/opt_jax "
          f"{statistics.median(times['hf']) / wall:.2f}x (median of rounds "
          f"{statistics.median(ratios):.2f}x)")
    print(f"    sweep {sweep:.1f} s of it ({sweep / n:.2f} s per checkpoint; restore {restore:.2f} s "
          f"+ evaluation {ev:.2f} s per checkpoint, median; compile {compile_s:.1f} s, "
          f"{programs_:.0f} programs); outside the sweep (start-up, imports, integrity "
          f"pre-check, tokenising, tables) {wall - sweep:.1f} s")
    print(f"    per checkpoint after the first: wall / (restore + evaluation) = "
          f"{(sweep - compile_s) / n / (restore + ev):.2f}")
    kernel_s = kernel["real_s"]
    print(f"    per checkpoint: (sweep - compile) / checkpoints / (restore + kernel of the real "
          f"rows, {kernel_s:.2f} s) = {(sweep - compile_s) / n / (restore + kernel_s):.2f}")
    print(f"    perplexities equal to HF's: largest relative difference {worst:.2e}")
    assert worst < 1e-4, "perplexities differ from HF's"
  shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
