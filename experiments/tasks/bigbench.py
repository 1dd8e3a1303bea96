"""BIG-bench JSON tasks: loading, the paper's selection rule, k-shot prompts, likelihood requests.

A task is a folder holding `task.json`. When that file has no `examples`, each immediate
subfolder with its own `task.json` is a subtask, read on its own (its own prefixes), as BIG-bench
does. Formatting fields and the defaults BIG-bench's `json_task.py` applies when one is absent:

  task_prefix                 ""               once, before everything
  example_input_prefix        "\\nQ: "          before each example's input
  example_output_prefix       "\\nA: "          after the input (and the appended choices)
  choice_prefix               "\\n  choice: "   before each option when choices are appended
  append_choices_to_input     true             list the options after the input
  few_shot_example_separator  "\\n"             between the shots and before the query

One example, as text (`example_text`):
  example_input_prefix + input [+ choice_prefix + option, for each option] + example_output_prefix
Appended options are listed in a seeded permutation of the sorted option strings, as BIG-bench
does (so the correct one is not always first); the permutation depends on (seed, subtask, example
index) only, so it does not change with which other examples are evaluated.

A k-shot prompt (`prompt`):
  task_prefix + sep.join(example_text(s) + answer(s) for the k shots) + sep + example_text(query)
(k = 0: task_prefix + example_text(query)). Shots come from the query's own subtask, never the
query itself, drawn without replacement by a generator seeded by (seed, subtask, query index);
answer(s) is the shot's highest-scored option. A subtask with fewer than k + 1 examples uses all
the others. `prompt`'s k defaults to 0; the `downstream_icl` binary uses the paper's k = 2.

Requests (`requests_for`) follow lm-evaluation-harness's context/continuation boundary: the
prompt's trailing whitespace moves to the front of every option, so "...\\nA: " + "Paris" is
scored as context "...\\nA:" and continuation " Paris" (BPE tokens carry their leading space).
The option text itself is the continuation; the choice_prefix only appears in the listed choices.

The paper's selection rule (`paper_selection`): every example multiple choice (`target_scores`),
fewer than 1000 examples with subtasks pooled, exactly one option scored 1 in every example; plus
`periodic_elements`, added by hand, of which only the multiple-choice examples are scored.

Deviation, on purpose: a boolean field given as the string "true"/"false" (identify_odd_metaphor
writes "false") is read as the boolean it spells; BIG-bench's Python truthiness would read "false"
as true.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable

import numpy as np

from opt_jax.errors import InputError, MissingFileError

TASK_FILE = "task.json"

DEFAULT_FORMAT = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
    "few_shot_example_separator": "\n",
}
# Tasks the paper adds by hand to those the rule selects.
PAPER_EXTRA_TASKS = ("periodic_elements",)
MAX_EXAMPLES = 1000  # the rule keeps tasks with fewer than this many examples

# The 74 tasks of the paper's Table 7 (Xia et al. 2023, appendix D.1). On the bigbench 1.0.0 task
# files the selection rule gives the other 73: sports_understanding has exactly 1000 examples
# there (its generator writes 1000), one too many for "fewer than 1000"; the paper's counts came
# from a de-duplicated copy.
PAPER_TASKS = (
    'anachronisms', 'analogical_similarity', 'analytic_entailment', 'authorship_verification',
    'causal_judgment', 'cause_and_effect', 'code_line_description', 'common_morpheme',
    'conceptual_combinations', 'crash_blossom', 'crass_ai', 'cryobiology_spanish',
    'dark_humor_detection', 'date_understanding', 'disambiguation_qa',
    'discourse_marker_prediction', 'emoji_movie', 'empirical_judgments',
    'english_russian_proverbs', 'entailed_polarity', 'entailed_polarity_hindi',
    'evaluating_information_essentiality', 'fantasy_reasoning', 'figure_of_speech_detection',
    'hhh_alignment', 'hinglish_toxicity', 'human_organs_senses', 'identify_math_theorems',
    'identify_odd_metaphor', 'implicatures', 'implicit_relations', 'intent_recognition',
    'international_phonetic_alphabet_nli', 'irony_identification', 'kannada', 'key_value_maps',
    'known_unknowns', 'logical_args', 'logical_sequence', 'mathematical_induction',
    'metaphor_boolean', 'metaphor_understanding', 'misconceptions', 'misconceptions_russian',
    'moral_permissibility', 'movie_recommendation', 'nonsense_words_grammar', 'odd_one_out',
    'penguins_in_a_table', 'periodic_elements', 'persian_idioms', 'phrase_relatedness',
    'physical_intuition', 'physics', 'presuppositions_as_nli', 'riddle_sense', 'ruin_names',
    'salient_translation_error_detection', 'sentence_ambiguity', 'similarities_abstraction',
    'simple_arithmetic_json_multiple_choice', 'simple_ethical_questions', 'snarks',
    'social_support', 'sports_understanding', 'strange_stories', 'suicide_risk',
    'swahili_english_proverbs', 'symbol_interpretation', 'understanding_fables',
    'undo_permutation', 'unit_interpretation', 'what_is_the_tao', 'which_wiki_edit',
)
# The paper's task groups (Table 9; the authors' analysis_section3.ipynb, fewshot_Ltasks and
# fewshot_Btasks): accuracy improving steadily with perplexity, and in a jump.
LINEARITY_TASKS = (
    "date_understanding", "hhh_alignment", "fantasy_reasoning", "implicit_relations",
    "intent_recognition", "figure_of_speech_detection", "similarities_abstraction",
    "simple_ethical_questions", "strange_stories", "undo_permutation", "misconceptions",
    "nonsense_words_grammar")
BREAKTHROUGHNESS_TASKS = (
    "code_line_description", "human_organs_senses", "implicatures", "phrase_relatedness",
    "what_is_the_tao", "swahili_english_proverbs")
TASK_GROUPS = {"linearity": LINEARITY_TASKS, "breakthroughness": BREAKTHROUGHNESS_TASKS}


class TaskFormatError(InputError):
  """A task.json that is not a readable BIG-bench JSON task; the message names task and example."""


@dataclasses.dataclass(frozen=True)
class Format:
  """How a (sub)task turns examples into text; field meanings in the module docstring."""
  task_prefix: str = DEFAULT_FORMAT["task_prefix"]
  example_input_prefix: str = DEFAULT_FORMAT["example_input_prefix"]
  example_output_prefix: str = DEFAULT_FORMAT["example_output_prefix"]
  choice_prefix: str = DEFAULT_FORMAT["choice_prefix"]
  append_choices_to_input: bool = DEFAULT_FORMAT["append_choices_to_input"]
  few_shot_example_separator: str = DEFAULT_FORMAT["few_shot_example_separator"]


@dataclasses.dataclass(frozen=True)
class Example:
  """One example. `options`/`scores` are empty for a generative (non multiple-choice) example.

  index: position in its task.json's `examples` list (for error messages and seeding).
  """
  input: str
  options: tuple[str, ...]
  scores: tuple[float, ...]
  subtask: str
  index: int

  @property
  def is_multiple_choice(self) -> bool:
    return bool(self.options)

  @property
  def correct(self) -> int:
    """Index of the first highest-scored option."""
    return int(np.argmax(self.scores))

  def is_correct(self, chosen: int) -> bool:
    """Whether option `chosen` has the highest score (ties: any top option counts)."""
    return self.scores[chosen] == max(self.scores)


@dataclasses.dataclass(frozen=True)
class Subtask:
  name: str  # "" for a task without subtasks
  format: Format
  examples: tuple[Example, ...]
  path: str = ""


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  subtasks: tuple[Subtask, ...]
  path: str = ""

  @property
  def examples(self) -> tuple[Example, ...]:
    return tuple(e for s in self.subtasks for e in s.examples)

  def subtask(self, name: str) -> Subtask:
    for s in self.subtasks:
      if s.name == name:
        return s
    raise KeyError(f"task {self.name!r} has no subtask {name!r}")

  def multiple_choice(self) -> Task:
    """The same task with only its multiple-choice examples (subtasks left empty are dropped)."""
    subs = []
    for s in self.subtasks:
      ex = tuple(e for e in s.examples if e.is_multiple_choice)
      if ex:
        subs.append(dataclasses.replace(s, examples=ex))
    return dataclasses.replace(self, subtasks=tuple(subs))

  def head(self, max_examples: int | None) -> Task:
    """At most `max_examples` examples, taken round-robin over the subtasks in file order (so
    every subtask is represented); None: all."""
    if max_examples is None or len(self.examples) <= max_examples:
      return self
    order = sorted((pos, si) for si, s in enumerate(self.subtasks)
                   for pos in range(len(s.examples)))
    keep = {}
    for pos, si in order[:max_examples]:
      keep[si] = pos + 1
    subs = tuple(dataclasses.replace(s, examples=s.examples[:keep[si]])
                 for si, s in enumerate(self.subtasks) if si in keep)
    return dataclasses.replace(self, subtasks=subs)


# ---------------------------------------------------------------------------------------------
# Reading task.json files.


def _where(task: str, path: str, index: int | None = None) -> str:
  at = f"BIG-bench task {task!r} ({path})"
  return at if index is None else f"{at}, example {index}"


def _read_bool(value, task: str, path: str, key: str) -> bool:
  if isinstance(value, bool):
    return value
  if isinstance(value, str) and value.strip().lower() in ("true", "false"):
    return value.strip().lower() == "true"
  raise TaskFormatError(f"{_where(task, path)}: {key!r} must be true or false, got {value!r}")


def _read_format(data: dict, task: str, path: str) -> Format:
  kwargs = {}
  for key, default in DEFAULT_FORMAT.items():
    if key not in data:
      continue
    value = data[key]
    if isinstance(default, bool):
      kwargs[key] = _read_bool(value, task, path, key)
    elif not isinstance(value, str):
      raise TaskFormatError(f"{_where(task, path)}: {key!r} must be a string, got {value!r}")
    else:
      kwargs[key] = value
  return Format(**kwargs)


def _read_example(raw, task: str, subtask: str, path: str, index: int) -> Example:
  where = _where(task, path, index)
  if not isinstance(raw, dict):
    raise TaskFormatError(f"{where}: expected an object with 'input', got {type(raw).__name__}")
  text = raw.get("input")
  if not isinstance(text, str):
    raise TaskFormatError(f"{where}: 'input' must be a string, got {text!r}")
  if "target_scores" not in raw:
    if "target" not in raw:
      raise TaskFormatError(f"{where}: has neither 'target_scores' nor 'target'")
    return Example(text, (), (), subtask, index)
  ts = raw["target_scores"]
  if not isinstance(ts, dict) or not ts:
    raise TaskFormatError(f"{where}: 'target_scores' must be a non-empty object mapping each "
                          f"option to a number, got {ts!r}")
  bad = {k: v for k, v in ts.items()
         if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
  if bad:
    raise TaskFormatError(f"{where}: 'target_scores' values must be finite numbers, got {bad!r}")
  return Example(text, tuple(ts.keys()), tuple(float(v) for v in ts.values()), subtask, index)


def _read_json(path: str, task: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise TaskFormatError(f"{_where(task, path)}: not valid JSON ({e})") from e
  if not isinstance(data, dict):
    raise TaskFormatError(f"{_where(task, path)}: the top level must be an object")
  return data


def _read_subtask(path: str, task: str, subtask: str) -> Subtask:
  data = _read_json(path, task)
  raw = data.get("examples")
  if not isinstance(raw, list):
    raise TaskFormatError(f"{_where(task, path)}: 'examples' must be a list, got {raw!r}")
  examples = tuple(_read_example(r, task, subtask, path, i) for i, r in enumerate(raw))
  return Subtask(subtask, _read_format(data, task, path), examples, path)


def load_task(directory: str | os.PathLike, name: str | None = None) -> Task:
  """The task in `directory` (all examples, generative ones included).

  Raises FileNotFoundError when there is no task.json, TaskFormatError (naming task, file and
  example index) when a file is malformed.
  """
  directory = os.fspath(directory)
  name = name or os.path.basename(os.path.normpath(directory))
  top = os.path.join(directory, TASK_FILE)
  if not os.path.isfile(top):
    raise MissingFileError(f"BIG-bench task {name!r}: no {TASK_FILE} in {directory}")
  data = _read_json(top, name)
  if "examples" in data:
    return Task(name, (_read_subtask(top, name, ""),), directory)
  subs = []
  for entry in sorted(os.listdir(directory)):
    path = os.path.join(directory, entry, TASK_FILE)
    if os.path.isfile(path):
      subs.append(_read_subtask(path, name, entry))
  if not subs:
    raise TaskFormatError(f"{_where(name, top)}: no 'examples' and no subtask folders with a "
                          f"{TASK_FILE}")
  return Task(name, tuple(subs), directory)


def task_names(root: str | os.PathLike) -> list[str]:
  """Sorted names of the folders under `root` that hold a task.json."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise MissingFileError(
        f"BIG-bench tasks folder {root!r} does not exist. Get the tasks with "
        f"`python -m tools.fetch_bigbench --out=DIR` (the bigbench==1.0.0 source distribution "
        f"through pip) or `python -m tools.fetch_bigbench --out=DIR --from=PATH` (a BIG-bench "
        f"checkout or a downloaded archive of the repository), and pass "
        f"--bigbench_dir=DIR/benchmark_tasks.")
  return sorted(e for e in os.listdir(root) if os.path.isfile(os.path.join(root, e, TASK_FILE)))


