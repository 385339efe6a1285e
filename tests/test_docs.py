"""The README and ``docs/*.md`` link only to files and section anchors that exist.

The README keeps a summary and ``docs/detection_quality.md`` the measurements behind it, with links both ways:
a renamed section or a moved file breaks them silently on GitHub, so they are checked here. Anchors follow
GitHub's rule (lower case, punctuation other than ``-`` and ``_`` dropped, spaces to hyphens); headings inside
fenced code blocks are not sections.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchors(path: Path) -> set[str]:
    """Section anchors GitHub generates for the Markdown headings of ``path``."""
    anchors: set[str] = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        m = None if in_code else re.match(r"^#+\s+(.*)", line)
        if m:
            title = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def test_anchor_rule_on_hand_built_headings(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("# Which RoIs teach the lesion head (`head_training.centre_rule`)\n```\n# not a heading\n```\n")
    assert github_anchors(doc) == {"which-rois-teach-the-lesion-head-head_trainingcentre_rule"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in github_anchors(path):
            broken.append(f"{target}: no such section")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)
