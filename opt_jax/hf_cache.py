"""Checkpoint suites from the HF hub cache: cached revisions -> steps, tokens and snapshot shas.

The cache layout (huggingface_hub's "Understand caching" guide):

  CACHE/models--ORG--NAME/refs/<revision>      file holding the commit sha the revision named when
                                               it was downloaded (`refs/pr/1` for pull requests)
  CACHE/models--ORG--NAME/snapshots/<sha>/...  the files of that commit: links into blobs/
  CACHE/models--ORG--NAME/blobs/<hash>         file contents; LFS files (weights) are named by the
                                               sha256 of their content, small files by git's sha1

`scan_repo` reads one repo's refs and snapshots and sorts each revision into a checkpoint (its
name gives a step: `parse_revision`), a note (a ref such as `main` that names no step but points
at a checkpoint's snapshot), an unknown name (listed, never guessed) or a problem (the snapshot
folder is missing or lacks config.json or weights). `build_suite` turns the scans of several repos
into a suite manifest (the format `opt_jax.suite` reads) with each checkpoint's revision and sha.

Revisions that hold only PyTorch .bin weights (older Pythia uploads) cannot be evaluated in place:
`build_suite` names each one, and takes its converted copy instead when `converted_dir` holds one
(`converted_path`: CONVERTED/models--ORG--NAME/<revision>-<sha[:12]>, safetensors in the HF layout,
written by `tools.make_suite --convert_bin`), so a re-run keeps using the copies.

Why not `huggingface_hub.scan_cache_dir`: it drops a whole repo as corrupted when one ref points to
a missing snapshot or one link is broken, which are exactly the per-revision problems to report,
and it walks every file of every repo in the cache. Pure Python; no JAX.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import statistics
from typing import Any, Iterable

from opt_jax import families, suite_templates
from opt_jax.checkpoints import safetensors_io
from opt_jax.checkpoints.layout import (CONFIG_FILE, SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN,
                                        WEIGHT_FILES)
from opt_jax.errors import InputError, MissingFileError, OutputExistsError

# Non-parameter buffers that some checkpoints store (causal-mask and rotary tables of GPT-2 /
# GPT-NeoX / Llama exports): not counted as parameters and never expected to change in training.
BUFFER_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".attn.bias", ".attn.masked_bias",
                   ".rotary_emb.inv_freq")
STAGE2_MODES = ("separate", "drop")
# How the files written from a cache scan start, so that a re-run replaces only its own files.
MANIFEST_MARK = "HF cache "
SCRIPT_MARK = "# Revisions of the template not in the HF cache."


def default_cache_dir() -> str:
  """HF's own default cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel
  return constants.HF_HUB_CACHE


def repo_folder(cache_dir: str, repo: str) -> str:
  """CACHE/models--ORG--NAME for model repo `repo` ("ORG/NAME")."""
  from huggingface_hub import file_download  # pylint: disable=import-outside-toplevel
  try:
    name = file_download.repo_folder_name(repo_id=repo, repo_type="model")
  except ValueError as e:   # huggingface_hub's HFValidationError
    raise InputError(f"{repo!r} is not an HF repo name (ORG/NAME): {e}") from None
  return os.path.join(cache_dir, name)


# Revision names -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Revision:
  """A parsed checkpoint name. tokens_billions: the token count the name states (rounded as in the
  name; None if it states none). stage: None (one-stage training), "stage1", or
  "stage2-ingredient{k}" (OLMo 2 mid-training runs, whose steps restart at 0)."""
  name: str
  step: int
  tokens_billions: float | None = None
  stage: str | None = None

  @property
  def is_stage2(self) -> bool:
    return bool(self.stage and self.stage.startswith("stage2"))


_REVISION_PATTERNS: list[tuple[re.Pattern, Any]] = [
    # Pythia: step143000
    (re.compile(r"step(\d+)"), lambda m: (int(m[1]), None, None)),
    # OLMo 1 (and a few early OLMo 2 7B branches): step20000-tokens84B
    (re.compile(r"step(\d+)-tokens(\d+)B"), lambda m: (int(m[1]), float(m[2]), None)),
    # OLMo 2 pretraining: stage1-step928646-tokens3896B
    (re.compile(r"stage1-step(\d+)-tokens(\d+)B"), lambda m: (int(m[1]), float(m[2]), "stage1")),
    # OLMo 2 mid-training: stage2-ingredient2-step11931-tokens50B
    (re.compile(r"stage2-ingredient(\d+)-step(\d+)-tokens(\d+)B"),
     lambda m: (int(m[2]), float(m[3]), f"stage2-ingredient{int(m[1])}")),
    # SmolLM2 intermediate checkpoints: step-125000
    (re.compile(r"step-(\d+)"), lambda m: (int(m[1]), None, None)),
]

