"""BIG-bench loader, the paper's selection rule, prompts and requests, the fetcher offline."""

import io
import json
import os
import sys
import subprocess
import tarfile
import zipfile

import pytest

from experiments.tasks import bigbench as bb
from tools import fetch_bigbench

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bigbench")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED),
                                  reason="../shared/data/bigbench absent")


@pytest.fixture(scope="module")
def shared_tasks():
  tasks, failures = bb.load_tasks(SHARED)
  assert failures == {}
  return {t.name: t for t in tasks}


def _write_task(root, name, data, sub=None):
  d = os.path.join(root, name, sub) if sub else os.path.join(root, name)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "task.json"), "w") as f:
    json.dump(data, f)


def _mc(i, n_opts=2, correct=0, score=1):
  return {"input": f"question {i}?",
          "target_scores": {f"opt{i}_{j}": (score if j == correct else 0) for j in range(n_opts)}}


# --- the selection rule --------------------------------------------------------------------------

@needs_shared
def test_rule_selects_every_shared_task_and_periodic_elements_only_by_hand(shared_tasks):
  assert len(shared_tasks) == 73
  assert sorted(t.name for t in bb.select_tasks(shared_tasks.values())) == sorted(shared_tasks)
  rejected = [n for n, t in shared_tasks.items() if bb.selection_problems(t)]
  assert rejected == ["periodic_elements"]  # its subtask_1 is generative
  pe = [t for t in bb.select_tasks(shared_tasks.values()) if t.name == "periodic_elements"][0]
  assert [(s.name, len(s.examples)) for s in pe.subtasks] == [("subtask_0", 118)]
  # Subtasks are pooled: metaphor_understanding is two folders of 117 examples each.
  assert len(shared_tasks["metaphor_understanding"].examples) == 234
  # The paper's Table 7 is the rule's 73 on these bigbench 1.0.0 files plus sports_understanding.
  assert sorted(set(bb.PAPER_TASKS) - set(shared_tasks)) == ["sports_understanding"]
  assert set(shared_tasks) <= set(bb.PAPER_TASKS)


def test_rule_rejects_each_violation(tmp_path):
  root = str(tmp_path)
  _write_task(root, "ok", {"examples": [_mc(i) for i in range(5)]})
  _write_task(root, "half_credit_ok", {"examples": [
      {"input": "q", "target_scores": {"a": 1, "b": 0.5, "c": 0}}]})
  _write_task(root, "generative", {"examples": [_mc(0), {"input": "q", "target": "x"}]})
  _write_task(root, "two_correct", {"examples": [_mc(0), {"input": "q",
                                                           "target_scores": {"a": 1, "b": 1}}]})
  _write_task(root, "none_correct", {"examples": [_mc(0, score=0.7)]})
  # 999 examples pooled over two subtasks pass; 1000 do not.
  _write_task(root, "pooled_999", {"name": "x"})
  _write_task(root, "pooled_999", {"examples": [_mc(i) for i in range(500)]}, sub="s1")
  _write_task(root, "pooled_999", {"examples": [_mc(i) for i in range(499)]}, sub="s2")
  _write_task(root, "pooled_1000", {"name": "x"})
  _write_task(root, "pooled_1000", {"examples": [_mc(i) for i in range(500)]}, sub="s1")
  _write_task(root, "pooled_1000", {"examples": [_mc(i) for i in range(500)]}, sub="s2")
  tasks, failures = bb.load_tasks(root)
  assert failures == {}
  selected = sorted(t.name for t in bb.select_tasks(tasks))
  assert selected == ["half_credit_ok", "ok", "pooled_999"]
  problems = {t.name: " ".join(bb.selection_problems(t)) for t in tasks}
  assert "not multiple choice" in problems["generative"]
  assert "exactly one option scored 1" in problems["two_correct"]
  assert "exactly one option scored 1" in problems["none_correct"]
  assert "1000 examples" in problems["pooled_1000"]


# --- loading and malformed tasks -----------------------------------------------------------------

def test_defaults_apply_when_fields_are_absent(tmp_path):
  _write_task(str(tmp_path), "t", {"examples": [_mc(0)]})
  assert bb.load_task(tmp_path / "t").subtasks[0].format == bb.Format(
      task_prefix="", example_input_prefix="\nQ: ", example_output_prefix="\nA: ",
      choice_prefix="\n  choice: ", append_choices_to_input=True, few_shot_example_separator="\n")


