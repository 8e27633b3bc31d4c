"""The documentation's cross-references: code and docs cite evidence as docs/FILE.md#anchor, and a
reader following one must land on a section."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"(\w+)\.md#([\w\-]+)")
# a bare #anchor in a document's prose points into that document (code and inline code left out)
IN_PAGE = re.compile(r"(?<![\w/.`\]])#([a-z][a-z0-9\-]*[a-z0-9])")


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


def in_page_references(doc: Path) -> list[str]:
    """The bare #anchors of a Markdown file's prose (fenced and inline code dropped)."""
    prose = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    return IN_PAGE.findall(re.sub(r"`[^`\n]*`", "", prose))


def test_every_section_a_document_points_to_in_itself_exists():
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    assert len(in_page_references(ROOT / "docs" / "results.md")) > 100
    headed = {doc: anchors(doc) for doc in docs}
    broken = [
        f"{doc.relative_to(ROOT)}: #{tag}" for doc in docs for tag in in_page_references(doc) if tag not in headed[doc]
    ]
    assert not broken, "sections pointed to in the same document that do not exist:\n" + "\n".join(broken)


def test_a_missing_section_is_reported(tmp_path):
    doc = tmp_path / "guide.md"
    doc.write_text("# Guide\n## Half precision (`--fp16`)\n")
    assert anchors(doc) == {"guide", "half-precision---fp16"}
    doc.write_text("# Guide\n## Half precision\nAs (#half-precision, #int8) say; `#no-link`.\n```\n# a-comment\n```\n")
    assert in_page_references(doc) == ["half-precision", "int8"]
    assert CITED.findall("see docs/guide.md#half-precision and guide.md#guide") == [
        ("guide", "half-precision"),
        ("guide", "guide"),
    ]
