"""REPORT.md of `make demo`: headline numbers and plots from the outputs of every stage (no JAX).

Reads what the stages wrote under the demo's output folder:
  family/training.json                    loss histories (opt_jax.train)
  validation_ppl/validation_ppl.csv       perplexity per checkpoint (experiments/validation_ppl.py)
  token_trajectories/*.csv                trends, tokens followed across sizes, double descent,
                                          agreement (token_trajectories.py)
  sequences/sequence_ppl.csv, sets/       generated and corrupted sets (sequence_generation.py)
  icl/icl_results.csv, correlations.csv   cloze/BIG-bench accuracy (downstream_icl.py)
and gives the text of OUT/REPORT.md with the plots embedded by relative paths, plus
OUT/report_plots/ (training curves). Every sentence that states a finding is computed from these tables, so it says
what the data shows whichever way it comes out. `export_readme_images` writes the main pictures
as small PNGs for the README.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any

import numpy as np
import pandas as pd

from experiments.analysis.figures import model_order
from opt_jax import files

REPORT_FILE = "REPORT.md"
PLOT_DIR = "report_plots"
MAX_README_BYTES = 150_000
# (name in the README folder, path under the demo's output folder): the report's main pictures.
README_IMAGES = (
    ("demo_training.png", f"{PLOT_DIR}/training_curves.png"),
    ("demo_token_trends.png", "token_trajectories/plots/trend_groups_f{f}.png"),
    ("demo_icl_accuracy.png", "icl/plots/mean_accuracy.png"),
)


@dataclasses.dataclass
class RunInfo:
  """What the report says about the run besides the stage outputs.

  settings: DemoSettings as a dict; stages: {stage: {name, ran, seconds, computed_seconds, note}}.
  """
  fast: bool
  settings: dict[str, Any]
  corpus_root: str
  train_texts: int
  train_tokens: int
  validation: list[str]
  evaluation: str
  bigbench_dir: str | None
  stages: dict[str, dict[str, Any]]


# Small helpers --------------------------------------------------------------------------------

def _read_csv(path: str) -> pd.DataFrame | None:
  return pd.read_csv(path) if os.path.isfile(path) else None


def _table(frame: pd.DataFrame, formats: dict[str, str] | None = None) -> list[str]:
  """A markdown table; floats formatted by column (default 4 significant digits)."""
  formats = formats or {}

  def cell(column, value):
    if isinstance(value, (float, np.floating)):
      return "" if math.isnan(value) else format(value, formats.get(column, ".4g"))
    return str(value).replace("|", "\\|").replace("\n", " ")
  lines = ["| " + " | ".join(str(c) for c in frame.columns) + " |",
           "|" + "---|" * len(frame.columns)]
  lines += ["| " + " | ".join(cell(c, v) for c, v in zip(frame.columns, row)) + " |"
            for row in frame.itertuples(index=False)]
  return lines


def _image(out_dir: str, rel: str, alt: str) -> list[str]:
  return [f"![{alt}]({rel})", ""] if os.path.isfile(os.path.join(out_dir, rel)) else [
      f"*(plot {rel} missing)*", ""]


def _fmt_params(n: float) -> str:
  return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"



def one_line(text: str, limit: int = 300) -> str:
  """Decoded text as one line for inline code: whitespace runs become one space, backticks
  become quotes, cut after `limit` characters (" ..." marks the cut)."""
  text = " ".join(text.split()).replace("`", "'")
  return (text[:limit] + " ...") if len(text) > limit else text


# Plots ----------------------------------------------------------------------------------------

def plot_training(training: dict[str, Any], vppl: pd.DataFrame | None, path: str) -> str:
  """Training curves: train/validation loss (nats per token) against steps, and validation-text
  perplexity against training FLOPs when the validation CSV is given. PNG, atomic."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = 2 if vppl is not None else 1
  fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.6), squeeze=False,
                           layout="constrained")
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  ax = axes[0, 0]
  models = sorted(training["models"], key=lambda m: m["params"])
  for i, m in enumerate(models):
    h = [r for r in m["history"] if r["step"] > 0]
    steps = [r["step"] for r in h]
    c = colors[i % len(colors)]
    ax.plot(steps, [r["val_loss"] for r in h], "-", marker=".", color=c,
            label=f"{m['name']} ({_fmt_params(m['params'])})")
    ax.plot(steps, [r["train_loss"] for r in h], "--", color=c, alpha=0.6)
  ax.set_xscale("log")
  ax.set_xlabel("training step")
  ax.set_ylabel("loss (nats / token)")
  ax.set_title("training (dashed) and validation (solid) loss", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  if vppl is not None:
    ax = axes[0, 1]
    corpus = vppl["corpus"].iloc[0] if "all" not in set(vppl["corpus"]) else "all"
    sub = vppl[vppl["corpus"] == corpus]
    for i, name in enumerate(model_order(sub)):
      g = sub[sub["model"] == name].sort_values("step")
      ax.plot(g["flops"], g["ppl"], marker=".", color=colors[i % len(colors)], label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(f"perplexity ({corpus})")
    ax.set_title("validation perplexity", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
  plt.close(fig)
  return path


def small_png(src: str, dst: str, max_bytes: int = MAX_README_BYTES) -> str:
  """Copies a PNG, shrinking it (256-colour palette, then smaller sizes) until it is under
  max_bytes. Raises ValueError if it cannot get that small."""
  from PIL import Image

  with files.atomic_path(dst) as tmp:   # replaces dst on return, removed on the error below
    if os.path.getsize(src) <= max_bytes:
      shutil.copyfile(src, tmp)
      return dst
    with Image.open(src) as im:
      image = im.convert("RGB")
    scale = 1.0
    for _ in range(8):
      size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
      small = image.resize(size, Image.LANCZOS) if scale < 1 else image
      small.quantize(256, method=Image.Quantize.MEDIANCUT).save(tmp, format="PNG", optimize=True)
      if os.path.getsize(tmp) <= max_bytes:
        return dst
      scale *= 0.8
    raise ValueError(f"{src}: could not shrink below {max_bytes} bytes")


def export_readme_images(out_dir: str, dest: str,
                         start_fraction: float | None = None) -> list[str]:
  """The report's main pictures (README_IMAGES) as PNGs under max 150 KB in dest; returns paths.

  start_fraction: which token-trend plot (default the first of the run's start fractions).
  """
  if start_fraction is None:
    pct = _read_csv(os.path.join(out_dir, "token_trajectories", "trend_percentages.csv"))
    start_fraction = float(pct["start_fraction"].iloc[0]) if pct is not None else 0.1
  written = []
  for name, rel in README_IMAGES:
    src = os.path.join(out_dir, rel.format(f=f"{start_fraction:g}"))
    if not os.path.isfile(src):
      raise FileNotFoundError(f"{src}: not written by the demo run (stage failed or skipped?)")
    written.append(small_png(src, os.path.join(dest, name)))
  return written


# Sections -------------------------------------------------------------------------------------

def _intro(info: RunInfo, training: dict[str, Any] | None) -> list[str]:
  lines = ["# opt_jax demo report", ""]
  if training:
    models = sorted(training["models"], key=lambda m: m["params"])
    steps = max(int(m["history"][-1]["step"]) for m in models)
    tokens = max(int(m["history"][-1]["tokens"]) for m in models)
    minutes = sum(m["seconds"] for m in models) / 60
    lines += [
        f"**These are tiny models, not OPT.** {len(models)} OPT-architecture decoders of "
        f"{', '.join(_fmt_params(m['params']) for m in models)} parameters, trained here for "
        f"{steps:,} steps ({tokens:,} tokens; {minutes:.1f} minutes on this machine in all) on "
        f"{info.train_texts} Project Gutenberg texts (Shakespeare and Milton, "
        f"{info.train_tokens:,} training tokens). The paper studies OPT models of 125M to 175B "
        f"parameters trained on hundreds of billions of tokens. What follows is what the same "
        f"analyses measure on these small models: it exercises the pipeline end to end and says "
        f"nothing definitive about the paper's claims at OPT's scale."
        + (" **Fast (CI) mode:** even smaller models and analyses; the numbers are only a smoke "
           "test." if info.fast else ""), ""]
  lines += [f"- Corpus: `{info.corpus_root}`; validation text: {', '.join(info.validation)}; "
            f"held-out document (token trajectories, cloze tasks): {info.evaluation}.",
            f"- BIG-bench: {info.bigbench_dir or 'not evaluated (no --bigbench_dir)'}.",
            "- Settings: " + ", ".join(f"{k}={v}" for k, v in info.settings.items()) + ".", ""]
  rows = []
  for name, s in info.stages.items():
    if name == "report":   # being written now
      continue
    computed = s.get("computed_seconds")
    rows.append({"stage": name, "this run": "ran" if s["ran"] else "up to date",
                 "seconds (this run)": f"{s['seconds']:.1f}",
                 "seconds (when computed)": "" if computed is None else f"{computed:.1f}",
                 "note": s.get("note", "")})
  lines += ["Stages (seconds of this run, and of the run that computed the stage's outputs):",
            ""] + _table(pd.DataFrame(rows)) + [""]
  return lines


def _training_section(out_dir: str, training: dict[str, Any] | None,
                      vppl: pd.DataFrame | None) -> list[str]:
  lines = ["## 1. Training", ""]
  if not training:
    return lines + ["*(family/training.json missing)*", ""]
  rows = []
  for m in sorted(training["models"], key=lambda m: m["params"]):
    last = m["history"][-1]
    rows.append({"model": m["name"], "params": f"{m['params']:,}", "steps": last["step"],
                 "tokens": f"{last['tokens']:,}", "final train loss": last["train_loss"],
                 "final val loss": last["val_loss"], "train seconds": m["seconds"]})
  lines += _table(pd.DataFrame(rows), {"final train loss": ".3f", "final val loss": ".3f",
                                       "train seconds": ".0f"})
  lines += ["", "Losses in nats per token; the validation loss here is the trainer's own check on "
            "a few fixed validation batches (the next section scores the whole validation text).",
            ""]
  plot_training(training, vppl, os.path.join(out_dir, PLOT_DIR, "training_curves.png"))
  return lines + _image(out_dir, f"{PLOT_DIR}/training_curves.png", "training curves")


def validation_headline(vppl: pd.DataFrame) -> tuple[pd.DataFrame, str]:
  """(per size at its final checkpoint: model, params, step, ppl, best ppl and its step;
  a sentence on whether final perplexity falls with size)."""
  corpus = "all" if "all" in set(vppl["corpus"]) else vppl["corpus"].iloc[0]
  sub = vppl[vppl["corpus"] == corpus]
  rows = []
  for name in model_order(sub):
    g = sub[sub["model"] == name].sort_values("step")
    best = g.loc[g["ppl"].idxmin()]
    rows.append({"model": name, "params": int(g["params"].iloc[0]), "final step":
                 int(g["step"].iloc[-1]), "final ppl": float(g["ppl"].iloc[-1]),
                 "best ppl": float(best["ppl"]), "best at step": int(best["step"])})
  table = pd.DataFrame(rows)
  ppl = table["final ppl"].to_numpy()
  chain = " > ".join(f"{r['model']} {r['final ppl']:.2f}" for _, r in table.iterrows())
  if len(ppl) < 2:
    sentence = f"Final validation perplexity: {chain}."
  elif np.all(np.diff(ppl) < 0):
    sentence = (f"Final validation perplexity falls with size ({chain.replace(' > ', ', ')}): "
                f"each larger model ends lower.")
  else:
    sentence = (f"Final validation perplexity does not fall monotonically with size "
                f"({chain.replace(' > ', ', ')}).")
  return table, sentence


def _validation_section(out_dir: str, vppl: pd.DataFrame | None) -> list[str]:
  lines = ["## 2. Validation perplexity", ""]
  if vppl is None:
    return lines + ["*(validation_ppl/validation_ppl.csv missing)*", ""]
  table, sentence = validation_headline(vppl)
  table["params"] = table["params"].map(lambda n: f"{n:,}")
  n_tokens = int(vppl["num_tokens"].iloc[0])
  lines += [f"Every checkpoint scored on the whole validation text ({n_tokens:,} tokens, windows "
            f"of the models' context). {sentence}", ""]
  lines += _table(table, {"final ppl": ".2f", "best ppl": ".2f"}) + [""]
  lines += _image(out_dir, "validation_ppl/validation_ppl_vs_flops.png",
                  "validation perplexity against FLOPs")
  return lines


TREND_COLUMNS = ("stagnated", "upward", "downward", "unclassified", "invalid")


def trend_headline(pct: pd.DataFrame, dd: pd.DataFrame, agreement: pd.DataFrame,
                   group_dd: pd.DataFrame | None = None) -> dict[str, Any]:
  """Tables and sentences of the token-trajectory section.

  Returns {"percentages": model x (start fraction, label) %, "double_descent": rows, "agreement":
  rows, "sentences": [...]} computed from the CSVs of experiments.analysis.trajectories
  (group_dd: group_double_descent.csv, the paper's group-level reading, when there is one).
  """
  order = list(dict.fromkeys(pct["model"]))
  wide = pct.pivot_table(index=["start_fraction", "model"], columns="label", values="percent",
                         sort=False).reset_index()
  wide = wide[["start_fraction", "model"] + [c for c in TREND_COLUMNS if c in wide.columns]]
  sentences = []
  f0 = float(pct["start_fraction"].iloc[0])
  first = wide[wide["start_fraction"] == f0].set_index("model").reindex(order)
  if "downward" in first.columns:
    down = first["downward"].to_numpy()
    trend = ("rises with size" if np.all(np.diff(down) > 0) else
             "falls with size" if np.all(np.diff(down) < 0) else "is not monotone in size")
    sentences.append(
        f"From start fraction {f0:g}: the share of downward tokens (perplexity still falling) "
        f"{trend} (" + ", ".join(f"{m} {v:.1f}%" for m, v in zip(order, down)) + "); upward "
        "tokens (perplexity rising): " + ", ".join(
            f"{m} {v:.1f}%" for m, v in zip(order, first.get("upward", pd.Series(
                np.nan, index=order)).to_numpy())) + ".")
  if "unclassified" in first.columns:
    sentences.append(
        f"In no group (no significant slope, but outside the stagnation band or too variable; the "
        f"paper's eliminated tokens), from start fraction {f0:g}: " + ", ".join(
            f"{m} {v:.1f}%" for m, v in zip(order, first["unclassified"].to_numpy())) + ".")
  if group_dd is not None and len(group_dd):
    parts = []
    for ref, rows in group_dd.groupby("reference_model", sort=False):
      hits = rows[rows["double_descent"].astype(bool)]
      parts.append(f"{ref} -> " + (", ".join(
          f"{r.model} (x{r.rise:.2f} up from step {r.valley_step} to {r.peak_step}, x{r.fall:.2f} "
          f"down by step {r.end_step})" for r in hits.itertuples()) if len(hits) else "none"))
    sentences.append(
        "Double descent as the paper reads it (the upward tokens of a reference size, followed in "
        "the other sizes: does their group perplexity rise and then fall after the selection "
        "point?): " + "; ".join(parts) + ".")
  ddt = dd[["start_fraction", "model", "n_tokens", "n_upward", "n_double_descent",
            "fraction_of_upward", "percent_of_all"]]
  d0 = ddt[ddt["start_fraction"] == f0]
  if len(d0):
    sentences.append(
        f"Per-token double-descent detector (an extra: fall, rise, fall again of a token's "
        f"smoothed perplexity) among the upward tokens of start fraction {f0:g}: " + ", ".join(
            f"{r.model} {r.n_double_descent}/{r.n_upward}"
            + (f" ({100 * r.fraction_of_upward:.1f}%)" if np.isfinite(r.fraction_of_upward) else "")
            for r in d0.itertuples()) + ".")
  agr = agreement.copy()
  agr["pair"] = agr["model_a"] + " / " + agr["model_b"]
  steps = agr[(agr["comparison"] == "matched_steps") & (agr["start_fraction"] == f0)]
  ppl = agr[agr["comparison"] == "matched_ppl"]
  merged = steps[["pair", "kappa"]].merge(ppl[["pair", "kappa", "note"]], on="pair",
                                          suffixes=(" matched steps", " matched ppl"))
  valid = merged.dropna(subset=["kappa matched steps", "kappa matched ppl"])
  if len(valid):
    ks, kp = valid["kappa matched steps"].mean(), valid["kappa matched ppl"].mean()
    higher = (valid["kappa matched ppl"] > valid["kappa matched steps"]).sum()
    verdict = ("agree more at matched perplexity, as the paper finds for OPT" if kp > ks else
               "do not agree more at matched perplexity than at matched steps here")
    sentences.append(
        f"Agreement of trend labels between sizes (Cohen's kappa, mean over {len(valid)} "
        f"pair{'' if len(valid) == 1 else 's'}): "
        f"{kp:.3f} over checkpoints of matched validation perplexity vs {ks:.3f} at matched steps "
        f"(start fraction {f0:g}); higher at matched perplexity for {higher} of {len(valid)} "
        f"pairs. The sizes {verdict}. (The two comparisons label different checkpoint windows: "
        f"the end of each run from the start fraction, and the checkpoints inside the common "
        f"perplexity range; agreement.csv lists both.)")
  missing = merged[merged["kappa matched ppl"].isna()]
  if len(missing):
    sentences.append("No matched-perplexity agreement for " + "; ".join(
        f"{r.pair} ({r.note})" for r in missing.itertuples()) + ".")
  return {"percentages": wide, "double_descent": ddt, "agreement": merged,
          "sentences": sentences, "start_fraction": f0}


def _trajectory_section(out_dir: str, info: RunInfo) -> list[str]:
  d = os.path.join(out_dir, "token_trajectories")
  lines = ["## 3. Token trajectories", ""]
  pct, dd, agr = (_read_csv(os.path.join(d, f"{n}.csv"))
                  for n in ("trend_percentages", "double_descent", "agreement"))
  if pct is None or dd is None or agr is None:
    return lines + ["*(token_trajectories CSVs missing)*", ""]
  h = trend_headline(pct, dd, agr, _read_csv(os.path.join(d, "group_double_descent.csv")))
  n_tokens = int(dd["n_tokens"].iloc[0])
  lines += [f"Every checkpoint scores {n_tokens:,} tokens of {info.evaluation}. As in the paper, "
            "each token's perplexity from a start fraction of training on is upward or downward "
            "when an OLS fit on log(step) has a significant slope (t-test, alpha 0.05), "
            "stagnated when it has none and stays within +-5% of its geometric mean with a "
            "variance below it, and in no group (unclassified) otherwise. Group curves are "
            "exp(mean loss) over a group's tokens.", ""]
  lines += [f"- {s}" for s in h["sentences"]] + [""]
  lines += ["Trend percentages per size (% of scored tokens):", ""]
  lines += _table(h["percentages"], {c: ".1f" for c in TREND_COLUMNS}) + [""]
  lines += _image(out_dir, "token_trajectories/plots/trend_percentages.png",
                  "share of tokens per trend against the start fraction (Figure 2)")
  cross = _read_csv(os.path.join(d, "cross_size.csv"))
  if cross is not None and len(cross):
    lines += [f"Tokens selected by one size after {float(cross['selection_fraction'].iloc[0]):g} "
              "of its training and followed in every size (the paper's Figures 3-4; the left "
              "column: each size on its own tokens):", ""]
  lines += _image(out_dir, "token_trajectories/plots/cross_size_val_ppl.png",
                  "tokens chosen by one size, followed in every size (Figures 3-4)")
  lines += ["Per-token double-descent detector among upward tokens (an extra):", ""]
  lines += _table(h["double_descent"], {"fraction_of_upward": ".3f", "percent_of_all": ".2f"})
  lines += ["", "Agreement between sizes (kappa; an extra):", ""]
  lines += _table(h["agreement"], {"kappa matched steps": ".3f", "kappa matched ppl": ".3f"})
  lines.append("")
  f = f"{h['start_fraction']:g}"
  lines += _image(out_dir, f"token_trajectories/plots/trend_groups_f{f}.png",
                  "group perplexity of each trend group")
  lines += _image(out_dir, f"token_trajectories/plots/double_descent_f{f}.png",
                  "per-token double-descent detector")
  ex = _read_csv(os.path.join(d, "double_descent_examples.csv"))
  if ex is not None and len(ex):
    lines += ["Double-descent examples (token in [[ ]]):", ""]
    for r in ex.head(4).itertuples():
      lines.append(f"- {r.model}, rise x{1 + r.relative_rise:.2f} between steps {r.valley_step} "
                   f"and {r.peak_step}: `{one_line(str(r.context), 120)}`")
    lines.append("")
  lines += ["Full tables: `token_trajectories/summary.md`.", ""]
  return lines


def _load_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def joint_examples(seq_dir: str, n: int = 3,
                   names: tuple[str, ...] = ("ps-pl_greedy", "pl-ps_greedy")
                   ) -> list[dict[str, str]]:
  """The first n prompts with their continuations (decoded text) in the sets `names`."""
  sets = os.path.join(seq_dir, "sets")
  rows = {name: {r["index"]: r for r in _load_jsonl(os.path.join(sets, f"{name}.jsonl"))}
          for name in names}
  first = rows[names[0]]
  return [{"prompt": r["context"], **{name: rows[name][i]["text"] if i in rows[name] else ""
                                      for name in names}}
          for i, r in sorted(first.items())[:n]]


def _sequence_section(out_dir: str) -> list[str]:
  from experiments.analysis import sequences

  d = os.path.join(out_dir, "sequences")
  lines = ["## 4. Sequences: generated and corrupted text", ""]
  df = _read_csv(os.path.join(d, "sequence_ppl.csv"))
  if df is None:
    return lines + ["*(sequences/sequence_ppl.csv missing)*", ""]
  manifest = {}
  if os.path.isfile(os.path.join(d, "sets", "manifest.json")):
    with open(os.path.join(d, "sets", "manifest.json")) as f:
      manifest = json.load(f)
  gen = manifest.get("generation", {})
  lines += [f"The final checkpoints of the smallest ({gen.get('small', '?')}) and largest "
            f"({gen.get('large', '?')}) model decode together from p' = l1 p_s + l2 p_l "
            f"(probabilities; entries <= 0 dropped, renormalised) for the paper's five "
            f"configurations p_s - p_l, p_s, p_s + p_l, p_l, p_l - p_s, each with greedy search "
            f"and nucleus sampling (top-p 0.9), from {gen.get('prompts', '?')} prompts of the "
            f"validation text; the corrupted sets replace 20% to 100% of a passage's tokens with "
            f"random ones. Decoding the sets took {gen.get('decode_seconds', float('nan')):.1f} s. "
            f"Every checkpoint then scores every set.", ""]
  examples = joint_examples(d)
  if examples:
    lines += ["Greedy examples:", ""]
    for i, ex in enumerate(examples, 1):
      lines += [f"{i}. prompt: `{one_line(ex['prompt'], 200)}`",
                f"   - p_s - p_l: `{one_line(ex['ps-pl_greedy'])}`",
                f"   - p_l - p_s: `{one_line(ex['pl-ps_greedy'])}`"]
    lines.append("")
  primary = df["scored_by"].iloc[0]
  sub = df[df["scored_by"] == primary]
  final = sequences.final_table(sub)
  methods = [m for m in sequences.METHODS if f"{sequences.INVERSE}_{m}" in set(sub["set"])]
  if methods:
    lines += ["At the final checkpoints, does the perplexity of p_s - p_l rise with model size "
              "(inverse scaling) while the human text and p_l fall (the paper's Figure 6, top)?",
              ""]
    lines += [f"- {m}: " + sequences.scaling_answer(final, primary, m).text for m in methods]
    lines += ["", "Along training, does every size first lower the perplexity of p_s - p_l, and "
              "do the larger sizes later raise it?", ""]
    for m in methods:
      shapes = sequences.shapes(sub, f"{sequences.INVERSE}_{m}")
      lines += [f"- {m}: " + sequences.fall_then_rise_answer(shapes).text]
    lines.append("")
  lines += _image(out_dir, f"sequences/plots/{primary}_final_vs_params.png",
                  "perplexity at the final checkpoints against parameters")
  lines += ["Perplexity of every set at each size's final checkpoint:", ""]
  lines += sequences.final_overview(final, primary).splitlines() + [""]
  plot_dir = os.path.join(d, "plots")
  plots = sorted(p for p in os.listdir(plot_dir)
                 if p.endswith("_vs_valid_ppl.png")) if os.path.isdir(plot_dir) else []
  for p in plots:
    lines += _image(out_dir, f"sequences/plots/{p}", p[:-4].replace("_", " "))
  lines += ["Full tables: `sequences/summary.md`, `sequences/final_checkpoints.csv`.", ""]
  return lines


def _icl_section(out_dir: str, info: RunInfo) -> list[str]:
  from experiments.analysis import icl

  d = os.path.join(out_dir, "icl")
  lines = ["## 5. Downstream in-context learning", ""]
  results = _read_csv(os.path.join(d, "icl_results.csv"))
  if results is None:
    return lines + ["*(icl/icl_results.csv missing)*", ""]
  ks = sorted(results["k_shot"].dropna().unique().astype(int)) if "k_shot" in results else [0]
  k0 = int(info.settings.get("icl_k_shot", ks)[0]) if info.settings.get("icl_k_shot") else ks[0]
  tasks = sorted(results["task"].unique())
  lines += [f"Multiple-choice tasks ({', '.join(tasks)}; cloze tasks: the true next word or line "
            f"of {info.evaluation} among distractors from the same text), scored like "
            f"lm-evaluation-harness by every checkpoint. Headline: {k0}-shot prompts, the option "
            f"with the highest mean log-prob per token (the paper's normalisation).", ""]
  for k in ks:
    sub = results[results["k_shot"] == k] if "k_shot" in results else results
    a = icl.analyze(sub.drop(columns=["k_shot"], errors="ignore"))
    corr = a.correlations[["x", "spearman", "spearman_lo", "spearman_hi", "spearman_p", "r2",
                           "r2_lo", "r2_hi", "n"]]
    lines += [f"### {k}-shot", ""] + [f"- {s}" for s in icl.verdict(a)] + [""]
    lines += ["Correlations of mean accuracy with log x, pooled over sizes and checkpoints (_lo, "
              "_hi: 95% bootstrap interval over checkpoints and tasks):", ""]
    lines += _table(corr, {"spearman": ".3f", "spearman_lo": ".3f", "spearman_hi": ".3f",
                           "spearman_p": ".2g", "r2": ".3f", "r2_lo": ".3f",
                           "r2_hi": ".3f"}) + [""]
    last = sub.sort_values("step").groupby(["model", "task"], sort=False).last().reset_index()
    wide = last.pivot_table(index="task", columns="model", values="accuracy", sort=False)
    wide = wide[[m for m in model_order(sub) if m in wide.columns]]
    wide["random"] = last.groupby("task")["random_baseline"].first()
    lines += ["Accuracy at each size's final checkpoint:", ""]
    lines += _table(wide.reset_index(), {c: ".3f" for c in wide.columns}) + [""]
  lines += _image(out_dir, "icl/plots/mean_accuracy.png", "mean accuracy")
  lines += _image(out_dir, "icl/plots/option_ppl.png", "correct and incorrect option perplexity")
  lines += ["Full tables: `icl/summary.md`, `icl/correlations.csv`.", ""]
  return lines


def report_markdown(out_dir: str, info: RunInfo) -> str:
  """The text of OUT_DIR/REPORT.md (the caller writes it); draws OUT_DIR/report_plots/."""
  training = None
  path = os.path.join(out_dir, "family", "training.json")
  if os.path.isfile(path):
    with open(path) as f:
      training = json.load(f)
  vppl = _read_csv(os.path.join(out_dir, "validation_ppl", "validation_ppl.csv"))
  lines = _intro(info, training)
  lines += _training_section(out_dir, training, vppl)
  lines += _validation_section(out_dir, vppl)
  lines += _trajectory_section(out_dir, info)
  lines += _sequence_section(out_dir)
  lines += _icl_section(out_dir, info)
  lines += ["## Files", "",
            "`family/` checkpoints, suite.json, training.json · `validation_ppl/` · "
            "`token_trajectories/` · `sequences/` · `icl/`: each with its CSV tables, "
            "summary.md, plots (PNG + PDF) and run manifests (`runs/`).", ""]
  return "\n".join(lines)

