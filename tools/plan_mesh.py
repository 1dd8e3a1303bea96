r"""Per-device memory of the programs a run compiles, from an ahead-of-time compile (no weights).

  python -m tools.plan_mesh --model=175b --mesh=data:8,model:8 --batch=8 --length=2048 \
      --dtype=bfloat16 --device_memory_gib=80                       # scoring rows of 2048 tokens
  python -m tools.plan_mesh --model=30b --mesh=model:8 --mode=multiple_choice --length=600 \
      --options=4 --continuation=16                                 # 4 options after a prompt
  python -m tools.plan_mesh --model=30b --mesh=model:8 --mode=decode --batch=8 --length=128 \
      --new_tokens=64 --joint_model=1.3b                            # joint decoding of two models

Modes, each planning the very program that runs (the same jitted function, spec and shapes):
  score            opt_jax.scoring.score_program for [batch, bucket(length)] rows (rolling
                   windows, perplexity, plain requests).
  multiple_choice  the same program for the packed row that one context of --length tokens with
                   --options continuations of --continuation tokens becomes (scoring.pack_options,
                   split at --max_length as the Scorer splits it), bucketed.
  decode           opt_jax.generation's decoding program (prefill + the decode loop in one
                   program) for [bucket(batch), bucket(length)] prompts and --new_tokens; with
                   --joint_model, the joint program of both models (each with its KV cache).

The tool simulates the mesh's devices on the host CPU (it sets jax_num_cpu_devices itself),
lowers the program against abstract sharded shapes and reads XLA's memory analysis of the
per-device program: parameter bytes, other arguments, temporaries, outputs. Nothing is
allocated. The last line is `per_device_total_gib=<float> fits=<true|false>`.

The numbers come from the XLA CPU backend: buffer assignment and fusion on GPU/TPU differ (e.g.
the CPU backend upcasts bf16 matmul operands to fp32, cuDNN/Pallas attention kernels keep fewer
temporaries), so treat them as an estimate, with a few GiB of headroom for the runtime.
"""

from __future__ import annotations

import dataclasses
import math
import os

from opt_jax import cli, families
from opt_jax.errors import InputError

# jax, and the opt_jax modules that import it, are imported inside the functions that use them:
# JAX reads JAX_PLATFORMS when it is first imported, and _simulate_devices must set it (and the
# number of simulated devices) before that.

GIB = 1024 ** 3
MODES = ("score", "multiple_choice", "decode")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(cli.Settings):
  model: str = cli.option("125m", "A preset of any family (opt-125m ... opt-175b or 125m ... "
                          "175b, pythia-14m ... pythia-12b, llama-7b, tinyllama-1.1b, olmo-1b, "
                          "olmo-7b, olmo-2-7b, olmo-2-13b) or the path of an HF config.json.")
  mesh: str = cli.option("data:-1", "Mesh spec, e.g. data:2,fsdp:1,model:4.")
  num_devices: int | None = cli.option(None, "Devices to simulate; needed only when --mesh has a "
                                       "-1 axis (default: the product of its sizes).", ge=1)
  mode: str = cli.option("score", "Program to plan: score (plain rows), multiple_choice (one "
                         "packed row per context), decode (prefill + decode loop).",
                         choices=MODES)
  batch: int = cli.option(8, "Rows per step (global, all devices); decode: prompts per call.",
                          ge=1)
  length: int = cli.option(2048, "score: tokens per row; multiple_choice: context tokens; "
                           "decode: prompt tokens.", ge=1)
  options: int = cli.option(4, "multiple_choice: continuations per context.", ge=1)
  continuation: int = cli.option(8, "multiple_choice: tokens per continuation.", ge=1)
  new_tokens: int = cli.option(64, "decode: tokens generated per prompt.", ge=1)
  joint_model: str = cli.option("", "decode: a second model (preset or config.json) decoded "
                                "jointly with --model ('': --model alone).")
  max_length: int | None = cli.option(None, "Scorer's max_length (default: the model's "
                                      "max_position_embeddings).", ge=2)
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
  if model.endswith(".json") or os.sep in model:
    return families.read_config(model)
  return families.preset(model)


