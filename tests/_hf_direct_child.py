"""Subprocess side of tests/test_hf_direct.py: restores HF checkpoints onto meshes of 8 simulated
CPU devices, directly and through a converted orbax copy.

  python tests/_hf_direct_child.py WORKDIR OUT.json

Per family and mesh it writes whether every shard equals the orbax restore's, whether the
shardings are the requested ones, the bytes the direct restore read from safetensors, and the
bytes of the distinct shards the local devices hold. tests/test_hf_direct.py asserts.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

MESHES = ("data:2,model:4", "fsdp:4,model:2", "fsdp:2,model:2,data:2")


def main(work: str, out_path: str) -> None:
  import _sharding_child as sc  # the tiny family shapes that divide 8
  import ml_dtypes
  import oracle
  from opt_jax import sharding
  from opt_jax.checkpoints import checkpoint, safetensors_io
  from opt_jax.convert import convert
  from opt_jax.families import table

  read = {"bytes": 0}
  real_open = safetensors_io.safe_open

  class Counting:
    """safe_open whose slices count the bytes they return."""

    def __init__(self, *a, **k):
      self._f = real_open(*a, **k)

    def __enter__(self):
      self._inner = self._f.__enter__()
      return self

    def __exit__(self, *exc):
      return self._f.__exit__(*exc)

    def get_slice(self, name):
      s = self._inner.get_slice(name)

      class Slice:
        def __getitem__(self, box):
          value = s[box]
          read["bytes"] += value.nbytes
          return value
      return Slice()

  safetensors_io.safe_open = Counting
  configs = {"opt": sc.config(), **{f: sc.family_config(f) for f in sc.FAMILY_CONFIGS}}
  results = {}
  for name, config in configs.items():
    hf_dir = os.path.join(work, name + "-hf")
    # Small shards: the index path, tensors spread over several files.
    oracle.hf_model(config).save_pretrained(hf_dir, max_shard_size="40KB")
    orbax_dir = convert(hf_dir, os.path.join(work, name + "-jax"))
    for spec in MESHES:
      mesh = sharding.make_mesh(spec)
      shardings = sharding.param_shardings(config, mesh)
      for dtype in (None, ml_dtypes.bfloat16) if spec == MESHES[0] else (None,):
        read["bytes"] = 0
        direct = table.flatten(checkpoint.restore(hf_dir, shardings=shardings, dtype=dtype))
        bytes_read = read["bytes"]
        ref = table.flatten(checkpoint.restore(orbax_dir, shardings=shardings, dtype=dtype))
        want = table.flatten(shardings)
        equal = all(
            a.dtype == b.dtype and a.sharding == want[k]
            and all(np.array_equal(np.asarray(x.data), np.asarray(y.data))
                    and x.index == y.index
                    for x, y in zip(a.addressable_shards, b.addressable_shards))
            for k, a in direct.items() for b in [ref[k]])
        # Bytes of the stored (float32) data of the distinct blocks the local devices hold (a
        # block held by several devices is read once).
        held = sum(np.prod(x.data.shape) * 4 for a in direct.values()
                   for x in {str(x.index): x for x in a.addressable_shards}.values())
        results[f"{name} {spec} {np.dtype(dtype or np.float32).name}"] = {
            "equal": bool(equal and direct.keys() == ref.keys()),
            "bytes_read": int(bytes_read), "bytes_held": int(held),
            "sharded": sum(not a.sharding.is_fully_replicated for a in direct.values())}
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