# TinyLlama repo names: TinyLlama-1.1B-intermediate-step-480k-1T, ...-step-955k-token-2T,
# TinyLlama-1.1B-step-50K-105b (steps in thousands, tokens in B or T).
_TINYLLAMA_REPO = re.compile(
    r"TinyLlama-1\.1B-(?:intermediate-)?step-(\d+)[kK]-(?:token-)?(\d+(?:\.\d+)?)([bBtT])")


def parse_revision(name: str) -> Revision | None:
  """The step (and tokens, stage) a revision name gives, or None for names that give no step."""
  for pattern, fields in _REVISION_PATTERNS:
    m = pattern.fullmatch(name)
    if m:
      step, tokens, stage = fields(m)
      return Revision(name=name, step=step, tokens_billions=tokens, stage=stage)
  return None


def parse_repo_step(repo: str) -> Revision | None:
  """For repos whose name is the checkpoint (TinyLlama): the step and tokens it names."""
  m = _TINYLLAMA_REPO.fullmatch(repo.rpartition("/")[2])
  if not m:
    return None
  billions = float(m[2]) * (1000 if m[3] in "tT" else 1)
  return Revision(name=repo.rpartition("/")[2], step=int(m[1]) * 1000, tokens_billions=billions)


def tokens_mismatch(revision: Revision, tokens_per_step: int) -> str | None:
  """Why the tokens a revision name states disagree with step x tokens_per_step, or None.

  Names round to whole billions (OLMo mostly up, TinyLlama to 0.5T), so 1B or 2% is allowed.
  """
  if revision.tokens_billions is None:
    return None
  computed = revision.step * tokens_per_step / 1e9
  if abs(computed - revision.tokens_billions) <= max(1.0, 0.02 * revision.tokens_billions):
    return None
  return (f"revision {revision.name} names {revision.tokens_billions:g}B tokens but step "
          f"{revision.step} x tokens_per_step {tokens_per_step} = {computed:.1f}B")


def estimate_tokens_per_step(revisions: Iterable[Revision]) -> int | None:
  """Median of named tokens / step over revisions that name both (a hint, not exact)."""
  ratios = [r.tokens_billions * 1e9 / r.step for r in revisions
            if r.tokens_billions and r.step > 0]
  return int(round(statistics.median(ratios))) if ratios else None


# Snapshot folders -----------------------------------------------------------------------------


def is_buffer(name: str, dtype: str) -> bool:
  """Stored tensors that are not trained parameters: non-float dtypes and known buffers."""
  return dtype not in safetensors_io.FLOAT_NAMES or name.endswith(BUFFER_SUFFIXES)


def weight_files(directory: str) -> tuple[str | None, list[str], list[str]]:
  """(kind, files, missing) of the HF weights in `directory`.

  kind: the first of WEIGHT_FILES present (None: no weights); files: the weight files themselves
  (the shards an index names, in order); missing: shard names an index lists that are absent.
  Raises InputError for an index that is not valid JSON with a "weight_map".
  """
  for kind in WEIGHT_FILES:
    path = os.path.join(directory, kind)
    if not os.path.lexists(path):
      continue
    if not kind.endswith(".index.json"):
      return kind, [path], []
    try:
      with open(path) as f:
        weight_map = json.load(f)["weight_map"]
      assert isinstance(weight_map, dict)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
      raise InputError(f"{path}: expected JSON with a \"weight_map\" object {{tensor: file}} "
                       f"({type(e).__name__}: {e})") from None
    shards = sorted(set(weight_map.values()))
    files = [os.path.join(directory, s) for s in shards]
    return kind, files, [s for s, p in zip(shards, files) if not os.path.isfile(p)]
  return None, [], []


