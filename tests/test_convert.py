import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import transformers

from opt_jax import families
from opt_jax.checkpoints import checkpoint
from opt_jax import model as M
from opt_jax.convert import ConversionError, convert, hf, metaseq
import oracle

PRE, POST = oracle.TINY["pre_ln"], oracle.TINY["post_ln_350m"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_params_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    g = np.asarray(g)
    assert g.dtype == w.dtype and g.shape == w.shape, path
    np.testing.assert_array_equal(g.view(np.uint32), w.view(np.uint32), err_msg=str(path))


@pytest.fixture(scope="module", params=["pre_ln", "post_ln_350m"])
def hf_dir(request, tmp_path_factory):
  """An HF checkpoint saved by transformers itself, its config, model and oracle params."""
  config = oracle.TINY[request.param]
  model = oracle.hf_model(config, seed=5)
  d = tmp_path_factory.mktemp("hf") / request.param
  model.save_pretrained(d)
  (d / "vocab.json").write_text('{"fake": 0}')
  (d / "merges.txt").write_text("#version: 0.2\n")
  return str(d), config, model, oracle.params_from_hf_model(model, config)


@pytest.fixture(scope="module")
def hf_pre(tmp_path_factory):
  model = oracle.hf_model(PRE, seed=7)
  d = tmp_path_factory.mktemp("hfpre")
  model.save_pretrained(d)
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  return str(d), model, sd, oracle.params_from_hf_model(model, PRE)


def _hf_variant(root, name, config, tensors, filename="model.safetensors", torch_save=False):
  d = os.path.join(root, name)
  os.makedirs(d)
  families.write_config(config, os.path.join(d, "config.json"))
  if torch_save:
    torch.save(tensors, os.path.join(d, filename))
  else:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()},
                                os.path.join(d, filename), metadata={"format": "pt"})
  return d


# HF reading ---------------------------------------------------------------------------------

def test_safetensors_from_save_pretrained_matches_state_dict(hf_dir):
  d, config, _, want = hf_dir
  params, got_config = hf.read_hf(d)
  assert got_config == config
  _assert_params_equal(params, want)


def test_sharded_safetensors_with_index(hf_pre, tmp_path):
  _, model, _, want = hf_pre
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
  _assert_params_equal(hf.read_hf(tmp_path)[0], want)


def test_pytorch_bin_and_decoder_key_layout(hf_pre, tmp_path):
  _, _, sd, want = hf_pre
  d = _hf_variant(tmp_path, "bin", PRE, sd, "pytorch_model.bin", torch_save=True)
  _assert_params_equal(hf.read_hf(d)[0], want)
  # OPTModel (no LM head wrapper) names tensors decoder.*.
  bare = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
  d = _hf_variant(tmp_path, "bare", PRE, bare)
  _assert_params_equal(hf.read_hf(os.path.join(d, "model.safetensors"))[0], want)


def test_stored_lm_head_equal_to_embedding_is_accepted(hf_pre, tmp_path):
  _, _, sd, want = hf_pre
  tensors = dict(sd, **{"lm_head.weight": sd["model.decoder.embed_tokens.weight"].clone()})
  d = _hf_variant(tmp_path, "head", PRE, tensors)
  _assert_params_equal(hf.read_hf(d)[0], want)


def test_bfloat16_safetensors_are_read_exactly(hf_pre, tmp_path):
  _, _, sd, want = hf_pre
  d = _hf_variant(tmp_path, "bf16", PRE, {k: v.to(torch.bfloat16) for k, v in sd.items()})
  params, _ = hf.read_hf(d)
  for g, w in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert g.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(g.view(np.uint16), w.astype(ml_dtypes.bfloat16).view(np.uint16))


# HF -> opt_jax -> HF ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
  d, config, model, want = hf_dir
  out = convert(d, str(tmp_path_factory.mktemp("jax") / "ckpt"))
  return out, hf_dir


def test_converted_checkpoint_layout_and_tokenizer(converted):
  out, (d, config, _, want) = converted
  assert checkpoint.is_checkpoint(out)
  assert checkpoint.load_config(out) == config
  assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "opt_jax.json", "params",
                                     "vocab.json"]
  meta = checkpoint.load_metadata(out)
  assert meta["source_format"] == "hf" and meta["converted_from"] == d
  _assert_params_equal(jax.tree.map(np.asarray, checkpoint.restore(out)), want)


