r"""Causal attention of one OPT-125M layer on CPU: opt_jax's kernels vs torch's fused sdpa.

  python benchmarks/attention_cpu.py                      # 1 x 2048 and 4 x 512, 12 heads of 64
  python benchmarks/attention_cpu.py --shapes=1x2048 --blocks=128,256,512 --reps=9

Where the time of `token_logprobs` at long context goes: the same random q, k, v (fp32,
[B, T, 12, 64]) through opt_jax.model's blocked causal attention (online softmax over key blocks,
fully masked blocks skipped) at each --blocks size, its plain XLA attention (full T x T scores),
and torch.nn.functional.scaled_dot_product_attention(is_causal=True) in the same process.
Every variant is warmed up, then timed --reps times, interleaved; medians. GFLOP/s counts the
causal half of the 4 T^2 H N multiply-adds per row. Outputs are checked against each other.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default="1x2048,4x512", help="BxT,BxT,...")
  p.add_argument("--blocks", default="128,256,512", help="block sizes of the blocked kernel")
  p.add_argument("--reps", type=int, default=7, help="timed runs per variant")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from opt_jax import model as M

  heads, head_dim = 12, 64
  print(f"backend {jax.default_backend()}, torch threads {torch.get_num_threads()}; "
        f"{heads} heads of {head_dim}, fp32")
  for shape in args.shapes.split(","):
    b, t = (int(x) for x in shape.split("x"))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, t, heads, head_dim), np.float32) for _ in range(3))
    # opt_jax's kernels take q already scaled by 1/sqrt(head_dim); sdpa scales it itself.
    jq, jk, jv = jnp.asarray(q / np.sqrt(head_dim)), jnp.asarray(k), jnp.asarray(v)
    valid = jnp.ones((b, t), bool)
    causal = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None, None]
    variants = {f"blocked:{n}": jax.jit(lambda q, k, v, n=int(n):
                                        M._blocked_causal_attention(q, k, v, valid, n))
                for n in args.blocks.split(",")}
    variants["xla (full T x T)"] = jax.jit(lambda q, k, v: M._softmax_attention(q, k, v, causal))
    tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()) for x in (q, k, v))

    def sdpa(*_):
      with torch.inference_mode():
        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    reference = np.asarray(sdpa()).transpose(0, 2, 1, 3)
    runs = {}
    for name, fn in variants.items():
      out = np.asarray(fn(jq, jk, jv))
      err = float(np.abs(out - reference).max())
      assert err < 1e-4, f"{name} differs from torch sdpa by {err}"
      runs[name] = lambda fn=fn: fn(jq, jk, jv).block_until_ready()
    runs["torch sdpa (causal)"] = sdpa
    times = {name: [] for name in runs}
    for _ in range(args.reps):
      for name, fn in runs.items():
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
    flops = 4 * b * heads * head_dim * t * (t + 1) / 2
    print(f"\n{b} x {t}:")
    for name, ts in times.items():
      med = statistics.median(ts)
      print(f"  {name:22s} {1e3 * med:8.1f} ms  {flops / med / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
  main()
