"""Subprocess side of the mesh test in tests/test_sequence_generation.py: 8 simulated CPU devices.

  python tests/_sequence_mesh_child.py SUITE CORPUS OUT_DIR

Runs experiments.sequence_generation with the same settings on one device and with
--mesh=data:2,model:4 (decoding and scoring sharded), into OUT_DIR/one and OUT_DIR/mesh, and
writes OUT_DIR/result.json: the sets' token ids of both runs and both trajectory tables. The test
asserts. The device count is set before JAX starts a backend, so this file runs as a script.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
  suite, corpus, out = sys.argv[1:4]
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  from experiments import sequence_generation as S

  settings = S.Settings(suite=suite, out=os.path.join(out, "one"), corpus=(corpus,),
                        num_prompts=4, prompt_tokens=8, max_new_tokens=8, num_passages=2,
                        passage_tokens=24, noise_rates=(0.3,), sample_models=("tiny-a",),
                        batch_size=8, generation_batch_size=4, seed=5, plots=False)
  runs = {"one": settings, "mesh": settings.replace(out=os.path.join(out, "mesh"),
                                                    mesh="data:2,model:4")}
  result = {"devices": len(jax.devices())}
  for name, s in runs.items():
    table = S.run(s, progress=False).table
    sets = {}
    for f in sorted(os.listdir(os.path.join(s.out, S.SETS_DIR))):
      if f.endswith(".jsonl"):
        seqs = S.load_set(os.path.join(s.out, S.SETS_DIR, f))
        sets[seqs.name] = {"context_ids": seqs.context_ids, "ids": seqs.ids}
    result[name] = {"sets": sets, "table": table.to_dict(orient="list")}
  with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main()
