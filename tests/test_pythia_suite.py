"""Every analysis on a Pythia-architecture suite (GPT-NeoX, no prefix token, padded vocabulary),
checked against HF GPTNeoXForCausalLM: the checkpoints are converted from random HF models that
`_suite_util.pythia_hf_model` rebuilds, and the oracle tokenises with transformers'
PreTrainedTokenizerFast over the same tokenizer.json.

Pythia prepends nothing to a text: under the native convention a document's first token is
context only (never scored); under lm_eval every token is scored, the first given
<|endoftext|> (HFLM's prefix token).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import _suite_util as U
import oracle
from experiments import downstream_icl as D
from experiments import token_trajectories as TT
from experiments import validation_ppl as V
from experiments.tasks import icl as icl_tasks
from opt_jax import families, suite
from opt_jax.errors import InputError
from opt_jax.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = 32
# One document longer than two windows, two short ones.
DOCS = [" ".join(U.CORPUS) + " " + U.CORPUS[1], U.CORPUS[2], U.CORPUS[4]]
CLOZE_TEXT = "\n".join(U.CORPUS[i % 5] for i in range(12))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The folder of JAX's persistent compilation cache, shared with the binaries run here."""
  directory = str(tmp_path_factory.mktemp("jax_cache"))
  with U.persistent_compilation_cache(directory):
    yield directory


@pytest.fixture(scope="module")
def pythia(tmp_path_factory):
  root = tmp_path_factory.mktemp("pythia")
  path = U.make_pythia_suite(str(root))
  corpus = root / "valid.jsonl"
  corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
  hf_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(root / "tok" / "tokenizer.json"), bos_token="<|endoftext|>",
      eos_token="<|endoftext|>")
  hf_models = {(n, s): U.pythia_hf_model(n, s) for n in U.PYTHIA_SIZES for s in U.PYTHIA_STEPS}
  return dict(root=root, suite=suite.load_suite(path), corpus=str(corpus), hf_tok=hf_tok,
              hf=hf_models)


def _ids(hf_tok, text):
  return hf_tok.encode(text, add_special_tokens=False)




def hf_continuation(hf, context, continuation, length=64):
  """sum log p(continuation | context) by HF, one forward pass over the last `length` inputs."""
  whole = (list(context) + list(continuation))[-(length + 1):]
  with torch.no_grad():
    logits = hf(torch.tensor([whole[:-1]])).logits[0].double()
  lp = torch.log_softmax(logits, -1).numpy()[-len(continuation):]
  return float(lp[np.arange(len(continuation)), continuation].sum())


def _documents(hf_tok, conventions):
  """What each convention scores: native: the text's ids (the first one context only);
  lm_eval: <|endoftext|> + the text's ids (every text token scored)."""
  lead = [hf_tok.eos_token_id] if conventions == "lm_eval" else []
  return [lead + _ids(hf_tok, d) for d in DOCS]


def test_validation_ppl_equals_hf_log_probs(pythia, tmp_path):
  # (--conventions=lm_eval: the binary's test below.)
  out = tmp_path / "out"
  table = V.run(V.Settings(suite=pythia["suite"].source, out=str(out), corpus=(pythia["corpus"],),
                           context_length=WINDOW, batch_size=4, plots=False), progress=False).table
  docs = _documents(pythia["hf_tok"], "native")
  assert len(docs[0]) > 2 * WINDOW + 1                                     # three windows
  assert sorted(set(zip(table.model, table.step))) == sorted(pythia["hf"])
  for (name, step), hf in pythia["hf"].items():
    lps = [oracle.hf_rolling(hf, d, WINDOW) for d in docs]
    row = table[(table.model == name) & (table.step == step)].iloc[0]
    n = sum(len(lp) for lp in lps)
    assert row["num_tokens"] == n == sum(len(d) - 1 for d in docs)
    np.testing.assert_allclose(row["nll"], -sum(lp.sum() for lp in lps) / n, rtol=1e-5)
    assert row["tokens"] == step * U.PYTHIA_TOKENS_PER_STEP