def load_tasks(root: str | os.PathLike, names: Iterable[str] | None = None
               ) -> tuple[list[Task], dict[str, str]]:
  """Every task under `root` (or the named ones): (tasks loaded, {name: error} for the failures).

  A malformed task does not stop the others; its error message goes into the failures.
  """
  root = os.fspath(root)
  available = task_names(root)
  names = available if names is None else list(names)
  tasks, failures = [], {}
  for n in names:
    try:
      tasks.append(load_task(os.path.join(root, n), n))
    except (TaskFormatError, FileNotFoundError, OSError, UnicodeDecodeError) as e:
      failures[n] = str(e)
  return tasks, failures


# ---------------------------------------------------------------------------------------------
# The paper's selection rule.


def selection_problems(task: Task) -> list[str]:
  """Why `task` fails the rule (every example multiple choice, < 1000 examples pooled, exactly one
  option scored 1 per example); empty when it passes."""
  ex = task.examples
  problems = []
  generative = [e for e in ex if not e.is_multiple_choice]
  if generative:
    e = generative[0]
    problems.append(f"{len(generative)} of {len(ex)} examples are not multiple choice "
                    f"(first: subtask {e.subtask!r} example {e.index})")
  if len(ex) >= MAX_EXAMPLES:
    problems.append(f"{len(ex)} examples (the rule needs fewer than {MAX_EXAMPLES})")
  not_one = [e for e in ex if e.is_multiple_choice and sum(s == 1 for s in e.scores) != 1]
  if not_one:
    e = not_one[0]
    problems.append(f"{len(not_one)} examples do not have exactly one option scored 1 "
                    f"(first: subtask {e.subtask!r} example {e.index})")
  return problems


