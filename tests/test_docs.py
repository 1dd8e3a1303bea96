"""The documentation's shape: README.md orients in a page and starts with the two set-up commands;
every relative link of README.md, BENCHMARKS.md and docs/*.md points at a file (and heading) that
exists."""
from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = ([README, os.path.join(ROOT, "BENCHMARKS.md")]
        + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))))

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _links(text: str) -> list[str]:
  text = _CODE_SPAN.sub("", _FENCE.sub("", text))
  return _LINK.findall(text)


def _anchors(text: str) -> set[str]:
  """GitHub's heading ids: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
  out = set()
  for heading in _HEADING.findall(_FENCE.sub("", text)):
    slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
    out.add(slug)
  return out


def test_readme_is_short_and_starts_with_the_two_commands():
  lines = _read(README).splitlines()
  assert len(lines) < 250, f"README.md has {len(lines)} lines; move detail into docs/"
  head = [line.strip() for line in lines[:15]]
  assert any(line.startswith("make demo") for line in head), "README.md: `make demo` not in its first 15 lines"
  assert any(line.startswith("make test") for line in head), "README.md: `make test` not in its first 15 lines"


def test_the_docs_exist():
  names = {os.path.basename(p) for p in DOCS}
  assert {"README.md", "architecture.md", "terminal.md"} <= names, sorted(names)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_point_at_existing_files(path):
  text = _read(path)
  links = _links(text)
  bad = []
  for link in links:
    if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
      continue
    target, _, anchor = link.partition("#")
    target_path = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
    if not os.path.exists(target_path):
      bad.append(f"{link}: no file {os.path.relpath(target_path, ROOT)}")
    elif anchor and target_path.endswith(".md") and anchor not in _anchors(_read(target_path)):
      bad.append(f"{link}: no heading #{anchor} in {os.path.relpath(target_path, ROOT)}")
  assert not bad, f"{os.path.relpath(path, ROOT)}: " + "; ".join(bad)


def test_the_link_reader_sees_links_and_anchors():
  text = "See [a](docs/a.md#b-c) and ![i](img/x.png), not `[x](y)`.\n\n## B, c!\n```\n[z](w)\n```\n"
  assert _links(text) == ["docs/a.md#b-c", "img/x.png"]
  assert _anchors(text) == {"b-c"}
