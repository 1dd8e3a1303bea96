r"""The scoring program vs HF PyTorch on CPU: tokens/s, peak memory and model FLOP utilisation.

  python benchmarks/scoring_cpu.py                       # OPT-125M shapes, 4x512 and 1x2048
  python benchmarks/scoring_cpu.py --model=pythia-160m    # GPT-NeoX (parallel residual, rotary)
  python benchmarks/scoring_cpu.py --model=tinyllama-1.1b --layers=4   # Llama, GQA 32/4
  python benchmarks/scoring_cpu.py --variants=xla,blocked:256,blocked:512 --reps=7
  python benchmarks/scoring_cpu.py --dtypes=float32,bfloat16      # + bf16 rows of both sides

Both sides use the same random fp32 weights of --model's shapes (any family preset, --layers
overriding its depth; written once as an HF safetensors checkpoint; HF loads it with
AutoModelForCausalLM.from_pretrained, the family's class, opt_jax converts it with convert.hf).
Each side runs in its own long-lived worker process, so peak memories never mix; the parent
sends the workers one forward pass at a time, interleaved (hf, jax, hf, jax, ...), so load from
other processes on a shared machine hits both sides alike; tokens/s ratios are medians over the
repetitions.

HF side: model(ids).logits -> log_softmax -> gather of the target (what lm-eval does), under
torch.inference_mode with HF's default attention (sdpa). opt_jax side: the Scorer's program,
opt_jax.scoring.score_program (chunked logsumexp, no [B, T, V] array), on plain rows.
Memory: the worker's peak RSS (VmHWM, reset just before the measured pass through
/proc/self/clear_refs) during one pass, and that peak minus the RSS once the weights are loaded
("working memory"), in a fresh worker per side and shape after one warm-up pass. MFU: model
FLOPs (DecoderConfig.flops_per_token, full T x T attention) per second over the fp32 matmul peak
(the better of jnp.dot and torch.matmul on a 2048^2 square matrix), measured in the same run.

--dtypes=float32,bfloat16 adds a worker per side in bf16 (HF: from_pretrained(dtype=bfloat16),
log_softmax of the logits cast to fp32; opt_jax: params cast to bf16, dtype=bfloat16, log-probs
fp32), their own matmul peaks (bf16 inputs; jnp.dot with fp32 accumulation as the model does)
and the mean / max absolute difference of each bf16 side's log-probs from the same side's fp32
log-probs on the same tokens. The CPU's bf16 support (avx512_bf16, amx_bf16 flags) is printed:
without it bf16 matmuls run on fp32 units after conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MARK = "@@"  # prefix of protocol lines on a worker's stdout (libraries may print other lines)


def _config(model: str, layers: int | None):
  from opt_jax import families
  config = families.preset(model)
  return config.replace(num_hidden_layers=layers) if layers else config


# Workers --------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")   # resets VmHWM to the current RSS (Linux >= 4.0)


def _hf_worker(weights: str, dtype: str):
  import torch
  import transformers
  tdtype = getattr(torch, dtype)
  model = transformers.AutoModelForCausalLM.from_pretrained(weights, dtype=tdtype).eval()
  info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "attention": model.config._attn_implementation, "dtype": dtype}

  def run(ids):
    with torch.inference_mode():
      t = torch.from_numpy(ids)
      logits = model(t).logits.float()                                 # [B, T, V] fp32
      lp = torch.log_softmax(logits, -1)[:, :-1]
      return lp.gather(-1, t[:, 1:, None])[..., 0].numpy()             # [B, T - 1]

  def matmul(n):
    a, b = torch.randn(n, n, dtype=tdtype), torch.randn(n, n, dtype=tdtype)
    a @ b
    return lambda: a @ b

  return info, run, matmul


def _jax_worker(weights: str, variant: str, config, dtype: str):
  import functools
  import jax
  import jax.numpy as jnp
  import numpy as np
  from safetensors.numpy import load_file
  from opt_jax import scoring
  from opt_jax.convert import hf

  sd = load_file(os.path.join(weights, "model.safetensors"))
  jdtype = jnp.dtype(dtype)
  # Stored in the compute dtype, as checkpoint.restore(dtype=...) gives them to a sweep.
  params = jax.device_put(jax.tree.map(lambda a: np.asarray(a).astype(jdtype),
                                       hf.params_from_state_dict(sd, config)))
  del sd
  attention, block, chunk = (variant.split(":") + ["", ""])[:3]
  # The Scorer's own program (scoring.score_program) on one plain row per batch entry.
  fn = scoring.score_program(scoring.ScoreSpec(
      config, jdtype.name, attention, int(block or 256),
      int(chunk or scoring.DEFAULT_VOCAB_CHUNK)))
  info = {"jax": jax.__version__, "attention": variant, "dtype": dtype}

  def run(ids):
    b, t = ids.shape
    inputs = (ids, np.ones_like(ids), np.roll(ids, -1, axis=1),
              np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)), np.zeros_like(ids))
    lp, _ = jax.block_until_ready(fn(params, *map(jnp.asarray, inputs)))
    return np.asarray(lp)[:, :-1]                                       # [B, T - 1]

  def matmul(n):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(jdtype)
    dot = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
    dot(a, a).block_until_ready()
    return lambda: dot(a, a).block_until_ready()

  return info, run, matmul


def worker_main(kind: str, weights: str, variant: str, config, dtype: str) -> None:
  import numpy as np
  if kind == "hf":
    info, run, matmul = _hf_worker(weights, dtype)
  else:
    info, run, matmul = _jax_worker(weights, variant, config, dtype)
  vocab = min(config.vocab_size, 32000)   # ids the tokenizer can produce (padded vocabularies)
  reply = lambda obj: print(MARK + json.dumps(obj), flush=True)
  reply({"ready": True, "rss_kib": _rss_kib("VmRSS"), **info})
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "quit":
      return
    if cmd["cmd"] == "matmul":
      f = matmul(cmd["n"])
      t0 = time.perf_counter()
      f()
      reply({"seconds": time.perf_counter() - t0})
      continue
    ids = np.random.RandomState(0).randint(3, vocab, (cmd["batch"], cmd["length"])).astype(np.int64)
    ids[:, 0] = 2
    if kind != "hf":
      ids = ids.astype(np.int32)
    _reset_peak()
    t0 = time.perf_counter()
    lp = run(ids)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "peak_kib": _rss_kib("VmHWM")}
    if cmd.get("logprobs"):
      out["logprobs"] = np.asarray(lp, np.float32).ravel().tolist()
    reply(out)


class Worker:
  def __init__(self, name: str, args: list[str]):
    self.name, self.args = name, args
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.info = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(MARK):
        return json.loads(line[len(MARK):])
    raise RuntimeError(f"worker {self.name} exited with {self.proc.wait()}")

  def ask(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    try:
      self.proc.stdin.write('{"cmd": "quit"}\n')
      self.proc.stdin.close()
    except BrokenPipeError:
      pass
    self.proc.wait()


# Parent ---------------------------------------------------------------------------------------

def write_weights(directory: str, config, seed: int = 0) -> None:
  """Random fp32 weights of `config` (normal(0.02), unit norm scales, zero biases) as an HF
  checkpoint."""
  import numpy as np
  from safetensors.numpy import save_file
  from opt_jax import families
  from opt_jax.convert import hf
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, shape in hf.expected_tensors(config).items():
    if ("norm" in name or "ln_f" in name) and name.endswith("weight"):
      value = np.ones(shape, np.float32)
    elif name.endswith("bias"):
      value = np.zeros(shape, np.float32)
    else:
      value = 0.02 * rng.standard_normal(shape, np.float32)
    tensors[name] = value
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  families.write_config(config, os.path.join(directory, "config.json"))


def _cpu_flags() -> list[str]:
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return []
  return sorted({x for x in flags if x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                             "amx_tile", "avx512_vnni", "avx_vnni")})


_SHORT = {"float32": "", "bfloat16": " bf16", "float16": " fp16"}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--shapes", default="4x512,1x2048", help="BxT,BxT,...")
  p.add_argument("--variants", default="blocked:256",
                 help="opt_jax variants, comma separated: ATTENTION[:BLOCK[:VOCAB_CHUNK]], "
                      "e.g. xla, blocked:256, blocked:256:4096")
  p.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16, comma separated")
  p.add_argument("--reps", type=int, default=5, help="timed passes per shape and side")
  p.add_argument("--model", default="opt-125m", help="a preset of any family (its shapes)")
  p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the "
                 "preset's)")
  p.add_argument("--matmul_n", type=int, default=2048, help="side of the square peak matmul")
  p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                 help="measure peak memory (a fresh worker per side and shape)")
  p.add_argument("--json", default=None, help="also write the results here")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    kind, _, variant = args.worker.partition("=")
    worker_main(kind, args.weights, variant, _config(args.model, args.layers), args.dtype)
    return

  shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
  variants = args.variants.split(",")
  dtypes = args.dtypes.split(",")
  if "float32" not in dtypes:
    dtypes = ["float32"] + dtypes   # the reference of every ratio and log-prob difference
  config = _config(args.model, args.layers)
  results: dict = {"model": args.model, "layers": config.num_hidden_layers, "shapes": {},
                   "machine": {"cpus": os.cpu_count(), "cpu_flags": _cpu_flags(),
                               "loadavg_start": os.getloadavg()}}
  with tempfile.TemporaryDirectory() as weights:
    write_weights(weights, config)
    common = [f"--weights={weights}", f"--model={args.model}",
              f"--layers={config.num_hidden_layers}"]
    workers, dtype_of, base_of = [], {}, {}
    for dt in dtypes:
      sides = [("hf", "hf", "--worker=hf")] + [(f"jax:{v}", f"jax:{v}", f"--worker=jax={v}")
                                                 for v in variants]
      for base, name, flag in sides:
        name += _SHORT[dt]
        workers.append(Worker(name, [flag, *common, f"--dtype={dt}"]))
        dtype_of[name], base_of[name] = dt, base
    try:
      results["workers"] = {w.name: w.info for w in workers}
      # Matmul peak of each framework and dtype, interleaved; per dtype the better median is
      # "the machine's peak" for that dtype.
      mm = {w.name: [] for w in workers if base_of[w.name] in ("hf", f"jax:{variants[0]}")}
      for _ in range(args.reps):
        for w in workers:
          if w.name in mm:
            mm[w.name].append(w.ask(cmd="matmul", n=args.matmul_n)["seconds"])
      flops = 2 * args.matmul_n ** 3
      peak = {k: flops / statistics.median(v) for k, v in mm.items()}
      results["matmul_peak_gflops"] = {k: v / 1e9 for k, v in peak.items()}
      machine_peak = {dt: max(v for k, v in peak.items() if dtype_of[k] == dt) for dt in dtypes}
      for b, t in shapes:
        logprobs = {}
        for w in workers:  # warm-up (compilation, allocator, caches); keeps the log-probs
          logprobs[w.name] = w.ask(cmd="run", batch=b, length=t, logprobs=True)["logprobs"]
        times = {w.name: [] for w in workers}
        for _ in range(args.reps):
          for w in workers:
            times[w.name].append(w.ask(cmd="run", batch=b, length=t)["seconds"])
        # Memory: a fresh worker per side and shape (allocators keep freed memory, so peaks of
        # earlier shapes would leak into later ones): one warm-up pass, then the measured one.
        mem = {}
        for w in workers if args.memory else []:
          fresh = Worker(w.name, w.args)
          try:
            fresh.ask(cmd="run", batch=b, length=t)
            mem[w.name] = {"peak_kib": fresh.ask(cmd="run", batch=b, length=t)["peak_kib"],
                           "before_kib": fresh.info["rss_kib"]}
          finally:
            fresh.close()
        model_flops = config.flops_per_token(t) * b * t
        row = {}
        for w in workers:
          med = statistics.median(times[w.name])
          r = row[w.name] = {"dtype": dtype_of[w.name], "median_s": med, "times_s": times[w.name],
                             "tokens_per_s": b * t / med,
                             "mfu": model_flops / med / machine_peak[dtype_of[w.name]]}
          if w.name in mem:
            r["peak_rss_mib"] = mem[w.name]["peak_kib"] / 1024
            r["working_mib"] = (mem[w.name]["peak_kib"] - mem[w.name]["before_kib"]) / 1024
        for name, r in row.items():
          # Against HF in the same dtype and against the same side in fp32: ratio of medians and
          # median of per-round ratios (rounds are interleaved in time).
          hf = "hf" + _SHORT[r["dtype"]]
          fp32 = base_of[name]
          r["speed_vs_hf"] = row[hf]["median_s"] / r["median_s"]
          r["speed_vs_hf_paired"] = statistics.median(
              h / x for h, x in zip(times[hf], times[name]))
          r["speed_vs_own_fp32"] = row[fp32]["median_s"] / r["median_s"]
          d = [abs(a - c) for a, c in zip(logprobs[name], logprobs[fp32])]
          r["logprob_vs_own_fp32"] = {"mean_abs": sum(d) / len(d), "max_abs": max(d)}
          if "peak_rss_mib" in r:
            r["peak_vs_hf"] = r["peak_rss_mib"] / row[hf]["peak_rss_mib"]
            r["working_vs_hf"] = r["working_mib"] / row[hf]["working_mib"]
        results["shapes"][f"{b}x{t}"] = row
    finally:
      for w in workers:
        w.close()
  results["machine"]["loadavg_end"] = os.getloadavg()

  print(f"{args.model} shapes, {config.num_hidden_layers} layers, "
        f"{config.num_params() / 1e6:.0f}M params")
  print(f"matmul peak ({args.matmul_n}^2): " + ", ".join(
      f"{k} {v:.1f} GFLOP/s" for k, v in results["matmul_peak_gflops"].items()))
  print(f"load average start {results['machine']['loadavg_start'][0]:.1f}, end "
        f"{results['machine']['loadavg_end'][0]:.1f} on {os.cpu_count()} CPUs; CPU flags "
        f"{' '.join(results['machine']['cpu_flags']) or '-'}")
  header = (f"{'shape':>7} {'side':>19} {'tok/s':>8} {'x HF':>6} {'paired':>6} {'x fp32':>6} "
            f"{'MFU':>6} {'peak MiB':>9} {'x HF':>6} {'work MiB':>9} {'x HF':>6} "
            f"{'mean|dlp|':>9} {'max|dlp|':>9}")
  print(header + "\n(x HF: vs HF in the same dtype; x fp32 and |dlp|: vs the same side in fp32)")
  for shape, row in results["shapes"].items():
    for name, r in row.items():
      mem = (f"{r['peak_rss_mib']:9.0f} {r['peak_vs_hf']:6.2f} {r['working_mib']:9.0f} "
             f"{r['working_vs_hf']:6.2f}" if "peak_rss_mib" in r else f"{'-':>9} {'-':>6} "
             f"{'-':>9} {'-':>6}")
      print(f"{shape:>7} {name:>19} {r['tokens_per_s']:8.0f} {r['speed_vs_hf']:6.2f} "
            f"{r['speed_vs_hf_paired']:6.2f} {r['speed_vs_own_fp32']:6.2f} {r['mfu']:6.1%} {mem} "
            f"{r['logprob_vs_own_fp32']['mean_abs']:9.2e} "
            f"{r['logprob_vs_own_fp32']['max_abs']:9.2e}")
  if args.json:
    with open(args.json + ".tmp", "w") as f:
      json.dump(results, f, indent=2)
    os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
  main()
