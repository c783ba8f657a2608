"""The documentation's promises that can rot unseen: relative links that resolve, no citation of a
document the repository lacks, and a README short enough to stay a newcomer's page.

No engine, no network: reads the files only.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250
MISSING_DOCUMENT = "SHAPES" + ".md"  # spelled apart, so this file does not cite it itself
"""The task spec's old name: it was never in the repository; docs/shapesvqa.md is the spec."""

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def doc_files() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "benchmarks/README.md",
    ]


def prose(text: str) -> str:
    """The text with code blocks removed and inline code made inert (link texts keep a word)."""
    return INLINE_CODE.sub("code", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text(encoding="utf-8")))


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lowercased, punctuation dropped, spaces as hyphens, -1 on repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of ``path`` whose file (inside ``root``) or heading is missing."""
    broken = []
    for target in links(path):
        if target.startswith(EXTERNAL):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif not linked.is_relative_to(root.resolve()):
            broken.append(f"{target}: outside the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert path.exists(), path
    broken = broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_check_sees_a_broken_link(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    page = root / "docs" / "page.md"
    page.write_text(
        "# Page\n\n## The `flow` method\n\n[ok](page.md#page) [ok](#the-flow-method) "
        "[gone](missing.md) [bad anchor](#nowhere) [`code` text](page.md) ![img](missing.png) "
        "[out](../../elsewhere.md) [web](https://example.com/x.md)\n"
        "```\n[in code](ignored.md)\n```\n"
    )
    (tmp_path / "elsewhere.md").write_text("# Elsewhere\n")
    assert broken_links(page, root=root) == [
        "missing.md: no such file",
        "#nowhere: no heading #nowhere in page.md",
        "missing.png: no such file",
        "../../elsewhere.md: outside the repository",
    ]


def test_the_readme_is_a_newcomers_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES} and move the rest "
        "to docs/"
    )


def test_no_file_cites_a_document_the_repository_lacks():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the repository's files")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    citing = []
    for name in filter(None, listed.split("\0")):
        path = ROOT / name
        if name.startswith("benchmarks/results/") or not path.is_file():
            continue  # results record the text of the run that made them
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if MISSING_DOCUMENT in text:
            citing.append(name)
    assert not citing, f"{', '.join(citing)} cite {MISSING_DOCUMENT}; the spec is docs/shapesvqa.md"