def snapshot_problem(directory: str) -> str | None:
  """Why `directory` is not a complete HF checkpoint (config.json and all weight files), or None."""
  if not os.path.isdir(directory):
    return "snapshot folder missing (download interrupted, or the cache was pruned)"
  broken = sorted(n for n in os.listdir(directory)
                  if os.path.islink(os.path.join(directory, n))
                  and not os.path.exists(os.path.join(directory, n)))
  if broken:
    return f"broken link(s) {', '.join(broken)}: the blob is missing (download interrupted?)"
  if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
    return f"no {CONFIG_FILE}"
  try:
    kind, _, missing = weight_files(directory)
  except InputError as e:
    return str(e)
  if kind is None:
    return f"no weights (expected one of {', '.join(WEIGHT_FILES)})"
  if missing:
    return f"{kind} lists shard(s) not in the snapshot: {', '.join(missing)}"
  return None


def count_params(directory: str) -> int | None:
  """Parameters in the safetensors headers of `directory` (buffers excluded); None without
  safetensors weights or with an unreadable header. Reads headers only."""
  kind, files, missing = weight_files(directory)
  if kind not in (SAFETENSORS, SAFETENSORS_INDEX) or missing:
    return None
  total = 0
  try:
    for path in files:
      for name, (dtype, shape, _, _) in safetensors_io.read_header(path).tensors.items():
        if not is_buffer(name, dtype):
          total += math.prod(shape)
  except (OSError, InputError):
    return None
  return total


# One repo -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CachedCheckpoint:
  """A revision of `repo` whose snapshot is complete: `path` is CACHE/.../snapshots/<sha>."""
  repo: str
  revision: Revision
  sha: str
  path: str


@dataclasses.dataclass
class RepoScan:
  """What the cache holds of one repo.

  checkpoints: complete revisions whose name gives a step, by (stage, step).
  step_refs: refs that name no step -> the checkpoint revision whose snapshot they share
    (`main` -> `step143000` for Pythia).
  unknown: one line per ref or snapshot that is no checkpoint (name gives no step; a snapshot no
    ref names). problems: one line per step revision whose snapshot is missing or incomplete.
  """
  repo: str
  folder: str
  checkpoints: list[CachedCheckpoint]
  step_refs: dict[str, str]
  unknown: list[str]
  problems: list[str]


def _read_refs(folder: str) -> dict[str, str]:
  refs_dir = os.path.join(folder, "refs")
  refs = {}
  for root, _, names in os.walk(refs_dir):
    for n in names:
      path = os.path.join(root, n)
      with open(path) as f:
        refs[os.path.relpath(path, refs_dir).replace(os.sep, "/")] = f.read().strip()
  return dict(sorted(refs.items()))


def cached_repos(cache_dir: str) -> list[str]:
  """The model repos ("ORG/NAME") that have a folder in the HF cache `cache_dir`."""
  names = sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []
  return [n[len("models--"):].replace("--", "/", 1) for n in names if n.startswith("models--")]


def _cache_hint(cache_dir: str, repo: str) -> str:
  """' (did you mean ...?)' for a repo missing from the cache, or a hint that `cache_dir` is
  HF_HOME rather than its hub/ folder; '' when there is nothing to say."""
  import difflib  # pylint: disable=import-outside-toplevel
  hub = os.path.join(cache_dir, "hub")
  if not cached_repos(cache_dir) and os.path.isdir(hub) and cached_repos(hub):
    return (f"; {cache_dir} looks like HF_HOME: the hub cache is its hub/ folder, "
            f"--hf_cache={hub}")
  known = cached_repos(cache_dir) + [t.repo for f in suite_templates.TEMPLATE_FAMILIES
                                     for t in suite_templates.family_templates(f)]
  close = difflib.get_close_matches(repo.lower(), [k.lower() for k in known], n=1, cutoff=0.8)
  if close:
    match = next(k for k in known if k.lower() == close[0])
    if match != repo:
      return f"; did you mean {match}?"
  return ""


