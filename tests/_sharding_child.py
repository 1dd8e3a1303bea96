"""Subprocess side of tests/test_sharding.py: runs with several (simulated) CPU devices.

  python tests/_sharding_child.py devices8 OUT.json        8 devices: mesh parity, HLO, restore,
                                                          every family on two meshes
  python tests/_sharding_child.py multihost OUT.npz --port P --process_id I [--ckpt DIR]
                                                          one of 2 processes x 2 devices (gloo)
devices8 also saves its params as a checkpoint beside OUT.json (ckpt/), which multihost restores.

Writes measurements only (log-probs, HLO facts, shard shapes); tests/test_sharding.py asserts.
The device count is set before JAX starts a backend, so this file must be run as a script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

# Tiny shapes whose heads / vocab / ffn divide 8, so every mesh of 8 devices splits them evenly.
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, ffn_dim=128,
            max_position_embeddings=64)
BATCH, LENGTH = 8, 16
MESHES = ("data:8,model:1", "data:4,model:2", "data:2,model:4", "data:1,model:8",
          "data:2,fsdp:2,model:2")
MULTIHOST_MESHES = ("data:2,model:2", "model:4", "fsdp:2,model:2")
# One tiny model per family (the features of tests/oracle.py's FAMILY_TINY) and the meshes they
# run on: Megatron data x model, and fsdp x model. Llama's 2 kv heads do not split over model:4
# (replicated there) and do over model:2.
FAMILY_MESHES = ("data:2,model:4", "fsdp:4,model:2")
_FAMILY_SHAPE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                     intermediate_size=128, max_position_embeddings=64, bos_token_id=0,
                     eos_token_id=2, pad_token_id=1)
FAMILY_CONFIGS = {
    "gpt_neox": dict(_FAMILY_SHAPE, rotary_pct=0.25, use_parallel_residual=True),
    "llama": dict(_FAMILY_SHAPE, num_key_value_heads=2, rope_theta=500000.0),
    "olmo": dict(_FAMILY_SHAPE, clip_qkv=0.5),
    "olmo2": dict(_FAMILY_SHAPE, num_key_value_heads=4),
}


def config(**changes):
  from opt_jax import families
  return families.get("opt").config(**{**TINY, **changes})


def family_config(name):
  from opt_jax import families
  return families.get(name).config(**FAMILY_CONFIGS[name])


def params_for(cfg, seed=0):
  """Random params with std 0.1 (not 0.02) so layers change the output measurably."""
  from opt_jax import model
  rng = np.random.RandomState(seed)
  shapes = model.param_shapes(cfg)
  def draw(path, s):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.endswith("norm/scale"):
      return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
  import jax
  return jax.tree_util.tree_map_with_path(draw, shapes)


def inputs(seed=0):
  """[B, T] ids and mask: rows of different real lengths, right- and left-padded, </s> first."""
  rng = np.random.RandomState(seed)
  ids = np.ones((BATCH, LENGTH), np.int32)
  mask = np.zeros((BATCH, LENGTH), np.int32)
  for r in range(BATCH):
    n = LENGTH - 2 * (r % 4)
    row = np.concatenate([[2], rng.randint(3, TINY["vocab_size"], n - 1)])
    sl = slice(0, n) if r % 2 == 0 else slice(LENGTH - n, LENGTH)
    ids[r, sl], mask[r, sl] = row, 1
  return ids, mask


def logprob_fn(cfg):
  """(params, ids, mask) -> per-token log-probs [B, T] fp32, through opt_jax.scoring."""
  import functools
  import jax
  from opt_jax import scoring
  # vocab_chunk 32: the log-softmax loop runs 4 chunks (not 2 or 3: tells it from the layer loop).
  fn = functools.partial(scoring.token_logprobs, config=cfg, attention="xla", vocab_chunk=32)
  return jax.jit(lambda p, i, m: fn(p, i, m)[0])


def sharded_logprobs(cfg, params, ids, mask, mesh):
  """The sharded run: params and batch placed by opt_jax.sharding, traced under activate()."""
  import jax
  from opt_jax import sharding
  sharding.check_divisible(cfg, mesh, batch_size=ids.shape[0])
  placed = sharding.shard_params(params, cfg, mesh)
  batch = sharding.batch_sharding(mesh)
  with sharding.activate(mesh):
    fn = jax.jit(logprob_fn(cfg), in_shardings=(sharding.param_shardings(cfg, mesh), batch, batch),
                 out_shardings=batch)
    out = fn(placed, sharding.put(ids, batch), sharding.put(mask, batch))
  return sharding.to_host(out), out


# HLO facts ------------------------------------------------------------------------------------

_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-, %]+)\}?")
_REDUCE = re.compile(r"= (\S+) (all-reduce|reduce-scatter|all-reduce-start)\(")
_GATHER = re.compile(r"= (\S+) (all-gather|all-gather-start)\(")


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  comps, name, entry = {}, None, None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m:
      name = m.group(1)
      comps[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif line.startswith("}"):
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps, entry


def _closure(comps, root):
  seen, todo = set(), [root]
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    for line in comps[c]:
      for m in _CALLS.finditer(line):
        todo.extend(x.strip().lstrip("%") for x in m.group(1).split(","))
  return seen


def _dims(shape: str) -> list[int]:
  m = re.search(r"\[([\d,]*)\]", shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def hlo_facts(hlo: str) -> dict:
  """Collectives of a compiled program: per-layer reductions (scan body x trip count), gathers."""
  comps, entry = _computations(hlo)
  loops = []
  for line in comps[entry]:
    if " while(" in line:
      body = re.search(r"body=%?([\w.\-]+)", line).group(1)
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      inside = _closure(comps, body)
      reductions = [(_dims(m.group(1)), m.group(2)) for c in inside for l in comps[c]
                    for m in [_REDUCE.search(l)] if m]
      loops.append({"trip_count": int(trip.group(1)) if trip else None,
                    "reductions": reductions})
  all_lines = [l for c in comps.values() for l in c]
  gathers = [_dims(m.group(1)) for l in all_lines for m in [_GATHER.search(l)] if m]
  reductions = [_dims(m.group(1)) for l in all_lines for m in [_REDUCE.search(l)] if m]
  return {"loops": loops, "all_gathers": gathers, "all_reductions": reductions}


def compiled_hlo(cfg, mesh, batch=4, length=16) -> str:
  import jax
  import jax.numpy as jnp
  from opt_jax import model, sharding
  shapes = model.param_shapes(cfg)
  bs = sharding.batch_sharding(mesh)
  with sharding.activate(mesh):
    fn = jax.jit(logprob_fn(cfg), in_shardings=(sharding.param_shardings(cfg, mesh), bs, bs))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return fn.lower(shapes, ids, ids).compile().as_text()


# Modes ----------------------------------------------------------------------------------------

def run_devices8(out_path: str) -> None:
  import jax
  from opt_jax import model, scoring, sharding
  from opt_jax.checkpoints import checkpoint, orbax_format
  assert jax.device_count() == 8, jax.devices()
  cfg = config()
  params = params_for(cfg)
  ids, mask = inputs()
  result = {"reference": np.asarray(logprob_fn(cfg)(params, ids, mask)).tolist(), "meshes": {}}
  for spec in MESHES:
    lp, _ = sharded_logprobs(cfg, params, ids, mask, sharding.make_mesh(spec))
    result["meshes"][spec] = lp.tolist()

  # Scorer's mesh path (scoring.py) against the same Scorer without a mesh: rolling windows, and
  # multiple-choice requests whose shared context is packed with its options into one row.
  rows = [[int(t) for t in r[m.astype(bool)]] for r, m in zip(ids, mask)]
  requests = [(rows[0][:6], rows[1][:k]) for k in (1, 3, 5)] + [(rows[2][:9], rows[3][2:4])]

  def scorer_outputs(mesh):
    try:
      sc = scoring.Scorer(cfg, params, batch_size=8, attention="xla", mesh=mesh)
      return {"rolling": [np.asarray(x).tolist() for x in sc.rolling_tokens(rows)],
              "choices": [list(x) for x in sc.loglikelihood_tokens(requests)]}
    except Exception as e:  # reported by the test, with the mesh that failed
      return {"error": f"{type(e).__name__}: {e}"}

  result["scorer"] = {"plain": scorer_outputs(None)}
  for spec in ("data:2,model:4", "data:2,fsdp:2,model:2"):
    result["scorer"][spec] = scorer_outputs(sharding.make_mesh(spec))

  # HLO of a 2- and 3-layer model on a 1 x 4 model-parallel mesh.
  mesh4 = sharding.make_mesh("data:1,model:4", devices=jax.devices()[:4])
  result["hlo"] = {}
  for layers in (2, 3):
    c = config(num_hidden_layers=layers)
    weights = [list(s.shape) for s in jax.tree.leaves(model.param_shapes(c)) if len(s.shape) >= 2]
    result["hlo"][str(layers)] = {**hlo_facts(compiled_hlo(c, mesh4)), "weights": weights}

  # Restore onto a 4 x 2 (and a 2 x 2 x 2 fsdp) mesh: each device holds only its shards.
  result["restore"] = {}
  path = os.path.join(os.path.dirname(os.path.abspath(out_path)), "ckpt")
  orbax_format.save(path, params, cfg, overwrite=True)  # kept: the multi-host children restore it
  for spec in ("data:4,model:2", "data:2,fsdp:2,model:2"):
    m = sharding.make_mesh(spec)
    restored = checkpoint.restore(path, shardings=sharding.param_shardings(cfg, m))
    leaves = []
    for (kp, arr), (_, ref), (_, want) in zip(
        jax.tree_util.tree_leaves_with_path(restored), jax.tree_util.tree_leaves_with_path(params),
        jax.tree_util.tree_leaves_with_path(sharding.param_shardings(cfg, m))):
      leaves.append({
          "name": jax.tree_util.keystr(kp), "shape": list(arr.shape),
          "spec": [a if a is None or isinstance(a, str) else list(a) for a in want.spec],
          "device_shapes": [list(s.data.shape) for s in arr.addressable_shards],
          "num_devices": len({s.device for s in arr.addressable_shards}),
          "same_sharding": arr.sharding.is_equivalent_to(want, arr.ndim),
          "max_abs_err": float(np.abs(np.asarray(arr) - ref).max()),
      })
    result["restore"][spec] = leaves

  result["families"] = run_families()

  tmp_out = out_path + ".tmp"
  with open(tmp_out, "w") as f:
    json.dump(result, f)
  os.replace(tmp_out, out_path)


def run_families() -> dict:
  """Per family: unsharded log-probs, the same on each of FAMILY_MESHES, whether the kv heads
  were replicated there; for Llama (GQA) also greedy decoding with and without a mesh."""
  from opt_jax import generation, sharding
  ids, mask = inputs()
  out = {}
  for name in FAMILY_CONFIGS:
    cfg = family_config(name)
    params = params_for(cfg, seed=3)
    facts = {"reference": np.asarray(logprob_fn(cfg)(params, ids, mask)).tolist(), "meshes": {},
             "kv_replicated": {}}
    for spec in FAMILY_MESHES:
      mesh = sharding.make_mesh(spec)
      lp, _ = sharded_logprobs(cfg, params, ids, mask, mesh)
      facts["meshes"][spec] = lp.tolist()
      facts["kv_replicated"][spec] = sharding.kv_heads_replicated(cfg, mesh)
    if name == "llama":
      prompts = [[int(t) for t in r[m.astype(bool)]][:9] for r, m in zip(ids, mask)][:4]
      kw = dict(max_new_tokens=8, eos_id=None)
      facts["decode"] = {"plain": generation.generate(cfg, params, prompts, **kw),
                         "data:2,model:4": generation.generate(
                             cfg, params, prompts, mesh=sharding.make_mesh("data:2,model:4"),
                             **kw)}
    out[name] = facts
  return out


def run_multihost(out_path: str, port: int, process_id: int, ckpt: str | None) -> None:
  import jax
  from opt_jax import sharding
  from opt_jax.checkpoints import checkpoint
  sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  cfg = config()
  params = params_for(cfg)       # the same seed on every process: identical host copies
  ids, mask = inputs()
  out = {}
  for spec in MULTIHOST_MESHES:
    lp, arr = sharded_logprobs(cfg, params, ids, mask, sharding.make_mesh(spec))
    assert not arr.is_fully_addressable  # really spread over both processes
    out[spec] = lp
  if ckpt:
    # Each process restores only the shards of its own devices, then the sharded run.
    mesh = sharding.make_mesh("data:2,model:2")
    restored = checkpoint.restore(ckpt, shardings=sharding.param_shardings(cfg, mesh))
    lp, _ = sharded_logprobs(cfg, restored, ids, mask, mesh)
    out["restored data:2,model:2"] = lp
  if sharding.is_main_process():
    tmp = out_path + ".tmp.npz"
    np.savez(tmp, **{k.replace(":", "_").replace(",", "-"): v for k, v in out.items()})
    os.replace(tmp, out_path)
  jax.distributed.shutdown()


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("mode", choices=("devices8", "multihost"))
  ap.add_argument("out")
  ap.add_argument("--port", type=int)
  ap.add_argument("--process_id", type=int)
  ap.add_argument("--ckpt", default=None, help="multihost: checkpoint to restore onto the mesh")
  a = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  jax.config.update("jax_num_cpu_devices", 8 if a.mode == "devices8" else 2)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if a.mode == "devices8":
    run_devices8(a.out)
  else:
    run_multihost(a.out, a.port, a.process_id, a.ckpt)


if __name__ == "__main__":
  main()
