"""Learner-facing text speaks to learners: no words from how the project was built (issue numbers, "this round",
"lent", "our learners") in the README, the lessons, the notebooks (text and printed output), the benchmarks page
or the package's docstrings. The history goes in CHANGELOG.md and the commit messages."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PROCESS_WORDS = re.compile(r"\bissues? #?\d+|\(#\d+\)|\b(this|previous|earlier|next|last) rounds?\b|\blent\b|"
                           r"\bour learners\b", re.I)
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md",
         *sorted((ROOT / "lessons").glob("*.md")), *sorted((ROOT / "notebooks").rglob("*.ipynb")),
         *sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "src").rglob("*.json")),
         *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "tools").glob("*.py"))]


def process_words(text: str) -> list:
    return [m.group(0) for m in PROCESS_WORDS.finditer(text)]


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_process_words_in_learner_facing_text(path):
    found = process_words(path.read_text())
    assert not found, f"{path.relative_to(ROOT)} says {found}: say what the code does and what was measured where"


def test_the_scan_finds_what_it_looks_for():
    assert process_words("Fixed in issue 14, this round; the H100 lent for it; what our learners read") == \
        ["issue 14", "this round", "lent", "our learners"]
    assert process_words("the issue is the rounding, one round of steps, the talent of a model") == []
