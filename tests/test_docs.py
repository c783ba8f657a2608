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


RESULTS = ROOT / "benchmarks" / "results"


def quiet_records(result: dict) -> list[dict]:
    """A results file's quiet-machine guard records (multiturn keeps one per block size)."""
    out = []
    for key in ("quiet", "flow_quiet"):
        record = result.get(key)
        if isinstance(record, dict):
            out += list(record.values()) if "marked" not in record else [record]
    return out


def linked_results() -> dict[Path, list[str]]:
    """Every results JSON behind a link of the docs (a table, its plot or the JSON itself)."""
    out: dict[Path, list[str]] = {}
    for path in doc_files():
        for target in links(path):
            linked = (path.parent / target.partition("#")[0]).resolve()
            if linked.is_relative_to(RESULTS) and linked.with_suffix(".json").exists():
                out.setdefault(linked.with_suffix(".json"), []).append(path.name)
    return out


def noisy(result: dict) -> bool:
    """Marked by its guard; or, for a run from before the guard, any request it timed while
    other processes used more than the limit (such runs record each request's share)."""
    from lvlm_prune.benchmarks.common import COTENANT_LIMIT

    records = quiet_records(result)
    if records:
        return any(r["marked"] for r in records)
    shares = [
        v
        for row in result.get("rows", [])
        for v in ((row.get("cotenant_cpu_share") or {}).get("values") or [])
    ]
    return any(v is not None and v > COTENANT_LIMIT for v in shares)


def test_no_document_cites_a_noisy_run():
    import json

    cited = linked_results()
    assert len(cited) >= 10, "the docs link the committed results"
    found = [
        f"{json_path.relative_to(ROOT)} (cited by {', '.join(sorted(set(by)))})"
        for json_path, by in cited.items()
        if noisy(json.loads(json_path.read_text()))
    ]
    assert not found, "a noisy run feeds a headline: " + "; ".join(found)


def test_the_noise_check_sees_a_marked_run_and_a_noisy_old_one():
    marked = {"quiet": {"marked": True, "rounds": []}}
    per_block = {"quiet": {"128": {"marked": False}, "32": {"marked": True}}}
    old = {"rows": [{"cotenant_cpu_share": {"values": [0.01, 0.47]}}]}
    quiet_old = {"rows": [{"cotenant_cpu_share": {"values": [0.01, 0.02]}}]}
    assert noisy(marked) and noisy(per_block) and noisy(old)
    assert not noisy(quiet_old) and not noisy({"quiet": {"marked": False}})


@pytest.mark.parametrize(
    "path", sorted(RESULTS.rglob("serve-*.json")), ids=lambda p: str(p.relative_to(RESULTS))
)
def test_every_committed_sustainable_rate_stands_on_quiet_passes_of_enough_requests(path):
    """Each setting's sustainable rate: every tested rate at or below it passed, every run used
    completed at least ``min_requests`` (>= 100) and none of them was noisy; a rate only ever
    measured noisy is not a tested rate."""
    import json

    from lvlm_prune.benchmarks import serve

    result = json.loads(path.read_text())
    assert result["workloads"], path
    for w in result["workloads"]:
        assert w["min_requests"] >= 100
        for setting in map(serve.Setting, sorted({p["keep_ratio"] for p in w["points"]})):
            rate = w["sustainable_rate"][setting.name]
            assert rate == serve._sustainable(w["points"], setting), setting.name
            used = [
                p
                for p in w["points"]
                if p["setting"] == setting.name and not p["noisy"] and rate and p["rate"] <= rate
            ]
            assert used, f"{w['workload']} {setting.name}: no quiet run at or below its rate"
            for p in used:
                assert p["within_slo"] and p["completed"] >= w["min_requests"], (setting, p["rate"])
                assert p["cotenant_cpu_share"] <= serve.COTENANT_LIMIT


def test_the_readme_first_request_is_the_example_whose_output_is_committed():
    """The README's first exchange is ``examples/first_request.py``'s code, and the numbers its
    comments quote are the committed output's (``benchmarks/results/first-request.md``)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = (ROOT / "examples" / "first_request.py").read_text(encoding="utf-8")
    shared = example.split("# --- the README's code, as it is there ---\n")[1]
    shared = shared.split("# --- end of the README's code ---")[0].strip()
    assert shared and shared in readme, "README and examples/first_request.py drifted apart"
    output = (RESULTS / "first-request.md").read_text(encoding="utf-8")
    answer = re.search(r"reply\.choices\[0\]\.message\.content\s+# ('\w+')", readme).group(1)
    assert f"reply at keep 0.25: {answer}" in output
    pruned, unpruned = re.search(r"prompt_tokens\s+# (\d+) \((\d+) unpruned\)", readme).groups()
    assert f"prompt tokens: {pruned} ({unpruned} unpruned)" in output
    for token, votes in re.findall(r"\{'token': '(\w+)', 'votes': (\d+)\}", readme):
        assert f"'{token}': {votes}" in output, (token, votes)
    kept = re.search(r"object hit rate\s+is (\d+) %", readme).group(1)
    assert f"asked object's patches kept: {kept} %" in output
