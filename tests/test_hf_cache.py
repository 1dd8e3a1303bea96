"""Suites from the HF hub cache (opt_jax.hf_cache, tools/make_suite.py) and the family templates.

Every cache here is a fake built locally with the real layout (refs, snapshots linking into blobs
named by content hash); nothing is downloaded.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

import _hf_cache_util as u
from opt_jax import families, hf_cache, suite, suite_templates
from opt_jax.config import DecoderConfig
from opt_jax.errors import InputError, MissingFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Three tiny random HF OPT checkpoint folders (different weights)."""
  root = tmp_path_factory.mktemp("src")
  return [u.tiny_opt(str(root / f"s{i}"), seed=i) for i in range(3)]


def _run(args, env=None):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, timeout=300)


# Revision names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,step,tokens,stage", [
    ("step0", 0, None, None),                                       # Pythia
    ("step143000", 143000, None, None),
    ("step20000-tokens84B", 20000, 84, None),                       # OLMo 1
    ("stage1-step928646-tokens3896B", 928646, 3896, "stage1"),      # OLMo 2
    ("stage2-ingredient2-step11931-tokens50B", 11931, 50, "stage2-ingredient2"),
    ("step-125000", 125000, None, None),                            # SmolLM2
])
def test_revision_names_of_each_family_give_step_tokens_and_stage(name, step, tokens, stage):
  r = hf_cache.parse_revision(name)
  assert (r.step, r.tokens_billions, r.stage) == (step, tokens, stage)
  assert r.is_stage2 == bool(stage and stage.startswith("stage2"))


@pytest.mark.parametrize("name", ["main", "pr/1", "v1.0", "step12b", "step-1.5k", "step",
                                  "stage3-step1-tokens1B", "checkpoint-1000step", "Step100",
                                  "step100-tokens", "stage2-step100-tokens1B"])
def test_names_that_give_no_step_are_not_guessed(name):
  assert hf_cache.parse_revision(name) is None


def test_tinyllama_repo_names_give_the_step_and_tokens():
  cases = {"TinyLlama/TinyLlama-1.1B-intermediate-step-480k-1T": (480_000, 1000),
           "TinyLlama/TinyLlama-1.1B-intermediate-step-955k-token-2T": (955_000, 2000),
           "TinyLlama/TinyLlama-1.1B-intermediate-step-1195k-token-2.5T": (1_195_000, 2500),
           "PY007/TinyLlama-1.1B-step-50K-105b": (50_000, 105),
           "TinyLlama/TinyLlama-1.1B-intermediate-step-240k-503b": (240_000, 503),
           "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": (1_431_000, 3000)}
  for repo, (step, tokens) in cases.items():
    r = hf_cache.parse_repo_step(repo)
    assert (r.step, r.tokens_billions) == (step, tokens), repo
    # The published batch (2048 x 1024 tokens) agrees with every published repo name.
    t = suite_templates.lookup(repo)
    assert t.repo_is_checkpoint and hf_cache.tokens_mismatch(r, t.tokens_per_step) is None, repo
  assert hf_cache.parse_repo_step("TinyLlama/TinyLlama-1.1B-Chat-v1.0") is None


def test_olmo2_template_batches_agree_with_the_published_revision_names():
  for t in suite_templates.family_templates("olmo2"):
    assert t.revisions
    for name in t.revisions:
      assert hf_cache.tokens_mismatch(hf_cache.parse_revision(name), t.tokens_per_step) is None
  wrong = hf_cache.tokens_mismatch(hf_cache.parse_revision("stage1-step928646-tokens3896B"),
                                   2_097_152)
  assert "3896B" in wrong and "1947.5B" in wrong


