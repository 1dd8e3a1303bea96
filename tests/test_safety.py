"""Never overwrite an input, never guess a tensor's meaning, and a full disk is a one-line error.

One test per way a binary could lose data or answer silently wrong: outputs that are inputs or lie
in checkpoint folders, integer weights, a stored tied head that differs (conversion and in-place
reads alike), two experiments in one --out, a full disk (a real 1 MiB tmpfs when the tests run as
root, else skipped; simulated ENOSPC always), torch's refusal of a malicious pickle, odd index
entries and output paths, BOM and CRLF in text inputs.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import _suite_util as U
from experiments import context
from experiments import validation_ppl as V
from opt_jax import cli, convert, families, files, inputs, results
from opt_jax.checkpoints import checkpoint, hf_format, layout, orbax_format, safetensors_io
from opt_jax.convert import hf
from opt_jax.errors import InputError, OutputExistsError
from tools import score_text

CONFIG = U.SIZES["tiny-a"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_folder(directory, tensors=None, config=CONFIG, tokenizer=False) -> str:
  """An HF safetensors folder of `config` with random weights (`tensors` replaces some)."""
  os.makedirs(directory, exist_ok=True)
  state = {k: np.ascontiguousarray(v, np.float32) for k, v in
           hf.state_dict_from_params(U.random_params(config, seed=3), config).items()}
  state.update(tensors or {})
  save_file(state, os.path.join(directory, "model.safetensors"))
  families.write_config(config, os.path.join(directory, "config.json"))
  if tokenizer:
    U.train_tokenizer(str(directory))
  return str(directory)


def _tree(root):
  return {p: open(p, "rb").read() for p in glob.glob(os.path.join(root, "**"), recursive=True)
          if os.path.isfile(p)}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  root = tmp_path_factory.mktemp("safety")
  hf_dir = _hf_folder(root / "hf", tokenizer=True)
  steps = {}
  for step in (1, 2):
    steps[step] = str(root / "ckpt" / f"step{step}")
    orbax_format.save(steps[step], U.random_params(CONFIG, seed=step), CONFIG,
                      tokenizer_files=[os.path.join(hf_dir, "tokenizer.json")])
  manifest = {"name": "t", "models": [{"name": "m", "params": CONFIG.num_params(),
                                       "tokens_per_step": 1,
                                       "checkpoints": {str(s): p for s, p in steps.items()}}]}
  (root / "suite.json").write_text(json.dumps(manifest))
  (root / "text.txt").write_text(" ".join(U.CORPUS[:2]))
  return {"root": root, "hf": hf_dir, "steps": steps, "suite": str(root / "suite.json"),
          "text": str(root / "text.txt")}


# 1. No binary writes over its inputs, into a checkpoint, or over a file it did not write -------

def test_score_text_never_writes_over_an_input_a_checkpoint_or_a_foreign_file(made, tmp_path,
                                                                              monkeypatch):
  monkeypatch.setattr(checkpoint, "restore", lambda *a, **k: pytest.fail("restored"))
  corpus = tmp_path / "self.jsonl"
  corpus.write_text(json.dumps({"text": U.CORPUS[0]}) + "\n")
  notes = tmp_path / "notes.txt"
  notes.write_text("keep me")
  link = tmp_path / "link.jsonl"
  link.symlink_to(corpus)
  before = {**_tree(made["hf"]), **_tree(str(tmp_path))}
  settings = lambda output, **kw: score_text.Settings(checkpoint=made["hf"], input=str(corpus),
                                                      output=str(output), **kw)
  cases = [
      (corpus, {}, r"--output=.*self.jsonl is the input --input="),
      (link, {"overwrite": True}, r"is the input --input=.*self.jsonl \(through the link"),
      (os.path.join(made["hf"], "config.json"), {"overwrite": True},
       r"lies inside the input --checkpoint="),
      (os.path.join(made["steps"][1], "scores.jsonl"), {},
       r"lies inside the checkpoint folder .*step1; write the output elsewhere"),
      (notes, {}, r"notes.txt already exists; pass --overwrite to replace an earlier output of "
                  r"tools.score_text"),
      (notes, {"overwrite": True}, r"refusing to overwrite --output=.*notes.txt: it is not an "
                                   r"output of tools.score_text"),
  ]
  for output, kw, message in cases:
    with pytest.raises(OutputExistsError, match=message):
      score_text.run(settings(output, **kw))
  assert {**_tree(made["hf"]), **_tree(str(tmp_path))} == before
  # An earlier output of score_text is replaced with --overwrite only.
  earlier = tmp_path / "earlier.jsonl"
  earlier.write_text(json.dumps({"doc": 0, "source": "x", "num_tokens": 1, "nll": 1.0,
                                 "token_ids": [5], "tokens": ["a"], "logprobs": [-1.0]}) + "\n")
  with pytest.raises(OutputExistsError, match="pass --overwrite"):
    score_text.check_output(settings(earlier))
  assert score_text.check_output(settings(earlier, overwrite=True)) == str(earlier)
  # A folder that merely has a params/ subfolder is no checkpoint.
  (tmp_path / "params").mkdir()
  assert layout.enclosing_checkpoint(tmp_path / "params" / "new.jsonl") is None
  assert layout.enclosing_checkpoint(made["steps"][1]) == made["steps"][1]


# 2-3. Integer weights and a differing tied head: the same error, converted or read in place ----

def test_integer_weight_is_an_error_naming_the_tensor_in_conversion_and_in_place(made, tmp_path):
  name = "model.decoder.embed_positions.weight"
  shape = hf.expected_tensors(CONFIG)[name]
  bad = _hf_folder(tmp_path / "bad", {name: np.zeros(shape, np.int32)})
  message = (rf"model.safetensors: tensor {name} is stored as int32, but it is a weight: "
             r"expected a float \(float32, bfloat16, float16, float64\)")
  with pytest.raises(InputError, match=message):
    convert.convert(bad, tmp_path / "out")
  assert not os.path.exists(tmp_path / "out")
  assert "is stored as int32" in checkpoint.checkpoint_problem(bad)
  with pytest.raises(InputError, match=message):
    hf_format.restore(bad)
  # A .bin state dict holding it is refused the same way.
  torch = pytest.importorskip("torch")
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           hf.state_dict_from_params(U.random_params(CONFIG, seed=3), CONFIG).items()}
  state[name] = torch.zeros(shape, dtype=torch.int32)
  (tmp_path / "bin").mkdir()
  torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
  families.write_config(CONFIG, tmp_path / "bin" / "config.json")
  with pytest.raises(InputError, match=rf"tensor {name} is stored as int32"):
    convert.convert(tmp_path / "bin", tmp_path / "out2")


def test_tied_head_that_differs_is_refused_in_place_as_in_conversion(made, tmp_path):
  embed = "model.decoder.embed_tokens.weight"
  head = np.random.default_rng(0).normal(size=hf.expected_tensors(CONFIG)[embed])
  bad = _hf_folder(tmp_path / "bad", {"lm_head.weight": head.astype(np.float32)})
  message = (rf"tensor lm_head.weight differs from {embed} \(max abs difference [0-9.]+\), but "
             r"config.json ties the LM head")
  with pytest.raises(InputError, match=message):
    convert.convert(bad, tmp_path / "out")
  with pytest.raises(InputError, match=message):
    hf_format.restore(bad)
  # The same head equal to the embedding (read back as stored) is accepted by both.
  same = safetensors_io.SafetensorsFile(os.path.join(made["hf"], "model.safetensors")).read(embed)
  good = _hf_folder(tmp_path / "good", {"lm_head.weight": same})
  restored = hf_format.restore(good)
  np.testing.assert_array_equal(np.asarray(restored["embed"]["embedding"]), same)
  convert.convert(good, tmp_path / "out_good")


# 4 + issue 22.7. One experiment per --out, never a checkpoint folder -------------------------

def test_experiment_out_is_never_a_checkpoint_nor_another_experiments_folder(made, tmp_path):
  settings = lambda out: V.Settings(suite=made["suite"], out=str(out), corpus=(made["text"],))
  before = _tree(made["steps"][1])
  for out in (made["steps"][1], os.path.join(made["steps"][1], "ppl")):
    with pytest.raises(InputError, match=r"--out=.*step1.* is or lies inside the checkpoint "
                                         r"folder .*step1: outputs never go into a checkpoint"):
      context.Experiment("validation_ppl", settings(out), progress=False)
  assert _tree(made["steps"][1]) == before
  # A folder holding another experiment's run manifest (as its sweep writes them) is refused.
  out = tmp_path / "out"
  (out / "runs").mkdir(parents=True)
  (out / "runs" / "token_trajectories-x.json").write_text(
      json.dumps({"experiment": ["token_trajectories", "abc"], "status": "finished"}))
  with pytest.raises(InputError, match=r"holds the outputs of token_trajectories .*one "
                                       r"experiment per output folder.*give validation_ppl "
                                       r"another --out"):
    context.Experiment("validation_ppl", settings(out), progress=False)
  context.Experiment("token_trajectories", settings(out), progress=False)   # its own: fine


# 5. A full disk: one line, no temporary left, no run marked finished --------------------------

def test_disk_full_deep_in_a_library_is_one_error_and_leaves_no_temporary(tmp_path):
  target = tmp_path / "plots" / "a.pdf"

  def broken_writer(path):   # what matplotlib does when its write hits ENOSPC
    with open(path, "wb") as f:
      f.write(b"%PDF partial")
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
      raise AttributeError("'Stream' object has no attribute 'pos'")  # pylint: disable=W0707

  with pytest.raises(files.DiskFullError) as e:
    with files.atomic_path(target) as tmp:
      broken_writer(tmp)
  message = cli.user_error_message(e.value)
  assert message.startswith(f"no space left on the device of {target} (") and "\n" not in message
  assert os.listdir(tmp_path / "plots") == []
  # Tensorstore's wrapped ENOSPC (orbax) is found too; its device-memory RESOURCE_EXHAUSTED not.
  wrapped = ValueError("RESOURCE_EXHAUSTED: Failed to write 8192 bytes to file 14: No space left "
                       "on device [os_error_code='28']")
  assert files.disk_full_cause(wrapped) is wrapped
  assert files.disk_full_cause(RuntimeError("RESOURCE_EXHAUSTED: Out of memory")) is None
  assert cli.user_error_message(RuntimeError("RESOURCE_EXHAUSTED: Out of memory")) is None
  # An ENOSPC raised outside opt_jax.files still prints as one line naming the file.
  error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npz"))
  assert cli.user_error_message(error).startswith(f"no space left on the device of {tmp_path}")


def test_a_run_whose_plots_fail_is_marked_failed_not_finished(made, tmp_path, monkeypatch):
  import matplotlib.figure  # pylint: disable=import-outside-toplevel

  def full_disk(self, fname, *args, **kwargs):
    with open(fname, "wb") as f:
      f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
  settings = V.Settings(suite=made["suite"], out=str(tmp_path / "out"), corpus=(made["text"],),
                        context_length=32, batch_size=4)
  with pytest.raises(files.DiskFullError) as e:
    context.run_and_mark(lambda s: V.run(s, progress=False), settings)
  assert "\n" not in cli.user_error_message(e.value)
  (manifest,) = glob.glob(str(tmp_path / "out" / "runs" / "*.json"))
  data = json.loads(open(manifest).read())
  assert data["status"] == "failed" and data["sweep_status"] == "finished"
  assert data["error"].startswith("no space left on the device of")
  assert not [p for p in glob.glob(str(tmp_path / "out" / "**" / ".*"), recursive=True)]
  # Written all the way: the sweep's status stands.
  monkeypatch.undo()
  context.run_and_mark(lambda s: V.run(s, progress=False), settings.replace(plots=False))
  statuses = sorted(json.loads(open(p).read())["status"]
                    for p in glob.glob(str(tmp_path / "out" / "runs" / "*.json")))
  assert statuses == ["failed", "finished"]


@pytest.fixture
def tiny_disk(tmp_path):
  """A 1 MiB tmpfs (needs root; skipped elsewhere)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                          str(mount)], capture_output=True).returncode != 0:
    pytest.skip("mounting a small tmpfs needs root")
  yield mount
  subprocess.run(["umount", str(mount)], check=False)


