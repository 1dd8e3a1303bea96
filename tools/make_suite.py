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
~/.cache/huggingface/hub). With --template the cache folder need not exist yet: the manifest is
skipped and the download script lists every revision.

Revisions that hold only PyTorch .bin weights are named; --convert_bin converts each into
--converted (default <out without .json>.converted/; safetensors in the HF layout, config.json
and tokenizer files kept), and every run uses the converted copies it finds there, so a re-run
keeps them in the manifest.
"""

from __future__ import annotations

import dataclasses
import os

from opt_jax import cli, files, suite_templates
from opt_jax import hf_cache as hub   # the name hf_cache is a setting


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(cli.Settings):
  hf_cache: str | None = cli.option(None, "HF hub cache folder (default: HF's default).")
  repos: tuple[str, ...] = cli.option((), "HF model repos (ORG/NAME) to take checkpoints from.")
  template: str | None = cli.option(
      None, "A family whose published revisions are listed: its repos (or those of --repos) go "
            "into the manifest, and the revisions missing from the cache into --download_script.",
      choices=suite_templates.TEMPLATE_FAMILIES)
  out: str = cli.option(help="Manifest to write (.json).")
  name: str | None = cli.option(None, "Suite name (default: the --out file name).")
  tokens_per_step: int | None = cli.option(None, "Training tokens per step for repos without a "
                                           "template.", ge=1)
  params: int | None = cli.option(None, "Parameter count for repos without safetensors weights "
                                  "or a template.", ge=1)
  olmo2_stage2: str = cli.option("separate", "OLMo 2 stage-2 (mid-training) revisions: each "
                                 "ingredient a separate model, or dropped.",
                                 choices=hub.STAGE2_MODES)
  overwrite: bool = cli.option(False, "Replace --out / --download_script even if they were not "
                               "written by make_suite.")
  converted: str | None = cli.option(
      None, "Folder of converted copies of revisions that hold only PyTorch .bin weights; the "
            "manifest uses the copies found there (default: <out without .json>.converted).")
  convert_bin: bool = cli.option(False, "Convert the revisions that hold only PyTorch .bin "
                                 "weights into --converted (needs torch).")
  download_script: str | None = cli.option(
      None, "With --template: where to write the download commands (default: <out without "
            ".json>.download.sh).")


def run(s: Settings) -> cli.Summary:
  templates = suite_templates.family_templates(s.template) if s.template else []
  repos = list(s.repos) or [t.repo for t in templates]
  name = s.name or os.path.splitext(os.path.basename(s.out))[0]
  script = s.download_script or os.path.splitext(s.out)[0] + ".download.sh"
  hub.check_replaceable(s.out, s.overwrite)
  if templates:
    hub.check_replaceable(script, s.overwrite)
  converted = s.converted or os.path.splitext(s.out)[0] + ".converted"

  def build_suite():
    return hub.build_suite(repos, cache_dir=s.hf_cache, name=name,
                           tokens_per_step=s.tokens_per_step, params=s.params,
                           olmo2_stage2=s.olmo2_stage2, missing_ok=bool(templates),
                           converted_dir=converted)
  build = build_suite()
  if s.convert_bin and build.bin_only:
    for c, target in build.bin_only.items():
      cli.say(f"converting {c.repo} revision {c.revision.name} (.bin) -> {target}")
      try:
        _convert(c.path, target)
      except Exception as e:  # pylint: disable=broad-except  (one revision; go on with the rest)
        cli.say(f"problem: {c.repo} revision {c.revision.name}: conversion failed "
                f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); it stays left out")
    build = build_suite()
  if templates:
    others = [r for r in repos if suite_templates.lookup(r) not in templates]
    for r in others:
      cli.say(f"note: {r} is not in the {s.template} template: its cached revisions go into the "
              "manifest, none is listed for download")
  for title, lines in (("note", build.notes), ("unknown", build.unknown),
                       ("problem", build.problems)):
    for line in lines:
      cli.say(f"{title}: {line}")
  written, results = [], []
  if build.manifest:
    files.write_json(s.out, build.manifest)
    n = sum(len(m["checkpoints"]) for m in build.manifest["models"])
    results.append(f"{cli.plural(len(build.manifest['models']), 'model')}, "
                   f"{cli.plural(n, 'checkpoint')}")
    written.append(os.path.abspath(s.out))
  else:
    results.append("no checkpoints in the cache: no manifest written")
  if templates:
    by_repo = {t.repo.lower(): t for t in templates}
    missing = {r: [v for v in by_repo[r.lower()].revisions if v not in build.present(r)]
               for r in repos if r.lower() in by_repo}
    files.write_text(script, hub.download_commands(
        {r: v for r, v in missing.items() if v}, s.hf_cache))
    results.append(f"{cli.plural(sum(len(v) for v in missing.values()), 'revision')} to "
                   f"download: {script}")
    written.append(os.path.abspath(script))
  if build.bin_only:
    results.append(f"{cli.plural(len(build.bin_only), 'revision')} with PyTorch .bin weights only "
                   "(left out by experiments; --convert_bin converts them)")
  return cli.Summary("make_suite", evaluated=[f"{cli.plural(len(repos), 'repo')} in the HF cache"],
                     results=results,
                     skipped=[f"{cli.plural(len(build.unknown), 'revision name')} without a "
                              f"step, {cli.plural(len(build.problems), 'problem')} (listed above)"]
                     if build.unknown or build.problems else [], files=written)


def _convert(source: str, target: str) -> None:
  """An HF safetensors copy of the .bin checkpoint `source` at `target`, with the source's own
  config.json (the integrity check compares it with the model's other revisions)."""
  from opt_jax import convert  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(target), exist_ok=True)
  convert.convert(source, target, output_format="hf")
  with open(os.path.join(source, hub.CONFIG_FILE)) as f:
    files.write_text(os.path.join(target, hub.CONFIG_FILE), f.read())


if __name__ == "__main__":
  cli.main(Settings, run)
