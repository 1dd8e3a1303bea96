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

from opt_jax import cli
from opt_jax.errors import InputError

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(cli.Settings):
  model: str = cli.option("125m", "A preset of any family (opt-125m ... opt-175b or 125m ... "
                          "175b, pythia-14m ... pythia-12b, llama-7b, tinyllama-1.1b, olmo-1b, "
                          "olmo-7b, olmo-2-7b, olmo-2-13b) or the path of an HF config.json.")
  mesh: str = cli.option("data:-1", "Mesh spec, e.g. data:2,fsdp:1,model:4.")
  num_devices: int | None = cli.option(None, "Devices to simulate; needed only when --mesh has a "
                                       "-1 axis (default: the product of its sizes).", ge=1)
  batch: int = cli.option(8, "Rows per step (global, all devices).", ge=1)
  length: int = cli.option(2048, "Tokens per row.", ge=1)
  dtype: str = cli.option("bfloat16", "Parameter and compute dtype.",
                          choices=("bfloat16", "float16", "float32"))
  attention: str = cli.option("xla", "Attention implementation to plan for (cudnn does not "
                              "compile on CPU; xla materialises [B, N, T, T] scores and is the "
                              "upper bound).", choices=("xla", "blocked"))
  vocab_chunk: int = cli.option(8192, "Vocabulary rows per log-softmax chunk.", ge=1)
  device_memory_gib: float = cli.option(80.0, "Memory of one device (GiB).", gt=0)


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
    raise InputError(f"{num_devices} devices requested but JAX sees {len(devices)}")
  if not 1 <= length <= config.max_position_embeddings:
    raise InputError(f"--length={length}: expected 1 to max_position_embeddings="
                     f"{config.max_position_embeddings}")
  if batch < 1:
    raise InputError(f"--batch={batch}: expected an integer >= 1")
  try:
    mesh = sharding.make_mesh(mesh_spec, devices=devices)
    sharding.check_divisible(config, mesh, batch_size=batch)
  except ValueError as e:   # a spec that does not parse, or does not divide the model
    raise InputError(f"--mesh={mesh_spec}: {e}") from None
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


# Creating N simulated CPU devices takes time growing faster than N (5 s for 1024 devices, over
# 5 min for 8192 on a 2-core machine). Per-device memory depends only on the shard shapes, so a
# larger data axis is planned as a smaller one with the batch divided alike.
_MAX_SIMULATED_DEVICES = 2048


def _num_devices(spec: str, num_devices: int | None) -> int:
  """Devices to simulate for `spec`; a spec that cannot be satisfied fails here, before any
  device is created."""
  from opt_jax import sharding  # pylint: disable=import-outside-toplevel
  n = num_devices or sharding.devices_needed(spec)
  if n is None:
    raise InputError(f"--mesh={spec!r} has a -1 axis: give --num_devices as well")
  sharding.parse_mesh_spec(spec, n)   # InputError naming what is wrong with the spec
  if n > _MAX_SIMULATED_DEVICES:
    raise InputError(
        f"--mesh={spec!r} needs {n} simulated devices; the planner simulates at most "
        f"{_MAX_SIMULATED_DEVICES} (creating more takes many minutes). Per-device memory is the "
        f"same with a smaller data axis and the batch divided by the same factor")
  return n


def _simulate_devices(s: Settings) -> None:
  """One simulated CPU device per mesh device; must happen before JAX creates its backend."""
  n = _num_devices(s.mesh, s.num_devices)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)


def run(s: Settings) -> None:
  """Prints the plan (its last line: per_device_total_gib=<float> fits=<true|false>)."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    config = load_model_config(s.model)
  except KeyError as e:   # an unknown preset: the message lists the known ones
    raise InputError(f"--model={s.model}: {e.args[0]}") from None
  result = plan(config, s.mesh, batch=s.batch, length=s.length, dtype=s.dtype,
                attention=s.attention, vocab_chunk=s.vocab_chunk,
                device_memory_gib=s.device_memory_gib, num_devices=_num_devices(s.mesh,
                                                                             s.num_devices))
  if jax.process_index() == 0:
    print(result.report(s.model))


if __name__ == "__main__":
  cli.main(Settings, run, before=_simulate_devices)
