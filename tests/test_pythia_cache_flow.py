"""README's "Public suites from the HF cache" flow, command by command, on a fake Pythia hub cache.

The cache is laid out like huggingface_hub's (blobs named by sha256 / git sha1, refs, relative
snapshot links, .locks, .no_exist) with what real Pythia caches hold: step0 = step1 byte for byte,
`main` = the last step, a revision with PyTorch .bin weights only, a truncated blob, a blob whose
bytes changed but not its size, and a revision that is a byte copy of a later one. Every binary
must finish without a traceback, evaluate every good checkpoint and name each bad one in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import _hf_cache_util as u
import _suite_util as U

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPOS = {"EleutherAI/pythia-70m": "pythia-a", "EleutherAI/pythia-160m": "pythia-b"}
REVISIONS = ("step0", "step1", "step512", "step1000", "step2000", "step3000")
SMALL, LARGE = "pythia-70m", "pythia-160m"
# What each bad checkpoint is and where the flow must name it.
BIN_ONLY = (SMALL, 512)             # pytorch_model.bin only
COPIED = (SMALL, 2000)              # a byte copy of step 3000 (EleutherAI/pythia#205)
TRUNCATED = (LARGE, 1000)           # its blob lost its last bytes
CORRUPT = (LARGE, 2000)             # its blob's bytes changed, not its size


def _hf_folder(directory, size, seed, safetensors=True):
  """A random HF GPTNeoX checkpoint of U.PYTHIA_SIZES[size] with the suite's tokenizer."""
  import torch  # pylint: disable=import-outside-toplevel  (only where needed)
  import oracle  # pylint: disable=import-outside-toplevel
  model = oracle.hf_model(U.PYTHIA_SIZES[size], seed=seed)
  if safetensors:
    model.save_pretrained(directory)
  else:   # what older Pythia revisions hold (transformers 5 writes safetensors only)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()},
               os.path.join(directory, "pytorch_model.bin"))
  shutil.copy(os.path.join(os.path.dirname(directory), "tok", "tokenizer.json"), directory)
  if os.path.exists(os.path.join(directory, "generation_config.json")):
    os.remove(os.path.join(directory, "generation_config.json"))
  return directory


def _build_cache(root):
  """The fake hub cache under root/hub; returns its path."""
  cache = os.path.join(root, "hub")
  U.train_tokenizer(os.path.join(root, "tok"), U.PYTHIA_SPECIALS, U.PYTHIA_TOKENIZER_SIZE)
  for r, (repo, size) in enumerate(REPOS.items()):
    src = {rev: _hf_folder(os.path.join(root, f"{size}-{rev}"), size, seed=10 * r + i,
                           safetensors=(repo, rev) != ("EleutherAI/pythia-70m", "step512"))
           for i, rev in enumerate(REVISIONS) if rev not in ("step1", "step2000")}
    src["step1"] = src["step0"]                      # Pythia: step1 holds step0's bytes
    src["step2000"] = src["step3000"] if repo.endswith("70m") else _hf_folder(
        os.path.join(root, f"{size}-step2000"), size, seed=10 * r + 7)
    for rev in REVISIONS:
      u.add_revision(cache, repo, rev, src[rev])
    u.set_ref(cache, repo, "main", u.commit_sha(repo, "step3000"))
    folder = u.repo_dir(cache, repo)
    os.makedirs(os.path.join(folder, ".no_exist", u.commit_sha(repo, "step0")), exist_ok=True)
    open(os.path.join(folder, ".no_exist", u.commit_sha(repo, "step0"),
                      "model.safetensors.index.json"), "w").close()
    locks = os.path.join(cache, ".locks", os.path.basename(folder))
    os.makedirs(locks, exist_ok=True)
    for blob in os.listdir(os.path.join(folder, "blobs")):
      open(os.path.join(locks, blob + ".lock"), "w").close()
  large = u.repo_dir(cache, "EleutherAI/pythia-160m")

  def blob(rev):
    return os.path.realpath(os.path.join(large, "snapshots", u.commit_sha(
        "EleutherAI/pythia-160m", rev), "model.safetensors"))
  with open(blob("step1000"), "r+b") as f:
    f.truncate(os.path.getsize(blob("step1000")) - 64)
  with open(blob("step2000"), "r+b") as f:
    f.seek(-64, os.SEEK_END)
    f.write(b"\x7f" * 16)
  return cache


def _run(*args, env=None):
  res = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
                                         **(env or {})})
  assert "Traceback" not in res.stderr + res.stdout, (args, res.stderr[-4000:])
  return res


