"""Test helpers: tiny checkpoint suites with random weights and tiny byte-level BPE tokenizers.

make_suite: OPT architecture, 2 sizes x 4 steps (SIZES; ICL_SIZES: 128 positions), OPT's special
  tokens.
make_pythia_suite: Pythia architecture (GPT-NeoX: partial rotary, parallel residual, untied
  embed_out, vocabulary rows beyond the tokenizer), 2 sizes x 3 steps, `<|endoftext|>` as bos and
  eos and no pad token, as Pythia's config.json; each checkpoint is converted from a random HF
  GPTNeoXForCausalLM that `pythia_hf_model` rebuilds as the oracle.
child_env, free_port: the environment and a coordinator port for tests that start JAX in
  subprocesses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket

import numpy as np

from experiments.tasks import corpus
from opt_jax.checkpoints import checkpoint, orbax_format
from opt_jax import families
from opt_jax.model import param_shapes

CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Language models learn to predict the next token; larger models learn faster.",
    "In 1901 the library held 4,512 books, and by 1950 it held 97,003 of them.",
    "She said: perplexity is the exponential of the mean negative log-likelihood.",
    "Checkpoints saved along training let us watch what a model learns and when.",
]

# Two tiny sizes; vocab 320 holds the 256 byte symbols, 4 specials and a few merges.
SIZES = {
    "tiny-a": families.get("opt").config(vocab_size=320, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, ffn_dim=64,
                                         max_position_embeddings=64),
    "tiny-b": families.get("opt").config(vocab_size=320, hidden_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, ffn_dim=96,
                                         max_position_embeddings=64),
}
# The same widths, two layers each and 128 positions: room for the cloze prompts of the ICL tests.
ICL_SIZES = {name: dataclasses.replace(config, num_hidden_layers=2, max_position_embeddings=128)
             for name, config in SIZES.items()}
STEPS = (10, 20, 30, 40)
TOKENS_PER_STEP = 1000


OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
# Pythia's tokenizer: <|endoftext|>=0 (bos and eos), <|padding|>=1 (config.json names no pad).
PYTHIA_SPECIALS = ("<|endoftext|>", "<|padding|>")
PYTHIA_TOKENIZER_SIZE = 300   # ids of the tokenizer; the models have 320 rows (20 padded)

_NEOX = dict(vocab_size=320, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True,
             hidden_act="gelu", bos_token_id=0, eos_token_id=0)
PYTHIA_SIZES = {
    # head_dim 8 and 16: 2 and 4 rotary dims.
    "pythia-a": families.get("gpt_neox").config(hidden_size=32, intermediate_size=128, **_NEOX),
    "pythia-b": families.get("gpt_neox").config(hidden_size=64, intermediate_size=256, **_NEOX),
}
PYTHIA_STEPS = (128, 512, 1000)
PYTHIA_TOKENS_PER_STEP = 2048


def train_tokenizer(directory: str, specials=OPT_SPECIALS, vocab_size: int = 320,
                    texts=None) -> str:
  """Byte-level BPE without a prefix space (GPT-2's, OPT's and GPT-NeoX's pipeline), `specials`
  first (ids 0, 1, ...), the 256 byte symbols next, trained on `texts` (default CORPUS * 4) with
  the project's trainer (experiments.tasks.corpus.bpe_tokenizer, every pair a merge candidate);
  returns the path of DIRECTORY/tokenizer.json."""
  tok = corpus.bpe_tokenizer(CORPUS * 4 if texts is None else texts, vocab_size,
                             specials=specials, min_frequency=0)
  assert tok.get_vocab_size() <= vocab_size
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "tokenizer.json")
  tok.save(path)
  return path


def make_suite(root: str, sizes: dict[str, DecoderConfig] | None = None, steps=STEPS,
               std: float = 0.3) -> str:
  """Saves len(sizes) x len(steps) random checkpoints under root/ckpt; returns root/suite.json.

  Every checkpoint has its own seed. Random normal(std) weights and 1 + normal(0.1) layer-norm
  scales, drawn with numpy on the shapes of `param_shapes` (`init_params` compiles model.init anew
  on every call, ~30 s on a loaded 2-core machine; the weights would be replaced anyway so that
  outputs differ between checkpoints far above float error).
  """
  sizes = sizes or SIZES
  tok_file = train_tokenizer(os.path.join(root, "tok"))
  models_ = []
  for i, (name, config) in enumerate(sizes.items()):
    ckpts = {}
    for j, step in enumerate(steps):
      params = random_params(config, seed=100 * i + j, std=std)
      rel = f"ckpt/{name}/step{step}"
      orbax_format.save(os.path.join(root, rel), params, config, tokenizer_files=[tok_file])
      ckpts[str(step)] = rel
    models_.append({"name": name, "params": config.num_params(),
                    "tokens_per_step": TOKENS_PER_STEP, "aliases": [f"org/{name}"],
                    "checkpoints": ckpts})
  path = os.path.join(root, "suite.json")
  with open(path, "w") as f:
    json.dump({"name": "tiny", "models": models_}, f, indent=2)
  return path


def pythia_seed(name: str, step: int) -> int:
  return 1000 * list(PYTHIA_SIZES).index(name) + PYTHIA_STEPS.index(step)


def pythia_hf_model(name: str, step: int):
  """The HF GPTNeoXForCausalLM (fp32, eval mode) that checkpoint (name, step) was made from."""
  import oracle  # pylint: disable=import-outside-toplevel  (torch: only where needed)
  return oracle.hf_model(PYTHIA_SIZES[name], seed=pythia_seed(name, step))


def hf_opt_model(path: str):
  """HF OPTForCausalLM (fp32, eval mode) holding the params of the opt_jax OPT checkpoint at
  `path`, its lm_head tied to the embedding as OPT's."""
  import torch  # pylint: disable=import-outside-toplevel  (torch: only where needed)
  import transformers  # pylint: disable=import-outside-toplevel
  from opt_jax.convert import hf  # pylint: disable=import-outside-toplevel
  config = checkpoint.load_config(path)
  model = transformers.OPTForCausalLM(transformers.OPTConfig(**families.to_hf_dict(config))).eval()
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           hf.state_dict_from_params(checkpoint.restore(path), config).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  model.tie_weights()
  return model


def make_pythia_suite(root: str) -> str:
  """Saves the Pythia-architecture suite (PYTHIA_SIZES x PYTHIA_STEPS) under root/ckpt with the
  tokenizer in root/tok; returns root/suite.json. Each checkpoint's params are converted from
  `pythia_hf_model(name, step)` (opt_jax.convert.hf, the path of tools/convert_checkpoint)."""
  import oracle  # pylint: disable=import-outside-toplevel
  tok_file = train_tokenizer(os.path.join(root, "tok"), PYTHIA_SPECIALS, PYTHIA_TOKENIZER_SIZE)
  models_ = []
  for name, config in PYTHIA_SIZES.items():
    ckpts = {}
    for step in PYTHIA_STEPS:
      params = oracle.params_from_hf_model(pythia_hf_model(name, step), config)
      rel = f"ckpt/{name}/step{step}"
      orbax_format.save(os.path.join(root, rel), params, config, tokenizer_files=[tok_file])
      ckpts[str(step)] = rel
    models_.append({"name": name, "params": config.num_params(),
                    "tokens_per_step": PYTHIA_TOKENS_PER_STEP,
                    "aliases": [f"EleutherAI/{name}"], "checkpoints": ckpts})
  path = os.path.join(root, "suite.json")
  with open(path, "w") as f:
    json.dump({"name": "pythia-tiny", "models": models_}, f, indent=2)
  return path


@contextlib.contextmanager
def persistent_compilation_cache(directory: str):
  """JAX's persistent compilation cache in `directory` for every program, however fast, restored
  to the previous settings on exit. Each experiment run builds its own Scorers, which compile the
  same programs again: with the cache the repeats are loads (~0.1 s instead of seconds)."""
  import jax  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.compilation_cache import compilation_cache
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  before = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], directory)
  jax.config.update(names[1], 0.0)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def random_params(config: DecoderConfig, seed: int, std: float = 0.3):
  """Params pytree of numpy float32 arrays for `config`."""
  import jax  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(seed)

  def draw(path, shape):
    z = rng.standard_normal(shape.shape).astype(np.float32)
    return 1.0 + 0.1 * z if "scale" in jax.tree_util.keystr(path) else std * z
  if config not in _SHAPES:
    _SHAPES[config] = param_shapes(config)
  return jax.tree_util.tree_map_with_path(draw, _SHAPES[config])


_SHAPES: dict = {}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra: str) -> dict[str, str]:
  """The environment of a subprocess that runs JAX: CPU only, the repository importable, and no
  XLA_FLAGS of this process (a child sets its own device count; otherwise one CPU device)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
  env.pop("XLA_FLAGS", None)
  return env


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (jax.distributed's coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def param_summary(params) -> dict[str, np.ndarray]:
  """A cheap deterministic evaluation (no compilation): float64 sum and norm of every array."""
  import jax  # pylint: disable=import-outside-toplevel
  leaves = jax.tree_util.tree_leaves_with_path(params)
  arrays = [np.asarray(a, np.float64) for _, a in leaves]
  return {"sums": np.array([a.sum() for a in arrays]),
          "norms": np.array([np.sqrt((a * a).sum()) for a in arrays]),
          "paths": np.array([jax.tree_util.keystr(p) for p, _ in leaves])}
