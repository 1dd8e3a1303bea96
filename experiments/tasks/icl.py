"""The downstream experiment's tasks, items and requests: which tasks, their k-shot prompts as
harness-style (context, continuation) requests, their token ids, and per-task rows of metrics.

Tasks (`load_tasks`):
  default         the paper's 74 tasks (bigbench.PAPER_TASKS, Table 7) found under the BIG-bench
                  folder; names the folder lacks are listed once (TaskList.missing), not an error
  ("rule",)       every task there that passes the paper's selection rule (bigbench.paper_selection;
                  73 on bigbench 1.0.0); the others are listed with the reason (TaskList.dropped)
  names           exactly those (an unknown name is an error naming the closest known ones)
plus cloze tasks made from held-out texts. A malformed task is skipped and listed with its error
(TaskList.failures).

Requests: each option of each example is one request (bigbench.requests_for): the k-shot prompt is
the context, the option the continuation. `encode` encodes them as the harness does (context and
context + continuation as strings; the continuation is what follows the context's tokens).
`task_rows` turns the flat per-option log-probs back into one row of metrics per (k, task)
(experiments.analysis.icl.task_metrics).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.analysis import icl
from experiments.tasks import bigbench as bb
from experiments.tasks import cloze
from opt_jax import files, inputs
from opt_jax.errors import InputError

RULE = "rule"   # --tasks=rule: the paper's selection rule instead of its list


def default_bigbench_dir() -> str:
  """Where tools/fetch_bigbench.py puts the tasks by default."""
  return files.user_cache_dir("bigbench", "benchmark_tasks")


@dataclasses.dataclass(frozen=True)
class Item:
  """One example's requests in one k-shot setting."""
  k: int
  task: str
  requests: bb.ExampleRequests


@dataclasses.dataclass
class TaskList:
  """tasks: what is evaluated; failures {task: error} (malformed, skipped); dropped {task:
  reason} (the selection rule, --tasks=rule); missing: names of the paper's list the folder
  lacks; notes: lines for summary.md."""
  tasks: list[bb.Task]
  failures: dict[str, str]
  dropped: dict[str, str]
  notes: list[str]
  missing: list[str] = dataclasses.field(default_factory=list)


def _check_names(names: Sequence[str], available: Sequence[str], root: str) -> None:
  unknown = [n for n in names if n not in available]
  if unknown:
    raise InputError("--tasks: " + "; ".join(
        f"no task {n!r} in {root} (closest: "
        f"{', '.join(difflib.get_close_matches(n, available, n=3, cutoff=0.5)) or 'none'})"
        for n in unknown) + f"; {len(available)} tasks there")


def load_tasks(bigbench_dir: str | None, task_names: Sequence[str] | None,
               cloze_texts: Sequence[str] = (), *, cloze_examples: int = 200, seed: int = 0
               ) -> TaskList:
  """The run's tasks (module docstring). bigbench_dir None: tools.fetch_bigbench's cache; "":
  no BIG-bench. InputError for an unknown task name (naming the closest known ones) and when
  nothing is left to evaluate; FileNotFoundError (saying how to fetch the tasks) for a missing
  folder."""
  out = TaskList([], {}, {}, [])
  explicit = bigbench_dir is not None
  root = os.path.expanduser(bigbench_dir) if explicit else default_bigbench_dir()
  names = list(task_names) if task_names else None
  by_rule = names == [RULE]
  if bigbench_dir == "":  # explicitly none: cloze tasks only, even if a fetched copy exists
    if not cloze_texts:
      raise InputError("--bigbench_dir='' disables BIG-bench, and no --cloze_text was given: "
                       "nothing to evaluate")
    out.notes.append("BIG-bench disabled (empty --bigbench_dir)")
  elif os.path.isdir(root):
    available = bb.task_names(root)
    if by_rule:
      wanted = None
    elif names is None:
      wanted = [n for n in bb.PAPER_TASKS if n in available]
      out.missing = [n for n in bb.PAPER_TASKS if n not in available]
    else:
      _check_names(names, available, root)
      wanted = names
    loaded, out.failures = bb.load_tasks(root, wanted)
    for t in loaded:
      problems = bb.selection_problems(t)
      if by_rule and not bb.paper_selection(t):
        out.dropped[t.name] = "; ".join(problems)
      elif names and not by_rule and problems and not bb.paper_selection(t):
        out.notes.append(f"task {t.name} fails the paper's selection rule ({'; '.join(problems)});"
                         f" its multiple-choice examples are evaluated because --tasks names it")
    out.tasks += [t.multiple_choice() for t in loaded if t.name not in out.dropped]
    for t in [t for t in out.tasks if not t.examples]:
      out.failures[t.name] = "no multiple-choice examples"
    out.tasks = [t for t in out.tasks if t.examples]
    if by_rule:
      how = f"the paper's selection rule; {len(out.dropped)} not selected"
    elif names is None:
      others = len(set(available) - set(bb.PAPER_TASKS))
      how = (f"the paper's list of {len(bb.PAPER_TASKS)} (Table 7): {len(out.missing)} of them "
             f"not in that folder" + (f"; {others} other task(s) there not evaluated (--tasks="
                                      f"{RULE} or --tasks=a,b)" if others else ""))
    else:
      how = "named by --tasks"
    out.notes.append(f"BIG-bench tasks from {root}: {len(out.tasks)} evaluated ({how})")
    if out.missing:
      out.notes.append(f"the paper's tasks not in {root}: {', '.join(out.missing)}")
  elif explicit or not cloze_texts:
    bb.task_names(root)  # raises FileNotFoundError saying how to fetch the tasks
  else:
    out.notes.append(f"no BIG-bench tasks: {root} does not exist (python -m tools.fetch_bigbench)")
  for path in cloze_texts:
    text = "\n".join(inputs.read_corpus(path, "cloze text").texts)
    stem = os.path.splitext(os.path.basename(path))[0]
    for t in cloze.cloze_tasks(text, n_examples=cloze_examples, seed=seed):
      name = t.name if len(cloze_texts) == 1 else f"{t.name}_{stem}"
      out.tasks.append(dataclasses.replace(t, name=name))
    out.notes.append(f"cloze tasks from {path}")
  if not out.tasks:
    raise InputError("no task to evaluate: every task failed to load, was not selected or is "
                     "missing:\n  " + "\n  ".join(
                         [f"{k}: {v}" for k, v in sorted({**out.failures, **out.dropped}.items())]
                         + ([f"not in {root}: {', '.join(out.missing)} (the default is the "
                             f"paper's list; --tasks={RULE} or --tasks=a,b select others)"]
                            if out.missing else [])))
  return out


