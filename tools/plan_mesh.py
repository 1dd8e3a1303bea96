r"""Per-device memory of the sharded scoring step, from an ahead-of-time compile (no weights).

  python -m tools.plan_mesh --model=175b --mesh=data:8,model:8 --batch=8 --length=2048 \
      --dtype=bfloat16 --device_memory_gib=80
  python -m tools.plan_mesh --model=/ckpts/opt-30b/config.json --mesh=fsdp:4,model:8 ...

The tool simulates the mesh's devices on the host CPU (it sets jax_num_cpu_devices itself),
lowers the scoring step (forward pass + chunked vocabulary log-softmax, exactly what
opt_jax.scoring.Scorer runs) against abstract sharded shapes and reads XLA's memory analysis of
the per-device program: parameter bytes, other arguments, temporaries, outputs. Nothing is
allocated. The last line is `per_device_total_gib=<float> fits=<true|false>`.

The numbers come from the XLA CPU backend: buffer assignment and fusion on GPU/TPU differ (e.g.
the CPU backend upcasts bf16 matmul operands to fp32, cuDNN/Pallas attention kernels keep fewer
temporaries), so treat them as an estimate, with a few GiB of headroom for the runtime.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

from absl import app, flags

GIB = 1024 ** 3

_MODEL = flags.DEFINE_string("model", "125m", "A preset of any family (opt-125m ... opt-175b or "
                             "125m ... 175b, pythia-14m ... pythia-12b, llama-7b, tinyllama-1.1b, "
                             "olmo-1b, olmo-7b, olmo-2-7b, olmo-2-13b) or the path of an HF "
                             "config.json.")
_MESH = flags.DEFINE_string("mesh", "data:-1", "Mesh spec, e.g. data:2,fsdp:1,model:4.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices to simulate; needed only when "
                                    "--mesh has a -1 axis (default: the product of its sizes).")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per step (global, all devices).")
_LENGTH = flags.DEFINE_integer("length", 2048, "Tokens per row.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                           "Parameter and compute dtype.")
_ATTENTION = flags.DEFINE_enum("attention", "xla", ["xla", "blocked"],
                               "Attention implementation to plan for (cudnn does not compile on "
                               "CPU; xla materialises [B, N, T, T] scores and is the upper bound).")
_VOCAB_CHUNK = flags.DEFINE_integer("vocab_chunk", 8192, "Vocabulary rows per log-softmax chunk.")
_DEVICE_MEMORY_GIB = flags.DEFINE_float("device_memory_gib", 80.0, "Memory of one device (GiB).")


# The planning itself (also called by tests and benchmarks; JAX must already see enough devices).

def load_model_config(model: str):
  """A preset name ('175b', 'opt-1.3b', 'facebook/opt-30b', 'pythia-12b', 'olmo-2-13b',
  'llama-7b') or a config.json path -> DecoderConfig."""
  from opt_jax import families
  from opt_jax.config import DecoderConfig
  if model.endswith(".json") or os.sep in model:
    return DecoderConfig.from_json_file(model)
  return families.preset(model)


@dataclasses.dataclass
class MemoryPlan:
  """Bytes per device of the compiled scoring step (XLA CPU memory analysis)."""
  mesh: str
  devices: int
  batch: int
  length: int
  dtype: str
  attention: str
  num_params: int
  parameter_bytes: int      # this device's shards of the parameters (from their shardings)
  argument_bytes: int       # all inputs XLA holds: parameters + ids + mask + targets
  temp_bytes: int           # XLA temporaries (activations, attention scores, logit chunks, ...)
  output_bytes: int
  alias_bytes: int
  device_memory_gib: float

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.device_memory_gib * GIB

  def report(self, name: str) -> str:
    g = lambda b: f"{b / GIB:.3f} GiB ({b:,} B)"
    return "\n".join([
        f"model={name} ({self.num_params / 1e9:.2f}B params) mesh={self.mesh} "
        f"devices={self.devices} batch={self.batch} length={self.length} dtype={self.dtype} "
        f"attention={self.attention}",
        f"per device: parameters {g(self.parameter_bytes)}, other inputs "
        f"{g(self.argument_bytes - self.parameter_bytes)}, temporaries {g(self.temp_bytes)}, "
        f"outputs {g(self.output_bytes)} (XLA CPU memory analysis; GPU/TPU differ somewhat)",
        f"device memory {self.device_memory_gib:g} GiB",
        f"per_device_total_gib={self.total_bytes / GIB:.4f} fits={str(self.fits).lower()}",
    ])


def plan(config, mesh_spec: str, *, batch: int, length: int, dtype: str = "bfloat16",
         attention: str = "xla", vocab_chunk: int = 8192, device_memory_gib: float = 80.0,
         num_devices: int | None = None) -> MemoryPlan:
  """Compiles the scoring step for abstract sharded inputs on the first `num_devices` devices."""
  import math

  import jax
  import jax.numpy as jnp

  from opt_jax import model, scoring, sharding

  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  if num_devices and len(devices) < num_devices:
    raise ValueError(f"{num_devices} devices requested but JAX sees {len(devices)}")
  if length > config.max_position_embeddings:
    raise ValueError(f"length={length} exceeds max_position_embeddings="
                     f"{config.max_position_embeddings}")
  mesh = sharding.make_mesh(mesh_spec, devices=devices)
  sharding.check_divisible(config, mesh, batch_size=batch)
  dt = jnp.dtype(dtype)
  shardings = sharding.param_shardings(config, mesh)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dt, sharding=sh),
                        model.param_shapes(config), shardings)
  rows = sharding.batch_sharding(mesh)
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)

  def step(params, ids, mask, targets):  # what Scorer compiles for a [batch, length] bucket
    return scoring.target_logprobs(params, ids, mask, targets, config=config, dtype=dt,
                                   attention=attention, vocab_chunk=vocab_chunk)

  with sharding.activate(mesh):
    lowered = jax.jit(step, out_shardings=(rows, rows)).lower(params, ids, ids, ids)
  # The CPU backend computes bf16 matmuls in fp32, and loop-invariant code motion then hoists the
  # fp32 conversion of every stacked layer weight out of the layer scan: an fp32 copy of all
  # weights that GPU/TPU (native bf16 matmuls) never make. Keep the conversion inside the loop.
  options = ({"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
             if devices[0].platform == "cpu" else {})
  compiled = lowered.compile(compiler_options=options)
  mem = compiled.memory_analysis()
  param_bytes = sum(math.prod(p.sharding.shard_shape(p.shape)) * dt.itemsize
                    for p in jax.tree.leaves(params))
  return MemoryPlan(
      mesh=sharding.describe(mesh), devices=len(devices), batch=batch, length=length,
      dtype=dt.name, attention=attention, num_params=config.num_params(),
      parameter_bytes=param_bytes, argument_bytes=int(mem.argument_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes), device_memory_gib=device_memory_gib)


def _num_devices(spec: str, num_devices: int | None) -> int:
  if num_devices:
    return num_devices
  sizes = [int(s) for s in re.findall(r":\s*(-?\d+)", spec)]
  if any(s == -1 for s in sizes) or not sizes:
    raise app.UsageError(f"--mesh={spec!r} has a -1 axis: give --num_devices as well")
  n = 1
  for s in sizes:
    n *= s
  return n


def main(argv):
  del argv
  n = _num_devices(_MESH.value, _NUM_DEVICES.value)
  # Must happen before JAX creates its CPU backend: one simulated device per mesh device.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)

  try:
    config = load_model_config(_MODEL.value)
    result = plan(config, _MESH.value, batch=_BATCH.value, length=_LENGTH.value,
                        dtype=_DTYPE.value, attention=_ATTENTION.value,
                        vocab_chunk=_VOCAB_CHUNK.value, device_memory_gib=_DEVICE_MEMORY_GIB.value,
                        num_devices=n)
  except (ValueError, KeyError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    print(result.report(_MODEL.value))


if __name__ == "__main__":
  app.run(main)