def test_pythia_template_holds_the_published_suite():
  standard = suite_templates.family_templates("pythia")
  deduped = suite_templates.family_templates("pythia-deduped")
  assert [t.repo for t in standard][:3] == ["EleutherAI/pythia-14m", "EleutherAI/pythia-31m",
                                            "EleutherAI/pythia-70m"]
  assert len(standard) == 10 and len(deduped) == 8
  assert deduped[0].repo == "EleutherAI/pythia-70m-deduped"
  steps = suite_templates.pythia_steps()
  assert len(steps) == 154 and steps[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
  assert steps[-1] == 143000 and all(b - a == 1000 for a, b in zip(steps[11:], steps[12:]))
  for t in standard + deduped:
    assert t.revisions == tuple(f"step{s}" for s in steps)
    # The README: "Each model saw 299,892,736,000 ~= 300B tokens during training".
    assert 143000 * t.tokens_per_step == 299_892_736_000
  assert suite_templates.lookup("eleutherai/PYTHIA-12B-deduped").params == 11_846_072_320
  assert suite_templates.lookup("EleutherAI/pythia-14m").params is None   # none published
  assert suite_templates.lookup("org/unknown") is None


# Scanning one repo ------------------------------------------------------------------------------


def test_scan_sorts_refs_into_checkpoints_notes_unknown_names_and_problems(tmp_path, sources):
  cache, repo = str(tmp_path / "hub"), "EleutherAI/pythia-160m"
  u.add_revision(cache, repo, "step0", sources[0])
  u.add_revision(cache, repo, "step1", sources[1])
  u.set_ref(cache, repo, "main", u.commit_sha(repo, "step1"))             # main = step1
  u.add_revision(cache, repo, "weird-branch", sources[2])                 # no step in the name
  u.add_revision(cache, repo, None, sources[2], sha="ab" * 20)            # no ref names it
  u.set_ref(cache, repo, "step2", "cd" * 20)                              # snapshot folder missing
  for step, drop in ((3, "model.safetensors"), (4, "config.json")):      # incomplete snapshots
    partial = tmp_path / f"partial{step}"
    shutil.copytree(sources[0], partial)
    os.remove(partial / drop)
    u.add_revision(cache, repo, f"step{step}", str(partial))
  broken = tmp_path / "broken"                                            # blob deleted
  shutil.copytree(sources[0], broken)
  with open(broken / "config.json", "a") as f:
    f.write("\n")
  snap = u.add_revision(cache, repo, "step5", str(broken))
  os.remove(os.path.realpath(os.path.join(snap, "config.json")))
  sharded = tmp_path / "sharded"
  u.tiny_opt(str(sharded), seed=7, max_shard_size="12KB")
  shards = sorted(p for p in os.listdir(sharded) if p.startswith("model-"))
  os.remove(sharded / shards[-1])                                         # index names a lost shard
  u.add_revision(cache, repo, "step6", str(sharded))

  scan = hf_cache.scan_repo(cache, repo)
  assert [c.revision.step for c in scan.checkpoints] == [0, 1]
  assert scan.checkpoints[1].sha == u.commit_sha(repo, "step1")
  assert scan.checkpoints[1].path == os.path.join(u.repo_dir(cache, repo), "snapshots",
                                                  u.commit_sha(repo, "step1"))
  assert scan.step_refs == {"main": "step1"}
  assert len(scan.unknown) == 2
  assert "'weird-branch'" in scan.unknown[0] and "gives no step" in scan.unknown[0]
  assert "abababababab" in scan.unknown[1] and "no ref names it" in scan.unknown[1]
  problems = "\n".join(scan.problems)
  assert len(scan.problems) == 5
  for step, why in ((2, "snapshot folder missing"), (3, "no weights"), (4, "no config.json"),
                    (5, "broken link(s) config.json"), (6, shards[-1])):
    assert f"revision step{step} " in problems and why in problems, (step, problems)
  with pytest.raises(MissingFileError, match="org/absent"):
    hf_cache.scan_repo(cache, "org/absent")


# Manifests --------------------------------------------------------------------------------------


def test_make_suite_manifest_round_trips_through_load_suite(tmp_path, sources):
  cache = str(tmp_path / "hub")
  for step, src in ((0, 0), (100, 1), (200, 2)):
    u.add_revision(cache, "org/opt-a", f"step{step}", sources[src])
  u.set_ref(cache, "org/opt-a", "main", u.commit_sha("org/opt-a", "step200"))
  u.add_revision(cache, "org/opt-b", "step-50", sources[2])
  out = tmp_path / "m" / "suite.json"
  # The default cache is HF's own: HF_HUB_CACHE here.
  res = _run(["tools.make_suite", "--repos=org/opt-a,org/opt-b", f"--out={out}",
              "--tokens_per_step=1000"], env={"HF_HUB_CACHE": cache})
  assert res.returncode == 0, res.stderr
  assert "ref 'main' is step200" in res.stderr and "2 models, 4 checkpoints" in res.stdout

  # A re-run replaces its own manifest, never a file it did not write.
  assert _run(["tools.make_suite", f"--hf_cache={cache}", "--repos=org/opt-a", f"--out={out}",
               "--tokens_per_step=1000"]).returncode == 0
  foreign = tmp_path / "mine.json"
  foreign.write_text("{}")
  res = _run(["tools.make_suite", f"--hf_cache={cache}", "--repos=org/opt-a", f"--out={foreign}",
              "--tokens_per_step=1000"])
  assert res.returncode == 2 and "was not written by tools.make_suite" in res.stderr
  assert foreign.read_text() == "{}"
  res = _run(["tools.make_suite", "--repos=org/opt-a,org/opt-b", f"--out={out}",
              "--tokens_per_step=1000"], env={"HF_HUB_CACHE": cache})
  assert res.returncode == 0, res.stderr

  s = suite.load_suite(out)              # full validation, configs and params included
  a, b = s.model("org/opt-a"), s.model("opt-b")
  assert (a.name, a.steps, b.steps) == ("opt-a", [0, 100, 200], [50])
  sha = u.commit_sha("org/opt-a", "step100")
  assert a.path(100) == os.path.join(u.repo_dir(cache, "org/opt-a"), "snapshots", sha)
  assert (a.revision(100), a.sha(100), b.revision(50)) == ("step100", sha, "step-50")
  assert a.refs == {"main": 200} and a.tokens(100) == 100_000
  with open(os.path.join(sources[0], "config.json")) as f:
    assert a.params == families.from_hf_dict(json.load(f)).num_params()   # from the headers
  # to_dict writes the same object entries back.
  again = tmp_path / "again.json"
  suite.save_suite(s, again)
  s2 = suite.load_suite(again)
  assert s2.model("opt-a").shas == a.shas and s2.model("opt-a").refs == a.refs


def test_olmo2_stage2_is_kept_apart_or_dropped(tmp_path, sources):
  cache, repo = str(tmp_path / "hub"), "allenai/OLMo-2-1124-7B"
  for name, src in (("stage1-step1000-tokens5B", 0), ("stage1-step2000-tokens9B", 1),
                    ("step150-tokens1B", 2), ("stage2-ingredient1-step1000-tokens5B", 1),
                    ("stage2-ingredient2-step1000-tokens5B", 2)):
    u.add_revision(cache, repo, name, sources[src])
  u.add_revision(cache, repo, "main", sources[0], sha="ef" * 20)  # the soup: no step of its own

  build = hf_cache.build_suite([repo], cache_dir=cache, olmo2_stage2="separate")
  models = {m["name"]: m for m in build.manifest["models"]}
  assert list(models) == ["OLMo-2-1124-7B", "OLMo-2-1124-7B-stage2-ingredient1",
                          "OLMo-2-1124-7B-stage2-ingredient2"]
  assert list(models["OLMo-2-1124-7B"]["checkpoints"]) == ["150", "1000", "2000"]
  stage2 = models["OLMo-2-1124-7B-stage2-ingredient1"]
  assert stage2["checkpoints"]["1000"]["revision"] == "stage2-ingredient1-step1000-tokens5B"
  assert stage2["aliases"] == [f"{repo}@stage2-ingredient1"]
  assert all(m["tokens_per_step"] == 4_194_304 for m in models.values())
  assert not build.problems and "'main'" in build.unknown[0]

  dropped = hf_cache.build_suite([repo], cache_dir=cache, olmo2_stage2="drop")
  assert [m["name"] for m in dropped.manifest["models"]] == ["OLMo-2-1124-7B"]
  assert "2 stage-2 revision(s) dropped" in dropped.notes[0]


def test_tinyllama_repos_make_one_model(tmp_path, sources):
  cache = str(tmp_path / "hub")
  repos = ["TinyLlama/TinyLlama-1.1B-intermediate-step-955k-token-2T",
           "TinyLlama/TinyLlama-1.1B-intermediate-step-480k-1T"]
  for repo, src in zip(repos, sources):
    u.add_revision(cache, repo, "main", src)
  build = hf_cache.build_suite(repos, cache_dir=cache)
  (model,) = build.manifest["models"]
  assert model["name"] == "TinyLlama-1.1B" and model["aliases"] == repos
  assert list(model["checkpoints"]) == ["480000", "955000"]
  assert model["checkpoints"]["480000"]["revision"] == "main"
  assert model["tokens_per_step"] == 2_097_152 and not build.problems and not build.unknown


def test_inconsistent_names_and_shared_snapshots_are_problems(tmp_path, sources):
  cache = str(tmp_path / "hub")
  u.add_revision(cache, "org/olmo-like", "step1000-tokens5B", sources[0])
  u.add_revision(cache, "org/olmo-like", "step2000-tokens9B", sources[1])
  u.set_ref(cache, "org/olmo-like", "step3000-tokens13B", u.commit_sha("org/olmo-like",
                                                                       "step2000-tokens9B"))
  with pytest.raises(InputError, match=r"org/olmo-like\): give --tokens_per_step \(its revision "
                                       r"names suggest about 4500000\)"):
    hf_cache.build_suite(["org/olmo-like"], cache_dir=cache)
  build = hf_cache.build_suite(["org/olmo-like"], cache_dir=cache, tokens_per_step=1_000_000)
  problems = "\n".join(build.problems)
  assert "step1000-tokens5B names 5B tokens but step 1000 x tokens_per_step 1000000 = 1.0B" \
      in problems
  assert "steps 2000, 3000 are one snapshot" in problems


def test_template_mode_writes_the_download_commands_of_missing_revisions(tmp_path, sources):
  cache = str(tmp_path / "hub")
  repo = "EleutherAI/pythia-70m"
  u.add_revision(cache, repo, "step0", sources[0])
  u.add_revision(cache, repo, "step1000", sources[1])
  u.set_ref(cache, repo, "main", u.commit_sha(repo, "step1000"))
  out = tmp_path / "pythia.json"
  res = _run(["tools.make_suite", f"--hf_cache={cache}", "--template=pythia",
              "--repos=EleutherAI/pythia-70m,EleutherAI/pythia-160m", f"--out={out}"])
  assert res.returncode == 0, res.stderr
  assert "EleutherAI/pythia-160m: not in the HF cache" in res.stderr
  script = (tmp_path / "pythia.download.sh").read_text().splitlines()
  commands = [line for line in script if line.startswith("hf download")]
  assert len(commands) == 152 + 154
  include = "".join(f" --include '{p}'" for p in hf_cache.DOWNLOAD_PATTERNS)
  assert "'*.safetensors'" in include and "bin" not in include
  assert (f"hf download EleutherAI/pythia-160m --revision step143000{include} --cache-dir "
          f"{cache}") in commands
  assert not any(f"{repo} --revision step1000 " in c or f"{repo} --revision step0 " in c
                 for c in commands)
  (model,) = suite.load_suite(out, check_paths=False).models
  assert (model.name, model.steps, model.refs) == ("pythia-70m", [0, 1000], {"main": 1000})
  assert model.tokens_per_step == 2_097_152


def test_template_mode_works_before_the_cache_folder_exists(tmp_path):
  cache = tmp_path / "not-yet"
  out = tmp_path / "pythia.json"
  res = _run(["tools.make_suite", f"--hf_cache={cache}", "--template=pythia",
              "--repos=EleutherAI/pythia-70m,org/other", f"--out={out}"])
  assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
  assert f"HF cache folder {cache} does not exist yet" in res.stderr
  assert "note: org/other is not in the pythia template" in res.stderr
  commands = [line for line in (tmp_path / "pythia.download.sh").read_text().splitlines()
              if line.startswith("hf download")]
  assert len(commands) == 154 and not out.exists()


def test_a_mistyped_repo_or_hf_home_gets_a_hint(tmp_path, sources):
  home = tmp_path / "hf_home"
  u.add_revision(str(home / "hub"), "EleutherAI/pythia-70m", "step0", sources[0])
  with pytest.raises(MissingFileError, match=r"looks like HF_HOME: the hub cache is its hub/"):
    hf_cache.build_suite(["EleutherAI/pythia-70m"], cache_dir=str(home))
  with pytest.raises(MissingFileError, match=r"did you mean EleutherAI/pythia-70m\?"):
    hf_cache.build_suite(["EleutherAI/pythia-07m"], cache_dir=str(home / "hub"))


def test_manifest_checkpoint_objects_are_validated(tmp_path):
  data = {"name": "t", "models": [{
      "name": "m", "params": 10, "tokens_per_step": 5, "refs": {"main": 7, "old": 1},
      "checkpoints": {"1": {"path": "a", "revision": "step1", "sha": "f" * 40},
                      "2": {"path": "b", "commit": "x"}, "3": {"revision": ""}, "4": "d"}}]}
  with pytest.raises(suite.SuiteError) as e:
    suite.parse_suite(data, str(tmp_path), check_paths=False)
  text = str(e.value)
  assert "checkpoint '2': unknown or repeated field(s) ['commit']" in text
  assert "checkpoint '3': 'revision' must be a non-empty string" in text
  assert "'main': 7" in text and "'old'" not in text
  data["models"][0]["checkpoints"] = {"1": {"path": "a", "revision": "step1"}, "4": "d"}
  data["models"][0]["refs"] = {"main": 4}
  m = suite.parse_suite(data, str(tmp_path), check_paths=False).models[0]
  assert (m.revision(1), m.sha(1), m.revision(4), m.refs) == ("step1", None, None, {"main": 4})
  with pytest.raises(KeyError, match="no checkpoint at step 2"):
    m.sha(2)