def test_token_trajectories_losses_equal_hf(pythia, tmp_path):
  out = tmp_path / "out"
  outcome = TT.run(TT.Settings(suite=pythia["suite"].source, out=str(out),
                               corpus=(pythia["corpus"],), context_length=WINDOW, batch_size=4,
                               start_fractions=(0.0,), num_examples=2, plots=False),
                   progress=False)
  docs = _documents(pythia["hf_tok"], "native")
  for name in U.PYTHIA_SIZES:
    (path,) = glob.glob(str(out / "store" / "token_trajectories_matrix" / "*" / f"{name}.npz"))
    m = np.load(path)
    # Scored: every token but each document's first (no prefix token to condition it on).
    np.testing.assert_array_equal(m["token_ids"], np.concatenate([d[1:] for d in docs]))
    np.testing.assert_array_equal(m["positions"],
                                  np.concatenate([np.arange(1, len(d)) for d in docs]))
    np.testing.assert_array_equal(m["steps"], U.PYTHIA_STEPS)
    for c, step in enumerate(U.PYTHIA_STEPS):
      want = -np.concatenate([oracle.hf_rolling(pythia["hf"][name, step], d, WINDOW) for d in docs])
      np.testing.assert_allclose(m["losses"][:, c], want, atol=1e-4, rtol=0)
  assert set(outcome.analysis.percentages["model"]) == set(U.PYTHIA_SIZES)
  # Examples show the text around a token, its document's first token included.
  tok = load_tokenizer(pythia["suite"].model("pythia-a").path(128))
  corpus = TT.tokenize_corpus(["a", "b", "c"], DOCS, tok)
  first, second = docs[0][0], docs[0][1]
  assert TT.describe_token(corpus, tok, 0, right=0) == (
      f"{pythia['hf_tok'].decode([first])}[[{pythia['hf_tok'].decode([second])}]]")


def _harness_pair(hf_tok, context, continuation, conventions):
  """lm-evaluation-harness's encoding (trailing spaces of the context move into the
  continuation); Pythia's native convention is the same, as it prepends nothing."""
  if context == "":
    return [hf_tok.eos_token_id], _ids(hf_tok, continuation)
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  ctx = _ids(hf_tok, context)
  return ctx, _ids(hf_tok, context + continuation)[len(ctx):]


@pytest.mark.parametrize("conventions", ["native", "lm_eval"])
def test_downstream_icl_option_log_probs_equal_hf(pythia, tmp_path, conventions):
  cloze = tmp_path / "cloze.txt"
  cloze.write_text(CLOZE_TEXT)
  out = tmp_path / "out"
  # Both sizes natively; the smaller one under lm_eval (the same programs: no compilation).
  checkpoints = ([("pythia-a", 128), ("pythia-b", 1000)] if conventions == "native" else
                 [("pythia-a", 512)])
  settings = D.Settings(suite=pythia["suite"].source, out=str(out), bigbench_dir="",
                        cloze_text=(str(cloze),), cloze_examples=3, k_shot=(1,), plots=False,
                        batch_size=4, conventions=conventions,
                        models=tuple(dict.fromkeys(m for m, _ in checkpoints)))
  table = D.run(settings, progress=False).table
  tasks = icl_tasks.load_tasks("", None, (str(cloze),), cloze_examples=3, seed=0)
  items = icl_tasks.make_items(tasks.tasks, (1,), 0, None)
  pairs = [_harness_pair(pythia["hf_tok"], it.requests.context, c, conventions)
           for it in items for c in it.requests.continuations]
  assert max(len(c) + len(x) for c, x in pairs) > 65                  # some truncated on the left
  for name, step in checkpoints:
    (path,) = glob.glob(str(out / "store" / "downstream_icl" / "*" / name / f"{step}.npz"))
    got = np.load(path)["logprob"]
    want = [hf_continuation(pythia["hf"][name, step], c, x) for c, x in pairs]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert set(table["k_shot"]) == {1} and len(set(table["task"])) == 2