def _lines(text, *words):
  return [line for line in text.splitlines() if all(w in line for w in words)]


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
  root = tmp_path_factory.mktemp("pythia_cache")
  work = root / "work"
  work.mkdir()
  jax_cache = f"--compilation_cache={root / 'jax_cache'}"
  repos = "--repos=" + ",".join(REPOS)
  manifest = str(work / "pythia.json")
  got = {}
  # 1. Before any download: the download script, no manifest.
  got["template"] = _run("tools.make_suite", f"--hf_cache={root / 'hub'}", "--template=pythia",
                         repos, f"--out={manifest}")
  got["script"] = (work / "pythia.download.sh").read_text()
  cache = _build_cache(str(root))
  # 2. The manifest of what the cache holds; the check.
  got["make"] = _run("tools.make_suite", f"--hf_cache={cache}", "--template=pythia", repos,
                     f"--out={manifest}")
  got["check"] = _run("tools.check_suite", f"--suite={manifest}")
  got["deep"] = _run("tools.check_suite", f"--suite={manifest}", "--deep",
                     f"--out={root / 'deep'}")
  corpus = work / "valid.jsonl"
  corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in U.CORPUS))
  common = (f"--suite={manifest}", f"--corpus={corpus}", "--batch_size=4", "--noplots", jax_cache)
  got["valid"] = _run("experiments.validation_ppl", *common, "--context_length=32",
                      f"--out={work / 'valid'}")
  # 3. The .bin revision converted; a later plain make_suite keeps the copy.
  got["convert"] = _run("tools.make_suite", f"--hf_cache={cache}", "--template=pythia", repos,
                        f"--out={manifest}", "--convert_bin")
  got["remake"] = _run("tools.make_suite", f"--hf_cache={cache}", "--template=pythia", repos,
                       f"--out={manifest}")
  got["recheck"] = _run("tools.check_suite", f"--suite={manifest}")
  # token_trajectories with step 0 in the suite: the trend fit starts at the start fraction
  # (0.05 x 3000 is nearest step 1; pythia-160m keeps steps 1, 512 and 3000 after the bad ones).
  got["tokens"] = _run("experiments.token_trajectories", *common, "--context_length=32",
                       "--start_fractions=0.05", "--selection_fraction=0.05", "--num_examples=1", f"--out={work / 'tokens'}")
  got["seq"] = _run("experiments.sequence_generation", *common, "--num_prompts=2",
                    "--prompt_tokens=8", "--max_new_tokens=8", "--num_passages=2",
                    "--passage_tokens=15", "--noise_rates=0.3", "--swaps_per_kind=1",
                    "--generation_batch_size=2", "--seed=1", f"--sample_models={SMALL}",
                    f"--out={work / 'seq'}")
  cloze = work / "cloze.txt"
  cloze.write_text("\n".join(U.CORPUS[i % 5] for i in range(12)))
  got["icl"] = _run("experiments.downstream_icl", f"--suite={manifest}", "--bigbench_dir=",
                    f"--cloze_text={cloze}", "--cloze_examples=3", "--k_shot=1", "--batch_size=4",
                    "--noplots", jax_cache, f"--out={work / 'icl'}")
  return dict(root=root, work=work, manifest=manifest, **got)


def test_template_before_the_cache_exists_writes_the_download_script(flow):
  res = flow["template"]
  assert res.returncode == 0 and "does not exist yet" in res.stderr, res.stderr
  commands = _lines(flow["script"], "hf download")
  assert len(commands) == 2 * 154 and all("--include '*.safetensors'" in c for c in commands)


def test_make_suite_names_the_bin_revision_and_the_known_duplicates(flow):
  res = flow["make"]
  assert res.returncode == 0, res.stderr
  assert len(_lines(res.stderr, "EleutherAI/pythia-70m revision step512",
                    "only PyTorch .bin weights")) == 1
  with open(flow["manifest"]) as f:
    models = {m["name"]: m for m in json.load(f)["models"]}
  assert set(models) == {SMALL, LARGE}
  for m in models.values():
    assert sorted(map(int, m["checkpoints"])) == [0, 1, 512, 1000, 2000, 3000]
    assert m["known_duplicates"] == [[0, 1]] and m["refs"] == {"main": 3000}


