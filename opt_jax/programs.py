"""What the compiled programs share: length buckets, and one count of programs traced.

Every jitted step of the engine (scoring.score_program, generation's decoding program) is a
module-level function of a static, hashable spec plus array arguments, so two callers with the
same spec and shapes share one compiled program. Each step calls `traced(kind, spec, shapes)`
while it is being traced, which happens exactly once per compiled program (parameters are
arguments, so a new checkpoint of the same size traces nothing); `compilations` reads the count.
"""

from __future__ import annotations

import collections
from typing import Any, Hashable

# (kind, spec, shapes) -> times traced. A program retraced for the same key (the jit cache was
# cleared) counts again: it was compiled again or read from the persistent cache.
_TRACES: collections.Counter = collections.Counter()


def traced(kind: str, spec: Hashable, shapes: Any) -> None:
  """Called by a step function while JAX traces it (never at run time)."""
  _TRACES[(kind, spec, shapes)] += 1


def compilations(kind: str | None = None, spec: Hashable | None = None) -> int:
  """Programs traced so far, of one kind ("score", "decode") and/or one spec, or all."""
  return sum(n for (k, s, _), n in _TRACES.items()
             if (kind is None or k == kind) and (spec is None or s == spec))


def traced_shapes(kind: str, spec: Hashable | None = None) -> list[Any]:
  """The shapes argument of every `traced` call of this kind (and spec), in no fixed order."""
  return [shapes for (k, s, shapes) in _TRACES if k == kind and (spec is None or s == spec)]


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
  """The bucket of n: the smallest minimum * 2^k >= n, capped at maximum.

  n >= 1; raises ValueError when n > maximum (nothing holds it).
  """
  if maximum is not None and n > maximum:
    raise ValueError(f"length {n} exceeds the largest bucket {maximum}")
  b = max(1, minimum)
  while b < n:
    b *= 2
  return b if maximum is None else min(b, maximum)


def buckets(minimum: int, maximum: int) -> list[int]:
  """Every bucket `bucket` can return for 1 <= n <= maximum: minimum * 2^k < maximum, maximum."""
  out, b = [], max(1, min(minimum, maximum))
  while b < maximum:
    out.append(b)
    b *= 2
  return out + [maximum]


# Time spent making programs -------------------------------------------------------------------

# jax.monitoring's duration events of making a program (jax/_src/dispatch.py): tracing to a
# jaxpr, lowering to MLIR, and the backend compile, which includes a persistent-cache lookup
# (a hit is also reported on its own as cache_retrieval_time_sec).
_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read",
}
_seconds: collections.Counter = collections.Counter()
_listening = False


def _on_duration(event: str, duration: float, **_: Any) -> None:
  name = _COMPILE_EVENTS.get(event)
  if name is not None:
    _seconds[name + "_seconds"] += duration
    if name == "compile":
      _seconds["backend_compiles"] += 1


def compile_seconds() -> dict[str, float]:
  """Seconds this process has spent making programs since the first call, from jax.monitoring:
  {"trace_seconds", "lower_seconds", "compile_seconds" (XLA compile or persistent-cache read),
  "cache_read_seconds" (part of compile_seconds), "backend_compiles" (count)}. Every thread's
  programs count (a sweep's restore thread compiles little). Call once before the work to
  measure, then take differences."""
  global _listening
  if not _listening:
    import jax  # pylint: disable=import-outside-toplevel
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _listening = True
  return {k: float(_seconds[k]) for k in ("trace_seconds", "lower_seconds", "compile_seconds",
                                          "cache_read_seconds", "backend_compiles")}


def compile_share(before: dict[str, float], after: dict[str, float], wall_seconds: float
                  ) -> dict[str, float]:
  """The program-making time between two `compile_seconds` readings, and its share of
  wall_seconds: {"trace_seconds", ..., "backend_compiles", "seconds" (trace + lower +
  compile), "share_of_wall"}."""
  out = {k: after[k] - before[k] for k in after}
  out["backend_compiles"] = int(out["backend_compiles"])
  out["seconds"] = out["trace_seconds"] + out["lower_seconds"] + out["compile_seconds"]
  out["share_of_wall"] = out["seconds"] / wall_seconds if wall_seconds > 0 else 0.0
  return out