def test_malformed_task_names_task_and_example_and_others_still_load(tmp_path):
  root = str(tmp_path)
  _write_task(root, "good", {"examples": [_mc(0)]})
  _write_task(root, "bad_scores", {"examples": [_mc(0), _mc(1), _mc(2),
                                                {"input": "q", "target_scores": ["a", "b"]}]})
  _write_task(root, "bad_input", {"examples": [_mc(0), {"target_scores": {"a": 1}}]})
  _write_task(root, "bad_value", {"examples": [{"input": "q", "target_scores": {"a": "1"}}]})
  os.makedirs(os.path.join(root, "bad_json"))
  with open(os.path.join(root, "bad_json", "task.json"), "w") as f:
    f.write("{not json")
  tasks, failures = bb.load_tasks(root)
  assert [t.name for t in tasks] == ["good"]
  assert sorted(failures) == ["bad_input", "bad_json", "bad_scores", "bad_value"]
  assert "'bad_scores'" in failures["bad_scores"] and "example 3" in failures["bad_scores"]
  assert os.path.join("bad_scores", "task.json") in failures["bad_scores"]
  assert "example 1" in failures["bad_input"] and "'input'" in failures["bad_input"]
  assert "example 0" in failures["bad_value"]
  assert "not valid JSON" in failures["bad_json"]
  with pytest.raises(bb.TaskFormatError, match="example 3"):
    bb.load_task(os.path.join(root, "bad_scores"))


def test_missing_tasks_folder_says_how_to_fetch(tmp_path):
  with pytest.raises(FileNotFoundError, match="fetch_bigbench"):
    bb.load_tasks(str(tmp_path / "nowhere"))


@needs_shared
def test_string_false_is_read_as_false(shared_tasks):
  # identify_odd_metaphor writes "append_choices_to_input": "false".
  t = shared_tasks["identify_odd_metaphor"]
  assert t.subtasks[0].format.append_choices_to_input is False
  ex = t.examples[0]
  assert bb.prompt(t.subtasks[0], ex) == "\nQ: " + ex.input + "\nA: "


# --- prompts and requests ------------------------------------------------------------------------

@needs_shared
def test_zero_shot_prompt_is_the_task_fields_concatenated(shared_tasks):
  with open(os.path.join(SHARED, "anachronisms", "task.json")) as f:
    raw = json.load(f)
  t = shared_tasks["anachronisms"]
  ex = t.examples[5]
  expected = (raw["example_input_prefix"] + raw["examples"][5]["input"]
              + raw["example_output_prefix"])
  assert bb.prompt(t.subtasks[0], ex, k=0) == expected  # no task_prefix; choices not appended
  r = bb.requests_for(t, k=0, max_examples=6)[5]
  assert r.example == ex
  # Harness boundary: the trailing "\n" of the output prefix moves into every continuation.
  assert r.context == expected.rstrip()
  assert r.continuations == tuple("\n" + o for o in raw["examples"][5]["target_scores"])
  for c, o in zip(r.continuations, ex.options):
    assert r.context + c == expected + o


@needs_shared
def test_appended_choices_are_a_seeded_permutation_of_all_options(shared_tasks):
  t = shared_tasks["emoji_movie"]  # append_choices_to_input: true, default choice prefix
  sub = t.subtasks[0]
  firsts = set()
  for ex in t.examples[:30]:
    text = bb.prompt(sub, ex, k=0, seed=1)
    listed = bb.listed_options(ex, seed=1)
    assert sorted(listed) == sorted(ex.options)
    assert text == "\nQ: " + ex.input + "".join("\n  choice: " + o for o in listed) + "\nA: "
    assert bb.prompt(sub, ex, k=0, seed=1) == text  # deterministic
    firsts.add(listed[0] == ex.options[ex.correct])
  assert firsts == {True, False}  # the correct option is not always listed first


