"""Device meshes, the one logical-axis rules table, parameter/batch placement, multi-host start-up.

The model (opt_jax/model.py) names the axes of every parameter and large activation with logical
names; `RULES` below is the only place that maps them to the mesh axes `data`, `fsdp`, `model`.
Layout (Megatron-style tensor parallelism):
  attention heads and the MLP hidden dim are split over `model` (one reduction of activations
  after the attention output projection and one after the MLP's down projection, per layer);
  key/value heads of a GQA model are split over `model` too when their number K divides it, and
  replicated otherwise (every device computes all K key/value heads and its query heads attend to
  their group's): the one rule that depends on the config (`rules`);
  the vocabulary of the embedding and LM head is split over `model` (vocabulary-parallel:
  logits stay split, log-softmax reduces across `model`);
  the batch is split over `data` x `fsdp`; parameters' embed dimension is split over `fsdp`
  (gathered layer by layer inside the scan; size 1 by default = no parameter sharding).

Typical use (every binary, unchanged with one or many processes):

  sharding.initialize_distributed()                       # no-op for a single process
  mesh = sharding.make_mesh("data:-1,model:4")
  sharding.check_divisible(config, mesh, batch_size=8)    # fails before any compilation
  params = sharding.shard_params(params, config, mesh)   # or checkpoint.restore(shardings=...)
  with sharding.activate(mesh):
    fn = jax.jit(step, in_shardings=(sharding.param_shardings(config, mesh),
                                     sharding.batch_sharding(mesh)))
    out = fn(params, sharding.put(ids, sharding.batch_sharding(mesh)))
  if sharding.is_main_process(): write(sharding.to_host(out))

Everything accepts mesh=None: single default device, no constraints.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError

# Mesh axes, outermost first: `model` is innermost so tensor-parallel groups are neighbouring
# devices (same host, fastest links); `data` is outermost (crosses hosts / slices).
AXES = ("data", "fsdp", "model")

# The one rules table: (logical name, mesh axes or None). Earlier rules win when two names of
# one array want the same mesh axis (flax.linen.logical_to_mesh_axes semantics).
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),    # activations' batch dim
    ("vocab", "model"),             # embed [V, E], lm_head [V, E]: vocabulary-parallel
    ("act_vocab", "model"),         # logits [B, T, V] (or vocab chunks of them)
    ("heads", "model"),             # q_kernel [L, D, N, H], o_kernel [L, N, H, D]
    ("act_heads", "model"),         # q, attention output [B, T, N, H]
    ("kv_heads", "model"),          # k/v_kernel [L, D, K, H]: replicated when K % model != 0
    ("act_kv_heads", "model"),      # KV cache [L, B, S, K, H]: as kv_heads
    ("mlp", "model"),               # up/gate_kernel [L, D, F], down_kernel [L, F, D]
    ("act_mlp", "model"),           # MLP hidden activations [B, T, F]
    ("embed", "fsdp"),              # parameters' D / E dim: ZeRO-3 style, only when fsdp > 1
    ("embed_out", None),            # project_in/out's D dim (350m): small, replicated
    ("act_embed", None),            # residual stream [B, T, D]: replicated over `model`
    ("act_length", None),
    ("head_dim", None),
    ("layers", None),               # the scan axis of stacked layer weights
)

# Which config field a logical dimension comes from, for error messages.
_DIM_FIELD = {
    "vocab": "vocab_size", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
    "mlp": "intermediate_size", "embed": "hidden_size", "embed_out": "hidden_size",
}
_KV_NAMES = ("kv_heads", "act_kv_heads")


# Meshes ---------------------------------------------------------------------------------------

def _axis_sizes(spec: str) -> dict[str, int]:
  """The axes `spec` names -> their sizes (-1 kept); InputError naming the problem and the fix."""
  sizes: dict[str, int] = {}
  for part in spec.split(","):
    m = re.fullmatch(r"\s*([A-Za-z_]+)\s*:\s*(-?\d+)\s*", part)
    if not m:
      raise InputError(f"mesh spec {spec!r}: cannot parse {part!r}; expected name:size pairs "
                       f"separated by commas, e.g. 'data:2,fsdp:1,model:4' (-1 = what is left)")
    name, size = m.group(1), int(m.group(2))
    if name not in AXES:
      raise InputError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(AXES)}")
    if name in sizes:
      raise InputError(f"mesh spec {spec!r}: axis {name!r} given twice")
    if size == 0 or size < -1:
      raise InputError(f"mesh spec {spec!r}: axis {name!r} has size {size}; expected a positive "
                       f"size or -1 (whatever is left)")
    sizes[name] = size
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise InputError(f"mesh spec {spec!r}: only one axis may be -1, got {free}")
  return sizes


def devices_needed(spec: str) -> int | None:
  """How many devices mesh spec `spec` uses (the product of its sizes); None when one axis is -1
  (it takes whatever devices there are). InputError for a spec that cannot be parsed.

  Needs no devices: a caller that creates them (tools/plan_mesh.py simulates CPU devices) checks
  the spec with this before creating any.
  """
  sizes = _axis_sizes((spec or "").strip() or "data:-1")
  return None if -1 in sizes.values() else math.prod(sizes.values())


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
  """"data:2,fsdp:1,model:4" -> {"data": 2, "fsdp": 1, "model": 4}; -1 = the devices left over.

  Axes not named get size 1. Raises InputError naming the problem and the fix.
  """
  spec = (spec or "").strip() or "data:-1"
  sizes = _axis_sizes(spec)
  free = [a for a, s in sizes.items() if s == -1]
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise InputError(f"mesh spec {spec!r}: the fixed axes use {fixed} devices, which does not "
                       f"divide the {num_devices} devices available; choose sizes whose product "
                       f"divides {num_devices}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    model = sizes.get("model", 1)
    hint = (f"give one axis -1 (e.g. 'data:-1,model:{model}')" if num_devices % model == 0
            else "use axis sizes whose product divides the device count")
    raise InputError(f"mesh spec {spec!r} needs {fixed} devices but {num_devices} are available "
                     f"({jax.process_count()} process(es)); make the sizes multiply to "
                     f"{num_devices}, or {hint}")
  return {a: sizes.get(a, 1) for a in AXES}


def make_mesh(spec: str = "data:-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, model) mesh over all devices of all processes (or `devices`).

  Axes are Auto (GSPMD propagates shardings from the constraints). TPU multi-slice runs put
  `data` across slices (DCN) and keep `fsdp`/`model` inside a slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  types = (AxisType.Auto,) * len(AXES)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  if len(slices) > 1:
    from jax.experimental import mesh_utils
    n = len(slices)
    if sizes["data"] % n:
      raise InputError(f"mesh spec {spec!r}: the data axis ({sizes['data']}) must be a multiple "
                       f"of the number of TPU slices ({n}); only `data` crosses slices")
    grid = mesh_utils.create_hybrid_device_mesh(
        (sizes["data"] // n, sizes["fsdp"], sizes["model"]), (n, 1, 1), devices)
    return Mesh(grid, AXES, axis_types=types)
  return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)


def describe(mesh: Mesh | None) -> str:
  """'data:2,fsdp:1,model:4' (the spec that rebuilds this mesh) or 'single-device'."""
  if mesh is None:
    return "single-device"
  return ",".join(f"{a}:{s}" for a, s in mesh.shape.items())


# Rules -> shardings ---------------------------------------------------------------------------

def logical_to_spec(axes: Sequence[str | None], rules: Sequence[tuple[str, Any]] = RULES
                    ) -> PartitionSpec:
  """Logical axis names of one array -> its PartitionSpec under `rules` (default RULES)."""
  return nn.logical_to_mesh_axes(tuple(axes), tuple(rules))


def named_sharding(mesh: Mesh | None, axes: Sequence[str | None],
                   rules: Sequence[tuple[str, Any]] = RULES) -> NamedSharding | None:
  """NamedSharding of an array whose dims have these logical names (None without a mesh)."""
  return None if mesh is None else NamedSharding(mesh, logical_to_spec(axes, rules))


def kv_heads_replicated(config: DecoderConfig, mesh: Mesh | jax.sharding.AbstractMesh | None
                        ) -> bool:
  """True when the key/value heads do not split over this mesh and are replicated instead."""
  return mesh is not None and config.num_key_value_heads % num_shards(mesh, "kv_heads") != 0


def rules(config: DecoderConfig, mesh: Mesh | jax.sharding.AbstractMesh | None
          ) -> tuple[tuple[str, Any], ...]:
  """RULES for this model on this mesh: kv_heads replicated when K does not divide their axis."""
  if not kv_heads_replicated(config, mesh):
    return RULES
  return tuple((name, None if name in _KV_NAMES else axes) for name, axes in RULES)


def num_shards(mesh: Mesh | jax.sharding.AbstractMesh | None, name: str) -> int:
  """How many pieces RULES cut a dimension with this logical name into (1 without a mesh).

  E.g. num_shards(mesh, "vocab") = the vocab-parallel split of the LM head.
  """
  if mesh is None:
    return 1
  axes = logical_to_spec((name,))[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def context_mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh set by activate() (or jax.set_mesh) around the current trace; None outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def replicated(mesh: Mesh | None) -> NamedSharding | None:
  """Every device holds the whole array (for small outputs every process reads)."""
  return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh | None) -> NamedSharding | None:
  """Sharding of [B, T] inputs (ids, masks) and [B, T] outputs: rows over data x fsdp."""
  return named_sharding(mesh, ("batch", "act_length"))


def _param_axes(config: DecoderConfig) -> Any:
  from opt_jax import model  # Local import: model imports nothing from here, keep it that way.
  return model.logical_axes(config)


def _is_axes(x: Any) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_shardings(config: DecoderConfig, mesh: Mesh | None, params_or_shapes: Any = None
                    ) -> Any:
  """Pytree of NamedSharding matching the params (layout: opt_jax/model.py docstring).

  params_or_shapes: optional params (arrays or ShapeDtypeStructs) to check the tree against.
  Returns None leaves without a mesh.
  """
  axes = _param_axes(config)
  if params_or_shapes is not None:
    want = jax.tree.structure(axes, is_leaf=_is_axes)
    got = jax.tree.structure(params_or_shapes)
    if want != got:
      raise ValueError(f"params do not match the layout of this config: expected tree {want}, "
                       f"got {got}")
  table = rules(config, mesh)
  return jax.tree.map(lambda a: named_sharding(mesh, a, table), axes, is_leaf=_is_axes)


def cache_shardings(mesh: Mesh | None, config: DecoderConfig) -> dict[str, NamedSharding | None]:
  """Shardings of the KV cache dict of model.init_cache: kv heads as the kv kernels (over `model`
  or replicated), batch over data x fsdp."""
  table = rules(config, mesh)
  kv = ("layers", "batch", "act_length", "act_kv_heads", "head_dim")
  return {
      "key": named_sharding(mesh, kv, table),
      "value": named_sharding(mesh, kv, table),
      "valid": named_sharding(mesh, ("batch", "act_length")),
      "next_position": named_sharding(mesh, ("batch",)),
      "index": replicated(mesh),
  }


# Validation -----------------------------------------------------------------------------------

def _divisors(n: int, upto: int) -> list[int]:
  return [d for d in range(1, min(n, upto) + 1) if n % d == 0]


def check_divisible(config: DecoderConfig, mesh: Mesh | None, batch_size: int | None = None
                    ) -> None:
  """Raises InputError, before anything is compiled, when a dimension cannot be split evenly.

  Names the config field, the mesh axis and the fix. Checks every parameter dim the rules
  split (key/value heads that do not divide are replicated, not an error), the activations'
  heads/mlp/vocab dims, and `batch_size` against data x fsdp.
  """
  if mesh is None:
    return
  from opt_jax import model
  problems: dict[str, str] = {}
  shapes = model.param_shapes(config)
  axes = _param_axes(config)
  table = rules(config, mesh)
  flat_axes = jax.tree.leaves(axes, is_leaf=_is_axes)
  flat_shapes = jax.tree.leaves(shapes)
  for names, shape in zip(flat_axes, flat_shapes):
    spec = logical_to_spec(names, table)
    for name, dim, mesh_axes in zip(names, shape.shape, tuple(spec) + (None,) * len(names)):
      if mesh_axes is None or name in problems:
        continue
      mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      k = math.prod(mesh.shape[a] for a in mesh_axes)
      if dim % k == 0:
        continue
      field = _DIM_FIELD.get(name, name)
      where = f"the {'x'.join(mesh_axes)} mesh axis ({k}) of mesh {describe(mesh)}"
      ok = [d for d in _divisors(dim, k * 8) if d > 1][-4:]
      if name == "vocab":
        padded = -(-dim // k) * k
        problems[name] = (f"vocab_size={dim} is not divisible by {where}: pad the vocabulary to "
                          f"{padded} (a multiple of {k}; padded logits masked to -inf) or use a "
                          f"model axis that divides {dim} (e.g. {ok})")
      else:
        problems[name] = (f"{field}={dim} (logical dim {name!r}) is not divisible by {where}: "
                          f"use a {mesh_axes[0]} axis size that divides {dim} (e.g. {ok})")
  if batch_size is not None:
    k = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % k:
      problems["batch"] = (f"batch_size={batch_size} is not divisible by data x fsdp = {k} of mesh "
                           f"{describe(mesh)}: use a batch size that is a multiple of {k}")
  if problems:
    raise InputError("cannot shard this model on this mesh: " + "; ".join(problems.values()))


# Placement ------------------------------------------------------------------------------------

def put(x: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """A global array with `sharding` from a host value that is identical on every process.

  Each process transfers only the slices its own devices hold, so this works with devices of
  other processes in the mesh (where jax.device_put of a host array does not).
  """
  if sharding is None:
    return jax.device_put(x)
  if isinstance(x, jax.Array) and (x.is_fully_addressable or x.sharding == sharding):
    if x.sharding == sharding:
      return x
    if x.is_fully_addressable and sharding.is_fully_addressable:
      return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # Already global in another layout: let XLA move it.
    return jax.jit(lambda a: a, out_shardings=sharding)(x)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: Any, config: DecoderConfig, mesh: Mesh | None) -> Any:
  """params (host or device arrays, identical on every process) placed on the mesh by RULES."""
  if mesh is None:
    return params
  check_divisible(config, mesh)
  shardings = param_shardings(config, mesh, params)
  return jax.tree.map(put, params, shardings)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of a (possibly multi-process) array as numpy, on every process."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@contextlib.contextmanager
def activate(mesh: Mesh | None) -> Iterator[None]:
  """Inside: the mesh is the context mesh and tracing the model applies RULES' constraints.

  Trace (first call of a jitted function) inside this context; jit keys its cache on the context
  mesh, so a function traced outside it is a different, unconstrained program.
  """
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield


# Multi-host -----------------------------------------------------------------------------------

def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _cluster_detected() -> bool:
  # Launchers whose environment jax.distributed.initialize() reads by itself, with > 1 process.
  for var in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if (_env_int(var) or 1) > 1 and (var.startswith("OMPI") or "SLURM_PROCID" in os.environ):
      return True
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
  return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts jax.distributed when this is a multi-process run; a no-op for a single process.

  Arguments win over the environment variables JAX_COORDINATOR_ADDRESS ('host:port'),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID. coordinator_address='auto' (or a SLURM / Open MPI /
  TPU-worker environment with several processes) lets JAX read the cluster's own variables
  (TPU pod slices, `srun`, `mpirun`). Must run before anything touches a device.
  """
  if jax.distributed.is_initialized():
    return
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  # CPU processes exchange data through gloo (the CPU backend has no collectives of its own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if address == "auto" or (address is None and n is None and pid is None):
    if address == "auto" or _cluster_detected():
      if os.environ.get("JAX_COORDINATOR_ADDRESS") == "auto":
        del os.environ["JAX_COORDINATOR_ADDRESS"]  # jax would take "auto" for a host name
      jax.distributed.initialize(num_processes=n, process_id=pid)
    return
  if n == 1 and not address:
    return
  missing = [name for name, v in (("coordinator_address / JAX_COORDINATOR_ADDRESS", address),
                                  ("num_processes / JAX_NUM_PROCESSES", n),
                                  ("process_id / JAX_PROCESS_ID", pid)) if v is None]
  if missing and not _cluster_detected():
    raise ValueError(f"multi-process run needs {', '.join(missing)} as well (got "
                     f"coordinator_address={address!r}, num_processes={n!r}, process_id={pid!r})")
  jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)