def test_validation_ppl_binary_with_lm_eval_conventions(pythia, compilation_cache, tmp_path):
  # The CLI path (flags -> Settings -> run) on the smaller size, named by its alias.
  args = [sys.executable, "-m", "experiments.validation_ppl",
          f"--suite={pythia['suite'].source}", f"--corpus={pythia['corpus']}",
          f"--out={tmp_path / 'out'}", "--context_length=32", "--conventions=lm_eval",
          "--noplots", "--models=EleutherAI/pythia-a", f"--compilation_cache={compilation_cache}"]
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "pythia-tiny: 3 checkpoints (3 evaluated now" in proc.stdout
  import pandas as pd  # pylint: disable=import-outside-toplevel
  table = pd.read_csv(tmp_path / "out" / V.CSV_NAME)
  docs = _documents(pythia["hf_tok"], "lm_eval")
  hf = pythia["hf"]["pythia-a", 512]
  nll = -sum(oracle.hf_rolling(hf, d, WINDOW).sum() for d in docs)
  row = table[table.step == 512].iloc[0]
  assert row["num_tokens"] == sum(len(d) - 1 for d in docs)              # every text token
  np.testing.assert_allclose(row["nll"], nll / row["num_tokens"], rtol=1e-5)


def _bad_suite(pythia, tmp_path, edit):
  """A copy of the suite (pythia-a only) whose first checkpoint's config.json is edited."""
  import shutil  # pylint: disable=import-outside-toplevel
  src = pythia["suite"].model("pythia-a")
  ckpts = {}
  for step in U.PYTHIA_STEPS:
    ckpts[str(step)] = str(tmp_path / f"step{step}")
    shutil.copytree(src.path(step), ckpts[str(step)])
  config_path = tmp_path / f"step{U.PYTHIA_STEPS[0]}" / "config.json"
  config = json.loads(config_path.read_text())
  edit(config)
  config_path.write_text(json.dumps(config))
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({"name": "bad", "models": [
      {"name": "pythia-a", "params": src.params, "tokens_per_step": 1, "checkpoints": ckpts}]}))
  return str(path)


def test_unsupported_model_type_in_a_suite_fails_in_one_line(pythia, tmp_path):
  bad = _bad_suite(pythia, tmp_path, lambda c: c.update(model_type="mistral"))
  cmd = [sys.executable, "-m", "experiments.validation_ppl", f"--suite={bad}",
         f"--corpus={pythia['corpus']}", f"--out={tmp_path / 'out'}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  # By default the checkpoint is left out in one line and the others are evaluated ...
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  left = [l for l in proc.stderr.splitlines() if " left out: " in l]
  assert len(left) == 1 and left[0].startswith(f"pythia-a step {U.PYTHIA_STEPS[0]} left out: ")
  assert "model_type 'mistral' is not supported" in left[0]
  assert "bad: 2 checkpoints (2 evaluated now" in proc.stdout, proc.stdout
  # ... and --strict_integrity stops the run in one line.
  cmd[-1] = f"--out={tmp_path / 'strict'}"
  proc = subprocess.run(cmd + ["--strict_integrity"], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=env)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert "model_type 'mistral' is not supported" in lines[0] and "gpt_neox" in lines[0]
  assert "config.json" in lines[0]
  assert not os.path.exists(tmp_path / "strict")                 # nothing written


def test_unimplemented_config_field_in_a_suite_is_named_before_scoring(pythia, tmp_path):
  bad = _bad_suite(pythia, tmp_path,
                   lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 2.0}))
  with pytest.raises(InputError, match="config.json: rope_scaling=.* is not supported"):
    V.run(V.Settings(suite=bad, out=str(tmp_path / "out"), corpus=(pythia["corpus"],),
                     strict_integrity=True), progress=False)
  assert not os.path.exists(tmp_path / "out")


