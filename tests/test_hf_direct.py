"""HF safetensors checkpoints evaluated in place (opt_jax.checkpoints.hf_format through
opt_jax.checkpoints.checkpoint), against conversion (the orbax copy) and HF transformers (the
oracle), and checkpoint identities of HF-cache snapshots (their commit sha)."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import _hf_cache_util as u
import _suite_util
import oracle
from opt_jax import families, results, scoring, suite, sweep
from opt_jax.checkpoints import checkpoint, layout
from opt_jax.convert import convert, hf
from opt_jax.errors import InputError
from opt_jax.families import table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_TINY = {**oracle.FAMILY_TINY, **{f"opt_{k}": v for k, v in oracle.TINY.items()}}


def _flat(params):
  return {k: np.asarray(v) for k, v in table.flatten(params).items()}


# Slices of every transform ----------------------------------------------------------------------

@pytest.mark.parametrize("transform,shapes,hf_shape", [
    (table.COPY, [(5, 7)], (5, 7)),
    (table.FLAT, [(4, 3)], (12,)),
    (table.LINEAR, [(6, 4, 3)], (12, 6)),                 # q_kernel [D, N, H] from [N*H, D]
    (table.LINEAR, [(6, 10)], (10, 6)),                   # up_kernel [D, F] from [F, D]
    (table.LINEAR_FROM_HEADS, [(4, 3, 6)], (6, 12)),      # o_kernel [N, H, D] from [D, N*H]
    (table.FusedHeads(3), [(6, 4, 3)] * 3, (36, 6)),      # GPT-NeoX query_key_value kernels
    (table.FusedHeads(3), [(4, 3)] * 3, (36,)),           # and biases
])
def test_read_slice_of_every_transform_is_the_block_of_the_full_conversion(transform, shapes,
                                                                           hf_shape):
  rng = np.random.default_rng(0)
  full_hf = rng.standard_normal(hf_shape)
  full = transform.to_params(full_hf, shapes)
  for part, shape in enumerate(shapes):
    for _ in range(40):
      index = []
      for n in shape:
        a = int(rng.integers(0, n))
        index.append(slice(a, int(rng.integers(a + 1, n + 1))))
      index = tuple(index)
      read = []

      def box(slices):
        read.append(full_hf[slices].size)
        return full_hf[slices]
      got = transform.read_slice(box, shapes, part, index)
      np.testing.assert_array_equal(got, full[part][index])
      # Splits at the leading dims (heads, not head_dim) read exactly the block.
      if all(s.start == 0 and s.stop == n for s, n in zip(index[1:], shape[1:])) or (
          isinstance(transform, table.FusedHeads)):
        assert sum(read) == got.size


# One device: every family, single file and sharded, fp32 and bf16 ------------------------------

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """name -> (HF model, its save_pretrained folder); neox_parallel sharded with an index,
  llama_gqa stored in bfloat16."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for name, config in ALL_TINY.items():
    model = oracle.hf_model(config)
    path = str(root / name)
    if name == "llama_gqa":
      model = model.to(torch.bfloat16)
    model.save_pretrained(path, **({"max_shard_size": "40KB"} if name == "neox_parallel" else {}))
    out[name] = (model, path)
  return out