@dataclasses.dataclass
class MemoryPlan:
  """Bytes per device of one compiled program (XLA CPU memory analysis).

  batch, length: the program's [batch, length] (after bucketing; decode: the prompt bucket).
  """
  mode: str
  program: str              # what was compiled, e.g. "score [8, 2048]"
  mesh: str
  devices: int
  batch: int
  length: int
  dtype: str
  attention: str
  num_params: int           # all models of the program
  parameter_bytes: int      # this device's shards of the parameters (from their shardings)
  argument_bytes: int       # all inputs XLA holds: parameters + token arrays (+ knobs)
  temp_bytes: int           # XLA temporaries (activations, attention scores, KV caches, ...)
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
        f"devices={self.devices} dtype={self.dtype} attention={self.attention}",
        f"program: {self.program}",
        f"per device: parameters {g(self.parameter_bytes)}, other inputs "
        f"{g(self.argument_bytes - self.parameter_bytes)}, temporaries {g(self.temp_bytes)}, "
        f"outputs {g(self.output_bytes)} (XLA CPU memory analysis; GPU/TPU differ somewhat)",
        f"device memory {self.device_memory_gib:g} GiB",
        f"per_device_total_gib={self.total_bytes / GIB:.4f} fits={str(self.fits).lower()}",
    ])


def multiple_choice_length(context: int, options: int, continuation: int, max_length: int
                           ) -> int:
  """Length of the longest packed row the Scorer builds for one context of `context` tokens and
  `options` continuations of `continuation` tokens (scoring.pack_options on dummy tokens)."""
  from opt_jax import scoring  # pylint: disable=import-outside-toplevel
  if context - 1 + continuation > max_length:
    raise InputError(f"--length={context} and --continuation={continuation}: one option does "
                     f"not fit max_length={max_length} with its context (the Scorer then scores "
                     f"it as a plain, truncated row: plan --mode=score)")
  rows = scoring.pack_options([0] * context, [[0] * continuation] * options, max_length)
  return max(len(row.inputs) for row, _ in rows)