def test_check_suite_reports_each_bad_checkpoint_once(flow):
  for key in ("check", "deep"):
    res = flow[key]
    assert res.returncode == 1, res.stderr
    problems = _lines(res.stdout, "problem: ")
    assert len(_lines(res.stdout, f"problem: {LARGE} step 1000:", "truncated")) == 1, res.stdout
    assert len(_lines(res.stdout, f"problem: {LARGE} step 2000:",
                      "does not match its blob name")) == 1, res.stdout
    assert _lines(res.stdout, f"problem: {SMALL} step 3000: weights identical to step 2000")
    assert len(problems) == 3, problems                # the copied pair is named once
    assert _lines(res.stdout, f"note: {SMALL} step 512:", ".bin weights only")
    assert _lines(res.stdout, f"note: {SMALL} step 1: known duplicate of step 0")
  assert "layout_differs" not in flow["recheck"].stdout          # the converted copy fits
  assert _lines(flow["recheck"].stdout, "problem: ") and not _lines(flow["recheck"].stdout,
                                                                    f"{SMALL} step 512")


def _left_out(res):
  return sorted(line for line in res.stderr.splitlines()
                if " left out" in line and not line.startswith("  "))


def test_validation_ppl_evaluates_every_good_checkpoint_and_names_each_bad_one(flow):
  res = flow["valid"]
  assert res.returncode == 0, res.stderr[-4000:]
  left = _left_out(res)
  for (model, step), why in ((BIN_ONLY, ".bin weights"), (TRUNCATED, "truncated"),
                             (CORRUPT, "does not match its blob name"),
                             (COPIED, "step 3000"), ((SMALL, 3000), "weights identical")):
    assert len([l for l in left if l.startswith(f"{model} step {step} left out")
                and why in l]) == 1, (model, step, left)
  assert len(left) == 5, left
  table = pd.read_csv(flow["work"] / "valid" / "validation_ppl.csv")
  table = table[table["corpus"] == "all"] if "all" in set(table["corpus"]) else table
  got = sorted(set(zip(table["model"], table["step"])))
  assert got == sorted([(SMALL, 0), (SMALL, 1), (SMALL, 1000), (LARGE, 0), (LARGE, 1),
                        (LARGE, 512), (LARGE, 3000)])
  dup = {(m, s): d for m, s, d in zip(table["model"], table["step"], table["duplicate_of"])}
  assert dup[(SMALL, 1)] == dup[(LARGE, 1)] == 0
  assert all(pd.isna(d) for k, d in dup.items() if k[1] != 1), dup
  assert "known duplicates evaluated" in res.stdout and f"{SMALL} step 1 = step 0" in res.stdout


def test_a_converted_bin_revision_stays_in_the_manifest(flow):
  assert flow["convert"].returncode == 0, flow["convert"].stderr
  assert flow["remake"].returncode == 0, flow["remake"].stderr
  assert _lines(flow["remake"].stderr, "step512", "using its converted copy")
  with open(flow["manifest"]) as f:
    small = next(m for m in json.load(f)["models"] if m["name"] == SMALL)
  entry = small["checkpoints"]["512"]
  assert entry["revision"] == "step512" and ".converted" in entry["path"]


@pytest.mark.parametrize("key", ["tokens", "seq", "icl"])
def test_the_experiments_finish_and_name_each_bad_checkpoint(flow, key):
  res = flow[key]
  assert res.returncode == 0, res.stderr[-4000:]
  left = _left_out(res)
  names = [f"{m} step {s} left out" for m, s in (TRUNCATED, CORRUPT, COPIED, (SMALL, 3000))]
  for name in names:
    assert len([l for l in left if l.startswith(name)]) == 1, (name, left)
  assert not [l for l in left if l.startswith(f"{SMALL} step 512")]   # converted: evaluated
  assert len(left) == len(names), left


def test_an_error_after_the_sweep_marks_the_run_manifest_failed_in_one_line(tmp_path):
  from experiments import context  # pylint: disable=import-outside-toplevel
  from opt_jax import files  # pylint: disable=import-outside-toplevel
  runs = tmp_path / "runs"
  runs.mkdir()
  mine = {"status": "finished", "writer": files.process_tag()}
  (runs / "a.json").write_text(json.dumps(mine))
  (runs / "b.json").write_text(json.dumps({**mine, "writer": "1.2@elsewhere"}))
  try:
    raise ValueError("steps must be finite\nand > 0")
  except ValueError as e:
    marked = context.mark_runs_failed(str(tmp_path), e)
  assert marked == [str(runs / "a.json")]
  data = json.loads((runs / "a.json").read_text())
  assert data["status"] == "failed" and data["error"] == "ValueError: steps must be finite and > 0"
  assert any("Traceback" in line for line in data["traceback"])
  assert json.loads((runs / "b.json").read_text())["status"] == "finished"