# Prompt (start + 8) + 8 new tokens and passages (start + 15): every row fits one bucket of 16.
SEQ = dict(num_prompts=2, prompt_tokens=8, max_new_tokens=8, num_passages=2, passage_tokens=15,
           noise_rates=(0.3,), swaps_per_kind=1, batch_size=4, generation_batch_size=2, seed=1,
           plots=False)


def _validation_csv(path, *suites):
  """A validation_ppl.csv for the suites (the x axis only; the test checks the set scores)."""
  rows = [f"{m.name},{step},valid,{10.0 + step / 100}\n" for s in suites for m in s.models
          for step in m.steps]
  path.write_text("model,step,corpus,ppl\n" + "".join(rows))
  return str(path)


def _opt_hf(path):
  """HF OPTForCausalLM holding an opt_jax checkpoint's params."""
  from opt_jax.checkpoints import checkpoint  # pylint: disable=import-outside-toplevel
  from opt_jax.convert import hf  # pylint: disable=import-outside-toplevel
  config = checkpoint.load_config(path)
  model = transformers.OPTForCausalLM(transformers.OPTConfig(**families.to_hf_dict(config))).eval()
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           hf.state_dict_from_params(checkpoint.restore(path), config).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  model.tie_weights()
  return model


def _seq_nll(out, label, model, step):
  (path,) = glob.glob(str(out / "store" / "sequence_generation" / "*" / label / model /
                          f"{step}.npz"))
  return np.load(path)


def _hf_nll(hf, context_ids, ids):
  """-sum log p(ids | context_ids) by HF (everything fits one window of 64)."""
  return -hf_continuation(hf, context_ids, ids)


def _check_scores(out, label, sets, checkpoints, token_lists):
  """The stored per-sequence NLL of every set equals HF's on token_lists(set)."""
  for (model, step), hf in checkpoints:
    arrays = _seq_nll(out, label, model, step)
    for s in sets:
      pairs = token_lists(s)
      want = [_hf_nll(hf, c, x) if x else 0.0 for c, x in pairs]
      np.testing.assert_allclose(arrays[f"{s.name}/nll_sum"], want, atol=2e-4, rtol=0,
                                 err_msg=f"{label} {model}@{step} {s.name}")
      np.testing.assert_array_equal(arrays[f"{s.name}/num_tokens"], [len(x) for _, x in pairs])


@pytest.fixture(scope="module")
def opt_suite(tmp_path_factory):
  return U.make_suite(str(tmp_path_factory.mktemp("opt")), {"tiny-b": U.SIZES["tiny-b"]},
                      steps=(10, 20))


@pytest.fixture(scope="module")
def seq_run(pythia, opt_suite, tmp_path_factory):
  from experiments import sequence_generation as S  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("seq")
  out = root / "out"
  csv = _validation_csv(root / "valid.csv", pythia["suite"], suite.load_suite(opt_suite))
  df = S.run(S.Settings(suite=pythia["suite"].source, out=str(out), corpus=(pythia["corpus"],),
                        cross_suite=opt_suite, validation_ppl=csv, cross_validation_ppl=csv,
                        sample_models=("pythia-a",), **SEQ), progress=False).table
  sets = [S.load_set(p) for p in sorted(glob.glob(str(out / "sets" / "*.jsonl")))]
  return dict(out=out, df=df, sets=sets)


