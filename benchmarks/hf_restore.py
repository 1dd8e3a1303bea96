r"""Peak RSS and time of restoring an HF safetensors checkpoint in place vs its orbax copy.

Builds a random Pythia-410M-shaped GPT-NeoX checkpoint (405M parameters, fp16, one 0.81 GB
model.safetensors; --family/--hidden/... change it) in a temporary directory, converts it to an
opt_jax (orbax) checkpoint, then restores each in fresh subprocesses, one at a time and `--repeats`
times each, in their stored dtype:
  import       python importing opt_jax.checkpoints.checkpoint and jax only (the fixed cost)
  orbax        checkpoint.restore(orbax copy) onto one CPU device
  hf           checkpoint.restore(HF folder) onto one CPU device (opt_jax.checkpoints.hf_format)
  orbax mesh / hf mesh   the same onto a --mesh of 8 simulated CPU devices
Each child reports its own peak RSS (VmHWM) and the seconds of the restore alone
(imports excluded, arrays ready). The files are in the page cache (just written): restore times
are read-from-memory times, not disk times. Prints medians and the hf / orbax ratios.

  python -m benchmarks.hf_restore [--hidden=1024 --layers=24 --heads=16 --vocab=50304]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np
from absl import app, flags

from opt_jax import families
from opt_jax.checkpoints import layout, safetensors_io
from opt_jax.convert import convert, hf

_FAMILY = flags.DEFINE_enum("family", "gpt_neox", ["gpt_neox", "opt", "llama"], "Model family.")
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "Hidden size (ffn = 4x).")
_LAYERS = flags.DEFINE_integer("layers", 24, "Decoder layers.")
_HEADS = flags.DEFINE_integer("heads", 16, "Attention heads.")
_VOCAB = flags.DEFINE_integer("vocab", 50304, "Vocabulary size.")
_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"],
                           "Stored dtype.")
_MESH = flags.DEFINE_string("mesh", "fsdp:2,model:4", "Mesh of 8 simulated CPU devices.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Fresh processes per mode.")
_KEEP = flags.DEFINE_string("workdir", None, "Directory for the files (default: a temporary one).")

_CHILD = r"""
import json, os, sys, time
mode, path, mesh_spec = sys.argv[1:4]
import jax
if mesh_spec != "-":
  jax.config.update("jax_num_cpu_devices", 8)
from opt_jax import sharding
from opt_jax.checkpoints import checkpoint
secs = 0.0
if mode != "import":
  shardings = None
  if mesh_spec != "-":
    mesh = sharding.make_mesh(mesh_spec)
    shardings = sharding.param_shardings(checkpoint.load_config(path), mesh)
  t = time.perf_counter()
  jax.block_until_ready(checkpoint.restore(path, shardings=shardings))
  secs = time.perf_counter() - t
# VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited over exec).
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"maxrss": hwm * 1024, "secs": secs}))
"""


def _config():
  if _FAMILY.value == "gpt_neox":
    fields = dict(intermediate_size=4 * _HIDDEN.value, rotary_pct=0.25, bos_token_id=0,
                  eos_token_id=0)
  elif _FAMILY.value == "opt":
    fields = dict(ffn_dim=4 * _HIDDEN.value)
  else:
    fields = dict(intermediate_size=4 * _HIDDEN.value)
  return families.get(_FAMILY.value).config(
      vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, num_hidden_layers=_LAYERS.value,
      num_attention_heads=_HEADS.value, max_position_embeddings=2048, **fields)


def write_random_hf(directory: str, config, dtype: np.dtype, seed: int = 0) -> str:
  """config.json + one model.safetensors of random values, written tensor by tensor."""
  os.makedirs(directory, exist_ok=True)
  families.write_config(config, os.path.join(directory, "config.json"))
  entries = [(k, s, dtype) for k, s in hf.expected_tensors(config).items()]
  path = os.path.join(directory, layout.SAFETENSORS)
  rng = np.random.default_rng(seed)
  with open(path, "wb") as f:
    header = safetensors_io.header_bytes(entries)
    f.write(len(header).to_bytes(8, "little") + header)
    for _, shape, _ in entries:
      value = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
      f.write(value.reshape(-1).view(np.uint8))
  return path


def run_child(mode: str, path: str = "", mesh: str = "-") -> tuple[float, float]:
  """(peak RSS in bytes, seconds of the restore) of one run in a fresh process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _CHILD, mode, path, mesh], env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  return float(report["maxrss"]), float(report["secs"])


def main(argv):
  del argv
  config = _config()
  dtype = np.dtype(ml_dtypes.bfloat16) if _DTYPE.value == "bfloat16" else np.dtype(_DTYPE.value)
  with tempfile.TemporaryDirectory(dir=_KEEP.value) as work:
    src = write_random_hf(os.path.join(work, "hf"), config, dtype)
    size = os.path.getsize(src)
    hf_dir = os.path.dirname(src)
    orbax_dir = convert(hf_dir, os.path.join(work, "jax"))
    print(f"model: {_FAMILY.value}, {config.num_params() / 1e6:.0f}M params {dtype.name}; "
          f"{src}: {size / 1e9:.3f} GB")
    runs = {"import": ("import", "", "-"), "import mesh": ("import", "", _MESH.value),
            "orbax": ("restore", orbax_dir, "-"),
            "hf": ("restore", hf_dir, "-"), "orbax mesh": ("restore", orbax_dir, _MESH.value),
            "hf mesh": ("restore", hf_dir, _MESH.value)}
    out = {}
    for name, (mode, path, mesh) in runs.items():
      got = [run_child(mode, path, mesh) for _ in range(_REPEATS.value)]
      out[name] = (statistics.median(r for r, _ in got), statistics.median(s for _, s in got))
    print(f"{'run':<12} {'peak RSS GB':>11} {'/ file':>7} {'restore s':>9}   (median of "
          f"{_REPEATS.value} fresh processes; mesh: {_MESH.value})")
    for name, (rss, secs) in out.items():
      print(f"{name:<12} {rss / 1e9:11.3f} {rss / size:7.2f} {secs:9.2f}")
    for where in ("", " mesh"):
      (r_hf, s_hf), (r_ob, s_ob) = out["hf" + where], out["orbax" + where]
      base = out["import" + where][0]
      print(f"hf / orbax{where}: peak RSS {r_hf / r_ob:.2f}x (above import: "
            f"{(r_hf - base) / (r_ob - base):.2f}x), restore time {s_hf / s_ob:.2f}x")
    print(json.dumps({"file_bytes": size, **{k: {"rss": r, "secs": s}
                                             for k, (r, s) in out.items()}}))


if __name__ == "__main__":
  app.run(main)
