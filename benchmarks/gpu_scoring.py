r"""OPT-1.3B-shaped scoring in bf16 on one GPU: opt_jax vs HF PyTorch (sdpa) on the same weights.

  python benchmarks/gpu_scoring.py                         # 1.3b shapes, batch 8 x 2048, bf16
  python benchmarks/gpu_scoring.py --batch=16 --reps=10
  python benchmarks/gpu_scoring.py --dry_run               # tiny model on CPU: checks the script

One process, in this order:
  1. bf16 matmul peak of the card: a chain of n x n bf16 matmuls (n = 8192) in one jitted
     program, FLOPs 2 n^3 each; the best of --reps timings.
  2. HF PyTorch: OPTForCausalLM random-initialised (std 0.02) in bf16 on the GPU,
     attn_implementation="sdpa"; per-token log-probs = log_softmax(logits.float()).gather(target)
     under torch.inference_mode (what lm-eval does). Its weights are copied to host numpy and the
     torch model freed before JAX starts, so both sides see the whole card in turn.
  3. opt_jax: the same weights (converted with opt_jax.convert.hf) in bf16, jitted
     opt_jax.scoring.token_logprobs with attention="auto" (cuDNN fused attention on GPU),
     chunked vocabulary log-softmax (no [B, T, V] array).
Reported: tokens/s of each side (median of --reps), opt_jax / HF speed-up, MFU = model FLOPs/s
(DecoderConfig.flops_per_token: 2 x matmul params + full T x T attention) over the measured peak,
and the largest |log-prob difference| between the two sides (bf16 noise, a sanity check).
Without CUDA PyTorch the HF side is skipped (random JAX weights instead) and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# JAX starts after the torch side has freed the card; leave torch's CUDA context some room.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")


def _median_time(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def hf_side(cfg, ids, reps: int, device: str):
  """(tokens/s, log-probs [B, T-1] np.float32, numpy state dict) of HF OPT in bf16 with sdpa."""
  import numpy as np
  import torch
  import transformers

  from opt_jax import families
  torch.manual_seed(0)
  hf_cfg = transformers.OPTConfig(**families.to_hf_dict(cfg))
  model = transformers.OPTForCausalLM._from_config(hf_cfg, attn_implementation="sdpa",
                                                   dtype=torch.bfloat16)
  model = model.to(device).eval()
  x = torch.tensor(ids, device=device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def run():
    with torch.inference_mode():
      logits = model(x).logits                                       # [B, T, V] bf16
      lp = torch.log_softmax(logits.float(), -1)[:, :-1]
      out = torch.gather(lp, 2, x[:, 1:, None]).squeeze(-1)
    sync()
    return out

  run()  # warm-up
  seconds = _median_time(run, reps)
  logprobs = run().float().cpu().numpy()
  state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
  del model, x
  if device == "cuda":
    torch.cuda.empty_cache()
  return ids.size / seconds, logprobs, state


def matmul_peak(n: int, chain: int, reps: int) -> float:
  """bf16 FLOP/s of n x n matmuls: `chain` dependent products per call, best of reps."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16) / n ** 0.5

  @jax.jit
  def f(a, b):
    for _ in range(chain):
      a = a @ b
    return a

  jax.block_until_ready(f(a, b))
  best = min(_median_time(lambda: jax.block_until_ready(f(a, b)), 1) for _ in range(reps))
  return 2 * n ** 3 * chain / best


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="1.3b", help="opt_jax.config preset")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--length", type=int, default=2048)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--matmul", type=int, default=8192, help="n of the n x n peak matmul")
  ap.add_argument("--no_hf", action="store_true", help="skip the HF PyTorch side")
  ap.add_argument("--dry_run", action="store_true",
                  help="tiny model, batch 2 x 128, on CPU: checks the script end to end")
  ap.add_argument("--json", default=None, help="also write the figures to this file")
  a = ap.parse_args()

  import numpy as np
  from opt_jax import families
  if a.dry_run:
    os.environ["JAX_PLATFORMS"] = "cpu"
    cfg = families.get("opt").config(vocab_size=512, hidden_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, ffn_dim=512,
                                     max_position_embeddings=256)
    a.batch, a.length, a.matmul, a.reps = 2, 128, 256, 2
  else:
    cfg = families.preset(a.model)
  rng = np.random.RandomState(0)
  ids = np.concatenate([np.full((a.batch, 1), cfg.bos_token_id),
                        rng.randint(3, cfg.vocab_size, (a.batch, a.length - 1))], 1).astype(np.int64)

  result = {"model": a.model if not a.dry_run else "tiny", "batch": a.batch, "length": a.length,
            "dtype": "bfloat16"}
  hf_lp = state = None
  if not a.no_hf:
    try:
      import torch
      device = "cuda" if torch.cuda.is_available() else "cpu"
      if device == "cpu" and not a.dry_run:
        raise RuntimeError("PyTorch has no CUDA here")
      hf_tps, hf_lp, state = hf_side(cfg, ids, a.reps, device)
      result.update(hf_tokens_per_s=hf_tps, torch=torch.__version__,
                    hf_device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    except (ImportError, RuntimeError) as e:
      result["hf_skipped"] = str(e)
      print(f"HF side skipped: {e}", file=sys.stderr)

  import functools

  import jax
  import jax.numpy as jnp
  import ml_dtypes
  from opt_jax import model, scoring
  from opt_jax.convert import hf
  dev = jax.devices()[0]
  result.update(device=dev.device_kind, platform=dev.platform, jax=jax.__version__)
  peak = matmul_peak(a.matmul, 8 if not a.dry_run else 2, a.reps)
  result["matmul_peak_tflops"] = peak / 1e12

  if state is not None:
    params = hf.params_from_state_dict(state, cfg, dtype=ml_dtypes.bfloat16)
    del state
  else:
    params = model.init_params(cfg, seed=0, param_dtype=jnp.bfloat16)
  params = jax.device_put(params)
  attention = scoring.resolve_attention("auto", cfg, jnp.bfloat16)
  step = jax.jit(functools.partial(scoring.token_logprobs, config=cfg, dtype=jnp.bfloat16,
                                   attention=attention))
  x = jnp.asarray(ids, jnp.int32)
  mask = jnp.ones_like(x)
  t = time.perf_counter()
  lp, _ = jax.block_until_ready(step(params, x, mask))
  result["compile_s"] = time.perf_counter() - t
  seconds = _median_time(lambda: jax.block_until_ready(step(params, x, mask)), a.reps)
  tps = ids.size / seconds
  flops = cfg.flops_per_token(a.length) * tps
  result.update(attention=attention, jax_tokens_per_s=tps, model_tflops=flops / 1e12,
                mfu=flops / peak)
  if hf_lp is not None:
    ours = np.asarray(lp, np.float32)[:, 1:]
    result["speedup_vs_hf"] = tps / result["hf_tokens_per_s"]
    result["max_abs_logprob_diff"] = float(np.abs(ours - hf_lp).max())
    result["mean_abs_logprob_diff"] = float(np.abs(ours - hf_lp).mean())

  print(f"{result['model']} bf16, batch {a.batch} x {a.length}, on {result['device']} "
        f"({result['platform']}), attention={attention}")
  print(f"bf16 matmul peak (n={a.matmul}): {result['matmul_peak_tflops']:.1f} TFLOP/s")
  print(f"opt_jax: {tps:,.0f} tokens/s, {result['model_tflops']:.1f} TFLOP/s, "
        f"MFU {100 * result['mfu']:.1f}% (compile {result['compile_s']:.1f} s)")
  if "hf_tokens_per_s" in result:
    print(f"HF PyTorch {result['torch']} sdpa: {result['hf_tokens_per_s']:,.0f} tokens/s; "
          f"opt_jax / HF = {result['speedup_vs_hf']:.2f}x; max |dlogp| = "
          f"{result['max_abs_logprob_diff']:.3f} nats (mean {result['mean_abs_logprob_diff']:.4f})")
  print(json.dumps(result))
  if a.json:
    with open(a.json + ".tmp", "w") as f:
      json.dump(result, f, indent=1)
    os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
  main()
