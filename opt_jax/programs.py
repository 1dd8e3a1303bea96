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