# orbax's stopped worker threads leave callbacks on closed event loops (the binaries drop them).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_conversion_onto_a_full_disk_is_one_line_and_leaves_nothing(made, tiny_disk, tmp_path,
                                                                    monkeypatch, caplog):
  big = families.get("opt").config(vocab_size=320, hidden_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, ffn_dim=512, max_position_embeddings=64)
  src = _hf_folder(tmp_path / "big", config=big)
  assert os.path.getsize(os.path.join(src, "model.safetensors")) > 2 << 20
  # Found before writing: the free space is less than the params need.
  with pytest.raises(files.DiskFullError, match=r"no space left on the device of .*disk/out "
                                                r"\(.* free there, about 3.\d MiB needed"):
    convert.convert(src, tiny_disk / "out")
  assert os.listdir(tiny_disk) == []
  # Found mid-write (orbax's RESOURCE_EXHAUSTED from its worker threads): the same one line, no
  # worker traceback logged, the temporary removed.
  monkeypatch.setattr(files, "check_free_space", lambda *a: None)
  with pytest.raises(files.DiskFullError, match=r"about 3.\d MiB needed"):
    convert.convert(src, tiny_disk / "out")
  assert os.listdir(tiny_disk) == []
  assert not [r for r in caplog.records if "raised an exception" in r.getMessage()]
  # The results store on a full disk: one DiskFullError naming the result file.
  store = results.ResultStore(str(tiny_disk / "store"))
  with pytest.raises(files.DiskFullError, match=r"no space left on the device of .*\.npz"):
    store.write(("e", "t", "m", 1), {"x": np.zeros(1 << 18)}, {"step": 1})
  assert not glob.glob(str(tiny_disk / "store" / "**" / ".*"), recursive=True)