def paper_selection(task: Task) -> bool:
  """Whether the paper evaluates `task`: it passes the rule, or is one of PAPER_EXTRA_TASKS."""
  return task.name in PAPER_EXTRA_TASKS or not selection_problems(task)


def select_tasks(tasks: Iterable[Task]) -> list[Task]:
  """The paper's tasks among `tasks`, reduced to their multiple-choice examples."""
  return [t.multiple_choice() for t in tasks if paper_selection(t)]


# ---------------------------------------------------------------------------------------------
# Prompts and requests.


def _rng(seed: int, *key) -> np.random.RandomState:
  """A generator that depends only on seed and key (not on Python's hash salt)."""
  digest = hashlib.sha256(repr((seed,) + key).encode()).digest()
  return np.random.RandomState(int.from_bytes(digest[:4], "little"))


def listed_options(example: Example, seed: int = 0) -> list[str]:
  """The options in the order they are appended to the input: a seeded permutation of the sorted
  option strings (BIG-bench's convention)."""
  opts = sorted(example.options)
  perm = _rng(seed, "choices", example.subtask, example.index).permutation(len(opts))
  return [opts[i] for i in perm]


def example_text(example: Example, fmt: Format, seed: int = 0) -> str:
  """input prefix + input [+ listed choices] + output prefix (no answer)."""
  text = fmt.example_input_prefix + example.input
  if fmt.append_choices_to_input and example.is_multiple_choice:
    text += "".join(fmt.choice_prefix + o for o in listed_options(example, seed))
  return text + fmt.example_output_prefix


