import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from opt_jax import families
from opt_jax.checkpoints import checkpoint, layout, orbax_format
import oracle

CONFIG = oracle.TINY["post_ln_350m"]  # has project_in/out: every kind of leaf.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_params(config, seed=0):
  """Numpy params of the model's layout with distinct random values (not produced by orbax)."""
  from opt_jax import model
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                      model.param_shapes(config))


def _bits(a):
  a = np.asarray(a)
  return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  params = _random_params(CONFIG)
  path = str(tmp_path_factory.mktemp("ckpt") / "model")
  tok = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tok.write_text('{"fake": true}')
  orbax_format.save(path, params, CONFIG, tokenizer_files=[tok], extra={"source": "test"})
  return path, params


def test_round_trip_is_bit_exact(saved):
  path, params = saved
  restored = checkpoint.restore(path)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  leaves = zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(restored))
  for (kp, want), got in leaves:
    assert got.dtype == want.dtype, kp
    np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=str(kp))


def test_directory_layout_config_metadata_and_tokenizer(saved):
  path, params = saved
  assert checkpoint.is_checkpoint(path)
  assert sorted(os.listdir(path)) == ["config.json", "opt_jax.json", "params", "tokenizer.json"]
  assert checkpoint.load_config(path) == CONFIG
  meta = checkpoint.load_metadata(path)
  assert meta["format"] == 2 and meta["dtype"] == "float32" and meta["source"] == "test"
  assert meta["num_params"] == CONFIG.num_params()
  # No temporary sibling is left behind.
  assert os.listdir(os.path.dirname(path)) == ["model"]


def test_restore_casts_dtype(saved):
  path, params = saved
  restored = checkpoint.restore(path, dtype=jnp.bfloat16)
  for want, got in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(got), _bits(want.astype(ml_dtypes.bfloat16)))


def test_restore_onto_named_sharding_one_device(saved):
  path, params = saved
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = jax.tree.map(lambda _: sharding, params)
  restored = checkpoint.restore(path, shardings=shardings)
  for want, got in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    assert got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), want)


def test_restore_rejects_shardings_of_another_tree(saved):
  path, params = saved
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: sharding, params)
  del shardings["project_in"]
  with pytest.raises(ValueError, match="missing.*project_in"):
    checkpoint.restore(path, shardings=shardings)


_FOUR_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from opt_jax.checkpoints import checkpoint
    path = sys.argv[1]
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("model",))
    stored = checkpoint.param_metadata(path)
    # Shard the heads of q/k/v [L, D, N, H] (N = 4) and the last axis of every other array that
    # divides by 4.
    def spec(s):
      axis = 2 if len(s.shape) == 4 else len(s.shape) - 1
      if s.shape[axis] % 4:
        return NamedSharding(mesh, P())
      return NamedSharding(mesh, P(*([None] * axis + ["model"])))
    restored = checkpoint.restore(path, shardings=jax.tree.map(spec, stored))
    q = restored["layers"]["attn"]["q_kernel"]
    full = np.load(sys.argv[2])
    assert len(q.addressable_shards) == 4
    for shard in q.addressable_shards:
      assert shard.data.shape == full.shape[:2] + (full.shape[2] // 4,) + full.shape[3:], shard
      np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    print("OK", q.shape, q.addressable_shards[0].data.shape)
""")


def test_restore_sharded_over_four_simulated_devices(saved, tmp_path):
  path, params = saved
  np.save(tmp_path / "q.npy", params["layers"]["attn"]["q_kernel"])
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, path, str(tmp_path / "q.npy")],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK (2, 32, 4, 8) (2, 32, 1, 8)" in out.stdout


def test_save_refuses_existing_directory_unless_overwrite(saved, tmp_path):
  path = str(tmp_path / "ckpt")
  first = _random_params(CONFIG, seed=1)
  orbax_format.save(path, first, CONFIG)
  with pytest.raises(FileExistsError, match="already exists"):
    orbax_format.save(path, first, CONFIG)
  second = _random_params(CONFIG, seed=2)
  orbax_format.save(path, second, CONFIG, overwrite=True)
  got = checkpoint.restore(path)
  np.testing.assert_array_equal(np.asarray(got["embed"]["embedding"]),
                                second["embed"]["embedding"])
  assert os.listdir(tmp_path) == ["ckpt"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
  params = _random_params(CONFIG)
  params["layers"]["mlp"]["up_kernel"] = params["layers"]["mlp"]["up_kernel"][:, :, :3]
  with pytest.raises(ValueError, match=r"layers/mlp/up_kernel has shape \(2, 32, 3\), config "
                                       r"expects \(2, 32, 64\)"):
    orbax_format.save(str(tmp_path / "bad"), params, CONFIG)
  # A failure after the arrays are written (here: writing config.json) removes them too.
  def broken(config, path):
    raise OSError("disk full")
  monkeypatch.setattr(families, "write_config", broken)
  with pytest.raises(OSError, match="disk full"):
    orbax_format.save(str(tmp_path / "bad"), _random_params(CONFIG), CONFIG)
  assert os.listdir(tmp_path) == []


def test_missing_directory_error(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=f"{missing}: no such directory; expected an opt_jax"):
    checkpoint.restore(missing)
  with pytest.raises(FileNotFoundError, match="no such directory"):
    checkpoint.load_config(missing)
  assert not checkpoint.is_checkpoint(missing)


def test_missing_config_error(saved, tmp_path):
  d = tmp_path / "noconfig"
  d.mkdir()
  (d / "opt_jax.json").write_text(json.dumps({"format": 2}))
  with pytest.raises(FileNotFoundError, match=f"{d / 'config.json'} not found"):
    checkpoint.load_config(d)
  with pytest.raises(FileNotFoundError, match=f"{d / 'config.json'} not found"):
    checkpoint.restore(d)
  assert not checkpoint.is_checkpoint(d)


def test_format_1_checkpoint_fails_asking_to_reconvert(saved, tmp_path):
  # A checkpoint written before the family-neutral parameter names (format 1, OPT names).
  import shutil
  old = tmp_path / "old"
  shutil.copytree(saved[0], old)
  (old / "opt_jax.json").write_text(json.dumps({"format": 1, "converted_from": "/ckpts/opt-hf"}))
  with pytest.raises(ValueError) as e:
    checkpoint.restore(old)
  msg = str(e.value)
  assert "\n" not in msg and "format 1" in msg and "re-convert it from its source /ckpts/opt-hf" \
      in msg and "tools.convert_checkpoint" in msg


def test_hf_directory_with_a_damaged_weights_file_is_refused_naming_it(tmp_path):
  families.write_config(CONFIG, tmp_path / "config.json")
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match=r"model.safetensors: not a valid safetensors file.*"
                                       r"truncated or corrupt"):
    checkpoint.restore(tmp_path)
  assert layout.checkpoint_kind(tmp_path) == "hf" and not checkpoint.is_checkpoint(tmp_path)
  assert checkpoint.load_config(tmp_path) == CONFIG  # config alone is still readable
