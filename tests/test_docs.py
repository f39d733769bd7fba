"""The documentation holds together: every link resolves, every section a comment
cites exists, and the product speaks of itself only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "fuzz" / "README.md", *(ROOT / "docs").glob("*.md")])


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)]


def test_docs_exist() -> None:
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"design.md", "kernel-contract.md", "benchmarks.md", "limitations.md", "reliability.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(doc: Path) -> None:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or doc != ROOT / "README.md"
    for link in links:
        if re.match(r"[a-z]+:", link):
            raise AssertionError(f"{doc.name}: a link out of the repository: {link}")
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: {link} does not exist"
        assert ROOT in path.parents or path == ROOT, f"{doc.name}: {link} leaves the repository"
        if anchor and path.suffix == ".md":
            anchors = {slug(h) for h in headings(path)}
            assert anchor in anchors, f"{doc.name}: no section #{anchor} in {target}"


def _sources() -> list[Path]:
    found: list[Path] = []
    for sub, pattern in (("python", "*.py*"), ("tests", "*.py"), ("benches", "*.py"), ("rust", "*.rs")):
        found += sorted((ROOT / sub).rglob(pattern))
    return found


def test_cited_sections_exist() -> None:
    # Comments cite sections as: docs/design.md, "Fork rule" (or several: "A" and "B").
    cite = re.compile(r'docs/([\w-]+\.md)(?:,\s*(?:#\s*)?((?:"[^"\n]+"(?:\s*(?:and|,)\s*)?)+))?')
    seen = 0
    for path in [*_sources(), *DOCS]:
        text = path.read_text()
        for m in cite.finditer(text):
            doc = ROOT / "docs" / m.group(1)
            assert doc.exists(), f"{path.relative_to(ROOT)} cites docs/{m.group(1)}, which does not exist"
            names = set(headings(doc))
            for section in re.findall(r'"([^"\n]+)"', m.group(2) or ""):
                seen += 1
                where = path.relative_to(ROOT)
                assert section in names, f"{where} cites {m.group(1)}, {section!r}: no such section"
    assert seen > 5


def test_design_and_contract_have_the_sections_code_cites() -> None:
    design = set(headings(ROOT / "docs" / "design.md"))
    for name in ("The mechanism", "VMAs and the budget", "Extent merging", "Fork rule", "Suspect frames"):
        assert name in design, name
    for name in ("Write tracking", "Threads", "Hashing threads", "Hazards", "Frame reclaim"):
        assert name in design, name
    contract = set(headings(ROOT / "docs" / "kernel-contract.md"))
    for name in ("Knobs", "Statistics", "Per-process statistics", "Where ksm departs"):
        assert name in contract, name


def test_limitations_name_tests_that_exist() -> None:
    text = (ROOT / "docs" / "limitations.md").read_text() + (ROOT / "docs" / "design.md").read_text()
    refs = re.findall(r"tests/(test_\w+\.py)::(test_\w+)", text)
    assert len(refs) > 10
    for module, function in refs:
        source = (ROOT / "tests" / module).read_text()
        assert re.search(rf"^def {function}\(", source, re.M), f"tests/{module}::{function} does not exist"


# Built from parts, so that this file does not match itself.
_OUTSIDE = re.compile(
    "|".join(["iss" + "ue", "DESIGN" + r"\.md", "KERNEL" + "-KSM", "sha" + "red/", "API" + r"\.md"])
)


def test_the_product_speaks_of_itself() -> None:
    # No planning references and no files outside the repository, in anything a user
    # or a contributor reads (the Rust sources are checked by their own review).
    paths = [p for p in _sources() if p.suffix != ".rs"]
    paths += [*DOCS, ROOT / "Makefile", ROOT / "pyproject.toml"]
    bad = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in paths
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if _OUTSIDE.search(line)
    ]
    assert not bad, "\n".join(bad)


def test_readme_is_a_users_page() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 20_000, f"README.md is {size} bytes: move detail into docs/"