def test_converted_params_give_hf_logits(converted):
  out, (_, config, model, _) = converted
  params = checkpoint.restore(out)
  ids, mask = oracle.padded_batch(config.vocab_size, [12, 7], 12, "left", seed=3)
  with torch.no_grad():
    want = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  hidden, _ = M.Decoder(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  got = np.asarray(M.logits(params, hidden))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_hf_to_opt_jax_to_hf_is_bit_exact(converted, tmp_path):
  out, (d, _, model, _) = converted
  back = convert(out, str(tmp_path / "hf"), output_format="hf", max_shard_bytes=30_000)
  assert os.path.isfile(os.path.join(back, "model.safetensors.index.json"))
  # Every tensor of the original file, byte for byte, read by the safetensors library.
  with safetensors.safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
    original = {k: f.get_tensor(k) for k in f.keys()}
  index = json.load(open(os.path.join(back, "model.safetensors.index.json")))["weight_map"]
  assert set(index) == set(original) - {"lm_head.weight"}
  for name, shard in index.items():
    with safetensors.safe_open(os.path.join(back, shard), "pt") as f:
      assert torch.equal(f.get_tensor(name), original[name]), name
  # And transformers loads it into the same model.
  reloaded = transformers.OPTForCausalLM.from_pretrained(back)
  for k, v in model.state_dict().items():
    assert torch.equal(reloaded.state_dict()[k], v), k
  assert sorted(f for f in os.listdir(back) if not f.endswith("safetensors")) == [
      "config.json", "merges.txt", "model.safetensors.index.json", "vocab.json"]


def test_bfloat16_export_loads_in_transformers(hf_pre, tmp_path):
  d, model, _, _ = hf_pre
  out = convert(d, str(tmp_path / "hf16"), output_format="hf", dtype="bfloat16")
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  reloaded = transformers.OPTForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  for k, v in model.state_dict().items():
    assert torch.equal(reloaded.state_dict()[k], v.to(torch.bfloat16)), k


# metaseq ------------------------------------------------------------------------------------

def metaseq_parts(hf_state: dict, config, parts: int) -> list[dict]:
  """metaseq state dicts of `parts` Megatron model-parallel parts, built the way metaseq shards
  an OPT model: column-parallel q/k/v/fc1 split on output rows and q, k, v fused per part in
  metaseq's K, V, Q order; row-parallel out_proj/fc2 split on input columns with replicated bias;
  vocab-parallel embeddings; everything else replicated."""
  out = [{} for _ in range(parts)]
  split = lambda t, dim: [c.clone() for c in torch.chunk(t, parts, dim)]
  sd = {k[len("model.decoder."):]: v for k, v in hf_state.items() if k != "lm_head.weight"}
  renames = {"final_layer_norm.weight": "layer_norm.weight",
             "final_layer_norm.bias": "layer_norm.bias",
             "project_in.weight": "project_in_dim.weight",
             "project_out.weight": "project_out_dim.weight"}
  for name, t in sd.items():
    if ".q_proj." in name:
      kvq = [split(sd[name.replace(".q_proj.", f".{x}_proj.")], 0) for x in "kvq"]
      for p in range(parts):
        out[p]["decoder." + name.replace(".q_proj.", ".qkv_proj.")] = torch.cat([c[p] for c in kvq])
      continue
    if ".k_proj." in name or ".v_proj." in name:
      continue
    if name == "embed_tokens.weight":
      pieces = split(t, 0)
      for p in range(parts):
        out[p]["decoder.output_projection.weight"] = pieces[p].clone()
    elif name.endswith(("fc1.weight", "fc1.bias")):
      pieces = split(t, 0)
    elif name.endswith(("out_proj.weight", "fc2.weight")):
      pieces = split(t, 1)
    else:
      pieces = [t.clone() for _ in range(parts)]
    for p in range(parts):
      out[p]["decoder." + renames.get(name, name)] = pieces[p]
  for p in range(parts):
    out[p]["decoder.version"] = torch.tensor([3.0])
  return out


def write_metaseq(directory, hf_state, config, parts, settings=None):
  os.makedirs(directory, exist_ok=True)
  paths = []
  for p, state in enumerate(metaseq_parts(hf_state, config, parts)):
    name = "consolidated.pt" if parts == 1 else f"reshard-model_part-{p}.pt"
    obj = {"model": state, "optimizer_history": [{"num_updates": 10}], **(settings or {})}
    torch.save(obj, os.path.join(directory, name))
    paths.append(os.path.join(directory, name))
  return paths


def _args(config):
  return argparse.Namespace(decoder_attention_heads=config.num_attention_heads,
                            decoder_normalize_before=config.block == "pre_norm",
                            activation_fn="relu", decoder_layers=config.num_hidden_layers)


@pytest.fixture(scope="module")
def hf_models():
  return {name: oracle.hf_model(oracle.TINY[name], seed=11) for name in ("pre_ln", "post_ln_350m")}


@pytest.mark.parametrize("name,parts,settings", [
    ("pre_ln", 1, "args"), ("pre_ln", 2, "cfg"), ("post_ln_350m", 1, "args"),
    ("post_ln_350m", 2, "args")])
def test_metaseq_equals_hf_conversion(hf_models, tmp_path, name, parts, settings):
  config, model = oracle.TINY[name], hf_models[name]
  hf_dir = tmp_path / "hf"
  model.save_pretrained(hf_dir)
  want, _ = hf.read_hf(hf_dir)
  stored = ({"args": _args(config)} if settings == "args" else
            {"cfg": {"model": vars(_args(config)), "task": {"_name": "streaming_lm"}}})
  paths = write_metaseq(tmp_path / "ms", model.state_dict(), config, parts, stored)
  params, got_config = metaseq.read_metaseq(paths[-1])  # any part names the whole set
  assert got_config == config
  _assert_params_equal(params, want)


def test_metaseq_two_parts_via_directory_and_config_file(hf_models, tmp_path):
  config, model = POST, hf_models["post_ln_350m"]
  want = oracle.params_from_hf_model(model, config)
  write_metaseq(tmp_path / "ms", model.state_dict(), config, 2)
  families.write_config(config, tmp_path / "config.json")
  params, got = metaseq.read_metaseq(tmp_path / "ms", config_path=str(tmp_path / "config.json"))
  assert got == config
  _assert_params_equal(params, want)
  with pytest.raises(ConversionError, match="cannot tell the number of attention heads.*--config"):
    metaseq.read_metaseq(tmp_path / "ms")


def test_metaseq_to_hf_loads_in_transformers_with_tokenizer(hf_models, tmp_path):
  config, model = PRE, hf_models["pre_ln"]
  write_metaseq(tmp_path / "ms", model.state_dict(), config, 2, {"args": _args(config)})
  (tmp_path / "ms" / "gpt2-vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "c": 3}))
  (tmp_path / "ms" / "gpt2-merges.txt").write_text("#version: 0.2\na b\n")
  (tmp_path / "ms" / "dict.txt").write_text("2 100\n0 50\n3 7\nmadeupword0000 0\n")
  out = convert(tmp_path / "ms", tmp_path / "out", output_format="hf")
  reloaded = transformers.OPTForCausalLM.from_pretrained(out)
  for k, v in model.state_dict().items():
    assert torch.equal(reloaded.state_dict()[k], v), k
  # fairseq ids: <s> <pad> </s> <unk> = 0..3, then dict.txt lines; "b" (GPT-2 id 1) is not in it.
  assert json.load(open(os.path.join(out, "vocab.json"))) == {
      "<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "ab": 4, "a": 5, "c": 6}
  assert open(os.path.join(out, "merges.txt")).read() == "#version: 0.2\na b\n"


class _Evil:
  def __reduce__(self):
    return (os.system, (f"touch {_Evil.marker}",))


def test_metaseq_pickle_runs_no_code_and_fsdp_wrapper_names_work(hf_models, tmp_path):
  _Evil.marker = str(tmp_path / "pwned")
  config, model = PRE, hf_models["pre_ln"]
  (state,) = metaseq_parts(model.state_dict(), config, 1)
  state = {k.replace("layers.1.", "layers.1._fsdp_wrapped_module._fpw_module."): v
           for k, v in state.items()}
  os.makedirs(tmp_path / "ms")
  torch.save({"model": state, "args": _args(config), "extra_state": _Evil()},
             tmp_path / "ms" / "consolidated.pt")
  params, got = metaseq.read_metaseq(tmp_path / "ms" / "consolidated.pt")
  assert got == config
  _assert_params_equal(params, oracle.params_from_hf_model(model, config))
  assert not os.path.exists(_Evil.marker)


# Bad input ----------------------------------------------------------------------------------

def _fails(tmp_path, source, match, **kwargs):
  """convert() raises ConversionError matching `match` and leaves no output behind."""
  before = set(os.listdir(tmp_path))
  with pytest.raises(ConversionError, match=match):
    convert(source, tmp_path / "out", **kwargs)
  assert set(os.listdir(tmp_path)) == before  # neither "out" nor a hidden temporary


def test_missing_tensor(hf_pre, tmp_path):
  _, _, sd, _ = hf_pre
  d = _hf_variant(tmp_path, "in", PRE, {k: v for k, v in sd.items()
                                       if k != "model.decoder.layers.1.fc2.bias"})
  _fails(tmp_path, d, r"in/model.safetensors: missing tensor model.decoder.layers.1.fc2.bias, "
                      r"needed by .*in/config.json")


def test_unexpected_tensor(hf_pre, tmp_path):
  _, _, sd, _ = hf_pre
  extra = dict(sd, **{"model.decoder.layers.0.adapter.weight": torch.zeros(2, 2)})
  d = _hf_variant(tmp_path, "in", PRE, extra)
  _fails(tmp_path, d, r"in/model.safetensors: unexpected tensor "
                      r"model.decoder.layers.0.adapter.weight")


def test_shape_not_matching_config(hf_pre, tmp_path):
  _, _, sd, _ = hf_pre
  d = _hf_variant(tmp_path, "in", PRE.replace(intermediate_size=48), sd)
  _fails(tmp_path, d, r"in/model.safetensors: tensor model.decoder.layers.0.fc1.weight has shape "
                      r"\(64, 32\), .*in/config.json implies \(48, 32\)")


def test_truncated_and_corrupt_safetensors(hf_pre, tmp_path):
  _, _, sd, _ = hf_pre
  d = _hf_variant(tmp_path, "in", PRE, sd)
  path = os.path.join(d, "model.safetensors")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-100])
  _fails(tmp_path, d, r"in/model.safetensors: tensor \S+ needs bytes .* the file is truncated")
  open(path, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  _fails(tmp_path, d, r"in/model.safetensors: corrupt safetensors header")
  open(path, "wb").write(b"garbage")
  _fails(tmp_path, d, r"in/model.safetensors: not a valid safetensors file")


def test_truncated_pytorch_bin(hf_pre, tmp_path):
  _, _, sd, _ = hf_pre
  d = _hf_variant(tmp_path, "in", PRE, sd, "pytorch_model.bin", torch_save=True)
  path = os.path.join(d, "pytorch_model.bin")
  open(path, "r+b").truncate(os.path.getsize(path) // 2)
  _fails(tmp_path, d, r"in/pytorch_model.bin: cannot read as a PyTorch checkpoint")


def test_missing_shard_and_missing_config(hf_pre, tmp_path):
  _, model, _, _ = hf_pre
  d = tmp_path / "in"
  model.save_pretrained(d, max_shard_size="20KB")
  os.remove(d / "model-00002-of-00006.safetensors" if os.path.exists(
      d / "model-00002-of-00006.safetensors") else sorted(d.glob("model-0000*"))[1])
  _fails(tmp_path, d, r"model.safetensors.index.json: shard model-00002-of-\d+.safetensors "
                      r"\(holding e.g. \S+\) not found")
  d2 = tmp_path / "noconfig"
  model.save_pretrained(d2)
  os.remove(d2 / "config.json")
  _fails(tmp_path, d2, r"noconfig/config.json not found")


def test_untied_lm_head(hf_pre, tmp_path):
  _, _, sd, _ = hf_pre
  d = _hf_variant(tmp_path, "in", PRE, dict(sd, **{"lm_head.weight": torch.randn(101, 32)}))
  _fails(tmp_path, d, r"in/model.safetensors: tensor lm_head.weight differs from "
                      r"model.decoder.embed_tokens.weight .*config.json ties the LM head")


def test_unknown_format(tmp_path):
  d = tmp_path / "in"
  d.mkdir()
  (d / "weights.npz").write_bytes(b"x")
  _fails(tmp_path, d, r"in: unknown checkpoint format; expected an HF checkpoint")
  _fails(tmp_path, d / "weights.npz", r"weights.npz: unknown checkpoint format")
  _fails(tmp_path, d / "weights.npz", r"weights.npz: unknown weights format", input_format="hf")
  _fails(tmp_path, d, r"unknown input format 'gguf'", input_format="gguf")


def test_metaseq_bad_inputs(hf_models, tmp_path):
  config, model = PRE, hf_models["pre_ln"]
  args = {"args": _args(config)}
  paths = write_metaseq(tmp_path / "ms3", model.state_dict(), config, 2, args)
  os.rename(paths[1], str(tmp_path / "ms3" / "reshard-model_part-2.pt"))
  _fails(tmp_path, paths[0], r"model part 1 of 3 not found \(expected reshard-model_part-1.pt")

  # A replicated tensor that differs between parts.
  parts = metaseq_parts(model.state_dict(), config, 2)
  parts[1]["decoder.layers.0.fc2.bias"] = parts[1]["decoder.layers.0.fc2.bias"] + 1
  os.makedirs(tmp_path / "msr")
  for p, state in enumerate(parts):
    torch.save({"model": state, **args}, tmp_path / "msr" / f"r-model_part-{p}.pt")
  _fails(tmp_path, tmp_path / "msr", r"r-model_part-1.pt: replicated tensor "
                                     r"decoder.layers.0.fc2.bias differs")

  # FSDP-flattened shard.
  os.makedirs(tmp_path / "fsdp")
  torch.save({"model": {"flat_param_0": torch.zeros(10)}, **args},
             tmp_path / "fsdp" / "checkpoint-shard0.pt")
  _fails(tmp_path, tmp_path / "fsdp", r"checkpoint-shard0.pt: tensor flat_param_0 is an "
                                      r"FSDP-flattened parameter")

  # Missing and unexpected tensors, truncated file.
  (state,) = metaseq_parts(model.state_dict(), config, 1)
  os.makedirs(tmp_path / "mm")
  torch.save({"model": {k: v for k, v in state.items() if "layers.1.fc1.bias" not in k}, **args},
             tmp_path / "mm" / "consolidated.pt")
  _fails(tmp_path, tmp_path / "mm", r"mm/consolidated.pt: missing tensor layers.1.fc1.bias")
  torch.save({"model": dict(state, **{"decoder.layers.0.ffn_layernorm.weight": torch.ones(64)}),
              **args}, tmp_path / "mm" / "consolidated.pt")
  _fails(tmp_path, tmp_path / "mm", r"consolidated.pt \[decoder.layers.0.ffn_layernorm.weight\]: "
                                    r"unexpected tensor")
  path = tmp_path / "mm" / "consolidated.pt"
  open(path, "r+b").truncate(os.path.getsize(path) - 300)
  _fails(tmp_path, path, r"consolidated.pt: cannot read as a PyTorch checkpoint")


def test_cli_converts_and_reports_errors(hf_pre, tmp_path):
  d, _, _, want = hf_pre
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run([sys.executable, "-m", "tools.convert_checkpoint", *args],
                                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  ok = run(f"--input={d}", f"--output={tmp_path / 'out'}", "--format=hf", "--dtype=bfloat16")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert checkpoint.load_metadata(tmp_path / "out")["dtype"] == "bfloat16"
  bad = run(f"--input={tmp_path / 'nope'}", f"--output={tmp_path / 'out2'}")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert f"error: {tmp_path / 'nope'}: no such file or directory" in bad.stderr
  assert sorted(os.listdir(tmp_path)) == ["out"]
