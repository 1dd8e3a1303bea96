"""Checkpoint suite manifests: models x training steps -> checkpoint paths, tokens seen, FLOPs.

A manifest is JSON (or YAML, by extension .yaml/.yml):

  {"name": "opt",
   "models": [{"name": "opt-125m", "params": 125239296, "tokens_per_step": 500000,
               "aliases": ["facebook/opt-125m"],
               "checkpoints": {"2000": "ckpt/125m/step2000", "6000": "ckpt/125m/step6000"}}]}

A checkpoint may also be an object naming where it came from (what `tools/make_suite.py` writes
for the HF cache): {"path": ".../snapshots/<sha>", "revision": "step2000", "sha": "<commit sha>"}.
A model's optional "refs" maps refs that name no step to the step they point at ({"main": 143000}).
Its optional "known_duplicates" lists groups of steps whose weights are identical by design
([[0, 1]]: Pythia uploaded the initial weights as step 0 and step 1): the integrity check accepts
them, and the experiments mark them in their tables. Its optional "exclude" maps steps that no
experiment evaluates to why ({"512": "a byte copy of step 1000"}; a list of steps also works).

Relative checkpoint paths resolve against the manifest's folder. Derived per checkpoint:
  tokens seen    = step x tokens_per_step
  training FLOPs = 6 x params x tokens seen          (forward + backward, Kaplan et al. 2020)

`load_suite` validates everything and raises one `SuiteError` that lists every problem, including
every entry that is not a checkpoint opt_jax can read (checked cheaply, before any sweep starts).
`readable` instead leaves out the checkpoints that cannot be read (one line each) and keeps the
rest: what experiments do unless told to be strict.
`opt_suite_template` / `write_opt_template` give the OPT suite analysed by Xia et al. (2023) with
placeholder paths that users point at their converted checkpoints.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Iterator, Mapping

from opt_jax import families
from opt_jax import files
from opt_jax import hf_cache
from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError, MissingFileError

_SUITE_FIELDS = ("name", "models", "description")
_MODEL_FIELDS = ("name", "params", "tokens_per_step", "aliases", "checkpoints", "description",
                 "refs", "known_duplicates", "exclude")
_CHECKPOINT_FIELDS = ("path", "revision", "sha")
_PARAMS_TOLERANCE = 0.05  # manifest `params` may be rounded; a larger gap means a wrong checkpoint


class SuiteError(InputError):
  """A manifest with problems; `problems` lists each one (file, model and key named)."""

  def __init__(self, source: str, problems: list[str]):
    self.source = source
    self.problems = list(problems)
    if len(self.problems) == 1:   # one line, as every other user error
      super().__init__(f"{source}: suite manifest: {self.problems[0]}")
      return
    lines = "\n".join(f"  - {p}" for p in self.problems)
    super().__init__(f"{source}: {len(self.problems)} problems in suite manifest:\n{lines}")


@dataclasses.dataclass(frozen=True)
class SuiteModel:
  """One model size of a suite.

  checkpoints: step -> absolute checkpoint directory, in increasing step order.
  params: parameter count used for FLOPs; tokens_per_step: training batch size in tokens.
  revisions / shas: step -> HF revision name / snapshot commit sha, for the checkpoints whose
  manifest entry names them. refs: refs that name no step (e.g. "main") -> the step they point at.
  known_duplicates: groups of steps whose weights are identical by design (Pythia's 0 and 1).
  excluded: step -> why, of the manifest's checkpoints that are left out (not in `checkpoints`);
  excluded_paths: their paths (what `Suite.to_dict` writes back).
  """
  name: str
  params: int
  tokens_per_step: int
  aliases: tuple[str, ...]
  checkpoints: dict[int, str]
  description: str = ""
  revisions: dict[int, str] = dataclasses.field(default_factory=dict)
  shas: dict[int, str] = dataclasses.field(default_factory=dict)
  refs: dict[str, int] = dataclasses.field(default_factory=dict)
  known_duplicates: tuple[tuple[int, ...], ...] = ()
  excluded: dict[int, str] = dataclasses.field(default_factory=dict)
  excluded_paths: dict[int, str] = dataclasses.field(default_factory=dict)

  @property
  def steps(self) -> list[int]:
    return list(self.checkpoints)

  def path(self, step: int) -> str:
    try:
      return self.checkpoints[step]
    except KeyError:
      raise KeyError(f"model {self.name!r} has no checkpoint at step {step}; "
                     f"steps: {self.steps}") from None

  def revision(self, step: int) -> str | None:
    """The HF revision name of the checkpoint at `step`, None if its entry names none."""
    self.path(step)
    return self.revisions.get(step)

  def sha(self, step: int) -> str | None:
    """The snapshot commit sha of the checkpoint at `step`, None if its entry names none."""
    self.path(step)
    return self.shas.get(step)

  def tokens(self, step: int) -> int:
    """Training tokens seen at `step`."""
    return int(step) * self.tokens_per_step

  def flops(self, step: int) -> float:
    """Training compute at `step` in FLOPs: 6 x params x tokens."""
    return 6.0 * self.params * self.tokens(step)

  def duplicate_of(self, step: int) -> int | None:
    """The first step of the known-duplicate group `step` is a later member of, else None."""
    for group in self.known_duplicates:
      if step in group and step != min(group):
        return min(group)
    return None

  def matches(self, name: str) -> bool:
    """True if `name` is this model's name or one of its aliases (case-insensitive)."""
    key = name.strip().lower()
    return key == self.name.lower() or key in (a.lower() for a in self.aliases)


@dataclasses.dataclass(frozen=True)
class Suite:
  """A set of model sizes, each with checkpoints at several training steps."""
  name: str
  models: list[SuiteModel]
  source: str | None = None  # manifest file, when loaded from one
  description: str = ""

  def model(self, name: str) -> SuiteModel:
    return find_model(self, name)

  def checkpoints(self) -> Iterator[tuple[SuiteModel, int, str]]:
    """(model, step, path) for every checkpoint, models in manifest order, steps increasing."""
    for m in self.models:
      for step, path in m.checkpoints.items():
        yield m, step, path

  def __len__(self) -> int:
    return sum(len(m.checkpoints) for m in self.models)

  def rows(self) -> list[dict[str, Any]]:
    """One dict per checkpoint: model, step, params, tokens, flops, path (tidy-table ready)."""
    return [{"model": m.name, "step": s, "params": m.params, "tokens": m.tokens(s),
             "flops": m.flops(s), "path": p} for m, s, p in self.checkpoints()]

  def select(self, models: list[str] | None = None) -> "Suite":
    """The suite restricted to `models` (names or aliases), in the order given."""
    if not models:
      return self
    return dataclasses.replace(self, models=[find_model(self, n) for n in models])

  def exclude(self, names: list[str], why: str = "--exclude") -> "Suite":
    """The suite without the checkpoints named "MODEL@STEP" (a model name or alias); KeyError
    naming the one that is not in the suite."""
    if not names:
      return self
    drop: dict[str, set[int]] = collections.defaultdict(set)
    for n in names:
      model, sep, step = n.rpartition("@")
      if not sep or _parse_step(step) is None:
        raise KeyError(f"{n!r}: expected MODEL@STEP, e.g. {self.models[0].name}@"
                       f"{self.models[0].steps[0] if self.models[0].steps else 1000}")
      m = find_model(self, model)
      if _parse_step(step) not in m.checkpoints and _parse_step(step) not in m.excluded:
        raise KeyError(f"{n!r}: model {m.name!r} has no checkpoint at step {step}; steps: "
                       f"{m.steps}")
      drop[m.name].add(_parse_step(step))
    models = []
    for m in self.models:
      gone = drop.get(m.name, set()) & set(m.checkpoints)
      models.append(dataclasses.replace(
          m, checkpoints={s: p for s, p in m.checkpoints.items() if s not in gone},
          excluded={**m.excluded, **{s: why for s in gone}},
          excluded_paths={**m.excluded_paths, **{s: m.checkpoints[s] for s in gone}})
          if gone else m)
    return dataclasses.replace(self, models=models)

  def excluded_lines(self) -> list[str]:
    """One line per excluded checkpoint: 'pythia-160m step 512 excluded: why'."""
    return [f"{m.name} step {s} excluded: {why}" for m in self.models
            for s, why in sorted(m.excluded.items())]

  def without_empty_models(self) -> "Suite":
    return dataclasses.replace(self, models=[m for m in self.models if m.checkpoints])

  def to_dict(self) -> dict[str, Any]:
    """Manifest form with absolute paths (what a run manifest records)."""
    out: dict[str, Any] = {"name": self.name}
    if self.description:
      out["description"] = self.description
    out["models"] = []
    for m in self.models:
      every = dict(sorted({**m.checkpoints, **m.excluded_paths}.items()))
      d = {"name": m.name, "params": m.params, "tokens_per_step": m.tokens_per_step,
           "aliases": list(m.aliases), "checkpoints": {str(s): _checkpoint_entry(m, s, p)
                                                       for s, p in every.items()}}
      if m.description:
        d["description"] = m.description
      if m.refs:
        d["refs"] = dict(m.refs)
      if m.known_duplicates:
        d["known_duplicates"] = [list(g) for g in m.known_duplicates]
      if m.excluded:
        d["exclude"] = {str(s): why for s, why in m.excluded.items()}
      out["models"].append(d)
    return out


def _checkpoint_entry(m: SuiteModel, step: int, path: str) -> str | dict[str, str]:
  if step not in m.revisions and step not in m.shas:
    return path
  entry = {"path": path}
  for field, values in (("revision", m.revisions), ("sha", m.shas)):
    if step in values:
      entry[field] = values[step]
  return entry


def find_model(suite: Suite, name: str) -> SuiteModel:
  """The model whose name or alias equals `name` (case-insensitive); KeyError naming the choices."""
  for m in suite.models:
    if m.matches(name):
      return m
  known = ", ".join(f"{m.name} (aliases: {', '.join(m.aliases) or '-'})" for m in suite.models)
  raise KeyError(f"suite {suite.name!r} has no model named {name!r}; models: {known}")


# Reading -------------------------------------------------------------------------------------


class _Pairs(list):
  """A JSON/YAML mapping kept as its (key, value) pairs, so duplicate keys can be reported."""


def _read_manifest(path: str) -> Any:
  with open(path) as f:
    text = f.read()
  if path.endswith((".yaml", ".yml")):
    import yaml  # pylint: disable=import-outside-toplevel

    class PairsLoader(yaml.SafeLoader):
      pass

    def construct_pairs(loader, node):
      return _Pairs((loader.construct_object(k, deep=True), loader.construct_object(v, deep=True))
                    for k, v in node.value)

    PairsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_pairs)
    try:
      return yaml.load(text, Loader=PairsLoader)  # noqa: S506 (SafeLoader subclass)
    except yaml.YAMLError as e:
      raise SuiteError(path, [f"not valid YAML: {e}"]) from None
  try:
    return json.loads(text, object_pairs_hook=_Pairs)
  except json.JSONDecodeError as e:
    raise SuiteError(path, [f"not valid JSON: {e}"]) from None