def is_main_process() -> bool:
  """True on process 0 only: the one process that writes results, plots and logs."""
  return jax.process_index() == 0


# Multi-process agreement: barriers, shared decisions, failing together --------------------------
#
# These talk through jax.distributed's coordination service (a key-value store and barriers over
# gRPC), never through device collectives: they can be called from any thread without racing the
# evaluation's collectives, and they keep working while another process is inside one.

_SEQUENCE = [0]        # every process calls these in the same order: the n-th call has one name
_WAIT_MS = 500
_KEY = "opt_jax"


def _client() -> Any:
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client


def multi_process() -> bool:
  """True in a run of several processes joined by jax.distributed (without starting a backend
  when there is none)."""
  return _client() is not None and jax.process_count() > 1


def _next_name(name: str) -> str:
  _SEQUENCE[0] += 1
  return f"{_KEY}/{_SEQUENCE[0]}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:80]}"


def barrier(name: str, timeout_s: float = 24 * 3600) -> None:
  """Every process waits here until all have arrived (no-op for one process).

  E.g. after process 0 wrote results and before any process reads them. Call it in the same
  order on every process (its name is numbered by the call)."""
  if multi_process():
    _client().wait_at_barrier(_next_name(name), int(timeout_s * 1000))


def _get(client: Any, key: str, timeout_s: float) -> str:
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      return client.blocking_key_value_get(key, _WAIT_MS)
    except Exception:  # pylint: disable=broad-except
      if time.monotonic() > deadline:
        raise


