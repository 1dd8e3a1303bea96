"""Corpus-derived cloze tasks: true continuation among distractors of the same text, by seed."""

import collections
import re

import numpy as np
import pytest

from experiments.tasks import bigbench as bb
from experiments.tasks import cloze


def _text(n_lines=400, seed=0):
  """Verse-like text: lines of 4-12 words from a Zipf-ish vocabulary, some short speaker lines."""
  rng = np.random.RandomState(seed)
  syllables = [c + v for c in "bdfgklmnprstv" for v in "aeiou"]
  made = {"".join(rng.choice(syllables, size=rng.randint(1, 4))) for _ in range(400)}
  vocab = sorted(made - {"the", "and"})[:300] + ["the", "and", "of", "to", "a", "in", "that", "is",
                                                  "Hamlet's", "well-met", "o'er"]
  p = 1.0 / np.arange(1, len(vocab) + 1)
  p /= p.sum()
  lines = []
  for i in range(n_lines):
    if i % 9 == 0:
      lines.append("HORATIO.")
      continue
    words = rng.choice(vocab, size=rng.randint(4, 13), p=p)
    lines.append(" ".join(words).capitalize() + rng.choice([",", ".", ";", "!"]))
    if i % 17 == 0:
      lines.append("")
  return "\n".join(lines)


TEXT = _text()
WORDS = re.findall(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*", TEXT)


def test_next_word_examples_hold_the_true_word_and_words_of_the_text():
  task = cloze.next_word_task(TEXT, n_examples=150, n_options=4, context_words=20, seed=3)
  assert task.name == "cloze_next_word" and len(task.examples) == 150
  assert bb.selection_problems(task) == []  # one correct option per example, multiple choice
  flat = re.sub(r"\s+", " ", TEXT)
  for ex in task.examples:
    answer = ex.options[ex.correct]
    assert len(ex.options) == 4 and len(set(ex.options)) == 4
    assert set(ex.options) <= set(WORDS)
    assert (re.sub(r"\s+", " ", ex.input) + " " + answer) in flat or \
        re.search(re.escape(re.sub(r"\s+", " ", ex.input)) + r"\W*" + re.escape(answer), flat)
    assert 8 <= len(re.findall(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*", ex.input)) <= 20
  positions = [ex.correct for ex in task.examples]
  assert len(set(positions)) == 4  # the true word is not always in the same place


def test_next_word_distractors_match_word_frequencies():
  # Distractors have frequencies near the answer's, so always choosing the most frequent option
  # is near chance (0.25). (Drawing distractors by occurrence, distinct from the answer, favours
  # the answer: a frequent answer excludes itself from the draws.)
  task = cloze.next_word_task(TEXT, n_examples=400, n_options=4, seed=0)
  freq = collections.Counter(WORDS)
  hits = [ex.is_correct(int(np.argmax([freq[o] for o in ex.options]))) for ex in task.examples]
  assert 0.15 < np.mean(hits) < 0.40


def test_next_line_examples_and_length_matched_distractors():
  task = cloze.next_line_task(TEXT, n_examples=80, n_options=4, context_lines=3, seed=1)
  assert bb.selection_problems(task) == []
  lines = [ln.strip() for ln in TEXT.splitlines() if ln.strip()]
  joined = "\n".join(lines)
  lengths = sorted(len(ln) for ln in set(lines) if len(ln) >= 12)
  spread = []
  for ex in task.examples:
    answer = ex.options[ex.correct]
    assert (ex.input + "\n" + answer) in joined
    assert ex.input.count("\n") == 2
    assert all(o in lines and len(o) >= 12 for o in ex.options)
    assert "HORATIO." not in ex.options
    spread.append(max(abs(len(o) - len(answer)) for o in ex.options))
  # Distractors come from the 20 lines nearest in length: far closer than random lines would be.
  assert np.median(spread) < 0.25 * (lengths[-1] - lengths[0])


def test_deterministic_by_seed_and_requests_use_the_harness_boundary():
  a = cloze.cloze_tasks(TEXT, n_examples=30, seed=7)
  b = cloze.cloze_tasks(TEXT, n_examples=30, seed=7)
  c = cloze.cloze_tasks(TEXT, n_examples=30, seed=8)
  assert [t.examples for t in a] == [t.examples for t in b]
  assert [t.examples for t in a] != [t.examples for t in c]
  word, line = a
  r = bb.requests_for(word, k=0)[0]
  assert r.context == r.example.input
  assert r.continuations == tuple(" " + o for o in r.example.options)
  r = bb.requests_for(line, k=2)[0]
  assert r.continuations == tuple("\n" + o for o in r.example.options)
  shots = bb.shots_for(line.subtasks[0], r.example, 2)
  assert r.context == "\n\n".join([s.input + "\n" + s.options[s.correct] for s in shots]
                                  + [r.example.input])


def test_too_little_text_is_a_clear_error():
  with pytest.raises(ValueError, match="distinct words"):
    cloze.next_word_task("one two three", n_options=4)
  with pytest.raises(ValueError, match="distinct lines"):
    cloze.next_line_task("a short line\nanother one here\n", n_options=4)