def scan_repo(cache_dir: str, repo: str) -> RepoScan:
  """Reads the refs and snapshots of model repo `repo` ("ORG/NAME") in the HF cache `cache_dir`."""
  folder = repo_folder(cache_dir, repo)
  if not os.path.isdir(folder):
    raise MissingFileError(f"{repo}: not in the HF cache {cache_dir} (no folder "
                           f"{os.path.basename(folder)}){_cache_hint(cache_dir, repo)}; download "
                           f"revisions with `hf download {repo} --revision REV`")
  refs = _read_refs(folder)
  snapshots_dir = os.path.join(folder, "snapshots")
  snapshots = sorted(os.listdir(snapshots_dir)) if os.path.isdir(snapshots_dir) else []
  template = suite_templates.lookup(repo)
  repo_step = parse_repo_step(repo) if template and template.repo_is_checkpoint else None

  checkpoints, unknown, problems, pending = [], [], [], {}
  for ref, sha in refs.items():
    revision = parse_revision(ref)
    if revision is None and ref == "main" and repo_step is not None:
      revision = dataclasses.replace(repo_step, name="main")
    if revision is None:
      pending[ref] = sha
      continue
    path = os.path.join(snapshots_dir, sha)
    problem = snapshot_problem(path)
    if problem:
      problems.append(f"{repo} revision {ref} (snapshot {sha[:12]}): {problem}; not a checkpoint")
    else:
      checkpoints.append(CachedCheckpoint(repo=repo, revision=revision, sha=sha, path=path))
  by_sha = {c.sha: c.revision.name for c in checkpoints}
  step_refs = {}
  for ref, sha in pending.items():
    if sha in by_sha:
      step_refs[ref] = by_sha[sha]
    else:
      unknown.append(f"{repo} ref {ref!r} (snapshot {sha[:12]}): its name gives no step and its "
                     "snapshot is no step revision's; not a checkpoint")
  named = set(refs.values())
  for sha in snapshots:
    if sha not in named:
      unknown.append(f"{repo} snapshot {sha[:12]}: no ref names it (downloaded by commit sha?); "
                     "not a checkpoint")
  checkpoints.sort(key=lambda c: (c.revision.stage or "", c.revision.step))
  return RepoScan(repo=repo, folder=folder, checkpoints=checkpoints, step_refs=step_refs,
                  unknown=unknown, problems=problems)


# A suite manifest from several repos ----------------------------------------------------------


@dataclasses.dataclass
class SuiteBuild:
  """The result of `build_suite`. manifest: the suite dict (None when no repo had a checkpoint);
  notes / unknown / problems: one line each, for the user to read. bin_only: the checkpoints
  holding only PyTorch .bin weights that have no converted copy (-> their converted_path)."""
  manifest: dict[str, Any] | None
  scans: list[RepoScan]
  notes: list[str]
  unknown: list[str]
  problems: list[str]
  bin_only: dict[CachedCheckpoint, str] = dataclasses.field(default_factory=dict)

  def present(self, repo: str) -> set[str]:
    """Revision names of `repo` present as checkpoints (or as a ref to one)."""
    out = set()
    for s in self.scans:
      if s.repo == repo:
        out |= {c.revision.name for c in s.checkpoints} | set(s.step_refs)
    return out


def is_bin_only(directory: str) -> bool:
  """True when the weights of `directory` are PyTorch .bin files (no safetensors)."""
  try:
    kind = weight_files(directory)[0]
  except InputError:
    return False
  return kind is not None and kind.startswith(TORCH_BIN)


def converted_path(converted_dir: str, checkpoint: CachedCheckpoint) -> str:
  """Where the converted copy of a .bin-only checkpoint lives under `converted_dir`."""
  from huggingface_hub import file_download  # pylint: disable=import-outside-toplevel
  repo = file_download.repo_folder_name(repo_id=checkpoint.repo, repo_type="model")
  return os.path.join(os.path.abspath(converted_dir), repo,
                      f"{checkpoint.revision.name}-{checkpoint.sha[:12]}")


def _model_params(checkpoints: list[CachedCheckpoint], template_params: int | None,
                  given: int | None) -> int | None:
  counted = count_params(checkpoints[-1].path)
  if counted:
    return counted
  if template_params:
    return template_params
  try:
    with open(os.path.join(checkpoints[-1].path, CONFIG_FILE)) as f:
      config = json.load(f)
    return families.from_hf_dict(config).num_params()
  except (OSError, ValueError, TypeError):
    pass
  return given