def _as_pairs(value: Any) -> _Pairs | None:
  if isinstance(value, _Pairs):
    return value
  if isinstance(value, Mapping):
    return _Pairs(value.items())
  return None


def _parse_step(key: Any) -> int | None:
  if isinstance(key, bool):
    return None
  if isinstance(key, int):
    return key
  if isinstance(key, str) and key.strip().isdigit():
    return int(key.strip())
  return None


def _is_count(value: Any) -> bool:
  """A positive whole number (int, or a float like 5e5 with no fractional part)."""
  if isinstance(value, bool):
    return False
  if isinstance(value, int):
    return value > 0
  return isinstance(value, float) and value > 0 and value.is_integer()


def parse_suite(data: Any, base_dir: str, *, source: str = "<suite>", check_paths: bool = True,
                require_checkpoints: bool = True) -> Suite:
  """Builds a Suite from a parsed manifest (dicts or `_Pairs`); raises SuiteError listing problems.

  check_paths=False skips the checks that need the checkpoint directories (existence, config
  agreement): for manifests used only for their sizes and steps, e.g. importing lm-eval results.
  require_checkpoints=False (with check_paths=False) also accepts models without checkpoints:
  names, aliases, params and tokens per step are all an import reads.
  """
  problems: list[str] = []
  top = _as_pairs(data)
  if top is None:
    raise SuiteError(source, [f"the manifest must be a mapping with 'name' and 'models', got "
                              f"{type(data).__name__}"])
  fields: dict[str, Any] = {}
  for k, v in top:
    if k not in _SUITE_FIELDS:
      problems.append(f"unknown top-level field {k!r} (expected one of {list(_SUITE_FIELDS)})")
    elif k in fields:
      problems.append(f"top-level field {k!r} given twice")
    else:
      fields[k] = v
  name = fields.get("name")
  if not isinstance(name, str) or not name.strip():
    problems.append(f"'name' must be a non-empty string, got {name!r}")
    name = os.path.splitext(os.path.basename(source))[0]
  description = fields.get("description", "")
  if not isinstance(description, str):
    problems.append("'description' must be a string")
    description = ""
  raw_models = fields.get("models")
  if not isinstance(raw_models, list) or not raw_models:
    problems.append(f"'models' must be a non-empty list of models, got {raw_models!r}")
    raw_models = []

  # Models with problems are still parsed as far as possible, so that their checkpoint paths are
  # checked too and one run of the validation reports everything.
  parsed = [_parse_model(raw, i, base_dir, problems, require_checkpoints or check_paths)
            for i, raw in enumerate(raw_models)]
  models = [m for m, ok in parsed if ok]
  checked = [m for m, _ in parsed if m is not None]

  seen: dict[str, str] = {}
  for m in checked:
    for n in (m.name, *m.aliases):
      key = n.lower()
      if key in seen and seen[key] != m.name:
        problems.append(f"name or alias {n!r} of model {m.name!r} is also used by model "
                        f"{seen[key]!r}")
      elif key in seen:
        problems.append(f"model {m.name!r}: name or alias {n!r} is listed twice")
      seen[key] = m.name
  if check_paths:
    for m in checked:
      problems.extend(_check_checkpoints(m))
  if problems:
    raise SuiteError(source, problems)
  return Suite(name=name, models=models, source=source, description=description)


