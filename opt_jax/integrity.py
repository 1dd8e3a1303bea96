"""Integrity of a checkpoint suite: repeated weights, config drift, unreadable files, step order.

Public suites contain checkpoints that silently serve the wrong weights (Pythia step0 = step1,
pythia-12b steps whose first shard is the final model's, byte-identical OLMo 2 branches). An
analysis over them draws wrong curves, so `check_suite` looks at every checkpoint of every model
before anything is evaluated:

- duplicates: checkpoints of one model whose weights are identical (`duplicate`: each later step
  of a group is the problem, named once against the group's first step, which is kept), or share
  some trained tensors or weight files (`partial_duplicate`); stored buffers (causal masks, rotary
  tables: `hf_cache.is_buffer`) are left out. Groups the manifest lists in the model's
  "known_duplicates" (Pythia's step 0 = step 1) are `known_duplicate`: no problem, but marked;
- unreadable: a safetensors header that is corrupt or promises more bytes than the file has, an
  index whose shards or tensors are missing, a .bin whose zip directory is gone, a missing or
  short orbax chunk, a blob whose content does not match its sha256 name (deep mode, and the fast
  mode for blobs of at most FAST_VERIFY_BYTES);
- config_differs / layout_differs: config.json (minus IGNORED_CONFIG_FIELDS) or tensor names and
  dtypes and shapes unlike the model's other checkpoints of the same storage format (the most
  common value is the reference; an opt_jax checkpoint converted from one of its HF siblings
  names its arrays differently and is compared with its opt_jax siblings only);
- bin_only: HF weights in PyTorch .bin files only, which experiments cannot read in place (no
  problem: the files are checked as far as they can be; the note says how to convert them);
- out_of_order: a revision name whose step is not the manifest's step, tokens in revision names
  that decrease with step, or that disagree with step x tokens_per_step.

Hashes. Each checkpoint is a set of units with a content hash: a tensor of a safetensors file, an
array of an opt_jax (orbax) checkpoint (from its stored chunk bytes), or a whole .bin file (its
tensors are not read: that would need torch). The fast mode hashes the dtype, shape and
FAST_WINDOWS fixed windows of WINDOW_BYTES (first, last and evenly spaced between; all bytes for
small units); `deep` hashes every byte. A .bin file that is an HF-cache LFS blob is already named
by the sha256 of its content, which serves as its hash in both modes, exact and free. Equal fast
hashes mean "identical in the sampled bytes": the report says so until --deep confirms.

Hashes are cached in `cache_dir` (integrity_hashes.jsonl), keyed by file identity: real path,
size, mtime and inode (an HF-cache blob's name says what its content should be, not what it is).
A second fast check of unchanged files reads no tensor bytes; a deep check never answers from the
cache: it re-reads every byte, since a corrupted blob keeps its name and size. Pure Python and
numpy; no JAX.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import zipfile
from typing import Any, Iterable

from opt_jax import families, files, hf_cache
from opt_jax.checkpoints import safetensors_io
from opt_jax.errors import InputError

FAST_WINDOWS = 8
WINDOW_BYTES = 4096
# The fast mode also checks the sha256 of HF-cache blobs up to this size (every byte: cheap for
# small files, cached like the rest); larger blobs only in deep mode.
FAST_VERIFY_BYTES = 64 << 20
_BLOCK = 8 << 20
CACHE_FILE = "integrity_hashes.jsonl"
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")

# config.json fields that do not change the evaluated function: bookkeeping, caching and kernel
# choices, initialisation and dropout (inactive at evaluation), and the storage dtype (what is
# evaluated is the dtype the weights are stored in, compared through the tensor layout).
IGNORED_CONFIG_FIELDS = frozenset({
    "transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype",
    "use_cache", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "initializer_range", "init_std", "init_device", "gradient_checkpointing", "pretraining_tp",
    "dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "layerdrop",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "classifier_dropout", "embedding_dropout",
    "residual_dropout",
})

# Row statuses, most severe first: a row shows the first that applies.
STATUSES = ("unreadable", "duplicate", "partial_duplicate", "config_differs", "layout_differs",
            "out_of_order", "bin_only", "not_checked", "known_duplicate", "ok")
BIN_ONLY_NOTE = ("PyTorch .bin weights only: experiments leave it out (python -m tools.make_suite "
                 "... --convert_bin converts it to safetensors and the manifest then uses the "
                 "copy)")
CSV_COLUMNS = ("model", "step", "revision", "sha", "status", "duplicate_of", "problem")



# Reading ------------------------------------------------------------------------------------


def _read(f, offset: int, n: int) -> bytes:
  """Every read of weight bytes goes through here (tests count the calls)."""
  f.seek(offset)
  return f.read(n)


def _tag(*parts: Any) -> bytes:
  return json.dumps(parts, separators=(",", ":")).encode()


def _hash_range(f, begin: int, end: int, tag: bytes, deep: bool, also: Any = None) -> str:
  """Hash of bytes [begin, end) of open file `f`: all bytes, or the fast windows. `also`: a hash
  object that is fed the same bytes in deep mode (the whole-file hash)."""
  h = hashlib.sha256(tag)
  n = end - begin
  if deep or n <= FAST_WINDOWS * WINDOW_BYTES:
    for off in range(begin, end, _BLOCK):
      block = _read(f, off, min(_BLOCK, end - off))
      h.update(block)
      if also is not None:
        also.update(block)
  else:
    for i in range(FAST_WINDOWS):
      h.update(_read(f, begin + (n - WINDOW_BYTES) * i // (FAST_WINDOWS - 1), WINDOW_BYTES))
  return h.hexdigest()[:32]


def _blob_mismatch(path: str, blob: str | None, size: int) -> str | None:
  """The problem when HF-cache blob `path` (of `size` bytes, named `blob`) does not hash to its
  name, else None; reads the whole file."""
  if not blob:
    return None
  content = hashlib.sha256()
  with open(path, "rb") as f:
    for off in range(0, size, _BLOCK):
      content.update(_read(f, off, min(_BLOCK, size - off)))
  if content.hexdigest() == blob:
    return None
  return (f"{path}: content sha256 {content.hexdigest()[:12]}... does not match its blob name "
          f"{blob[:12]}...: the download is corrupt")


def _blob_sha256(path: str) -> str | None:
  """The sha256 an HF-cache LFS blob is named by, or None for any other file."""
  real = os.path.realpath(path)
  name = os.path.basename(real)
  if os.path.basename(os.path.dirname(real)) == "blobs" and _BLOB_NAME.fullmatch(name):
    return name
  return None


class HashCache:
  """File identity -> hashes, kept as JSON lines in `directory` (None: in memory only).

  Appended one line per hashed file, so an interrupted check keeps what it hashed; a torn last
  line is skipped on reading. Entries for changed files are simply never looked up again.
  """

  def __init__(self, directory: str | None):
    self.path = os.path.join(directory, CACHE_FILE) if directory else None
    self._entries: dict[str, Any] = {}
    if self.path and os.path.isfile(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            key, value = json.loads(line)
            self._entries[key] = value
          except (ValueError, TypeError):
            continue

  @staticmethod
  def key(path: str, mode: str) -> str:
    real = os.path.realpath(path)
    st = os.stat(real)
    return f"{mode}|file:{real}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"

  def get(self, key: str) -> Any:
    if key.startswith("deep:"):   # a deep check re-reads every byte (module docstring)
      return None
    return self._entries.get(key)

  def put(self, key: str, value: Any) -> None:
    if key.startswith("deep:"):
      return
    self._entries[key] = value
    if self.path:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      with open(self.path, "a") as f:
        f.write(json.dumps([key, value], separators=(",", ":")) + "\n")


def _mode(deep: bool) -> str:
  return "deep:1" if deep else f"fast:1:{FAST_WINDOWS}x{WINDOW_BYTES}"


# One checkpoint -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Scan:
  """What one checkpoint directory holds. units: unit name -> hash (None: unreadable);
  layout: tensor name -> [dtype, shape] (tensor-level units only); buffers: units left out of the
  partial-duplicate comparison; exact: every hash covers all bytes; blobs: the sha256 names of
  its weight files when all are HF-cache blobs (equal blobs are equal bytes, in any mode)."""
  units: dict[str, str | None] = dataclasses.field(default_factory=dict)
  layout: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
  buffers: set[str] = dataclasses.field(default_factory=set)
  problems: list[str] = dataclasses.field(default_factory=list)
  not_checked: str | None = None
  exact: bool = True
  blobs: tuple[str, ...] | None = None
  config: dict[str, Any] | None = None
  format: str = "hf"
  bin_only: bool = False


def _safetensors_file(path: str, deep: bool, cache: HashCache) -> dict[str, Any]:
  """{"tensors": [[name, dtype, shape, hash|None]], "problems": [...]} of one .safetensors file."""
  key = cache.key(path, _mode(deep))
  cached = cache.get(key)
  if cached is not None:
    return cached
  try:
    header = safetensors_io.read_header(path)
  except safetensors_io.HeaderError as e:
    out = {"tensors": [], "problems": [f"{path}: not a readable safetensors file ({e.detail}): "
                                       "truncated or corrupt"]}
    cache.put(key, out)
    return out
  problems, tensors = [], []
  data_size = header.file_size - header.data_start
  needed = max((e for _, _, _, e in header.tensors.values()), default=0)
  if needed > data_size:
    problems.append(f"{path}: truncated: the header promises {header.data_start + needed} bytes, "
                    f"the file has {header.file_size}")
  items = sorted(header.tensors.items(), key=lambda kv: kv[1][2])
  file_hash = hashlib.sha256() if deep else None
  with open(path, "rb") as f:
    if file_hash is not None:
      file_hash.update(_read(f, 0, header.data_start))
    pos = 0
    for name, (dtype, shape, begin, end) in items:
      itemsize = safetensors_io.ITEMSIZE.get(dtype)
      if itemsize is None or begin < 0 or end - begin != math.prod(shape) * itemsize:
        problems.append(f"{path}: tensor {name}: header byte range {begin}..{end} does not fit "
                        f"shape {list(shape)} of {dtype}")
        tensors.append([name, dtype, list(shape), None])
        file_hash = None
        continue
      if end > data_size:
        tensors.append([name, dtype, list(shape), None])
        continue
      if file_hash is not None and begin != pos:  # gaps or overlaps: no whole-file hash
        file_hash = None
      h = _hash_range(f, header.data_start + begin, header.data_start + end,
                      _tag(dtype, shape), deep, also=file_hash)
      tensors.append([name, dtype, list(shape), h])
      pos = end
    if file_hash is not None and not problems:
      # Deep mode has now read the file from its first byte to the end of the last tensor.
      start = header.data_start + pos
      file_hash.update(_read(f, start, header.file_size - start))
      blob = _blob_sha256(path)
      if blob and file_hash.hexdigest() != blob:
        problems.append(f"{path}: content sha256 {file_hash.hexdigest()[:12]}... does not match "
                        f"its blob name {blob[:12]}...: the download is corrupt")
  if not deep and not problems and header.file_size <= FAST_VERIFY_BYTES:
    mismatch = _blob_mismatch(path, _blob_sha256(path), header.file_size)
    if mismatch:
      problems.append(mismatch)
  out = {"tensors": tensors, "problems": problems}
  cache.put(key, out)
  return out


def _bin_file(path: str, deep: bool, cache: HashCache) -> dict[str, Any]:
  """{"hash", "exact", "problems", "not_checked"} of one PyTorch .bin file (file-level)."""
  blob = _blob_sha256(path)
  key = cache.key(path, _mode(deep))
  cached = cache.get(key)
  if cached is not None:
    return cached
  out: dict[str, Any] = {"hash": None, "exact": True, "problems": [], "not_checked": None}
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"PK\x03\x04":  # torch.save's zip format (torch >= 1.6)
    try:
      with zipfile.ZipFile(path) as z:
        end = max((i.header_offset + i.compress_size for i in z.infolist()), default=0)
      if end > size:
        out["problems"].append(f"{path}: truncated: its zip directory needs {end} bytes, the file "
                               f"has {size}")
    except (zipfile.BadZipFile, OSError) as e:
      out["problems"].append(f"{path}: unreadable zip archive ({e})")
  else:
    # The legacy (pre-1.6) pickle format has no directory to check against the file size.
    out["not_checked"] = f"{os.path.basename(path)}: legacy torch format, completeness not checked"
  if blob:
    out["hash"] = blob
    if deep or size <= FAST_VERIFY_BYTES:
      mismatch = _blob_mismatch(path, blob, size)
      if mismatch:
        out["problems"].append(mismatch)
  else:
    with open(path, "rb") as f:
      out["hash"] = _hash_range(f, 0, size, _tag("bin", size), deep)
    out["exact"] = deep or size <= FAST_WINDOWS * WINDOW_BYTES
  cache.put(key, out)
  return out


def _scan_hf(directory: str, deep: bool, cache: HashCache, scan: _Scan) -> None:
  try:
    kind, paths, missing = hf_cache.weight_files(directory)
  except InputError as e:
    scan.problems.append(str(e))
    return
  for shard in missing:
    scan.problems.append(f"{os.path.join(directory, kind)} lists shard {shard}, which is missing")
  if not kind.endswith(".index.json") and not os.path.isfile(paths[0]):
    scan.problems.append(f"{paths[0]}: a broken link (its blob is missing)")
  present = [p for p in paths if os.path.isfile(p)]
  blobs = tuple(_blob_sha256(p) for p in present)
  if present and all(blobs):
    scan.blobs = blobs
  if kind.startswith(hf_cache.TORCH_BIN):
    scan.bin_only = True
    for path in present:
      r = _bin_file(path, deep, cache)
      scan.units[os.path.basename(path)] = r["hash"]
      scan.problems.extend(r["problems"])
      scan.exact &= r["exact"]
      scan.not_checked = scan.not_checked or r["not_checked"]
    return
  for path in present:
    r = _safetensors_file(path, deep, cache)
    scan.problems.extend(r["problems"])
    for name, dtype, shape, h in r["tensors"]:
      scan.units[name] = h
      scan.layout[name] = [dtype, list(shape)]
      if hf_cache.is_buffer(name, dtype):
        scan.buffers.add(name)
  scan.exact = deep
  if kind == hf_cache.SAFETENSORS_INDEX and not missing:
    with open(os.path.join(directory, kind)) as f:
      listed = json.load(f)["weight_map"]
    absent = sorted(set(listed) - set(scan.units))
    if absent:
      scan.problems.append(f"{os.path.join(directory, kind)} lists {len(absent)} tensor(s) that "
                           f"no shard holds, e.g. {absent[0]}")


def _chunk_names(shape: list[int], chunks: list[int], sep: str) -> list[str]:
  grid = [math.ceil(s / c) if c else 0 for s, c in zip(shape, chunks)]
  if not grid:
    return ["0"]
  names = [""]
  for n in grid:
    names = [f"{p}{sep}{i}" if p else str(i) for p in names for i in range(n)]
  return names if all(grid) else []


def _scan_orbax(directory: str, deep: bool, cache: HashCache, scan: _Scan) -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  params = os.path.join(directory, "params")
  if not os.path.isfile(os.path.join(directory, "opt_jax.json")):
    scan.problems.append(f"{directory}: no opt_jax.json: the checkpoint was never completed")
  arrays = sorted(n for n in os.listdir(params) if os.path.isfile(os.path.join(params, n,
                                                                               ".zarray")))
  if not arrays:
    scan.not_checked = f"{params}: no zarr arrays (OCDBT layout?): not checked"
    return
  scan.exact = deep
  scan.format = "opt_jax"
  for name in arrays:
    folder = os.path.join(params, name)
    try:
      with open(os.path.join(folder, ".zarray")) as f:
        meta = json.load(f)
      shape, chunks = list(meta["shape"]), list(meta["chunks"])
      itemsize = np.dtype(meta["dtype"]).itemsize if meta["dtype"] != "bfloat16" else 2
    except (OSError, ValueError, KeyError, TypeError) as e:
      scan.problems.append(f"{folder}/.zarray: unreadable ({type(e).__name__}: {e})")
      scan.units[name] = None
      continue
    expected = math.prod(chunks) * itemsize if meta.get("compressor") is None else None
    chunk_hashes, ok = [], True
    for chunk in _chunk_names(shape, chunks, meta.get("dimension_separator", ".")):
      path = os.path.join(folder, chunk)
      if not os.path.isfile(path):
        if meta.get("fill_value") is None:  # without a fill value every chunk is stored
          scan.problems.append(f"{folder}: chunk {chunk} is missing")
          ok = False
        chunk_hashes.append(None)
        continue
      size = os.path.getsize(path)
      if expected is not None and size != expected:
        scan.problems.append(f"{path}: {size} bytes, expected {expected}: truncated or corrupt")
        ok = False
        continue
      key = cache.key(path, _mode(deep))
      h = cache.get(key)
      if h is None:
        with open(path, "rb") as f:
          h = _hash_range(f, 0, size, _tag("chunk"), deep)
        cache.put(key, h)
      chunk_hashes.append(h)
    scan.layout[name] = [meta["dtype"], list(shape)]
    scan.units[name] = (hashlib.sha256(_tag(meta["dtype"], shape, chunk_hashes)).hexdigest()[:32]
                        if ok else None)


def _scan_checkpoint(directory: str, deep: bool, cache: HashCache) -> _Scan:
  scan = _Scan()
  if not os.path.isdir(directory):
    scan.problems.append(f"{directory}: no such directory")
    return scan
  config_path = os.path.join(directory, hf_cache.CONFIG_FILE)
  try:
    with open(config_path) as f:
      scan.config = json.load(f)
    if not isinstance(scan.config, dict):
      raise ValueError("not a JSON object")
  except FileNotFoundError:
    scan.problems.append(f"{config_path}: missing")
  except (OSError, ValueError) as e:
    scan.problems.append(f"{config_path}: unreadable ({e})")
    scan.config = None
  if any(os.path.lexists(os.path.join(directory, n)) for n in hf_cache.WEIGHT_FILES):
    _scan_hf(directory, deep, cache, scan)
  elif os.path.isdir(os.path.join(directory, "params")):
    _scan_orbax(directory, deep, cache, scan)
  else:
    scan.problems.append(f"{directory}: no weights (expected {', '.join(hf_cache.WEIGHT_FILES)} "
                         "or an opt_jax params/ folder)")
  return scan


# The suite ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
  """The verdict on one checkpoint (one CSV row). problems: one sentence each."""
  model: str
  step: int
  revision: str | None
  sha: str | None
  path: str
  status: str = "ok"
  duplicate_of: int | None = None
  problems: list[str] = dataclasses.field(default_factory=list)
  note: str | None = None


@dataclasses.dataclass
class Report:
  """All rows of a check; `problems` lists "model step N: what" for every problem found."""
  rows: list[Row]
  deep: bool

  @property
  def problems(self) -> list[str]:
    return [f"{r.model} step {r.step}: {p}" for r in self.rows for p in r.problems]

  @property
  def ok(self) -> bool:
    return not self.problems

  def records(self) -> list[dict[str, Any]]:
    """One dict per checkpoint with CSV_COLUMNS (problem: the problems joined by "; ")."""
    return [{"model": r.model, "step": r.step, "revision": r.revision or "", "sha": r.sha or "",
             "status": r.status, "duplicate_of": "" if r.duplicate_of is None else r.duplicate_of,
             "problem": "; ".join(r.problems + ([r.note] if r.note else []))} for r in self.rows]

  def write_csv(self, path: str | os.PathLike) -> str:
    import pandas as pd  # pylint: disable=import-outside-toplevel
    return files.write_csv(pd.DataFrame(self.records(), columns=list(CSV_COLUMNS)), path)


def _add(row: Row, status: str, problem: str) -> None:
  row.problems.append(problem)
  if STATUSES.index(status) < STATUSES.index(row.status):
    row.status = status


def _steps_text(steps: Iterable[int]) -> str:
  steps = sorted(steps)
  shown = ", ".join(str(s) for s in steps[:8])
  return shown + (f" and {len(steps) - 8} more" if len(steps) > 8 else "")


def _check_duplicates(rows: dict[int, Row], scans: dict[int, _Scan],
                      known: Iterable[Iterable[int]] = ()) -> None:
  known_groups = [set(g) for g in known]
  full: dict[tuple, list[int]] = collections.defaultdict(list)
  for step, scan in scans.items():
    if scan.units and all(h is not None for h in scan.units.values()):
      full[tuple(sorted(scan.units.items()))].append(step)
  in_full = set()
  for steps in full.values():
    if len(steps) < 2:
      continue
    exact = (all(scans[s].exact for s in steps)
             or (scans[steps[0]].blobs is not None
                 and all(scans[s].blobs == scans[steps[0]].blobs for s in steps)))
    steps = sorted(steps)
    first, how = steps[0], "" if exact else " (in the sampled bytes; --deep compares every byte)"
    is_known = any(set(steps) <= g for g in known_groups)
    in_full.update(steps)
    for s in steps:
      rows[s].duplicate_of = first if s != first else steps[1]
      if is_known:
        if STATUSES.index("known_duplicate") < STATUSES.index(rows[s].status):
          rows[s].status = "known_duplicate"
        if s != first:
          rows[s].note = f"known duplicate of step {first} (the manifest's known_duplicates)"
      elif s != first:   # each pair named once, on its later step; the first step is kept
        _add(rows[s], "duplicate", f"weights identical to step {first}{how}")
      elif STATUSES.index("duplicate") < STATUSES.index(rows[s].status):
        rows[s].status = "duplicate"
        many = len(steps) > 2
        rows[s].note = (f"{'steps' if many else 'step'} {_steps_text(steps[1:])} "
                        f"{'hold' if many else 'holds'} the same weights")
  holders: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
  for step, scan in scans.items():
    for name, h in scan.units.items():
      if h is not None and name not in scan.buffers:
        holders[(name, h)].append(step)
  for step, scan in scans.items():
    if step in in_full:
      continue
    shared = collections.Counter()
    first: dict[int, str] = {}
    for name, h in scan.units.items():
      if h is None or name in scan.buffers:
        continue
      for other in holders[(name, h)]:
        if other != step:
          shared[other] += 1
          first.setdefault(other, name)
    if shared:
      total = sum(1 for n_ in scan.units if n_ not in scan.buffers)
      rows[step].duplicate_of = shared.most_common(1)[0][0]
      for other, n in shared.most_common(3):
        how = "" if scan.exact and scans[other].exact else " (sampled bytes)"
        _add(rows[step], "partial_duplicate",
             f"{n} of {total} tensors or weight files identical to step {other}'s, e.g. "
             f"{first[other]}{how}")


def _most_common(values: dict[int, Any]) -> tuple[int, Any]:
  counts = collections.Counter(json.dumps(v, sort_keys=True, default=str) for v in values.values())
  top = counts.most_common(1)[0][0]
  step = next(s for s, v in values.items() if json.dumps(v, sort_keys=True, default=str) == top)
  return step, values[step]


def _check_siblings(rows: dict[int, Row], scans: dict[int, _Scan]) -> None:
  formats = sorted({sc.format for sc in scans.values()})
  for fmt in formats:   # config.json as stored, among the checkpoints of one format
    _check_configs(rows, {s: {k: v for k, v in sc.config.items() if k not in IGNORED_CONFIG_FIELDS}
                          for s, sc in scans.items() if sc.config is not None and sc.format == fmt})
  if len(formats) > 1:  # across formats: the architecture opt_jax reads from it
    parsed = {}
    for s, sc in scans.items():
      try:
        parsed[s] = dataclasses.asdict(families.from_hf_dict(sc.config))
      except (ValueError, KeyError, TypeError, AttributeError):
        continue
    _check_configs({s: r for s, r in rows.items() if r.status != "config_differs"}, parsed,
                   what="the architecture read from config.json")
  for fmt in formats:
    _check_layouts(rows, {s: {k: v for k, v in sc.layout.items() if k not in sc.buffers}
                          for s, sc in scans.items() if sc.layout and sc.format == fmt})


def _check_configs(rows: dict[int, Row], configs: dict[int, dict[str, Any]],
                   what: str = "config.json") -> None:
  if len(configs) > 1:
    ref_step, ref = _most_common(configs)
    for step, config in configs.items():
      diff = [f"{k}={config.get(k, '<absent>')!r} (step {ref_step}: {ref.get(k, '<absent>')!r})"
              for k in sorted(set(config) | set(ref)) if config.get(k) != ref.get(k)]
      if diff and step in rows:
        _add(rows[step], "config_differs",
             f"{what} differs from the model's other checkpoints: {', '.join(diff[:6])}")


def _check_layouts(rows: dict[int, Row], layouts: dict[int, dict[str, list[Any]]]) -> None:
  if len(layouts) > 1:
    ref_step, ref = _most_common(layouts)
    for step, layout in layouts.items():
      if layout == ref:
        continue
      missing = sorted(set(ref) - set(layout))
      extra = sorted(set(layout) - set(ref))
      reshaped = sorted(k for k in set(ref) & set(layout) if ref[k] != layout[k])
      parts = [f"{what} {names[:3]}" for what, names in (("missing", missing), ("extra", extra))
               if names]
      parts += [f"{k} is {' '.join(map(str, layout[k]))} (step {ref_step}: "
                f"{' '.join(map(str, ref[k]))})" for k in reshaped[:2]]
      more = f" and {len(reshaped) - 2} more" if len(reshaped) > 2 else ""
      _add(rows[step], "layout_differs",
           f"tensors differ from the model's other checkpoints: {'; '.join(parts)}{more}")


def _check_order(rows: dict[int, Row], tokens_per_step: int) -> None:
  last: tuple[int, float] | None = None
  for step in sorted(rows):
    name = rows[step].revision
    revision = hf_cache.parse_revision(name) if name else None
    if revision is None:
      continue
    if revision.step != step:
      _add(rows[step], "out_of_order",
           f"revision {name} names step {revision.step}, the manifest says step {step}")
      continue
    mismatch = hf_cache.tokens_mismatch(revision, tokens_per_step)
    if mismatch:
      _add(rows[step], "out_of_order", mismatch)
    if revision.tokens_billions is not None:
      if last is not None and revision.tokens_billions < last[1]:
        _add(rows[step], "out_of_order",
             f"revision {name} names fewer tokens ({revision.tokens_billions:g}B) than step "
             f"{last[0]} ({last[1]:g}B)")
      last = (step, revision.tokens_billions)


def check_suite(suite: Any, *, deep: bool = False, cache_dir: str | None = None,
                progress: bool = False) -> Report:
  """Checks every checkpoint of `suite` (an `opt_jax.suite.Suite`); see the module docstring.

  deep: hash every byte instead of the sampled windows. cache_dir: where the hash cache lives
  (None: no cache). Returns a Report with one Row per checkpoint, models in manifest order.
  """
  cache = HashCache(cache_dir)
  rows_out: list[Row] = []
  todo = [(m, s, p) for m, s, p in suite.checkpoints()]
  bar = None
  if progress:
    import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm.tqdm(total=len(todo), desc="checking", unit="ckpt")
  for m in suite.models:
    rows: dict[int, Row] = {}
    scans: dict[int, _Scan] = {}
    for step, path in m.checkpoints.items():
      row = Row(model=m.name, step=step, revision=m.revisions.get(step), sha=m.shas.get(step),
                path=path)
      scan = _scan_checkpoint(path, deep, cache)
      for p in scan.problems:
        _add(row, "unreadable", p)
      if scan.not_checked:
        row.note = scan.not_checked
        if row.status == "ok":
          row.status = "not_checked"
      if scan.bin_only:
        row.note = "; ".join(n for n in (row.note, BIN_ONLY_NOTE) if n)
        if STATUSES.index("bin_only") < STATUSES.index(row.status):
          row.status = "bin_only"
      rows[step], scans[step] = row, scan
      if bar is not None:
        bar.update(1)
    _check_duplicates(rows, scans, getattr(m, "known_duplicates", ()))
    _check_siblings(rows, scans)
    _check_order(rows, m.tokens_per_step)
    rows_out.extend(rows[s] for s in sorted(rows))
  if bar is not None:
    bar.close()
  return Report(rows=rows_out, deep=deep)