@needs_shared
def test_few_shot_draws_other_examples_of_the_same_subtask_by_seed(shared_tasks):
  t = shared_tasks["hhh_alignment"]
  sub = t.subtask("honest")
  sep = "\n-----\n"
  assert sub.format.few_shot_example_separator == sep
  for ex in sub.examples[:20]:
    shots = bb.shots_for(sub, ex, 3, seed=0)
    assert len(shots) == 3 and len({s.index for s in shots}) == 3
    assert all(s.subtask == "honest" and s.index != ex.index for s in shots)
    assert shots == bb.shots_for(sub, ex, 3, seed=0)
    text = bb.prompt(sub, ex, k=3, seed=0)
    parts = [bb.example_text(s, sub.format) + s.options[s.correct] for s in shots]
    assert text == sep.join(parts + [bb.example_text(ex, sub.format)])
  ex = sub.examples[0]
  draws = {tuple(s.index for s in bb.shots_for(sub, ex, 3, seed=s)) for s in range(5)}
  assert len(draws) > 1
  # A subtask smaller than k + 1 uses every other example.
  small = bb.Subtask("s", bb.Format(), sub.examples[:3])
  assert sorted(s.index for s in bb.shots_for(small, small.examples[0], 5)) == [
      e.index for e in small.examples[1:]]


@needs_shared
def test_task_prefix_comes_once_before_the_shots(shared_tasks):
  t = shared_tasks["analytic_entailment"]
  sub = t.subtasks[0]
  ex = sub.examples[0]
  text = bb.prompt(sub, ex, k=2, seed=3)
  assert text.startswith(sub.format.task_prefix + sub.format.example_input_prefix)
  assert text.count(sub.format.task_prefix) == 1
  assert text.endswith(bb.example_text(ex, sub.format))


def test_max_examples_takes_every_subtask_round_robin(tmp_path):
  root = str(tmp_path)
  _write_task(root, "t", {"name": "t"})
  for s, n in (("a", 5), ("b", 1), ("c", 5)):
    _write_task(root, "t", {"examples": [_mc(i) for i in range(n)]}, sub=s)
  t = bb.load_task(os.path.join(root, "t"))
  assert [(s.name, len(s.examples)) for s in t.head(5).subtasks] == [("a", 2), ("b", 1), ("c", 2)]
  assert len(bb.requests_for(t, max_examples=4)) == 4
  assert t.head(None) is t


def test_boundary_moves_every_trailing_whitespace():
  assert bb.split_boundary("Q: x\nA: ", "Paris") == ("Q: x\nA:", " Paris")
  assert bb.split_boundary("Q: x\n", "yes") == ("Q: x", "\nyes")
  assert bb.split_boundary("Q: x:", "yes") == ("Q: x:", "yes")


# --- the fetcher, offline ------------------------------------------------------------------------

