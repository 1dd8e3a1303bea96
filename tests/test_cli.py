"""What a researcher sees in the terminal (opt_jax/cli.py), for the binaries as users run them.

Every user error below runs as its own subprocess and must print `error: <what is wrong>` in a
few lines, no traceback, and exit with status 2. All of them fail before JAX compiles anything,
so the processes are cheap; they run two at a time.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

import _suite_util as U
from opt_jax import cli
from opt_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "_cli_child.py")


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  suite = U.make_suite(str(root / "suite"), {"tiny-a": U.SIZES["tiny-a"]}, steps=(10,))
  (root / "latin1.txt").write_bytes("a first line\nd\xe9j\xe0 vu\n".encode("latin-1"))
  (root / "empty.txt").write_text(" \n")
  (root / "ok.txt").write_text(" ".join(U.CORPUS))
  (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
  bench = root / "bench"
  for name in ("ruin_names", "hyperbaton"):
    (bench / name).mkdir(parents=True)
    (bench / name / "task.json").write_text(json.dumps(
        {"examples": [{"input": "q", "target_scores": {"a": 1, "b": 0}}] * 3}))
  return {"root": str(root), "suite": suite, "bench": str(bench),
          "ckpt": os.path.join(str(root), "suite", "ckpt", "tiny-a", "step10")}


def _user_errors(i):
  s, out, r = i["suite"], os.path.join(i["root"], "out"), i["root"]
  vppl = ["experiments.validation_ppl", f"--suite={s}", f"--out={out}"]
  return {
      "bad flag value": ([*vppl, f"--corpus={r}/ok.txt", "--batch_size=abc"],
                         r"--batch_size=abc: invalid literal"),
      "number out of range": ([*vppl, f"--corpus={r}/ok.txt", "--stride=0"],
                              r"--stride=0: expected an integer >= 1"),
      "missing flag": (vppl, r"--corpus is required"),
      "unexpected argument": ([*vppl, f"--corpus={r}/ok.txt", "extra"],
                              r"unexpected arguments \['extra'\]"),
      "missing file": ([*vppl, f"--corpus={r}/absent.txt"], r"corpus not found: .*absent.txt"),
      "not UTF-8": ([*vppl, f"--corpus={r}/latin1.txt"],
                    r"latin1.txt:2: not UTF-8 \(byte 0xe9 at column 2\)"),
      "empty input": ([*vppl, f"--corpus={r}/empty.txt"], r"empty.txt is empty"),
      "window beyond the model": ([*vppl, f"--corpus={r}/ok.txt", "--context_length=65"],
                                  r"--context_length=65: expected 2 to 64"),
      "mesh the devices cannot hold": ([*vppl, f"--corpus={r}/ok.txt", "--mesh=model:3"],
                                       r"--mesh=model:3: .*needs 3 devices"),
      "unknown model": (["experiments.token_trajectories", f"--suite={s}", f"--out={out}",
                         f"--corpus={r}/ok.txt", "--models=tiny-z"],
                        r"no model named 'tiny-z'"),
      "unknown task": (["experiments.downstream_icl", f"--suite={s}", f"--out={out}",
                        f"--bigbench_dir={i['bench']}", "--tasks=ruin_name"],
                       r"no task 'ruin_name' .*\(closest: ruin_names\)"),
      "malformed file": ([*vppl, f"--corpus={r}/bad.jsonl"], r"bad.jsonl:2: not valid JSON"),
      "too few checkpoints": (["experiments.sequence_generation", f"--suite={s}", f"--out={out}",
                               f"--corpus={r}/ok.txt"],
                              r"every model needs at least 2 checkpoints; tiny-a \(1\)"),
      "output is a folder": (["tools.score_text", f"--checkpoint={i['ckpt']}",
                              f"--input={r}/ok.txt", f"--output={r}"],
                             r"--output=.* is a folder; expected the path of a file"),
      "output is the input": (["tools.score_text", f"--checkpoint={i['ckpt']}",
                               f"--input={r}/ok.txt", f"--output={r}/ok.txt"],
                              r"refusing to write: --output=.*ok.txt is the input --input="),
      "output into a checkpoint": (["tools.convert_checkpoint", f"--input={i['ckpt']}",
                                    f"--output={i['ckpt']}/hf", "--to=hf"],
                                   r"--output=.*step10/hf lies inside the input --input="),
      "experiment --out in a checkpoint": ([*vppl[:2], f"--out={i['ckpt']}",
                                            f"--corpus={r}/ok.txt"],
                                           r"--out=.*step10 is or lies inside the checkpoint "
                                           r"folder"),
      "plan of no rows": (["tools.plan_mesh", "--model=125m", "--mesh=data:1", "--batch=0"],
                          r"--batch=0: expected an integer >= 1"),
      "unknown preset": (["tools.plan_mesh", "--model=7b", "--mesh=data:1"],
                         r"--model=7b: unknown preset '7b'"),
  }


def test_user_errors_print_one_message_and_exit_2(inputs):
  cases = _user_errors(inputs)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    procs = dict(zip(cases, pool.map(lambda c: _run(*c[0]), cases.values())))
  for name, (_, pattern) in cases.items():
    p = procs[name]
    assert p.returncode == 2, (name, p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, (name, p.stderr[-2000:])
    assert p.stderr.startswith("error: "), (name, p.stderr[-2000:])
    assert len(p.stderr.strip().splitlines()) <= 3, (name, p.stderr)
    assert re.search(pattern, p.stderr), (name, pattern, p.stderr)
  assert not os.path.exists(os.path.join(inputs["root"], "out", "store"))   # nothing scored


def test_a_bug_keeps_its_traceback():
  p = _run(CHILD, "--mode=bug", "--compilation_cache=")
  assert p.returncode == 1 and "Traceback" in p.stderr
  assert "RuntimeError: a bug, not a user error" in p.stderr


def _screen(text: str) -> list[str]:
  """The lines a terminal shows: \\r returns to the line's start, later text overwrites."""
  lines, cur, col = [], [], 0
  for ch in text:
    if ch == "\n":
      lines.append("".join(cur).rstrip())
      cur, col = [], 0
    elif ch == "\r":
      col = 0
    else:
      cur[col:col + 1] = [ch]
      col += 1
  return lines + ["".join(cur).rstrip()]