def build_suite(repos: list[str], *, cache_dir: str | None = None, name: str = "hf",
                tokens_per_step: int | None = None, params: int | None = None,
                olmo2_stage2: str = "separate", missing_ok: bool = False,
                converted_dir: str | None = None) -> SuiteBuild:
  """A suite manifest of every checkpoint of `repos` in the HF cache.

  repos: HF model repos ("ORG/NAME"). Repos of one template model (the TinyLlama repos) become one
    model; every other repo is a model named after it. cache_dir: default `default_cache_dir()`.
  tokens_per_step / params: for repos without a template value (params are first counted from
    the safetensors headers, then taken from the template, then from an OPT config.json).
  olmo2_stage2: "separate" (each stage-2 ingredient a model `<model>-stage2-ingredient<k>`, its
    steps and tokens counted from the start of stage 2 as in the revision names) or "drop".
  missing_ok: a repo absent from the cache is a note instead of a MissingFileError.
  converted_dir: where converted copies of .bin-only revisions are looked for (module docstring).
  Raises InputError naming every model whose tokens_per_step or params cannot be determined.
  """
  if olmo2_stage2 not in STAGE2_MODES:
    raise InputError(f"olmo2_stage2 must be one of {STAGE2_MODES}, got {olmo2_stage2!r}")
  if not repos:
    raise InputError("no repos given: name HF repos like EleutherAI/pythia-160m")
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
  scans, notes, bin_only = [], [], {}
  if not os.path.isdir(cache_dir):
    if not missing_ok:
      raise MissingFileError(f"HF cache folder {cache_dir} does not exist")
    notes.append(f"HF cache folder {cache_dir} does not exist yet: nothing is downloaded")
  for repo in repos:
    try:
      if not os.path.isdir(cache_dir):
        continue
      scans.append(scan_repo(cache_dir, repo))
    except MissingFileError as e:
      if not missing_ok:
        raise
      notes.append(str(e))
  unknown = [u for s in scans for u in s.unknown]
  problems = [p for s in scans for p in s.problems]

  # Group checkpoints into models, keeping the repo order.
  groups: dict[str, dict[str, Any]] = {}
  for s in scans:
    template = suite_templates.lookup(s.repo)
    base = template.model if template else s.repo.rpartition("/")[2]
    dropped = [c for c in s.checkpoints if c.revision.is_stage2 and olmo2_stage2 == "drop"]
    if dropped:
      notes.append(f"{s.repo}: {len(dropped)} stage-2 revision(s) dropped (--olmo2_stage2=drop)")
    for c in s.checkpoints:
      if c in dropped:
        continue
      key = f"{base}-{c.revision.stage}" if c.revision.is_stage2 else base
      alias = f"{s.repo}@{c.revision.stage}" if c.revision.is_stage2 else s.repo
      g = groups.setdefault(key, {"checkpoints": [], "aliases": [], "template": template,
                                  "refs": {}})
      g["checkpoints"].append(c)
      if alias not in g["aliases"]:
        g["aliases"].append(alias)
    for ref, target in s.step_refs.items():
      for key, g in groups.items():
        for c in g["checkpoints"]:
          if c.repo == s.repo and c.revision.name == target:
            g["refs"][ref] = c.revision.step
            notes.append(f"{s.repo} ref {ref!r} is {target} (same snapshot {c.sha[:12]}): not a "
                         "separate checkpoint")

  models, unresolved = [], []
  for key, g in groups.items():
    template = g["template"]
    tps = (template.tokens_per_step if template else None) or tokens_per_step
    n_params = _model_params(g["checkpoints"], template.params if template else None, params)
    if not tps or not n_params:
      hint = ""
      estimate = estimate_tokens_per_step(c.revision for c in g["checkpoints"])
      if not tps and estimate:
        hint = f" (its revision names suggest about {estimate})"
      what = [w for w, v in (("--tokens_per_step" + hint, tps), ("--params", n_params)) if not v]
      unresolved.append(f"{key} ({', '.join(g['aliases'])}): give {' and '.join(what)}")
      continue
    checkpoints: dict[str, Any] = {}
    for c in sorted(g["checkpoints"], key=lambda c: c.revision.step):
      if str(c.revision.step) in checkpoints:
        first = checkpoints[str(c.revision.step)]
        problems.append(f"{key}: step {c.revision.step} given by {c.repo} revision "
                        f"{c.revision.name} and by {first['revision']}; kept the first")
        continue
      mismatch = tokens_mismatch(c.revision, tps)
      if mismatch:
        problems.append(f"{key}: {mismatch} (is tokens_per_step right?)")
      path = c.path
      if is_bin_only(c.path):
        copy = converted_path(converted_dir, c) if converted_dir else None
        if copy and os.path.isfile(os.path.join(copy, CONFIG_FILE)) and not is_bin_only(copy) \
            and weight_files(copy)[0] is not None:
          path = copy
          notes.append(f"{c.repo} revision {c.revision.name} holds only PyTorch .bin weights: "
                       f"using its converted copy {copy}")
        else:
          bin_only[c] = copy or ""
          problems.append(f"{c.repo} revision {c.revision.name} holds only PyTorch .bin weights: "
                          "experiments leave it out; tools.make_suite --convert_bin converts it "
                          "(safetensors) into a folder the manifest then uses")
      checkpoints[str(c.revision.step)] = {"path": path, "revision": c.revision.name,
                                           "sha": c.sha}
    shared = collections.defaultdict(list)
    for step, entry in checkpoints.items():
      shared[entry["sha"]].append(step)
    for sha, steps in shared.items():
      if len(steps) > 1:
        problems.append(f"{key}: steps {', '.join(steps)} are one snapshot ({sha[:12]}): the same "
                        "weights under several step names")
    model = {"name": key, "params": n_params, "tokens_per_step": tps, "aliases": g["aliases"],
             "checkpoints": checkpoints}
    if g["refs"]:
      model["refs"] = g["refs"]
    known = [[s for s in group if str(s) in checkpoints]
             for group in (template.known_duplicates if template else ())]
    known = [group for group in known if len(group) > 1]
    if known:
      model["known_duplicates"] = known
      notes.append(f"{key}: steps {' and '.join(', '.join(map(str, g_)) for g_ in known)} hold "
                   "the same weights by design (noted as known_duplicates; evaluated and marked)")
    models.append(model)
  if unresolved:
    raise InputError("cannot complete the manifest for model(s) without a template value:\n  "
                     + "\n  ".join(unresolved))
  manifest = None
  if models:
    manifest = {"name": name,
                "description": f"{MANIFEST_MARK}{cache_dir}: {', '.join(s.repo for s in scans)}",
                "models": models}
  return SuiteBuild(manifest=manifest, scans=scans, notes=notes, unknown=unknown,
                    problems=problems, bin_only=bin_only)