def skip_lines(tasks: TaskList, root_hint: str = "--bigbench_dir") -> list[str]:
  """The closing summary's lines for tasks not evaluated (each failure, the rule's drops in one
  line, the paper's missing tasks in one line)."""
  lines = [f"task {name}: {why}" for name, why in sorted(tasks.failures.items())]
  if tasks.dropped:
    shown = ", ".join(sorted(tasks.dropped)[:5]) + (" ..." if len(tasks.dropped) > 5 else "")
    lines.append(f"{len(tasks.dropped)} BIG-bench task(s) not selected by the paper's rule "
                 f"({shown}; summary.md gives each reason)")
  if tasks.missing:
    shown = ", ".join(tasks.missing[:8]) + (" ..." if len(tasks.missing) > 8 else "")
    lines.append(f"{len(tasks.missing)} of the paper's {len(bb.PAPER_TASKS)} tasks not in "
                 f"{root_hint}: {shown}" + (" (summary.md lists all)"
                                            if len(tasks.missing) > 8 else ""))
  return lines


def make_items(tasks: Sequence[bb.Task], k_shots: Sequence[int], seed: int,
               max_examples: int | None) -> list[Item]:
  """Every example of every task in every k-shot setting, k first."""
  return [Item(k, t.name, r) for k in k_shots for t in tasks
          for r in bb.requests_for(t, k, seed, max_examples)]


def items_digest(items: Sequence[Item]) -> str:
  """sha256 over every request of every item (what the stored numbers depend on)."""
  h = hashlib.sha256()
  for it in items:
    h.update(json.dumps([it.k, it.task, it.requests.context, it.requests.continuations]).encode())
  return h.hexdigest()


@dataclasses.dataclass
class Encoded:
  """Token ids of every option request of `items` under one tokenizer.

  pairs: (context ids, continuation ids) per option of every kept item, items in order;
  kept[i]: whether item i fits the window (every continuation 1..max_length tokens).
  """
  pairs: list[tuple[list[int], list[int]]]
  kept: np.ndarray

  @property
  def n_tokens(self) -> np.ndarray:
    return np.array([len(c) for _, c in self.pairs], np.int64)


def encode(items: Sequence[Item], tokenizer, max_length: int) -> Encoded:
  """The harness's encoding: context and context + continuation encoded as strings (after the
  convention's prefix, e.g. OPT's </s>), the continuation is the whole encoding after the
  context's tokens; a context that encodes to nothing (no prefix: Pythia, OLMo, lm_eval) is the
  tokenizer's start token, as in Scorer.loglikelihood and HFLM."""
  contexts = sorted({it.requests.context for it in items})
  ctx_ids = dict(zip(contexts, tokenizer.encode_batch(contexts)))
  wholes = [it.requests.context + c for it in items for c in it.requests.continuations]
  whole_ids = iter(tokenizer.encode_batch(wholes))
  pairs, kept = [], []
  for it in items:
    ctx = ctx_ids[it.requests.context]
    conts = [next(whole_ids)[len(ctx):] for _ in it.requests.continuations]
    ctx = ctx or [tokenizer.start_id]
    ok = all(1 <= len(c) <= max_length for c in conts)
    kept.append(ok)
    if ok:
      pairs += [(ctx, c) for c in conts]
  return Encoded(pairs, np.array(kept, bool))


def task_rows(items: Sequence[Item], enc: Encoded, logprobs: np.ndarray
              ) -> list[dict[str, Any]]:
  """Per (k, task) metrics (icl.task_metrics) from the flat per-option log-probs of `enc`; a task
  whose every example is too long has no row (skipped_examples counts the others)."""
  groups: dict[tuple[int, str], list] = {}
  ntok = enc.n_tokens
  o = 0
  for it, ok in zip(items, enc.kept):
    g = groups.setdefault((it.k, it.task), [[], [], [], [], 0])
    if not ok:
      g[4] += 1
      continue
    n = len(it.requests.continuations)
    g[0].append(logprobs[o:o + n])
    g[1].append(ntok[o:o + n])
    g[2].append([len(c) for c in it.requests.continuations])
    g[3].append(it.requests.example.scores)
    o += n
  if o != len(logprobs):
    raise InputError(f"{len(logprobs)} option log-probs for {o} options: stale stored results?")
  return [{"k_shot": k, "task": task, **icl.task_metrics(lp, nt, nc, sc), "skipped_examples": skip}
          for (k, task), (lp, nt, nc, sc, skip) in groups.items() if lp]
