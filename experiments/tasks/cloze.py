"""Multiple-choice cloze tasks made from a held-out text, in the structure of BIG-bench tasks.

Two tasks, each a `bigbench.Task` with one subtask, so prompts, requests, scoring and analysis are
the ones BIG-bench tasks use:

  cloze_next_word  context: up to `context_words` words of running text ending just before a word
                   (the text's own spacing and line breaks kept); options: that word and
                   `n_options - 1` other words of the same text. Words are runs of letters (with
                   inner apostrophes or hyphens), so punctuation gives no cue. Distractors are
                   words of similar frequency in the text (nearest in its frequency ranking), so a
                   model that only knows word frequencies is near chance.
  cloze_next_line  context: the `context_lines` non-empty lines before a line; options: that line
                   and `n_options - 1` other lines of the text, the ones closest to it in length
                   (so length gives little cue to the summed log-prob).

Format: no task prefix, no input prefix, choices not listed; the answer follows the context after
" " (words) or "\\n" (lines), which the harness boundary moves into every option. Few-shot
examples are separated by a blank line. Everything is deterministic in (text, seed); the true
option sits at a seeded position among the options.
"""

from __future__ import annotations

import collections
import re

import numpy as np

from experiments.tasks import bigbench as bb
from opt_jax.errors import InputError

WORD_FORMAT = bb.Format(task_prefix="", example_input_prefix="", example_output_prefix=" ",
                        choice_prefix="", append_choices_to_input=False,
                        few_shot_example_separator="\n\n")
LINE_FORMAT = bb.Format(task_prefix="", example_input_prefix="", example_output_prefix="\n",
                        choice_prefix="", append_choices_to_input=False,
                        few_shot_example_separator="\n\n")
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")


def _example(context: str, answer: str, distractors: list[str], index: int,
             rng: np.random.RandomState, name: str) -> bb.Example:
  options = list(distractors)
  options.insert(int(rng.randint(len(options) + 1)), answer)
  return bb.Example(context, tuple(options), tuple(1.0 if o == answer else 0.0 for o in options),
                    "", index)


def _task(name: str, fmt: bb.Format, examples: list[bb.Example]) -> bb.Task:
  return bb.Task(name, (bb.Subtask("", fmt, tuple(examples)),))


def next_word_task(text: str, *, n_examples: int = 200, n_options: int = 4,
                   context_words: int = 40, min_context_words: int = 8, frequency_pool: int = 20,
                   seed: int = 0, name: str = "cloze_next_word") -> bb.Task:
  """The next-word task from `text` (see the module docstring).

  Answers are words at uniformly drawn positions; each one's distractors are drawn from the
  `frequency_pool` other words nearest to it in the text's frequency ranking.
  Raises ValueError when the text has fewer than n_options distinct words or no word with
  min_context_words words before it.
  """
  spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
  words = [text[a:b] for a, b in spans]
  counts = collections.Counter(words)
  ranked = sorted(counts, key=lambda w: (-counts[w], w))                 # most frequent first
  rank = {w: r for r, w in enumerate(ranked)}
  if len(ranked) < n_options:
    raise InputError(f"{name}: the text has {len(ranked)} distinct words; {n_options} options need "
                     f"at least {n_options}")
  eligible = np.arange(min_context_words, len(words))
  if eligible.size == 0:
    raise InputError(f"{name}: the text has {len(words)} words; a context needs "
                     f"{min_context_words} words before the answer")
  pool_size = min(max(frequency_pool, n_options - 1), len(ranked) - 1)
  rng = np.random.RandomState(seed)
  picks = np.sort(rng.choice(eligible, size=min(n_examples, eligible.size), replace=False))
  examples = []
  for i in picks:
    answer = words[i]
    # The pool_size + 1 ranks centred on the answer's (shifted inside the ranking at its ends).
    lo = min(max(0, rank[answer] - pool_size // 2), len(ranked) - pool_size - 1)
    pool = [w for w in ranked[lo:lo + pool_size + 1] if w != answer]
    distractors = [pool[j] for j in rng.choice(len(pool), size=n_options - 1, replace=False)]
    start = spans[max(0, i - context_words)][0]
    context = text[start:spans[i][0]].rstrip()
    examples.append(_example(context, answer, distractors, len(examples), rng, name))
  return _task(name, WORD_FORMAT, examples)


def next_line_task(text: str, *, n_examples: int = 100, n_options: int = 4, context_lines: int = 3,
                   min_line_chars: int = 12, length_pool: int = 20, seed: int = 0,
                   name: str = "cloze_next_line") -> bb.Task:
  """The next-line task from `text` (see the module docstring).

  Lines are stripped; lines shorter than min_line_chars are context but never an answer or a
  distractor. Distractors are drawn from the `length_pool` eligible lines (other than the answer's
  text) closest to the answer in length.
  """
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  candidates = sorted({ln for ln in lines if len(ln) >= min_line_chars})
  if len(candidates) < n_options:
    raise InputError(f"{name}: the text has {len(candidates)} distinct lines of at least "
                     f"{min_line_chars} characters; {n_options} options need at least {n_options}")
  eligible = np.array([i for i in range(context_lines, len(lines))
                       if len(lines[i]) >= min_line_chars])
  if eligible.size == 0:
    raise InputError(f"{name}: no line of at least {min_line_chars} characters has "
                     f"{context_lines} lines before it")
  lengths = np.array([len(c) for c in candidates])
  rng = np.random.RandomState(seed)
  picks = np.sort(rng.choice(eligible, size=min(n_examples, eligible.size), replace=False))
  examples = []
  for i in picks:
    answer = lines[i]
    # Stable sort: ties in length keep the sorted-text order, so the pool is deterministic.
    near = [candidates[j] for j in np.argsort(np.abs(lengths - len(answer)), kind="stable")
            if candidates[j] != answer][:max(length_pool, n_options - 1)]
    distractors = [near[j] for j in rng.choice(len(near), size=n_options - 1, replace=False)]
    context = "\n".join(lines[i - context_lines:i])
    examples.append(_example(context, answer, distractors, len(examples), rng, name))
  return _task(name, LINE_FORMAT, examples)


def cloze_tasks(text: str, *, n_examples: int = 200, n_options: int = 4, seed: int = 0
                ) -> list[bb.Task]:
  """Both cloze tasks from one held-out text."""
  return [next_word_task(text, n_examples=n_examples, n_options=n_options, seed=seed),
          next_line_task(text, n_examples=n_examples, n_options=n_options, seed=seed)]