# What a download fetches of a revision: safetensors weights, config and tokenizer files (Pythia
# revisions also hold the same weights as pytorch_model.bin: twice the bytes otherwise).
DOWNLOAD_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model")


def download_commands(missing: dict[str, list[str]], cache_dir: str | None = None) -> str:
  """A shell script with one `hf download REPO --revision REV --include ...` line per missing
  revision: safetensors weights, config.json and tokenizer files only (DOWNLOAD_PATTERNS)."""
  import shlex  # pylint: disable=import-outside-toplevel
  cache = f" --cache-dir {shlex.quote(cache_dir)}" if cache_dir else ""
  include = "".join(f" --include {shlex.quote(p)}" for p in DOWNLOAD_PATTERNS)
  lines = ["#!/bin/sh", SCRIPT_MARK,
           "# Each line downloads one revision: its safetensors weights, config and tokenizer",
           "# files (in Python: huggingface_hub.snapshot_download(repo_id, revision=REV,",
           f"# allow_patterns={list(DOWNLOAD_PATTERNS)})). A revision published with PyTorch .bin",
           "# weights only then has none: download it again with --include '*.bin' and run",
           "# tools.make_suite --convert_bin. Then run tools.make_suite again.", "set -e"]
  for repo, revisions in missing.items():
    lines += [f"hf download {repo} --revision {r}{include}{cache}" for r in revisions]
  return "\n".join(lines) + "\n"


def check_replaceable(path: str, overwrite: bool = False) -> None:
  """Raises OutputExistsError if `path` exists and is not a manifest or download script written
  by `build_suite` / `download_commands` (a hand-edited manifest is never replaced silently)."""
  if overwrite or not os.path.exists(path):
    return
  try:
    with open(path) as f:
      text = f.read(1 << 16)
  except (OSError, UnicodeDecodeError):
    text = ""
  if SCRIPT_MARK in text or f'"description": "{MANIFEST_MARK}' in text:
    return
  raise OutputExistsError(f"{path} exists and was not written by tools.make_suite; choose another "
                          "path or pass --overwrite")
