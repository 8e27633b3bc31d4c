"""The documentation's cross-references: code and docs cite evidence as docs/FILE.md#anchor, and a
reader following one must land on a section."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"(\w+)\.md#([\w\-]+)")


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {anchor(m.group(1)) for m in re.finditer(r"^#+ (.*)$", doc.read_text(encoding="utf-8"), re.M)}


def citing_files() -> list[Path]:
    packages = ("cbpt", "cbpt_cli", "cbpt_guard", "export", "guard", "testbed", "benchmarks", "tests")
    return [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(p for d in packages for p in (ROOT / d).glob("*.py"))]


def test_every_cited_section_of_the_docs_exists():
    sections = {doc.name: anchors(doc) for doc in (ROOT / "docs").glob("*.md")}
    assert "what-a-build-rests-on" in sections["results.md"] and "int8---int8" in sections["export.md"]
    broken = [
        f"{path.relative_to(ROOT)}: {name}.md#{tag}"
        for path in citing_files()
        for name, tag in CITED.findall(path.read_text(encoding="utf-8"))
        if f"{name}.md" in sections and tag not in sections[f"{name}.md"]
    ]
    assert not broken, "cited sections that do not exist:\n" + "\n".join(broken)


def test_a_missing_section_is_reported(tmp_path):
    doc = tmp_path / "guide.md"
    doc.write_text("# Guide\n## Half precision (`--fp16`)\n")
    assert anchors(doc) == {"guide", "half-precision---fp16"}
    assert CITED.findall("see docs/guide.md#half-precision and guide.md#guide") == [
        ("guide", "half-precision"),
        ("guide", "guide"),
    ]