def plan(config, mesh_spec: str, *, batch: int, length: int, dtype: str = "bfloat16",
         attention: str = "xla", vocab_chunk: int = 8192, device_memory_gib: float = 80.0,
         num_devices: int | None = None, mode: str = "score", options: int = 4,
         continuation: int = 8, new_tokens: int = 64, joint_config=None,
         max_length: int | None = None, min_bucket: int = 16) -> MemoryPlan:
  """Compiles the program of `mode` (module docstring) for abstract sharded inputs on the first
  `num_devices` devices. Shapes are those Scorer (batch_size=batch, max_length, min_bucket) or
  generate / joint_generate (batch_size=batch) would run."""
  import jax
  import jax.numpy as jnp

  from opt_jax import generation, model, programs, scoring, sharding

  if mode not in MODES:
    raise InputError(f"--mode={mode!r}: expected one of {MODES}")
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  if num_devices and len(devices) < num_devices:
    raise InputError(f"{num_devices} devices requested but JAX sees {len(devices)}")
  if batch < 1:
    raise InputError(f"--batch={batch}: expected an integer >= 1")
  configs = (config,) if joint_config is None else (config, joint_config)
  max_pos = min(c.max_position_embeddings for c in configs)
  max_length = max_length or config.max_position_embeddings
  if not 2 <= max_length <= config.max_position_embeddings:
    raise InputError(f"--max_length={max_length}: expected 2 to max_position_embeddings="
                     f"{config.max_position_embeddings}")
  limit = max_pos - new_tokens if mode == "decode" else max_length
  if not 1 <= length <= limit:
    raise InputError(f"--length={length}: expected 1 to {limit} ("
                     + ("max_position_embeddings - --new_tokens" if mode == "decode"
                        else "the Scorer's max_length") + ")")
  if joint_config is not None and joint_config.vocab_size != config.vocab_size:
    raise InputError(f"--joint_model: vocabulary {joint_config.vocab_size} differs from "
                     f"--model's {config.vocab_size}; joint decoding needs one vocabulary")
  try:
    mesh = sharding.make_mesh(mesh_spec, devices=devices)
    for c in configs:
      sharding.check_divisible(c, mesh, batch_size=batch if mode != "decode" else None)
  except ValueError as e:   # a spec that does not parse, or does not divide the model
    raise InputError(f"--mesh={mesh_spec}: {e}") from None
  dt = jnp.dtype(dtype)
  abstract = tuple(
      jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dt, sharding=sh),
                   model.param_shapes(c), sharding.param_shardings(c, mesh)) for c in configs)

  if mode == "decode":
    spec = generation.DecodeSpec(configs, new_tokens, joint_config is not None, dt.name,
                                 attention, mesh)
    b, t = generation.decode_shape(spec, batch, length)
    lowered = generation.lower_decode(spec, abstract, b, t)
    program = (f"decode [{b}, {t}] prompts + {new_tokens} new tokens"
               + (" (joint, 2 models)" if joint_config is not None else ""))
  else:
    n = length if mode == "score" else multiple_choice_length(length, options, continuation,
                                                              max_length)
    b, t = batch, programs.bucket(n, min(min_bucket, max_length), max_length)
    spec = scoring.ScoreSpec(config, dt.name, attention, vocab_chunk=vocab_chunk, mesh=mesh)
    lowered = scoring.lower_score(spec, abstract[0], b, t)
    program = f"score [{b}, {t}]" + (
        "" if mode == "score" else
        f" (one packed row of {n} tokens: {length}-token context, {options} x {continuation}"
        "-token options)")
  # The XLA CPU backend (this host, not the target) computes bf16 dots in fp32, and loop-invariant
  # code motion then hoists the fp32 conversion of every stacked layer weight out of the layer
  # scan: an fp32 copy of all weights that GPU/TPU (native bf16 dots) never make. Keep the
  # conversion inside the loop. The program compiled is the same lowered program either way.
  options = ({"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
             if devices[0].platform == "cpu" else {})
  mem = lowered.compile(compiler_options=options).memory_analysis()
  param_bytes = sum(math.prod(p.sharding.shard_shape(p.shape)) * dt.itemsize
                    for p in jax.tree.leaves(abstract))
  return MemoryPlan(
      mode=mode, program=program, mesh=sharding.describe(mesh), devices=len(devices), batch=b,
      length=t, dtype=dt.name, attention=attention,
      num_params=sum(c.num_params() for c in configs), parameter_bytes=param_bytes,
      argument_bytes=int(mem.argument_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
      device_memory_gib=device_memory_gib)


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
  configs = []
  for flag, name in (("--model", s.model), ("--joint_model", s.joint_model)):
    try:
      configs.append(load_model_config(name) if name else None)
    except (KeyError, InputError) as e:   # an unknown preset: the message lists the known ones
      raise InputError(f"{flag}={name}: {e.args[0]}") from None
  if configs[1] is not None and s.mode != "decode":
    raise InputError("--joint_model is for --mode=decode")
  result = plan(configs[0], s.mesh, batch=s.batch, length=s.length, dtype=s.dtype,
                attention=s.attention, vocab_chunk=s.vocab_chunk,
                device_memory_gib=s.device_memory_gib,
                num_devices=_num_devices(s.mesh, s.num_devices), mode=s.mode,
                options=s.options, continuation=s.continuation, new_tokens=s.new_tokens,
                joint_config=configs[1], max_length=s.max_length)
  if jax.process_index() == 0:
    print(result.report(s.model))


if __name__ == "__main__":
  cli.main(Settings, run, before=_simulate_devices)
