r"""Writes a suite manifest of the checkpoints of HF repos in the HF hub cache.

  python -m tools.make_suite --repos=EleutherAI/pythia-160m,EleutherAI/pythia-410m --out=pythia.json
  python -m tools.make_suite --repos=allenai/OLMo-2-1124-7B --out=olmo2.json --olmo2_stage2=drop
  python -m tools.make_suite --repos=my-org/my-model --tokens_per_step=4194304 --out=mine.json
  # every published revision of a family: manifest of those present + download script for the rest
  python -m tools.make_suite --template=pythia --out=pythia.json   # writes pythia.download.sh too

Every cached revision whose name gives a step (step1000, stage1-step...-tokens...B, step-125000,
...) becomes a checkpoint with its revision name and snapshot sha; refs such as `main` that point
at one of them are noted in the model's "refs"; other names and incomplete snapshots are listed,
never guessed. --hf_cache defaults to HF's own ($HF_HUB_CACHE, $HF_HOME/hub,
~/.cache/huggingface/hub).
"""

import os
import sys

from absl import app, flags

from opt_jax import files, hf_cache, suite_templates
from opt_jax.errors import UserError

_CACHE = flags.DEFINE_string("hf_cache", None, "HF hub cache folder (default: HF's default).")
_REPOS = flags.DEFINE_list("repos", [], "HF model repos (ORG/NAME) to take checkpoints from.")
_TEMPLATE = flags.DEFINE_enum("template", None, suite_templates.TEMPLATE_FAMILIES,
                              "A family whose published revisions are listed: its repos (or "
                              "those of --repos) go into the manifest, and the revisions missing "
                              "from the cache into --download_script.")
_OUT = flags.DEFINE_string("out", None, "Manifest to write (.json).", required=True)
_NAME = flags.DEFINE_string("name", None, "Suite name (default: the --out file name).")
_TOKENS = flags.DEFINE_integer("tokens_per_step", None, "Training tokens per step for repos "
                               "without a template.")
_PARAMS = flags.DEFINE_integer("params", None, "Parameter count for repos without safetensors "
                               "weights or a template.")
_STAGE2 = flags.DEFINE_enum("olmo2_stage2", "separate", hf_cache.STAGE2_MODES,
                            "OLMo 2 stage-2 (mid-training) revisions: each ingredient a separate "
                            "model, or dropped.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out / --download_script even if "
                                "they were not written by make_suite.")
_SCRIPT = flags.DEFINE_string("download_script", None, "With --template: where to write the "
                              "download commands (default: <out without .json>.download.sh).")


def main(argv):
  del argv
  try:
    templates = suite_templates.family_templates(_TEMPLATE.value) if _TEMPLATE.value else []
    repos = _REPOS.value or [t.repo for t in templates]
    name = _NAME.value or os.path.splitext(os.path.basename(_OUT.value))[0]
    script = _SCRIPT.value or os.path.splitext(_OUT.value)[0] + ".download.sh"
    hf_cache.check_replaceable(_OUT.value, _OVERWRITE.value)
    if templates:
      hf_cache.check_replaceable(script, _OVERWRITE.value)
    build = hf_cache.build_suite(repos, cache_dir=_CACHE.value, name=name,
                                 tokens_per_step=_TOKENS.value, params=_PARAMS.value,
                                 olmo2_stage2=_STAGE2.value, missing_ok=bool(templates))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for title, lines in (("note", build.notes), ("unknown", build.unknown),
                       ("problem", build.problems)):
    for line in lines:
      print(f"{title}: {line}")
  if build.manifest:
    files.write_json(_OUT.value, build.manifest)
    n = sum(len(m["checkpoints"]) for m in build.manifest["models"])
    print(f"wrote {_OUT.value}: {len(build.manifest['models'])} model(s), {n} checkpoint(s)")
  else:
    print("no checkpoints in the cache: no manifest written")
  if templates:
    by_repo = {t.repo: t for t in templates}
    missing = {r: [v for v in by_repo[r].revisions if v not in build.present(r)]
               for r in repos if r in by_repo}
    files.write_text(script, hf_cache.download_commands(
        {r: v for r, v in missing.items() if v}, _CACHE.value))
    print(f"wrote {script}: {sum(len(v) for v in missing.values())} revision(s) to download")


if __name__ == "__main__":
  app.run(main)