def _parse_model(raw: Any, index: int, base_dir: str, problems: list[str],
                 require_checkpoints: bool = True) -> tuple[SuiteModel | None, bool]:
  """(model, ok): with problems, a partial model (params 0 where invalid) for the path checks."""
  pairs = _as_pairs(raw)
  where = f"models[{index}]"
  if pairs is None:
    problems.append(f"{where}: a model must be a mapping, got {type(raw).__name__}")
    return None, False
  fields: dict[str, Any] = {}
  field_problems = []
  for k, v in pairs:
    if k not in _MODEL_FIELDS:
      field_problems.append(f"unknown field {k!r} (expected one of {list(_MODEL_FIELDS)})")
    elif k in fields:
      field_problems.append(f"field {k!r} given twice")
    else:
      fields[k] = v
  ok = not field_problems
  name = fields.get("name")
  if not isinstance(name, str) or not name.strip():
    problems.append(f"{where}: 'name' must be a non-empty string, got {name!r}")
    name, ok = where, False
  else:
    where = f"{where} ({name})"
  problems.extend(f"{where}: {p}" for p in field_problems)
  for field in ("params", "tokens_per_step"):
    if field not in fields:
      problems.append(f"{where}: missing {field!r} (a positive integer)")
      ok = False
    elif not _is_count(fields[field]):
      problems.append(f"{where}: {field!r} must be a positive integer, got {fields[field]!r}")
      ok = False
  aliases = fields.get("aliases", [])
  if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
    problems.append(f"{where}: 'aliases' must be a list of non-empty strings, got {aliases!r}")
    aliases, ok = [], False
  description = fields.get("description", "")
  if not isinstance(description, str):
    problems.append(f"{where}: 'description' must be a string")
    description = ""

  raw_ckpts = _as_pairs(fields.get("checkpoints"))
  checkpoints: dict[int, str] = {}
  revisions: dict[int, str] = {}
  shas: dict[int, str] = {}
  if not require_checkpoints and fields.get("checkpoints") in (None, {}, []):
    pass
  elif raw_ckpts is None or not raw_ckpts:
    problems.append(f"{where}: 'checkpoints' must be a non-empty mapping step -> directory, got "
                    f"{fields.get('checkpoints')!r}")
    ok = False
  else:
    first_key: dict[int, Any] = {}
    for key, path in raw_ckpts:
      step = _parse_step(key)
      if step is None:
        problems.append(f"{where}: checkpoint step {key!r} is not a non-negative integer")
        ok = False
        continue
      if step in first_key:
        problems.append(f"{where}: duplicate step {step} (keys {first_key[step]!r} and {key!r})")
        ok = False
        continue
      first_key[step] = key
      entry = _as_pairs(path)
      if entry is not None:
        path, entry_ok = _parse_checkpoint_entry(entry, step, f"{where}: checkpoint {key!r}",
                                                 revisions, shas, problems)
        if not entry_ok:
          ok = False
          continue
      if not isinstance(path, str) or not path.strip():
        problems.append(f"{where}: checkpoint {key!r} must map to a directory path, got {path!r}")
        ok = False
        continue
      path = os.path.expanduser(path)
      checkpoints[step] = os.path.normpath(path if os.path.isabs(path)
                                           else os.path.join(base_dir, path))
  refs: dict[str, int] = {}
  raw_refs = _as_pairs(fields.get("refs", {}))
  if raw_refs is None:
    problems.append(f"{where}: 'refs' must be a mapping ref name -> step, got "
                    f"{fields.get('refs')!r}")
    raw_refs, ok = _Pairs(), False
  for ref, step in raw_refs:
    if not isinstance(ref, str) or _parse_step(step) not in checkpoints:
      problems.append(f"{where}: 'refs' must map ref names to steps of its checkpoints, got "
                      f"{ref!r}: {step!r}")
      ok = False
      continue
    refs[ref] = _parse_step(step)
  known: list[tuple[int, ...]] = []
  raw_known = fields.get("known_duplicates", [])
  if not isinstance(raw_known, list):
    raw_known = [raw_known]
  for group in raw_known:
    steps = [_parse_step(x) for x in group] if isinstance(group, list) else [None]
    if len(steps) < 2 or None in steps:
      problems.append(f"{where}: 'known_duplicates' must be a list of groups of two or more steps "
                      f"([[0, 1]]), got {group!r}")
      ok = False
      continue
    known.append(tuple(sorted(set(steps))))
  excluded: dict[int, str] = {}
  raw_exclude = fields.get("exclude", {})
  pairs = (_as_pairs(raw_exclude) if not isinstance(raw_exclude, list)
           else _Pairs((x, "excluded by the manifest") for x in raw_exclude))
  for key, why in pairs or _Pairs():
    step = _parse_step(key)
    if step is None or step not in checkpoints or not isinstance(why, str):
      problems.append(f"{where}: 'exclude' must map steps of its checkpoints to a reason "
                      f"(or list them), got {key!r}: {why!r}")
      ok = False
      continue
    excluded[step] = why.strip() or "excluded by the manifest"
  if pairs is None:
    problems.append(f"{where}: 'exclude' must map steps to a reason, got {raw_exclude!r}")
    ok = False
  count = lambda f: int(fields[f]) if _is_count(fields.get(f)) else 0
  model = SuiteModel(name=name.strip(), params=count("params"),
                     tokens_per_step=count("tokens_per_step"),
                     aliases=tuple(a.strip() for a in aliases),
                     checkpoints={s: p for s, p in sorted(checkpoints.items())
                                  if s not in excluded},
                     description=description, revisions=revisions, shas=shas, refs=refs,
                     known_duplicates=tuple(known), excluded=excluded,
                     excluded_paths={s: checkpoints[s] for s in excluded})
  return model, ok