@pytest.mark.parametrize("name", list(ALL_TINY))
def test_direct_restore_equals_conversion_bit_for_bit(hf_dirs, name):
  _, path = hf_dirs[name]
  assert layout.checkpoint_kind(path) == "hf" and checkpoint.checkpoint_problem(path) is None
  ref, config = hf.read_hf(path)
  assert checkpoint.load_config(path) == config
  direct = _flat(checkpoint.restore(path))
  want = _flat(ref)
  assert direct.keys() == want.keys()
  for k in want:
    assert direct[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(direct[k], want[k], err_msg=k)
  meta = table.flatten(checkpoint.param_metadata(path))
  assert {k: (m.shape, m.dtype) for k, m in meta.items()} == {
      k: (v.shape, v.dtype) for k, v in want.items()}
  assert checkpoint.stored_dtype(path) == ("bfloat16" if name == "llama_gqa" else "float32")
  # Cast on the way, as conversion casts.
  cast = _flat(checkpoint.restore(path, dtype=np.float16))
  np.testing.assert_array_equal(cast["embed/embedding"],
                                want["embed/embedding"].astype(np.float16))


@pytest.mark.parametrize("name", ["neox_parallel", "llama_gqa", "olmo2", "opt_post_ln_350m"])
def test_direct_restore_gives_hf_logprobs(hf_dirs, name):
  model, path = hf_dirs[name]
  config = checkpoint.load_config(path)
  params = checkpoint.restore(path, dtype=np.float32)
  ids, mask = oracle.padded_batch(oracle.TOKENS, [12, 9], 12, "right", seed=3)
  fn = jax.jit(functools.partial(scoring.token_logprobs, config=config, attention="xla"))
  got = np.asarray(fn(params, ids, mask)[0])[:, 1:]            # log p(ids[t+1] | ids[:t+1])
  want = oracle.hf_logprobs(model.float(), ids, mask)
  scored = (mask[:, 1:] & mask[:, :-1]).astype(bool)
  tol = 1e-4
  np.testing.assert_allclose(got[scored], want[scored], atol=tol, rtol=tol)


def test_score_text_on_an_hf_folder_equals_its_converted_copy(tmp_path):
  tok = _suite_util.train_tokenizer(str(tmp_path / "tok"))
  config = families.get("gpt_neox").config(
      vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=2)
  hf_dir = str(tmp_path / "pythia-tiny")
  oracle.hf_model(config).save_pretrained(hf_dir)
  shutil.copy(tok, hf_dir)
  jax_dir = convert(hf_dir, tmp_path / "pythia-tiny-jax")
  text = tmp_path / "doc.txt"
  text.write_text(" ".join(_suite_util.CORPUS[:4]))
  out = {}
  for kind, path in (("hf", hf_dir), ("jax", jax_dir)):
    res = subprocess.run(
        [sys.executable, "-m", "tools.score_text", f"--checkpoint={path}", f"--input={text}",
         f"--output={tmp_path / kind}.jsonl", "--context_length=32", "--stride=16"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr
    out[kind] = json.loads((tmp_path / f"{kind}.jsonl").read_text())
  assert out["hf"]["token_ids"] == out["jax"]["token_ids"] and len(out["hf"]["logprobs"]) > 32
  np.testing.assert_array_equal(out["hf"]["logprobs"], out["jax"]["logprobs"])


def test_bin_weights_are_convert_only_in_one_line(hf_dirs, tmp_path):
  model, src = hf_dirs["opt_pre_ln"]
  path = tmp_path / "bin"
  path.mkdir()
  shutil.copy(os.path.join(src, "config.json"), path)
  torch.save(model.state_dict(), path / "pytorch_model.bin")
  problem = checkpoint.checkpoint_problem(path)
  assert problem == (f"{path} holds PyTorch .bin weights, which opt_jax reads only to convert "
                     f"them: run python -m tools.convert_checkpoint --input={path} --output=DIR "
                     "and use DIR")
  with pytest.raises(InputError, match="reads only to convert"):
    checkpoint.restore(path)
  # Conversion still reads it.
  params, _ = hf.read_hf(path)
  assert "embed" in params


def test_damaged_hf_folders_are_named_before_any_read(hf_dirs, tmp_path):
  _, src = hf_dirs["neox_sequential"]
  bad = tmp_path / "bad"
  shutil.copytree(src, bad)
  weights = bad / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[: len(data) // 2])
  assert re.fullmatch(re.escape(str(weights)) + r": tensor gpt_neox\.\S+ needs bytes \d+\.\.\d+ "
                      r"of the data but the file holds only \d+: the file is truncated",
                      checkpoint.checkpoint_problem(bad))
  with pytest.raises(InputError, match="truncated"):
    checkpoint.restore(bad)
  # A config that does not describe the stored tensors.
  shutil.copyfile(src + "/model.safetensors", weights)
  cfg = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
  assert "missing tensor gpt_neox.layers.2." in checkpoint.checkpoint_problem(bad)


# Meshes: each device reads its block, nothing else ----------------------------------------------

def test_direct_restore_onto_meshes_reads_only_the_local_blocks(tmp_path):
  out = tmp_path / "out.json"
  res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_hf_direct_child.py"),
                        str(tmp_path), str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
  assert res.returncode == 0, res.stderr[-3000:]
  runs = json.loads(out.read_text())
  assert len(runs) == 5 * 4   # 5 families x (3 meshes + one bf16 restore)
  for key, r in runs.items():
    assert r["equal"], key                       # every shard = the orbax restore's
    assert r["sharded"] >= 7, key                # the mesh really splits the params
    # Bytes read = bytes of the distinct blocks the devices hold: no superset, no re-read.
    assert r["bytes_read"] == r["bytes_held"], key


# Snapshot identity ------------------------------------------------------------------------------

def _cache_suite(tmp_path, cache, name="suite.json"):
  from opt_jax import hf_cache  # pylint: disable=import-outside-toplevel
  build = hf_cache.build_suite(["org/opt-a"], cache_dir=cache, tokens_per_step=1000)
  path = tmp_path / name
  suite.save_suite(build.manifest, path)
  return suite.load_suite(path)


def test_results_of_snapshots_record_the_sha_and_a_reupload_is_stale(tmp_path, caplog):
  cache = str(tmp_path / "hub")
  srcs = [u.tiny_opt(str(tmp_path / f"s{i}"), seed=i) for i in range(3)]
  u.add_revision(cache, "org/opt-a", "step100", srcs[0])
  u.add_revision(cache, "org/opt-a", "step200", srcs[1])
  s = _cache_suite(tmp_path, cache)
  m = s.model("opt-a")
  store = results.ResultStore(tmp_path / "store")
  seen = []

  def evaluate(model, step, config, params):
    seen.append((step, float(np.asarray(params["embed"]["embedding"]).sum())))
    return {"x": np.zeros(1)}, {}

  report = sweep.run_sweep(s, evaluate, store, progress=False)
  assert report.evaluated == [("eval", "opt-a", 100), ("eval", "opt-a", 200)]
  ident = store.read_meta(("eval", "opt-a", 100))["identity"]
  sha100 = u.commit_sha("org/opt-a", "step100")
  assert ident["fingerprint"] == f"hf-snapshot:{sha100}" and ident["revision"] == "step100"
  assert ident["path"] == m.path(100) and ident["restore_dtype"] == "float32"
  assert sweep.run_sweep(s, evaluate, store, progress=False).skipped == report.evaluated

  # step200 re-uploaded: a new commit; the rebuilt manifest points at its snapshot.
  new_sha = "f" * 40
  u.add_revision(cache, "org/opt-a", "step200", srcs[2], sha=new_sha)
  s2 = _cache_suite(tmp_path, cache, "suite2.json")
  with caplog.at_level(logging.WARNING, logger="opt_jax.sweep"):
    report = sweep.run_sweep(s2, evaluate, store, progress=False)
  assert report.recomputed == [("eval", "opt-a", 200)]
  assert store.read_meta(("eval", "opt-a", 200))["identity"]["fingerprint"] == \
      f"hf-snapshot:{new_sha}"
  assert seen[-1][1] == pytest.approx(float(hf.read_hf(srcs[2])[0]["embed"]["embedding"].sum()))

  # A blob replaced under the same snapshot (same sha, other files): stale too.
  snap = m.path(100)
  os.unlink(os.path.join(snap, "model.safetensors"))
  shutil.copyfile(os.path.join(srcs[2], "model.safetensors"),
                  os.path.join(snap, "model.safetensors"))
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="opt_jax.sweep"):
    report = sweep.run_sweep(s2, evaluate, store, progress=False)
  assert report.recomputed == [("eval", "opt-a", 100)]
  assert "the files of" in caplog.text and "changed since" in caplog.text


def test_a_suite_sha_that_is_not_the_snapshot_folders_is_refused(tmp_path):
  cache = str(tmp_path / "hub")
  src = u.tiny_opt(str(tmp_path / "s"), seed=0)
  snap = u.add_revision(cache, "org/opt-a", "step1", src)
  assert checkpoint.identity(snap)["fingerprint"] == f"hf-snapshot:{os.path.basename(snap)}"
  with pytest.raises(InputError, match="the suite gives sha 0{40}, but this is the snapshot"):
    checkpoint.identity(snap, sha="0" * 40)
  # A copy outside the cache with the sha from its suite entry keeps the snapshot scheme.
  copy = shutil.copytree(snap, tmp_path / "copy")
  assert checkpoint.identity(copy, sha="a" * 40)["fingerprint"] == "hf-snapshot:" + "a" * 40
  assert checkpoint.identity(copy)["fingerprint"].startswith("files:")