def test_library_logs_are_quiet_unless_asked_and_never_break_the_bar():
  quiet = _run(CHILD, "--mode=logs", "--compilation_cache=")
  assert quiet.returncode == 0, quiet.stderr
  assert "absl info" not in quiet.stderr and "orbax info" not in quiet.stderr
  warning = [line for line in _screen(quiet.stderr) if "a warning the user must see" in line]
  # On a line of its own (the bar is cleared first and redrawn below), not after bar text.
  assert warning == ["warning: a warning the user must see"], warning   # no absl prefix
  assert "== logs finished in" in quiet.stdout
  loud = _run(CHILD, "--mode=logs", "--verbosity=0", "--compilation_cache=")
  assert loud.returncode == 0, loud.stderr
  screen = _screen(loud.stderr)
  for message in ("absl info 2", "orbax info 2", "a warning the user must see"):
    lines = [line for line in screen if message in line]
    assert len(lines) == 1 and lines[0][0] in "IW", (message, lines)


def test_ctrl_c_prints_one_line_and_a_closing_summary():
  p = _run(CHILD, "--mode=interrupt", "--compilation_cache=")
  assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
  assert p.stderr.strip() == "interrupted (Ctrl-C)", p.stderr
  assert p.stdout.startswith("== _cli_child interrupted after "), p.stdout
  assert "the same command resumes" in p.stdout


