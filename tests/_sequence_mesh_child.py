"""Subprocess side of the mesh test in tests/test_sequence_generation.py: 8 simulated CPU devices.

  python tests/_sequence_mesh_child.py SETTINGS.json OUT.json

Runs experiments.sequence_generation with the settings in SETTINGS.json (opt_jax.cli.as_dict of
a Settings; the test sets --mesh) and writes OUT.json: the device count, every set's token ids
and the trajectory table. The test compares them with its one-device run. The device count is
set before JAX starts a backend, so this file runs as a script.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
  settings_path, out_path = sys.argv[1:3]
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  from experiments import sequence_generation as S

  with open(settings_path) as f:
    settings = S.Settings(**json.load(f))
  table = S.run(settings, progress=False).table
  sets = {}
  for name in sorted(os.listdir(os.path.join(settings.out, S.SETS_DIR))):
    if name.endswith(".jsonl"):
      seqs = S.load_set(os.path.join(settings.out, S.SETS_DIR, name))
      sets[seqs.name] = {"context_ids": seqs.context_ids, "ids": seqs.ids}
  with open(out_path, "w") as f:
    json.dump({"devices": len(jax.devices()), "sets": sets,
               "table": table.to_dict(orient="list")}, f)


if __name__ == "__main__":
  main()