def shots_for(subtask: Subtask, query: Example, k: int, seed: int = 0) -> list[Example]:
  """k examples of `subtask` other than `query`, drawn without replacement, deterministic in
  (seed, subtask, query index)."""
  if k <= 0:
    return []
  pool = [e for e in subtask.examples if e.index != query.index]
  k = min(k, len(pool))
  picked = _rng(seed, "shots", query.subtask, query.index).choice(len(pool), size=k, replace=False)
  return [pool[i] for i in picked]


def prompt(subtask: Subtask, query: Example, k: int = 0, seed: int = 0) -> str:
  """The k-shot prompt for `query` (text before the answer); see the module docstring."""
  fmt = subtask.format
  parts = [example_text(s, fmt, seed) + s.options[s.correct]
           for s in shots_for(subtask, query, k, seed)]
  parts.append(example_text(query, fmt, seed))
  return fmt.task_prefix + fmt.few_shot_example_separator.join(parts)


def split_boundary(context: str, continuation: str) -> tuple[str, str]:
  """lm-evaluation-harness's boundary: trailing whitespace of the context moves to the front of
  the continuation."""
  stripped = context.rstrip()
  return stripped, context[len(stripped):] + continuation


@dataclasses.dataclass(frozen=True)
class ExampleRequests:
  """The requests of one example: one (context, continuation) per option, same context for all."""
  task: str
  example: Example
  context: str
  continuations: tuple[str, ...]


def requests_for(task: Task, k: int = 0, seed: int = 0,
                 max_examples: int | None = None) -> list[ExampleRequests]:
  """Requests of every multiple-choice example of `task` (the first `max_examples`)."""
  out = []
  for sub in task.multiple_choice().head(max_examples).subtasks:
    for ex in sub.examples:
      text = prompt(sub, ex, k, seed)
      pairs = [split_boundary(text, o) for o in ex.options]
      out.append(ExampleRequests(task.name, ex, pairs[0][0], tuple(c for _, c in pairs)))
  return out
