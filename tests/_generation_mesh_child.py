"""Subprocess side of the mesh tests in tests/test_generation.py: several (simulated) CPU devices.

  python tests/_generation_mesh_child.py devices8 OUT.json
      8 devices: generate / joint_generate without a mesh and on the meshes below.
  python tests/_generation_mesh_child.py multihost OUT.json --port P --process_id I
      one of 2 processes x 2 devices joined by jax.distributed (gloo), decoding (the CASES) on
      one mesh of all 4 devices; each process writes OUT.json.<I>.

Writes tokens and facts only (JSON); tests/test_generation.py asserts. The device count is set
before JAX starts a backend, so this file must be run as a script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

# Tiny shapes whose heads (8) and vocabulary (128) split over a model axis of 8.
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
            ffn_dim=128, max_position_embeddings=64)
MESHES = ("data:8", "data:2,model:4", "model:8")
JOINT_MESH = "data:2,model:4"
MULTIHOST_MESH = "data:2,model:2"
N = 12                                            # new tokens per prompt
LENGTHS = (7, 3, 11, 5, 9)                        # one batch: bucket 8 x 16, three filler rows
CASES = {                                         # one compiled program serves both
    "greedy": dict(sampler="greedy"),
    "nucleus": dict(sampler="sample", temperature=1.3, top_p=0.9, seed=7),
}
JOINT = dict(sampler="sample", temperature=1.2, top_p=0.9, seed=3)


def config(**changes):
  from opt_jax import families
  return families.get("opt").config(**{**TINY, **changes})


def params_for(cfg, seed: int):
  """Random params with std 0.3, so a 2-layer model's next-token distributions are peaked enough
  to make greedy paths differ between the models and nucleus sampling cut real tails."""
  import jax
  from opt_jax import model
  rng = np.random.RandomState(seed)

  def draw(path, s):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.endswith("norm/scale"):
      return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    return (0.3 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, model.param_shapes(cfg))


def prompts(seed: int = 0) -> list[list[int]]:
  rng = np.random.RandomState(seed)
  return [[2] + rng.randint(3, TINY["vocab_size"], n - 1).tolist() for n in LENGTHS]


def models():
  """The two models of the joint case: same vocabulary, different depth and weights."""
  small = config()
  large = config(num_hidden_layers=3)
  return [(large, params_for(large, 1)), (small, params_for(small, 0))]


def _generate(mesh, **kw):
  from opt_jax import generation as G
  cfg = config()
  return G.generate(cfg, params_for(cfg, 0), prompts(), max_new_tokens=N, eos_id=None,
                    batch_size=8, mesh=mesh, **kw)


def run_devices8(out_path: str) -> None:
  import jax
  from opt_jax import generation as G
  from opt_jax import programs
  from opt_jax import sharding
  assert jax.device_count() == 8, jax.devices()
  result = {"single": {}, "meshes": {}, "joint": {}}
  for name, kw in CASES.items():
    result["single"][name] = _generate(None, **kw)
  for spec in MESHES:
    mesh = sharding.make_mesh(spec)
    before = programs.compilations("decode")
    result["meshes"][spec] = {name: _generate(mesh, **kw) for name, kw in CASES.items()}
    result["meshes"][spec]["compilations"] = programs.compilations("decode") - before
  # Params already laid out on the mesh are taken as they are.
  mesh = sharding.make_mesh("model:8")
  cfg = config()
  placed = sharding.shard_params(params_for(cfg, 0), cfg, mesh)
  result["presharded"] = G.generate(cfg, placed, prompts(), max_new_tokens=N, eos_id=None,
                                    batch_size=8, mesh=mesh, **CASES["nucleus"])

  pair = models()
  for spec in (None, JOINT_MESH):
    got, stats = G.joint_generate(pair, (1.0, -1.0), prompts(), max_new_tokens=N, eos_id=None,
                                  batch_size=8, mesh=spec and sharding.make_mesh(spec), **JOINT)
    result["joint"][spec or "single"] = {"tokens": got, "fallback": stats["fallback_steps"]}

  # A mesh the model cannot be split on fails before compiling, naming the dimension.
  before = programs.compilations("decode")
  bad = config(num_attention_heads=4)
  try:
    G.generate(bad, params_for(bad, 0), prompts(), max_new_tokens=N, mesh=mesh)
    result["bad_mesh_error"] = None
  except ValueError as e:
    result["bad_mesh_error"] = str(e)
  result["bad_mesh_compilations"] = programs.compilations("decode") - before

  tmp = out_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f)
  os.replace(tmp, out_path)


def run_multihost(out_path: str, port: int, process_id: int) -> None:
  import jax
  from opt_jax import sharding
  sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh = sharding.make_mesh(MULTIHOST_MESH)
  result = {name: _generate(mesh, **kw) for name, kw in CASES.items()}
  tmp = f"{out_path}.{process_id}.tmp"
  with open(tmp, "w") as f:
    json.dump(result, f)
  os.replace(tmp, f"{out_path}.{process_id}")
  jax.distributed.shutdown()


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("mode", choices=("devices8", "multihost"))
  ap.add_argument("out")
  ap.add_argument("--port", type=int)
  ap.add_argument("--process_id", type=int)
  a = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  jax.config.update("jax_num_cpu_devices", 8 if a.mode == "devices8" else 2)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if a.mode == "devices8":
    run_devices8(a.out)
  else:
    run_multihost(a.out, a.port, a.process_id)


if __name__ == "__main__":
  main()
