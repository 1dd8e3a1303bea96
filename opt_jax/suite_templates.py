"""Published facts about public checkpoint suites on the HF hub: repos, revisions, batch sizes.

One `RepoTemplate` per HF repo: the suite model it belongs to, tokens per training step, the
parameter count where one is published, and the revisions published as intermediate checkpoints
(empty where the full list could not be confirmed). `tools/make_suite.py` uses these to name
models, to fill `tokens_per_step` and `params` in a manifest built from the HF cache, and in
`--template` mode to list the revisions still to download.

Every number below comes from a published source named in the comment above it; where a fact
could not be confirmed it is left out (None / empty), never guessed.
"""

from __future__ import annotations

import dataclasses

# Pythia ---------------------------------------------------------------------------------------
#
# Source: github.com/EleutherAI/pythia README (July 2024 revision): 10 sizes; 14M and 31M were
# trained later on the standard Pile only ("we plan on training deduped versions ... in the
# future"), the other 8 in a standard and a `-deduped` repo. "154 checkpoints ... steps 0
# (initialization), 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, and then every 1,000 subsequent
# steps" up to 143000, each a branch `step{N}` of the HF repo; "Revision/branch `step143000`
# corresponds exactly to the model checkpoint on the `main` branch". "All models were trained for
# the equivalent of 143000 steps at a batch size of 2,097,152 tokens" (1024 x 2048).
PYTHIA_TOKENS_PER_STEP = 2_097_152
PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
PYTHIA_DEDUPED_SIZES = PYTHIA_SIZES[2:]

# Total parameters, "Naming convention and parameter count" table of every Pythia model card
# (e.g. huggingface.co/EleutherAI/pythia-12b-deduped). None is published for 14M and 31M: a
# manifest built from the HF cache counts them from the safetensors headers.
PYTHIA_PUBLISHED_PARAMS = {"70m": 70_426_624, "160m": 162_322_944, "410m": 405_334_016,
                           "1b": 1_011_781_632, "1.4b": 1_414_647_808, "2.8b": 2_775_208_960,
                           "6.9b": 6_857_302_016, "12b": 11_846_072_320}


# Steps whose weights are identical by design: Pythia's step0 and step1 branches hold the same
# bytes (github.com/EleutherAI/pythia issue #83: the step-1 checkpoint is the initialization, as
# is step 0). The integrity check accepts these and the experiments mark them.
PYTHIA_KNOWN_DUPLICATES = ((0, 1),)


def pythia_steps() -> list[int]:
  """The 154 published Pythia checkpoint steps."""
  return [0] + [2 ** i for i in range(10)] + list(range(1000, 143001, 1000))


# OLMo 2 ---------------------------------------------------------------------------------------
#
# Revision names: `stage1-step{N}-tokens{M}B` (pretraining) and
# `stage2-ingredient{k}-step{N}-tokens{M}B` (mid-training runs with different data orders that
# restart the step count; `main` is their weight average, "the final souped model", which is no
# step). Sources: github.com/allenai/OLMo README (7B, 13B) and github.com/allenai/OLMo-core
# README (32B). Tokens per step is the global batch in tokens, 1024 x 4096 = 4,194,304 for 7B
# (configs/official-1124/OLMo2-7B-stage1.yaml: global_train_batch_size 1024,
# max_sequence_length 4096); for 1B, 13B and 32B it is the value that the published final
# stage-1 revision names give (step x tokens per step rounds up to the named billions):
#   1B  stage1-step1907359-tokens4001B   -> 2,097,152   (512 x 4096)
#   7B  stage1-step928646-tokens3896B    -> 4,194,304   (1024 x 4096)
#   13B stage1-step596057-tokens5001B    -> 8,388,608   (2048 x 4096)
#   32B stage1-step721901-tokens6056B    -> 8,388,608   (2048 x 4096)
# The 1B's revision is not in the OLMo READMEs; it is the one cited for allenai/OLMo-2-0425-1B
# by users of that repo, and its tokens agree with 512 x 4096. The full list of intermediate
# revisions (every 1000 steps, some missing) is only on the hub: `huggingface_hub.
# list_repo_refs(repo).branches`; the templates list the revisions confirmed in the READMEs.
# Note: OLMo-2-1124-7B also has a few early branches without the `stage1-` prefix
# (`step150-tokens1B`, ...: huggingface.co/allenai/OLMo-2-1124-7B/discussions/6); their tokens fit
# the stage-1 batch, so `hf_cache` reads them as stage 1.
OLMO2_REPOS = {
    # repo: (model name, tokens per step, confirmed revisions)
    "allenai/OLMo-2-0425-1B": ("OLMo-2-0425-1B", 2_097_152, (
        "stage1-step1907359-tokens4001B",)),
    "allenai/OLMo-2-1124-7B": ("OLMo-2-1124-7B", 4_194_304, (
        "stage1-step928646-tokens3896B", "stage2-ingredient1-step11931-tokens50B",
        "stage2-ingredient2-step11931-tokens50B", "stage2-ingredient3-step11931-tokens50B")),
    "allenai/OLMo-2-1124-13B": ("OLMo-2-1124-13B", 8_388_608, (
        "stage1-step596057-tokens5001B", "stage2-ingredient1-step11931-tokens100B",
        "stage2-ingredient2-step11931-tokens100B", "stage2-ingredient3-step11931-tokens100B",
        "stage2-ingredient4-step35773-tokens300B")),
    "allenai/OLMo-2-0325-32B": ("OLMo-2-0325-32B", 8_388_608, (
        "stage1-step721901-tokens6056B", "stage2-ingredient1-step11921-tokens101B",
        "stage2-ingredient2-step11921-tokens101B", "stage2-ingredient3-step35763-tokens301B")),
}