def test_persistent_compilation_cache_is_hit_by_a_second_run(tmp_path):
  cache = str(tmp_path / "jax_cache")
  counts = lambda p: tuple(map(int, re.search(r"hits=(\d+) misses=(\d+)", p.stdout).groups()))
  first = _run(CHILD, "--mode=cache", f"--compilation_cache={cache}")
  assert first.returncode == 0, first.stderr
  hits, misses = counts(first)
  assert hits == 0 and misses >= 1 and os.listdir(cache)
  entries = sorted(os.listdir(cache))
  second = _run(CHILD, "--mode=cache", f"--compilation_cache={cache}")
  assert counts(second) == (misses, 0)           # everything compiled before is read back
  assert sorted(os.listdir(cache)) == entries
  off = _run(CHILD, "--mode=cache", "--compilation_cache=")
  assert counts(off) == (0, 0) and sorted(os.listdir(cache)) == entries
  # The default folder is the user's cache ($XDG_CACHE_HOME, a temporary one in these tests).
  default = _run(CHILD, "--mode=cache")
  assert counts(default)[1] >= 1
  assert os.listdir(os.path.join(os.environ["XDG_CACHE_HOME"], "opt_jax", "jax_cache"))


# Settings dataclasses and the summary (in process, no JAX) --------------------------------------

def test_settings_check_every_field_and_name_the_flag():
  from experiments import downstream_icl, token_trajectories
  base = dict(suite="s.json", out="o")
  with pytest.raises(InputError, match=r"--batch_size=0: expected an integer >= 1"):
    token_trajectories.Settings(**base, corpus=("c",), batch_size=0)
  with pytest.raises(InputError, match=r"--alpha=1.5: expected a number > 0 and < 1"):
    token_trajectories.Settings(**base, corpus=("c",), alpha=1.5)
  with pytest.raises(InputError, match=r"--start_fractions=0.1,2.0: expected numbers >= 0 and "
                                       r"<= 1 \(got 2.0\)"):
    token_trajectories.Settings(**base, corpus=("c",), start_fractions=[0.1, 2])
  with pytest.raises(InputError, match=r"--dtype=fp8: 'fp8' is not one of"):
    token_trajectories.Settings(**base, corpus=("c",), dtype="fp8")
  with pytest.raises(InputError, match=r"--k_shot=0,0: expected distinct"):
    downstream_icl.Settings(**base, k_shot=(0, 0))
  with pytest.raises(InputError, match=r"--corpus is required"):
    token_trajectories.Settings(**base, corpus=None)
  s = token_trajectories.Settings(**base, corpus=["c"], stride="16")
  assert s.corpus == ("c",) and s.stride == 16
  key = cli.key(s)
  assert "dtype" in key and "stride" in key and "max_tokens" in key
  assert not {"out", "suite", "batch_size", "alpha", "plots", "corpus"} & set(key)


def test_flags_are_derived_from_the_settings_once():
  from absl import flags
  from experiments import downstream_icl
  fv = flags.FlagValues()
  cli.define_flags(downstream_icl.Settings, fv)
  fv(["prog", "--suite=s.json", "--out=o", "--k_shot=0,3", "--tasks=a,b", "--noshare_prefix",
      "--max_examples=5"])
  s = cli.from_flags(downstream_icl.Settings, fv)
  assert s.k_shot == (0, 3) and s.tasks == ("a", "b") and not s.share_prefix
  assert s.max_examples == 5 and s.validation_ppl is None and s.dtype == "float32"
  names = {f.name for f in dataclasses.fields(downstream_icl.Settings)}
  assert names == set(fv)   # one flag per field, nothing else
  assert cli.as_dict(s)["k_shot"] == [0, 3]


def test_summary_render_has_each_part_and_says_when_nothing_was_skipped():
  text = cli.Summary("x", evaluated=["2 models"], results=["ppl 3.1", "rho -0.9"],
                     out_dir="/o", files=["a.csv", "plots/"]).render(75.0)
  assert text.splitlines() == ["== x finished in 1m 15s", "evaluated: 2 models",
                               "result:    ppl 3.1", "           rho -0.9", "skipped:   nothing",
                               "outputs:   /o/ a.csv, plots/"]