def _parse_checkpoint_entry(entry: _Pairs, step: int, where: str, revisions: dict[int, str],
                            shas: dict[int, str], problems: list[str]) -> tuple[Any, bool]:
  """(path, ok) of an object entry {"path", "revision", "sha"}; records revision and sha."""
  fields = dict(entry)
  bad = [k for k, _ in entry if k not in _CHECKPOINT_FIELDS]
  if bad or len(fields) != len(entry):
    problems.append(f"{where}: unknown or repeated field(s) {bad or [k for k, _ in entry]} "
                    f"(expected {list(_CHECKPOINT_FIELDS)})")
    return None, False
  for field, values in (("revision", revisions), ("sha", shas)):
    if field in fields:
      if not isinstance(fields[field], str) or not fields[field].strip():
        problems.append(f"{where}: {field!r} must be a non-empty string, got {fields[field]!r}")
        return None, False
      values[step] = fields[field].strip()
  return fields.get("path"), True


def _check_checkpoints(m: SuiteModel) -> list[str]:
  """Missing directories, entries opt_jax cannot read (opt_jax.checkpoints' checkpoint_problem:
  e.g. an unconverted HF folder), configs that differ within the model, params far from the
  config's."""
  per_step, model_problems = _checkpoint_problems(m)
  return [f"model {m.name!r} step {s}: {p}" for s, p in per_step.items()] + model_problems


