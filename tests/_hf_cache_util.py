"""Test helpers: tiny HF OPT checkpoints and a fake HF hub cache laid out like the real one.

The cache: CACHE/models--ORG--NAME/refs/<revision> holds a commit sha (no newline, as
huggingface_hub writes it), snapshots/<sha>/<file> are relative links into blobs/, and blobs are
named by the sha256 of their content for LFS files (weights) and by git's blob sha1 otherwise.
"""

from __future__ import annotations

import hashlib
import os
import shutil

LFS_SUFFIXES = (".safetensors", ".bin")

TINY_OPT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                ffn_dim=32, max_position_embeddings=32, word_embed_proj_dim=16)


def tiny_opt(directory: str, seed: int, max_shard_size: str | None = None, **changes) -> str:
  """A tiny OPTForCausalLM saved with save_pretrained (config.json + model.safetensors, or shards
  of at most `max_shard_size` + index). Every tensor is random, layer norms and biases included:
  a fresh model's are all ones and zeros, equal between any two seeds, unlike trained ones."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  model = transformers.OPTForCausalLM(transformers.OPTConfig(**{**TINY_OPT, **changes}))
  with torch.no_grad():
    for p in model.parameters():
      p.normal_()
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(directory, **kwargs)
  return directory


def blob_name(path: str) -> str:
  with open(path, "rb") as f:
    data = f.read()
  if path.endswith(LFS_SUFFIXES):
    return hashlib.sha256(data).hexdigest()
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_dir(cache: str, repo: str) -> str:
  return os.path.join(cache, "models--" + repo.replace("/", "--"))


def commit_sha(repo: str, revision: str) -> str:
  return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


def add_revision(cache: str, repo: str, revision: str | None, source: str,
                 sha: str | None = None) -> str:
  """Puts the files of folder `source` in the cache as `revision` of `repo` (None: a snapshot no
  ref names); returns the snapshot folder. The same content shares one blob, as in HF's cache."""
  root = repo_dir(cache, repo)
  sha = sha or commit_sha(repo, revision or source)
  snapshot = os.path.join(root, "snapshots", sha)
  os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
  os.makedirs(snapshot, exist_ok=True)
  for name in sorted(os.listdir(source)):
    src = os.path.join(source, name)
    blob = blob_name(src)
    target = os.path.join(root, "blobs", blob)
    if not os.path.exists(target):
      shutil.copyfile(src, target)
    link = os.path.join(snapshot, name)
    if os.path.lexists(link):
      os.unlink(link)
    os.symlink(os.path.relpath(target, snapshot), link)
  if revision is not None:
    set_ref(cache, repo, revision, sha)
  return snapshot


def set_ref(cache: str, repo: str, revision: str, sha: str) -> None:
  path = os.path.join(repo_dir(cache, repo), "refs", revision)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(sha)