# 6. Messages: what happened and what to do --------------------------------------------------

def test_malicious_pickle_is_refused_naming_what_it_asked_for_without_torchs_advice(tmp_path):
  torch = pytest.importorskip("torch")

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))
  (tmp_path / "in").mkdir()
  torch.save({"model.decoder.embed_tokens.weight": Evil()}, tmp_path / "in" / "pytorch_model.bin")
  families.write_config(CONFIG, tmp_path / "in" / "config.json")
  with pytest.raises(InputError) as e:
    convert.convert(tmp_path / "in", tmp_path / "out")
  text = str(e.value)
  assert "refused to unpickle" in text and "GLOBAL posix.system" in text, text
  assert "weights_only" not in text and "truncated" not in text and "corrupt" not in text, text


def test_index_naming_a_file_outside_the_folder_is_named_once(made, tmp_path):
  d = _hf_folder(tmp_path / "ckpt")
  os.rename(os.path.join(d, "model.safetensors"), tmp_path / "outside.safetensors")
  names = safetensors_io.SafetensorsFile(str(tmp_path / "outside.safetensors")).names()
  (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {n: "../outside.safetensors" for n in names}}))
  with pytest.raises(InputError, match=r"lists tensor .* in '../outside.safetensors', which is "
                                       r"not a file name in .*ckpt: an index names shards beside "
                                       r"it") as e:
    convert.convert(d, tmp_path / "out")
  assert str(e.value).count("outside.safetensors") == 1


