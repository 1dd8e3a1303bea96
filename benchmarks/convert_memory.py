r"""Peak resident memory of checkpoint conversion against the size of its input.

Builds a random OPT-shaped HF checkpoint (one fp32 model.safetensors of ~1 GB by default) in a
temporary directory, then runs in fresh subprocesses, one at a time:
  import     python importing opt_jax.convert, jax and orbax only (the fixed cost)
  hf->jax    opt_jax.convert.convert(input, out)                    (what the CLI runs)
  jax->hf    opt_jax.convert.convert(out, out_hf, output_format="hf")
  restore    opt_jax.checkpoints.checkpoint.restore(out) onto one CPU device
and reports each child's peak RSS (its own getrusage ru_maxrss) as a ratio to the largest input
file. "written" is the size of the output directory; "target" = 1.5 x input + written.
Target (issue 2): peak < 1.5 x largest input file + the size of what is being written.

  python -m benchmarks.convert_memory [--hidden=1024 --layers=16 --vocab=50272]
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import app, flags

from opt_jax import families
from opt_jax.checkpoints import layout, safetensors_io
from opt_jax.config import DecoderConfig
from opt_jax.convert import hf

_HIDDEN = flags.DEFINE_integer("hidden", 1024, "Hidden size (ffn = 4x).")
_LAYERS = flags.DEFINE_integer("layers", 16, "Decoder layers.")
_VOCAB = flags.DEFINE_integer("vocab", 50272, "Vocabulary size.")
_KEEP = flags.DEFINE_string("workdir", None, "Directory for the files (default: a temporary one).")

_CHILD = r"""
import json, resource, sys, time
from opt_jax.checkpoints import checkpoint
from opt_jax.convert import convert
import jax
t = time.time()
if sys.argv[1] == "restore":
  jax.block_until_ready(checkpoint.restore(sys.argv[2]))
elif sys.argv[1] != "import":
  convert(sys.argv[2], sys.argv[3], output_format=sys.argv[1])
print(json.dumps({"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "secs": time.time() - t}))
"""


def write_random_hf(directory: str, config: DecoderConfig, seed: int = 0) -> str:
  """config.json + one fp32 model.safetensors of random values, written tensor by tensor."""
  os.makedirs(directory, exist_ok=True)
  families.write_config(config, os.path.join(directory, "config.json"))
  shapes = hf.expected_tensors(config)
  entries = [(k, s, np.dtype("<f4")) for k, s in shapes.items()]
  path = os.path.join(directory, layout.SAFETENSORS)
  rng = np.random.default_rng(seed)
  with open(path, "wb") as f:
    header = safetensors_io.header_bytes(entries)
    f.write(len(header).to_bytes(8, "little") + header)
    for _, shape, _ in entries:
      f.write(rng.standard_normal(shape, dtype=np.float32).reshape(-1).view(np.uint8))
  return path


def run_child(mode: str, src: str = "", dst: str = "") -> tuple[float, float]:
  """(peak RSS in bytes, seconds of the work after imports) of one run in a fresh process; the
  child reports its own ru_maxrss (Linux: KiB) when done."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _CHILD, mode, src, dst], env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  return float(report["maxrss"]), float(report["secs"])


def _dir_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)


def main(argv):
  del argv
  config = families.get("opt").config(
      vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, num_hidden_layers=_LAYERS.value,
      num_attention_heads=_HIDDEN.value // 64, ffn_dim=4 * _HIDDEN.value)
  with tempfile.TemporaryDirectory(dir=_KEEP.value) as work:
    src = write_random_hf(os.path.join(work, "hf"), config)
    size = os.path.getsize(src)
    print(f"model: {config.num_params() / 1e6:.0f}M params fp32; input {src}: {size / 1e9:.3f} GB")
    rows = []
    base, _ = run_child("import")
    rows.append(("import only", base, 0, 0.0))
    out = os.path.join(work, "jax")
    peak, wall = run_child("opt_jax", os.path.dirname(src), out)
    rows.append(("hf -> opt_jax", peak, _dir_bytes(out), wall))
    back = os.path.join(work, "hf_back")
    peak_r, wall_r = run_child("restore", out)
    rows.append(("restore", peak_r, 0, wall_r))
    peak2, wall2 = run_child("hf", out, back)
    rows.append(("opt_jax -> hf", peak2, _dir_bytes(back), wall2))
    print(f"{'run':<14} {'peak RSS GB':>11} {'/ input':>8} {'written GB':>10} "
          f"{'target GB':>9} {'wall s':>7}")
    for name, rss, written, secs in rows:
      target = 1.5 * size + written
      print(f"{name:<14} {rss / 1e9:11.3f} {rss / size:8.2f} {written / 1e9:10.3f} "
            f"{target / 1e9 if written else math.nan:9.3f} {secs:7.1f}")
    print(json.dumps({"input_bytes": size, "import_rss": base, "hf_to_opt_jax_rss": peak,
                      "restore_rss": peak_r, "opt_jax_to_hf_rss": peak2}))


if __name__ == "__main__":
  app.run(main)