# SmolLM2 --------------------------------------------------------------------------------------
#
# Repos `HuggingFaceTB/SmolLM2-{size}-intermediate-checkpoints`, revisions `step-{N}` (model cards
# of those repos: "The GBS (Global Batch Size) in token of SmolLM2-1.7B is 2 097 152", "of
# SmolLM2-135M is 1 048 576"; "nb_tokens = nb_step * GBS"). The 360M card's batch size could not
# be confirmed here: pass --tokens_per_step for it.
SMOLLM2_REPOS = {
    "HuggingFaceTB/SmolLM2-135M-intermediate-checkpoints": ("SmolLM2-135M", 1_048_576),
    "HuggingFaceTB/SmolLM2-360M-intermediate-checkpoints": ("SmolLM2-360M", None),
    "HuggingFaceTB/SmolLM2-1.7B-intermediate-checkpoints": ("SmolLM2-1.7B", 2_097_152),
}

# TinyLlama ------------------------------------------------------------------------------------
#
# Each intermediate checkpoint of TinyLlama 1.1B is its own repo (model cards of
# TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T and siblings): the step and tokens are in
# the repo name (`step-480k-1T`, `step-955k-token-2T`, `step-50K-105b`), rounded to thousands of
# steps, and `main` is the checkpoint. Batch: "2 million tokens (2048 * 1024)". The 1431k-3T repo
# also has branches ("Branch name indicates the step and number of tokens seen") whose naming
# could not be confirmed: they are listed as unknown unless they follow a known pattern.
TINYLLAMA_MODEL = "TinyLlama-1.1B"
TINYLLAMA_TOKENS_PER_STEP = 2048 * 1024
TINYLLAMA_ORGS = ("TinyLlama", "PY007")


@dataclasses.dataclass(frozen=True)
class RepoTemplate:
  """What is published about one HF repo of a checkpoint suite.

  model: the suite model the repo's checkpoints belong to (several TinyLlama repos share one).
  tokens_per_step: training batch in tokens (None: not confirmed). params: total parameters where
  published (None: count them from the checkpoint). revisions: published checkpoint revisions
  (empty: unknown). repo_is_checkpoint: the repo name carries the step and `main` is it.
  known_duplicates: groups of steps whose weights are identical by design.
  """
  repo: str
  model: str
  family: str
  tokens_per_step: int | None
  params: int | None = None
  revisions: tuple[str, ...] = ()
  repo_is_checkpoint: bool = False
  known_duplicates: tuple[tuple[int, ...], ...] = ()


def _pythia_templates(deduped: bool) -> list[RepoTemplate]:
  revisions = tuple(f"step{s}" for s in pythia_steps())
  sizes = PYTHIA_DEDUPED_SIZES if deduped else PYTHIA_SIZES
  suffix = "-deduped" if deduped else ""
  return [RepoTemplate(repo=f"EleutherAI/pythia-{s}{suffix}", model=f"pythia-{s}{suffix}",
                       family="pythia", tokens_per_step=PYTHIA_TOKENS_PER_STEP,
                       params=PYTHIA_PUBLISHED_PARAMS.get(s),
                       revisions=revisions, known_duplicates=PYTHIA_KNOWN_DUPLICATES)
          for s in sizes]


def family_templates(family: str) -> list[RepoTemplate]:
  """The repos of a template family: pythia, pythia-deduped or olmo2, smallest first."""
  if family == "pythia":
    return _pythia_templates(False)
  if family == "pythia-deduped":
    return _pythia_templates(True)
  if family == "olmo2":
    return [RepoTemplate(repo=r, model=m, family="olmo2", tokens_per_step=t, revisions=revs)
            for r, (m, t, revs) in OLMO2_REPOS.items()]
  raise KeyError(f"no template family {family!r}; known: {', '.join(TEMPLATE_FAMILIES)}")


TEMPLATE_FAMILIES = ("pythia", "pythia-deduped", "olmo2")


def lookup(repo: str) -> RepoTemplate | None:
  """The template of HF repo `repo` (case-insensitive), or None for a repo without one."""
  key = repo.strip().lower()
  for family in TEMPLATE_FAMILIES:
    for t in family_templates(family):
      if t.repo.lower() == key:
        return t
  for r, (model, tokens) in SMOLLM2_REPOS.items():
    if r.lower() == key:
      return RepoTemplate(repo=r, model=model, family="smollm2", tokens_per_step=tokens)
  org, _, name = repo.partition("/")
  if org in TINYLLAMA_ORGS and name.startswith("TinyLlama-1.1B-"):
    return RepoTemplate(repo=repo, model=TINYLLAMA_MODEL, family="tinyllama",
                        tokens_per_step=TINYLLAMA_TOKENS_PER_STEP, repo_is_checkpoint=True)
  return None