def test_conversion_output_paths_that_cannot_work_say_why_first(made, tmp_path, monkeypatch):
  monkeypatch.setattr(hf, "read_hf", lambda *a, **k: pytest.fail("the input was read"))
  link = tmp_path / "link"
  link.symlink_to(made["hf"])
  with pytest.raises(OutputExistsError, match=r"--output=.*link is the input --input=.*hf "
                                              r"\(through the link"):
    convert.convert(made["hf"], link, overwrite=True)
  with pytest.raises(OutputExistsError, match=r"--output=.*link is the input"):
    convert.convert(made["hf"], link)   # not first a request for --overwrite
  (tmp_path / "afile").write_text("x")
  with pytest.raises(InputError, match=r"--output=.*afile/out: .*afile is a file, so no folder "
                                       r"can be created there"):
    convert.convert(made["hf"], tmp_path / "afile" / "out")
  with pytest.raises(OutputExistsError, match=r"lies inside the checkpoint folder .*step1"):
    convert.convert(made["hf"], os.path.join(made["steps"][1], "converted"))


# 7. BOM and CRLF: dropped and read as LF, in .txt and .jsonl, and said ------------------------

def test_bom_and_crlf_are_read_as_what_they_mean_and_said_once(tmp_path):
  text = "first line\nsecond line\n"
  (tmp_path / "lf.txt").write_bytes(text.encode())
  (tmp_path / "win.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
  (tmp_path / "win.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "a\\r\\nb"}\r\n"c"\r\n')
  lf, win, jsonl = (inputs.read_corpus(tmp_path / n) for n in ("lf.txt", "win.txt", "win.jsonl"))
  assert win.texts == lf.texts == (text,) and lf.notes == ()
  assert win.notes == (inputs.BOM_DROPPED, inputs.CRLF_READ_AS_LF)
  assert jsonl.texts == ("a\r\nb", "c")    # a JSON value is content: kept as written
  assert inputs.BOM_DROPPED in jsonl.notes
  note = inputs.normalisation_note([lf, win, jsonl])
  assert note == ("input normalised: a leading UTF-8 byte-order mark dropped (win.txt, win.jsonl); "
                  "CRLF line endings read as LF (win.txt, win.jsonl)")
  assert inputs.normalisation_note([lf]) is None


def test_score_text_binary_says_the_normalisation_in_its_summary(made, tmp_path):
  (tmp_path / "win.txt").write_bytes(b"\xef\xbb\xbf" + " ".join(U.CORPUS[:2]).encode()
                                     + b"\r\nend\r\n")
  res = subprocess.run([sys.executable, "-m", "tools.score_text", f"--checkpoint={made['hf']}",
                        f"--input={tmp_path / 'win.txt'}", f"--output={tmp_path / 'o.jsonl'}",
                        "--context_length=32", "--compilation_cache="], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0, res.stderr
  assert res.stdout.count("input normalised: a leading UTF-8 byte-order mark dropped") == 1
  record = json.loads((tmp_path / "o.jsonl").read_text())
  assert "\r" not in "".join(record["tokens"]) and "\ufeff" not in "".join(record["tokens"])
