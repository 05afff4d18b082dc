"""Every document path that the code and the docs cite exists in the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a cited document: a repo-relative path ending in .md, e.g. docs/design.md or README.md
CITED = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
SOURCES = [
    "src/**/*.py",
    "src/**/*.yaml",
    "docs/**/*.md",
    "*.md",
    "benchmarks/**/*.py",
    "benchmarks/**/*.md",
    "scripts/*",
    "tests/*.py",
]


def _cited() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for pattern in SOURCES:
        for path in ROOT.glob(pattern):
            if not path.is_file() or ".venv" in path.parts or path.name == Path(__file__).name:
                continue
            for name in CITED.findall(path.read_text(errors="replace")):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _exists(name: str, citing: str) -> bool:
    if (ROOT / name).exists():
        return True
    return (ROOT / citing).parent.joinpath(name).exists()  # relative link inside docs/


def test_every_cited_document_exists():
    missing = {
        name: sorted(where)
        for name, where in _cited().items()
        if not any(_exists(name, w) for w in where)
        # files a command writes into its output folder
        and not name.startswith(("report.md", "tune.md", "reports/", "runs/", "DIR/", "OUT/"))
    }
    assert not missing, f"cited documents missing from the repository: {missing}"


def test_design_doc_is_cited_and_has_its_sections():
    text = (ROOT / "docs" / "design.md").read_text()
    for section in ("Layers", "Data flow", "Algorithms", "Budget units", "Run folder"):
        assert f". {section}" in text, section
    assert "DESIGN.md" not in "".join(p.read_text() for p in ROOT.glob("src/**/*.py")), (
        "cite docs/design.md, the project's own design document"
    )