def agree(name: str, error: str | None, timeout_s: float = 24 * 3600) -> str | None:
  """The first error of any process (by process index; None when every process passed None):
  the same answer on every process, e.g. whether a checkpoint restored everywhere.

  Call it in the same order on every process. One process: returns `error`."""
  if not multi_process():
    return error
  client, key = _client(), _next_name(name)
  client.key_value_set(f"{key}/{jax.process_index()}", "" if error is None else "!" + error)
  for i in range(jax.process_count()):
    value = _get(client, f"{key}/{i}", timeout_s)
    if value:
      return value[1:]
  return None


def same_everywhere(name: str, value: str) -> str | None:
  """None when every process passed the same `value`; else a line naming the processes that
  differ from process 0 (e.g. the keys each decided to compute, as a digest)."""
  if not multi_process():
    return None
  client, key = _client(), _next_name(name)
  client.key_value_set(f"{key}/{jax.process_index()}", value)
  values = [_get(client, f"{key}/{i}", 600) for i in range(jax.process_count())]
  odd = [i for i, v in enumerate(values) if v != values[0]]
  return f"process(es) {odd} differ from process 0" if odd else None


def from_main(name: str, value: str | None) -> str:
  """Process 0's `value` on every process (the others pass anything, e.g. None)."""
  if not multi_process():
    return value or ""
  client, key = _client(), _next_name(name)
  if is_main_process():
    client.key_value_set(key, value or "")
    return value or ""
  return _get(client, key, 600)