def _sdist(path, extra_members=()):
  files = {
      "bigbench-1.0.0/bigbench/benchmark_tasks/a/task.json": b'{"examples": []}',
      "bigbench-1.0.0/bigbench/benchmark_tasks/a/README.md": b"readme",
      "bigbench-1.0.0/bigbench/benchmark_tasks/b/sub1/task.json": b'{"examples": [1]}',
      "bigbench-1.0.0/bigbench/api/json_task.py": b"code",
      "bigbench-1.0.0/setup.py": b"setup",
  }
  files.update(dict(extra_members))
  with tarfile.open(path, "w:gz") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _listing(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_extract_keeps_only_task_json_and_refuses_escaping_paths(tmp_path):
  sdist = str(tmp_path / "bigbench-1.0.0.tar.gz")
  _sdist(sdist, {"bigbench-1.0.0/bigbench/benchmark_tasks/../../evil/task.json": b"x"})
  out = str(tmp_path / "cache")
  assert fetch_bigbench.extract_tasks(sdist, out, version="1.0.0", progress=False) == 2
  tasks = os.path.join(out, "benchmark_tasks")
  assert _listing(tasks) == ["FETCHED.json", os.path.join("a", "task.json"),
                             os.path.join("b", "sub1", "task.json")]
  assert _listing(out) == [os.path.join("benchmark_tasks", p) for p in _listing(tasks)]
  with open(os.path.join(tasks, "b", "sub1", "task.json"), "rb") as f:
    assert f.read() == b'{"examples": [1]}'


def test_extract_without_tasks_fails_and_leaves_nothing(tmp_path):
  sdist = str(tmp_path / "other.tar.gz")
  with tarfile.open(sdist, "w:gz") as tar:
    info = tarfile.TarInfo("pkg/setup.py")
    tar.addfile(info, io.BytesIO(b""))
  out = str(tmp_path / "cache")
  with pytest.raises(ValueError, match="no bigbench/benchmark_tasks"):
    fetch_bigbench.extract_tasks(sdist, out, progress=False)
  assert os.listdir(out) == []


def test_fetch_downloads_once_then_is_idempotent(tmp_path):
  sdist = str(tmp_path / "src.tar.gz")
  _sdist(sdist)
  calls = tmp_path / "calls.txt"
  fake_pip = tmp_path / "fake_pip.py"
  # Stands in for `pip download ... -d DIR`: copies the archive into DIR under pip's file name.
  fake_pip.write_text(
      "import shutil, sys\n"
      f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
      "d = sys.argv[sys.argv.index('-d') + 1]\n"
      f"shutil.copy({sdist!r}, d + '/bigbench-1.0.0.tar.gz')\n")
  out = str(tmp_path / "cache")
  cmd = [sys.executable, str(fake_pip)]
  final = fetch_bigbench.fetch(out, "1.0.0", pip_command=cmd, progress=False)
  assert final == os.path.join(out, "benchmark_tasks")
  assert calls.read_text().split() == ["--no-deps", "--no-binary=:all:", "bigbench==1.0.0", "-d",
                                       os.path.join(out, "downloads")]
  with open(os.path.join(final, "FETCHED.json")) as f:
    assert json.load(f) == {"source": "bigbench-1.0.0.tar.gz", "version": "1.0.0", "task_files": 2}
  assert fetch_bigbench.fetch(out, "1.0.0", pip_command=cmd, progress=False) == final
  assert len(calls.read_text().splitlines()) == 1  # second run: nothing downloaded


def _repo_archive(path):
  """A small stand-in for GitHub's archive of the BIG-bench repository."""
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("BIG-bench-main/README.md", "readme")
    z.writestr("BIG-bench-main/bigbench/benchmark_tasks/a/task.json", '{"examples": []}')
    z.writestr("BIG-bench-main/bigbench/benchmark_tasks/b/sub1/task.json", '{"examples": [1]}')
    z.writestr("BIG-bench-main/bigbench/benchmark_tasks/b/README.md", "readme")


def test_from_takes_a_repository_archive_or_checkout_through_the_binary(tmp_path):
  archive = str(tmp_path / "BIG-bench-main.zip")
  _repo_archive(archive)
  out = str(tmp_path / "cache")
  # The binary itself: --from is its flag.
  res = subprocess.run([sys.executable, "-m", "tools.fetch_bigbench", f"--from={archive}",
                        f"--out={out}"], cwd=os.path.dirname(os.path.dirname(__file__)),
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  tasks = os.path.join(out, "benchmark_tasks")
  assert "2 task.json files" in res.stdout
  assert _listing(tasks) == ["FETCHED.json", os.path.join("a", "task.json"),
                             os.path.join("b", "sub1", "task.json")]
  # A checkout: the same files from the folder (replacing what the tool wrote before).
  checkout = tmp_path / "BIG-bench"
  with zipfile.ZipFile(archive) as z:
    z.extractall(checkout)
  os.remove(os.path.join(tasks, "a", "task.json"))
  final = fetch_bigbench.fetch_from(str(checkout / "BIG-bench-main"), out, progress=False)
  assert _listing(final) == _listing(tasks) and len(_listing(final)) == 3
  with open(os.path.join(final, "b", "sub1", "task.json")) as f:
    assert f.read() == '{"examples": [1]}'
  assert fetch_bigbench.fetch_from(
      str(checkout / "BIG-bench-main" / "bigbench" / "benchmark_tasks"), out, progress=False)
  with pytest.raises(ValueError, match="no such file"):
    fetch_bigbench.fetch_from(str(tmp_path / "nowhere.zip"), out, progress=False)


def test_an_index_without_the_sdist_names_both_routes(tmp_path):
  fake_pip = tmp_path / "fake_pip.py"
  fake_pip.write_text("import sys\nsys.exit(1)\n")     # "Could not find a version ..."
  with pytest.raises(Exception, match=r"package index.*--from=PATH") as e:
    fetch_bigbench.fetch(str(tmp_path / "cache"), "1.0.0",
                         pip_command=[sys.executable, str(fake_pip)], progress=False)
  assert "git clone https://github.com/google/BIG-bench" in str(e.value)