def _checkpoint_problems(m: SuiteModel) -> tuple[dict[int, str], list[str]]:
  """({step: why it cannot be read or differs}, [problems of the model as a whole])."""
  from opt_jax.checkpoints import checkpoint  # pylint: disable=import-outside-toplevel
  per_step: dict[int, str] = {}
  problems: list[str] = []
  configs: dict[int, DecoderConfig] = {}
  for step, path in m.checkpoints.items():
    if not os.path.isdir(path):
      per_step[step] = f"checkpoint directory {path} does not exist"
      continue
    if hf_cache.is_bin_only(path) and os.path.basename(os.path.dirname(path)) == "snapshots":
      per_step[step] = (f"{path} holds only PyTorch .bin weights, which opt_jax reads only to "
                        "convert them (an HF-cache snapshot: python -m tools.make_suite ... "
                        "--convert_bin)")
      continue
    problem = checkpoint.checkpoint_problem(path)
    if problem is not None:
      per_step[step] = problem
      continue
    try:
      configs[step] = checkpoint.load_config(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
      per_step[step] = f"{path}: config.json unreadable ({e})"
  if not configs:
    return per_step, problems
  # The most common config is the model's; every checkpoint that differs is named.
  counts = collections.Counter(configs.values())
  reference, _ = counts.most_common(1)[0]
  ref_step = next(s for s, c in configs.items() if c == reference)
  for step, config in configs.items():
    if config != reference:
      diff = [f"{f.name}={getattr(config, f.name)!r} (step {ref_step}: "
              f"{getattr(reference, f.name)!r})"
              for f in dataclasses.fields(DecoderConfig)
              if getattr(config, f.name) != getattr(reference, f.name)]
      per_step[step] = (f"config.json in {m.checkpoints[step]} differs from the model's other "
                        f"checkpoints: {', '.join(diff)}")
  actual = reference.num_params()
  if m.params > 0 and abs(actual - m.params) > _PARAMS_TOLERANCE * actual:
    problems.append(f"model {m.name!r}: manifest says params={m.params} but its checkpoints' "
                    f"config.json has {actual} parameters (more than "
                    f"{_PARAMS_TOLERANCE:.0%} apart: wrong checkpoints or wrong size?)")
  return dict(sorted(per_step.items())), problems


def check_checkpoints(suite: Suite) -> list[str]:
  """Every problem `load_suite(check_paths=True)` finds with the checkpoints of `suite`."""
  return [p for m in suite.models for p in _check_checkpoints(m)]


def readable(suite: Suite) -> tuple[Suite, list[str]]:
  """(the suite without the checkpoints opt_jax cannot read, one line per checkpoint left out).

  The cheap checks of `load_suite(check_paths=True)`, per checkpoint: a missing directory, an
  entry opt_jax.checkpoints' `checkpoint_problem` refuses (a .bin-only or truncated HF snapshot),
  a config.json unlike the model's other checkpoints. Models left with no checkpoint are dropped.
  Raises SuiteError for problems of a model as a whole (params far from its config's) and when
  nothing is left to evaluate."""
  models, left_out, problems = [], [], []
  for m in suite.models:
    per_step, model_problems = _checkpoint_problems(m)
    problems += model_problems
    left_out += [f"{m.name} step {s} left out: {why}" for s, why in per_step.items()]
    kept = {s: p for s, p in m.checkpoints.items() if s not in per_step}
    if kept:
      models.append(dataclasses.replace(m, checkpoints=kept))
  if not models and not problems:
    problems.append("no checkpoint can be read:\n    " + "\n    ".join(left_out))
  if problems:
    raise SuiteError(suite.source or suite.name, problems)
  return dataclasses.replace(suite, models=models), left_out


def load_suite(path: str | os.PathLike, *, check_paths: bool = True,
               require_checkpoints: bool = True) -> Suite:
  """Reads and validates a manifest (.json, .yaml or .yml); SuiteError lists every problem.
  check_paths / require_checkpoints: as for `parse_suite`."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise MissingFileError(f"suite manifest not found: {path}")
  data = _read_manifest(path)
  return parse_suite(data, os.path.dirname(path), source=path, check_paths=check_paths,
                     require_checkpoints=require_checkpoints)


def save_suite(suite_or_dict: Suite | dict[str, Any], path: str | os.PathLike) -> None:
  """Writes a manifest as JSON atomically (temporary name, then rename)."""
  data = suite_or_dict.to_dict() if isinstance(suite_or_dict, Suite) else suite_or_dict
  files.write_json(path, data)


# The OPT suite of Xia et al. (2023) ----------------------------------------------------------
#
# Source of the steps: the analysis code released with the paper,
# github.com/xiamengzhou/training_trajectory_analysis, utils.py (`return_checkpoint_index`,
# commit fac1538). Intermediate OPT checkpoints were never published by metaseq (issue
# facebookresearch/metaseq#32 asked and was closed); the authors had them from Meta, so users
# must obtain them the same way, and the step lists below describe what the paper analysed.
# Batch sizes in tokens: OPT paper (Zhang et al., 2022) Table 1, written as decimal millions like
# the paper and the analysis code (get_num_tokens). metaseq's launcher
# (metaseq/launcher/opt_job_constants.py) used binary millions (0.5 x 2^20 = 524288 tokens per
# step for 125m), 4.9% more tokens per step; the paper's FLOPs axis used the decimal numbers.
# 13b is 4M tokens per step (Table 1, metaseq's MODEL_SIZES and the analysis code agree; its
# last analysed step, 70000, x 4M = 280B of the ~300B training tokens). `params` is the exact
# count of the architecture (DecoderConfig.num_params); the analysis code used rounded sizes
# (125e6, 1.3e9, ...) for FLOPs, a < 3% difference.


def _opt_steps() -> dict[str, list[int]]:
  early = list(range(2000, 40000, 4000))                  # 2000, 6000, ..., 38000
  steps = {
      "125m": early + [s for s in range(40000, 580000, 20000) if s != 180000],
      "1.3b": early + list(range(40000, 280000, 20000)),
      "6.7b": early + list(range(40000, 150000, 10000)),
      "13b": list(range(2000, 72000, 4000)),
      "30b": list(range(2000, 72000, 4000)),
      "175b": [s for s in range(4000, 144000, 4000) if s not in (28000, 32000, 116000)],
  }
  return {k: sorted(v) for k, v in steps.items()}


OPT_TOKENS_PER_STEP = {"125m": 500_000, "1.3b": 1_000_000, "6.7b": 2_000_000,
                       "13b": 4_000_000, "30b": 4_000_000, "175b": 2_000_000}


def opt_suite_template(root: str = "checkpoints", sizes: list[str] | None = None
                       ) -> dict[str, Any]:
  """The OPT suite analysed by Xia et al. (2023) as a manifest dict.

  Checkpoint paths are placeholders `{root}/opt-{size}/step{step}` (relative to the manifest's
  folder unless `root` is absolute): convert each checkpoint there, or edit the paths.
  sizes: subset of 125m, 1.3b, 6.7b, 13b, 30b, 175b (default all).
  """
  all_steps = _opt_steps()
  sizes = list(sizes or all_steps)
  unknown = [s for s in sizes if s not in all_steps]
  if unknown:
    raise KeyError(f"no OPT trajectory for size(s) {unknown}; known: {list(all_steps)}")
  models = []
  for size in sizes:
    name = f"opt-{size}"
    models.append({
        "name": name,
        "params": families.preset(f"opt-{size}").num_params(),
        "tokens_per_step": OPT_TOKENS_PER_STEP[size],
        "aliases": [f"facebook/opt-{size}", f"opt_{size}", size],
        "checkpoints": {str(s): f"{root}/{name}/step{s}" for s in all_steps[size]},
    })
  return {"name": "opt",
          "description": "OPT intermediate checkpoints analysed in Xia et al. (2023); steps from "
                         "github.com/xiamengzhou/training_trajectory_analysis utils.py, batch "
                         "sizes from Zhang et al. (2022) Table 1. Complete with local paths.",
          "models": models}


def write_opt_template(path: str | os.PathLike, root: str = "checkpoints",
                       sizes: list[str] | None = None) -> str:
  """Writes `opt_suite_template(root, sizes)` as JSON to `path`; returns the path."""
  save_suite(opt_suite_template(root, sizes), path)
  return os.fspath(path)
