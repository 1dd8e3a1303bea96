"""The experiment binaries as README launches them on several hosts: two processes on 127.0.0.1
joined by jax.distributed (gloo CPU collectives), one CPU device each, default flags (prefetch on).

Each binary runs once on two processes (the meshes alternate: data:2 splits the batch, data:1,
model:2 splits heads, MLP and vocabulary) and once as one process; both processes must exit 0
and print the same closing summary, and every CSV must equal the one-process run's. A user error
on one process only must end both processes with the same one-line error within seconds.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

import _suite_util as U

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240
# Two tiny OPT sizes x 3 steps; 128 positions for the cloze prompts; heads (4), MLP and vocabulary
# (320) split over model:2.
SIZES = U.ICL_SIZES


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  suite = U.make_suite(str(root / "suite"), SIZES, steps=(10, 20, 30))
  text = root / "text.txt"
  text.write_text("\n".join(U.CORPUS * 3) + "\n")
  return {"root": root, "suite": suite, "text": str(text)}


def _flags(binary: str, world) -> list[str]:
  common = [f"--suite={world['suite']}", "--batch_size=2"]
  text = world["text"]
  return common + {
      "validation_ppl": [f"--corpus={text}", "--noplots"],
      "token_trajectories": [f"--corpus={text}", "--context_length=32", "--stride=16",
                             "--start_fractions=0.1", "--noplots"],
      "sequence_generation": [f"--corpus={text}", "--num_prompts=2", "--prompt_tokens=8",
                              "--max_new_tokens=6", "--num_passages=2", "--passage_tokens=24",
                              "--noise_rates=0.3", "--generation_batch_size=2",
                              "--sample_models=tiny-a", "--noplots"],
      "downstream_icl": [f"--cloze_text={text}", "--cloze_examples=3", "--k_shot=0,1",
                         "--n_bins=2", "--top_k=2", "--noplots"],
  }[binary]


def _start(binary: str, flags: list[str], processes: int, per_process=None
           ) -> list[subprocess.Popen]:
  """The binary as `processes` processes (one: no jax.distributed); per_process(i) -> extra
  flags of process i."""
  port = U.free_port()
  procs = []
  for i in range(processes):
    env = U.child_env() if processes == 1 else U.child_env(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
        JAX_PROCESS_ID=str(i))
    extra = per_process(i) if per_process else []
    procs.append(subprocess.Popen([sys.executable, "-m", f"experiments.{binary}", *flags, *extra],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _wait(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
  """[(returncode, stdout, stderr)] of each process; kills what is left after TIMEOUT."""
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=TIMEOUT)
      out.append((p.returncode, stdout, stderr))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out


def _csvs(out_dir: str) -> dict[str, pd.DataFrame]:
  return {os.path.relpath(p, out_dir): pd.read_csv(p)
          for p in sorted(glob.glob(os.path.join(out_dir, "**", "*.csv"), recursive=True))}


def _assert_frames_equal(got: pd.DataFrame, want: pd.DataFrame, name: str) -> None:
  assert list(got.columns) == list(want.columns), name
  assert len(got) == len(want), name
  for col in want.columns:
    a, b = want[col].to_numpy(), got[col].to_numpy()
    if pd.api.types.is_numeric_dtype(want[col]) and pd.api.types.is_numeric_dtype(got[col]):
      # Float sums in another order (rows split over processes, heads and vocabulary over
      # devices): 1e-4 relative, or 1e-5 of the column's scale for values near 0 (slopes).
      a, b = a.astype(float), b.astype(float)
      scale = float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 0.0
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale + 1e-7, equal_nan=True,
                                 err_msg=f"{name} column {col}")
    else:
      assert [str(x) for x in b] == [str(x) for x in a], f"{name} column {col}"


# One launch per binary; the meshes alternate between binaries (data parallel, tensor parallel).
@pytest.mark.parametrize("binary, mesh", [
    ("validation_ppl", "data:2"),
    ("token_trajectories", "data:1,model:2"),
    ("sequence_generation", "data:2"),
    ("downstream_icl", "data:1,model:2"),
])
def test_two_processes_write_what_one_process_writes(world, binary, mesh):
  flags = _flags(binary, world)
  one_dir, two_dir = str(world["root"] / f"{binary}-1"), str(world["root"] / f"{binary}-2")
  # The one-process reference runs beside the two processes (the machine's cores are shared).
  procs = (_start(binary, flags + [f"--out={one_dir}"], 1)
           + _start(binary, flags + [f"--out={two_dir}", f"--mesh={mesh}"], 2))
  (rc, _, stderr), *two = _wait(procs)
  assert rc == 0, stderr[-3000:]
  for i, (rc, _, stderr) in enumerate(two):
    assert rc == 0, f"process {i}: {stderr[-3000:]}"
  # Both print process 0's closing summary (after its first line, which gives each one's time).
  closing = [s[s.index(f"== {binary} finished"):].split("\n", 1)[1] for _, s, _ in two]
  assert closing[0] == closing[1] and "failed" not in closing[0]
  # Only process 0 writes: one run manifest.
  assert len(glob.glob(os.path.join(two_dir, "runs", "*.json"))) == 1
  want, got = _csvs(one_dir), _csvs(two_dir)
  assert want and sorted(got) == sorted(want)
  for name in want:
    _assert_frames_equal(got[name], want[name], f"{binary} {name}")


def test_an_error_on_one_process_ends_both_with_its_message(world):
  flags = _flags("validation_ppl", world) + [f"--out={world['root'] / 'bad'}", "--mesh=data:2"]
  start = time.monotonic()
  runs = _wait(_start("validation_ppl", flags, 2,
                      per_process=lambda i: ["--models=nope"] if i == 1 else []))
  seconds = time.monotonic() - start
  errors = [stderr.strip().splitlines()[-1] for _, _, stderr in runs]
  assert [rc for rc, _, _ in runs] == [2, 2], errors
  assert errors[0] == errors[1] and "--models: suite 'tiny' has no model named 'nope'" in errors[0]
  assert seconds < 60