def test_sequence_generation_on_pythia_with_an_opt_cross_suite(pythia, opt_suite, seq_run):
  out, df, sets = seq_run["out"], seq_run["df"], seq_run["sets"]
  assert {"ps-pl_greedy", "pl-ps_nucleus", "clean", "replace_0.3"} <= {s.name for s in sets}
  # Pythia has no prefix token: every sequence is conditioned on <|endoftext|> (id 0) first.
  assert all(c[0] == 0 for s in sets for c in s.context_ids)
  hf_tok = pythia["hf_tok"]
  for s in sets:
    if s.kind == "perturbed":
      assert s.context_ids == [[0]] * len(s)
    else:
      assert all(c[1:] == _ids(hf_tok, t)[-len(c) + 1:] for c, t in zip(s.context_ids,
                                                                        s.contexts))
  # The suite's own scores (stored ids) are HF's.
  _check_scores(out, "pythia-tiny", sets,
                [(k, pythia["hf"][k]) for k in [("pythia-a", 128), ("pythia-b", 1000)]],
                lambda s: list(zip(s.context_ids, s.ids)))
  # OPT re-tokenises each text with its own tokenizer after its </s>, as HF's tokenizer does.
  opt = suite.load_suite(opt_suite)
  opt_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(opt.models[0].path(10), "tokenizer.json"))
  _check_scores(out, "tiny", sets, [(("tiny-b", 20), _opt_hf(opt.model("tiny-b").path(20)))],
                lambda s: [([2] + _ids(opt_tok, c), _ids(opt_tok, t))
                           for c, t in zip(s.contexts, s.texts)])
  assert set(df["scored_by"]) == {"pythia-tiny", "tiny"}


def test_pythia_scores_sets_made_with_another_tokenizer_on_their_text(pythia, opt_suite, seq_run,
                                                                     tmp_path):
  # Sets of another suite (their tokenizer fingerprint is not Pythia's, as OPT's sets are under
  # --cross_suite): Pythia re-tokenises their text, its context led by <|endoftext|>.
  from experiments import sequence_generation as S  # pylint: disable=import-outside-toplevel
  from experiments.context import Experiment  # pylint: disable=import-outside-toplevel
  import dataclasses  # pylint: disable=import-outside-toplevel
  sets = [dataclasses.replace(s, tokenizer="another tokenizer") for s in seq_run["sets"]]
  settings = S.Settings(suite=pythia["suite"].source, out=str(tmp_path / "out"),
                        corpus=(pythia["corpus"],), models=("pythia-a",), **SEQ)
  ctx = Experiment(S.NAME, settings, progress=False)
  S.score_suite(ctx, "pythia-tiny", sets, {}, [])
  hf_tok = pythia["hf_tok"]
  _check_scores(tmp_path / "out", "pythia-tiny", sets,
                [(k, pythia["hf"][k]) for k in [("pythia-a", 512)]],
                lambda s: [([0] + _ids(hf_tok, c), _ids(hf_tok, t))
                           for c, t in zip(s.contexts, s.texts)])


def test_an_empty_icl_context_is_the_start_token(pythia):
  # HFLM: an empty context is [prefix token] and the continuation its own encoding.
  import types  # pylint: disable=import-outside-toplevel
  tok = load_tokenizer(pythia["suite"].model("pythia-a").path(128))
  empty = types.SimpleNamespace(context="", continuations=(" fox", " dog"))
  items = [icl_tasks.Item(0, "t", empty),
           icl_tasks.Item(0, "t", types.SimpleNamespace(context="The", continuations=(" fox",)))]
  enc = icl_tasks.encode(items, tok, 64)
  hf_tok = pythia["hf_tok"]
  assert enc.pairs == [([0], _ids(hf_tok, " fox")), ([0], _ids(hf_tok, " dog")),
                       (_ids(hf_tok, "The"), _ids(hf_tok, "The fox")[len(_ids(hf_tok, "The")):])]
  assert enc.kept.tolist() == [True, True]


def test_special_ids_are_the_tokenizers_own(pythia):
  # Noise never draws them: Pythia's <|endoftext|> and <|padding|>, not OPT's four ids.
  tok = load_tokenizer(pythia["suite"].model("pythia-a").path(128))
  assert tok.special_ids == {0, 1}
  assert pythia["hf_tok"].convert_ids_to_tokens([0, 1]) == list(U.PYTHIA_SPECIALS)
