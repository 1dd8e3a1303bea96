"""A family's HF tensor <-> params table, and the one engine that reads it in both directions.

Each family lists `Tensor` rows: an HF tensor name, the params path(s) it becomes and the
`Transform` between them. The same rows serve reading (`read_params`: HF -> params) and
writing (`hf_tensors`: params -> HF). Rows whose params the config's model does not have (biases
of a bias-free model, learned positions of a rotary one) are skipped, so a table holds every
tensor its family can have; every parameter of the model must be covered by exactly one row.

Conventions: HF Linear weights are [out, in]; opt_jax kernels are [in, out] with heads split out
([D, N, H], [N, H, D]); per-layer weights are stacked on a leading L axis under `layers/`. An HF
name containing "{i}" is one tensor per layer i.

Slices (`Transform.read_slice`): restoring onto a mesh, each device needs one block of each params
array. Every transform here maps a block of params to a box of the HF tensor whose rows (and
columns) are contiguous ranges once a params dimension is split at its leading axis, so a block is
read from a box of the HF tensor (`read(slices)`, e.g. safetensors' get_slice) without reading the
rest. Where a block's box is not contiguous, the comment of the transform says what is read.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

Shape = tuple[int, ...]
# Every weight of every family is a float; conversion and in-place reads cast between these
# widths as asked. Anything else (an integer, a bool) where a weight belongs is an error naming
# the tensor: casting it would restore wrong numbers without a word.
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


Read = Callable[[tuple[slice, ...]], np.ndarray]   # a box of the HF tensor: hf[slices]


def _ranges(index: tuple[slice, ...], shape: Shape) -> list[tuple[int, int]]:
  """(start, stop) per dimension of a block given as slices (None bounds allowed, step 1)."""
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"block slices must have step 1, got {s}")
    out.append((start, max(start, stop)))
  return out


def _lead_box(dims: Shape, ranges: list[tuple[int, int]]) -> tuple[slice, tuple[slice, ...]]:
  """The flat range of the C-order flattening of `dims` that covers the block `ranges`, taken
  whole along every dimension after the first, and the slices that cut the block out of it once
  reshaped to (range of dim 0, *dims[1:])."""
  inner = math.prod(dims[1:])
  (a, b), rest = ranges[0], ranges[1:]
  return (slice(a * inner, b * inner),
          (slice(0, b - a),) + tuple(slice(lo, hi) for lo, hi in rest))


class Transform:
  """How one HF tensor becomes params (`to_params`) and back (`to_hf`); shapes are per layer."""

  def to_params(self, hf: np.ndarray, shapes: list[Shape]) -> list[np.ndarray]:
    raise NotImplementedError

  def read_slice(self, read: Read, shapes: list[Shape], part: int,
                 index: tuple[slice, ...]) -> np.ndarray:
    """to_params(hf, shapes)[part][index], reading only a box of the HF tensor through `read`."""
    raise NotImplementedError

  def to_hf(self, params: list[np.ndarray]) -> np.ndarray:
    raise NotImplementedError

  def hf_shape(self, shapes: list[Shape]) -> Shape:
    raise NotImplementedError


class _Copy(Transform):
  """The same array (embeddings, norm scales and biases of [D])."""

  def to_params(self, hf, shapes):
    return [hf]

  def read_slice(self, read, shapes, part, index):
    return read(tuple(slice(a, b) for a, b in _ranges(index, shapes[0])))

  def to_hf(self, params):
    return params[0]

  def hf_shape(self, shapes):
    return shapes[0]


class _Flat(Transform):
  """HF keeps heads flat: [N * H] <-> [N, H] (q/k/v biases, OLMo-2's q/k norm scales)."""

  def to_params(self, hf, shapes):
    return [hf.reshape(shapes[0])]

  def read_slice(self, read, shapes, part, index):
    # Whole heads are contiguous; a block of part of head_dim reads its heads whole.
    rows, cut = _lead_box(shapes[0], _ranges(index, shapes[0]))
    return read((rows,)).reshape((-1,) + tuple(shapes[0][1:]))[cut]

  def to_hf(self, params):
    return params[0].reshape(-1)

  def hf_shape(self, shapes):
    return (math.prod(shapes[0]),)


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
  """HF [out, in] <-> kernel [*in, *out] whose first `n_in` dims are the input (e.g. q_kernel
  [D, N, H] has n_in=1, o_kernel [N, H, D] has n_in=2)."""
  n_in: int = 1

  def to_params(self, hf, shapes):
    return [hf.T.reshape(shapes[0])]

  def read_slice(self, read, shapes, part, index):
    # The HF box: rows for the block's output dims, columns for its input dims, each whole
    # along the dims after the first (head_dim, when heads lead): a block that splits head_dim
    # reads whole heads and cuts them here. Splits of heads, mlp, embed or vocab are exact.
    s = shapes[0]
    ranges = _ranges(index, s)
    cols, cut_in = _lead_box(s[:self.n_in], ranges[:self.n_in])
    rows, cut_out = _lead_box(s[self.n_in:], ranges[self.n_in:])
    box = read((rows, cols)).T                                     # [in, out] flat
    shape = ((cut_in[0].stop,) + tuple(s[1:self.n_in])
             + (cut_out[0].stop,) + tuple(s[self.n_in + 1:]))
    return box.reshape(shape)[cut_in + cut_out]

  def to_hf(self, params):
    p = params[0]
    return p.reshape(math.prod(p.shape[:self.n_in]), -1).T

  def hf_shape(self, shapes):
    s = shapes[0]
    return (math.prod(s[self.n_in:]), math.prod(s[:self.n_in]))


@dataclasses.dataclass(frozen=True)
class FusedHeads(Transform):
  """One HF tensor holding several projections per head (GPT-NeoX's query_key_value): rows
  [N, parts, H] head-major, i.e. head n's q, then its k, then its v. Kernels: HF
  [N * parts * H, D] <-> `parts` kernels [D, N, H]; biases: [N * parts * H] <-> [N, H] each."""
  parts: int = 3

  def to_params(self, hf, shapes):
    n, h = shapes[0][-2:]
    rest = hf.shape[1:]                                             # (D,) or ()
    grouped = hf.reshape((n, self.parts, h) + rest)
    return [np.moveaxis(grouped[:, j], (0, 1), (-2, -1)) for j in range(self.parts)]

  def read_slice(self, read, shapes, part, index):
    # The rows of one projection for a range of heads are not contiguous (q, k and v alternate
    # per head): one read per head of exactly its rows of this part, so nothing else is read.
    ranges = _ranges(index, shapes[part])
    (n0, n1), (h0, h1) = ranges[-2:]
    h = shapes[part][-1]
    rest = tuple(slice(a, b) for a, b in ranges[:-2])               # () or (D range,)
    if n1 == n0:
      return np.zeros(tuple(b - a for a, b in ranges), np.float32)
    out = np.stack([read((slice(base + h0, base + h1),) + rest)
                    for base in ((n * self.parts + part) * h for n in range(n0, n1))])
    return np.moveaxis(out, (0, 1), (-2, -1))                       # [*rest, n, h]

  def to_hf(self, params):
    heads_first = [np.moveaxis(p, (-2, -1), (0, 1)) for p in params]   # [N, H, *rest]
    stacked = np.stack(heads_first, axis=1)                            # [N, parts, H, *rest]
    return stacked.reshape((-1,) + stacked.shape[3:])

  def hf_shape(self, shapes):
    n, h = shapes[0][-2:]
    return (n * self.parts * h,) + tuple(shapes[0][:-2])


COPY = _Copy()
FLAT = _Flat()
LINEAR = Linear(1)
LINEAR_FROM_HEADS = Linear(2)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One row of a family's table.

  hf: the HF name relative to the base model's prefix (e.g. "layers.{i}.fc1.weight" under
    "model.decoder."), or absolute when top_level (the LM head, stored outside the base model).
  params: the params path(s) ("layers/mlp/up_kernel"); several for a fused HF tensor.
  aliases: other absolute names the tensor may be stored under (read only; written as `hf`).
  dtypes: the stored dtypes accepted (names); every row holds float weights.
  """
  hf: str
  params: tuple[str, ...]
  transform: Transform = COPY
  top_level: bool = False
  aliases: tuple[str, ...] = ()
  dtypes: tuple[str, ...] = FLOAT_DTYPES

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf


def row(hf: str, *params: str, transform: Transform = COPY, top_level: bool = False,
        aliases: tuple[str, ...] = ()) -> Tensor:
  return Tensor(hf, tuple(params), transform, top_level, aliases)


def dtype_problem(tensor: Tensor, dtype: Any) -> str | None:
  """Why a stored dtype (numpy dtype, torch dtype or name) cannot hold `tensor`'s weights; None
  when it can."""
  name = str(getattr(dtype, "name", dtype)).removeprefix("torch.")
  if name in tensor.dtypes:
    return None
  return f"is stored as {name}, but it is a weight: expected a float ({', '.join(tensor.dtypes)})"


@dataclasses.dataclass(frozen=True)
class Item:
  """One HF tensor of one model: a row expanded for layer `layer` (None: not per layer)."""
  name: str                    # full HF name
  aliases: tuple[str, ...]
  tensor: Tensor
  layer: int | None
  shapes: tuple[Shape, ...]    # per-layer shapes of the params
  hf_shape: Shape


def flatten(tree: Any) -> dict[str, Any]:
  """{"layers/attn/q_kernel": leaf, ...} of a params-like tree."""
  import jax  # pylint: disable=import-outside-toplevel  (families stay importable without JAX)
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _flat_shapes(config) -> dict[str, Any]:
  from opt_jax import model  # pylint: disable=import-outside-toplevel  (model imports JAX)
  return flatten(model.param_shapes(config))


@functools.lru_cache(maxsize=64)
def items(config, prefix: str) -> tuple[Item, ...]:
  """Every HF tensor of `config`'s model: the rows that are not per layer in table order, then
  layer by layer the per-layer rows (so one layer's tensors come together, as HF files and
  metaseq's fused parts hold them), with the base-model tensors named `prefix` + row name.
  Raises ValueError when the family's table leaves a parameter uncovered or covers one twice (a
  bug in the family file)."""
  # opt_jax.families imports this module (a known cycle, tests/test_imports.py): callers should
  # hand `items` the family instead.
  from opt_jax import families  # pylint: disable=import-outside-toplevel
  family = families.get(config.family)
  leaves = _flat_shapes(config)
  covered: dict[str, str] = {}
  out, per_layer = [], []
  for t in family.tensors:
    present = [p in leaves for p in t.params]
    if not any(present):
      continue
    if not all(present):
      raise ValueError(f"family {family.name}: row {t.hf} maps to {t.params}, of which only "
                       f"some exist for this config")
    for p in t.params:
      if p in covered:
        raise ValueError(f"family {family.name}: params {p} covered by rows {covered[p]} and "
                         f"{t.hf}")
      covered[p] = t.hf
    shapes = tuple(tuple(leaves[p].shape[1:] if t.per_layer else leaves[p].shape)
                   for p in t.params)
    hf_shape = tuple(t.transform.hf_shape(list(shapes)))
    name = t.hf if t.top_level else prefix + t.hf
    if t.per_layer:
      per_layer.append((name, t, shapes, hf_shape))
    else:
      out.append(Item(name, t.aliases, t, None, shapes, hf_shape))
  for i in range(config.num_hidden_layers):
    out += [Item(name.format(i=i), t.aliases, t, i, shapes, hf_shape)
            for name, t, shapes, hf_shape in per_layer]
  missing = sorted(set(leaves) - set(covered))
  if missing:
    raise ValueError(f"family {family.name}: its table has no row for params {missing}")
  return tuple(out)


def read_params(config, get: Callable[[Item], np.ndarray], *, prefix: str,
                dtype: Any = None) -> dict[str, Any]:
  """The params tree from HF tensors, one tensor at a time.

  get(item) returns the HF tensor of `item` (shape item.hf_shape); it is called once per tensor
  in table order, so a caller can stream from disk: peak memory is the params plus one tensor.
  dtype: cast to this dtype (None keeps the stored one).
  """
  leaves = _flat_shapes(config)
  out: dict[str, np.ndarray] = {}
  for item in items(config, prefix):
    values = item.tensor.transform.to_params(get(item), list(item.shapes))
    for path, value in zip(item.tensor.params, values):
      if path not in out:
        out[path] = np.empty(leaves[path].shape, value.dtype if dtype is None else dtype)
      if item.layer is None:
        out[path][...] = value
      else:
        out[path][item.layer] = value
  return nest(out)


def hf_tensors(config, params: Mapping[str, Any], *, prefix: str
               ) -> Iterator[tuple[Item, np.ndarray]]:
  """(item, HF tensor) for every tensor of `config`'s model, in table order; inverse of
  `read_params`. Arrays are views where the transform allows (no copy of the whole model)."""
  flat = flatten(params)
  for item in items(config, prefix):
    parts = [np.asarray(flat[p]) for p in item.tensor.params]
    if item.layer is not None:
      parts = [p[item.layer] for p in parts]
    yield item, item.tensor.transform.to_hf(parts)


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The nested params tree of {"layers/attn/q_kernel": leaf, ...} (inverse of `flatten`)."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = value
  return tree
