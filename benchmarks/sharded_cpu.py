r"""Sharded vs unsharded scoring step on 8 simulated CPU devices: tokens/s and their ratio.

  python benchmarks/sharded_cpu.py                          # 4-layer, 256-wide model, 8 x 256
  python benchmarks/sharded_cpu.py --meshes=data:8,model:8 --reps=10

The unsharded step runs on one device; each sharded step runs the same jitted
opt_jax.scoring.token_logprobs with params and batch placed by opt_jax.sharding, traced under
sharding.activate. All 8 "devices" are threads of the host CPU, so the ratio measures the
overhead of partitioning and (simulated) collectives, not a speed-up: a drop in the ratio from one
commit to the next is a regression of the sharded path. Repetitions alternate between the
variants so load from other processes hits them alike; tokens/s are medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--meshes", default="data:8,data:4-model:2,data:2-model:4,model:8",
                  help="comma-separated mesh specs with '-' between axes (data:4-model:2)")
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--length", type=int, default=256)
  ap.add_argument("--reps", type=int, default=5)
  a = ap.parse_args()

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  import functools

  import numpy as np

  from opt_jax import model, scoring, sharding
  from opt_jax import families

  cfg = families.get("opt").config(vocab_size=a.vocab, hidden_size=a.hidden,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   ffn_dim=4 * a.hidden,
                                   max_position_embeddings=max(2048, a.length))
  params = model.init_params(cfg, seed=0)
  rng = np.random.RandomState(0)
  ids = rng.randint(3, a.vocab, (a.batch, a.length)).astype(np.int32)
  mask = np.ones_like(ids)
  step = jax.jit(functools.partial(scoring.token_logprobs, config=cfg, attention="xla"))

  variants = {"unsharded (1 device)": (None, params, ids, mask)}
  for spec in a.meshes.split(","):
    spec = spec.replace("-", ",")
    mesh = sharding.make_mesh(spec)
    sharding.check_divisible(cfg, mesh, batch_size=a.batch)
    rows = sharding.batch_sharding(mesh)
    variants[spec] = (mesh, sharding.shard_params(params, cfg, mesh), sharding.put(ids, rows),
                      sharding.put(mask, rows))

  def run(name):
    mesh, p, i, m = variants[name]
    with sharding.activate(mesh):
      t = time.perf_counter()
      jax.block_until_ready(step(p, i, m))
      return time.perf_counter() - t

  for name in variants:  # compile + warm up
    run(name)
    run(name)
  times = {name: [] for name in variants}
  for _ in range(a.reps):
    for name in variants:
      times[name].append(run(name))

  tokens = a.batch * a.length
  base = tokens / statistics.median(times["unsharded (1 device)"])
  if jax.process_index() == 0:
    print(f"model: {a.layers} layers, hidden {a.hidden}, {a.heads} heads, vocab {a.vocab}; "
          f"batch {a.batch} x {a.length}; {a.reps} reps; {os.cpu_count()} host cores, "
          f"8 simulated devices")
    print(f"{'variant':<24} {'tokens/s':>10} {'ratio':>7}")
    for name, ts in times.items():
      tps = tokens / statistics.median(ts)
      print(f"{name:<24} {tps:>10.0f} {tps / base:>7.2f}")


if __name__ == "__main__":
  main()