_ERROR_KEY = f"{_KEY}/error"


class _Together:
  """The watchdog of `fail_together` (one per process)."""

  def __init__(self, grace_s: float):
    self.grace_s = grace_s
    self.client = _client()
    self.failing = threading.Event()    # this process's run raised
    self.done = threading.Event()       # this process finished (or is leaving): stop watching
    self.thread = threading.Thread(target=self._watch, name="fail_together", daemon=True)
    self.thread.start()

  def _watch(self) -> None:
    pid = jax.process_index()
    while not self.done.is_set():
      try:
        message = self.client.blocking_key_value_get(_ERROR_KEY, _WAIT_MS)
      except Exception as e:  # pylint: disable=broad-except
        text = str(e)
        if self.done.is_set():
          return
        if "DEADLINE_EXCEEDED" in text or "deadline" in text.lower():
          continue
        message = (f"lost contact with the coordinator (process 0) of this {jax.process_count()}"
                   f"-process run: it ended or was killed ({text.splitlines()[0][:200]})")
      else:
        try:
          self.client.key_value_set(f"{_ERROR_KEY}/ack/{pid}", "1")
        except Exception:  # pylint: disable=broad-except
          pass
      if self.failing.is_set() or self.done.is_set():
        return                          # this process reports its own error
      self.leave(2, f"error: {message}")

  def leave(self, code: int, line: str | None = None) -> None:
    """Prints `line` (last, to stderr) and exits now (no JAX shutdown: it would wait for the
    others). Process 0 hosts the coordination service and leaves last: a process that loses it
    while still running aborts."""
    pid = jax.process_index()
    try:
      self.client.key_value_set(f"{_ERROR_KEY}/left/{pid}", "1")
    except Exception:  # pylint: disable=broad-except
      pass
    if pid == 0:
      deadline = time.monotonic() + self.grace_s
      for i in range(1, jax.process_count()):
        try:
          _get(self.client, f"{_ERROR_KEY}/left/{i}", max(0.0, deadline - time.monotonic()))
        except Exception:  # pylint: disable=broad-except
          pass
      time.sleep(0.5)                   # their exit after saying so
    sys.stdout.flush()
    if line is not None:
      print(line, file=sys.stderr)
    sys.stderr.flush()
    os._exit(code)                      # pylint: disable=protected-access

  def fail(self, message: str) -> None:
    """Tells the other processes (the first message posted wins) and waits up to grace_s for
    each to have read it."""
    self.failing.set()
    try:
      self.client.key_value_set(_ERROR_KEY, message)
    except Exception:  # pylint: disable=broad-except
      pass  # another process posted first (or the coordinator is gone)
    deadline = time.monotonic() + self.grace_s
    for i in range(jax.process_count()):
      if i == jax.process_index():
        continue
      try:
        _get(self.client, f"{_ERROR_KEY}/ack/{i}", max(0.0, deadline - time.monotonic()))
      except Exception:  # pylint: disable=broad-except
        pass


def fail_together(fn: Callable[[], Any], describe_error: Callable[[BaseException], str | None],
                  grace_s: float = 10.0) -> Any:
  """fn() on every process of a multi-process run such that all end the same way.

  When fn raises on one process, every other process prints `error: <message>` (one line) and
  exits 2 within seconds instead of hanging in a collective; the raising process prints the same
  line (a traceback when describe_error(e) is None: not a user error), then leaves at once with
  exit 2 (1 for a traceback) without waiting for the others at JAX's shutdown. A process that
  loses its coordinator (process 0 ended or was killed) ends the same way. On success every
  process waits for the others (a barrier) and returns fn()'s value. One process: plain fn()."""
  if not multi_process():
    return fn()
  watch = _Together(grace_s)
  try:
    value = fn()
    barrier("finished")
  except BaseException as e:  # pylint: disable=broad-except
    message = describe_error(e) if isinstance(e, Exception) else None
    text = message or f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    watch.fail(text)
    if message is None:
      traceback.print_exc()
    watch.leave(2 if message is not None else 1,
                None if message is None else f"error: {message}")
  watch.done.set()
  # Not left to die at exit: a daemon thread stopped inside the client's C++ call aborts Python.
  watch.thread.join()
  return value
