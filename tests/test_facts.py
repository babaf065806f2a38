"""The numbers in the README and the lessons that come from the results are the results' numbers."""
from pathlib import Path

import pytest

from nanopeft.lab import facts

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "lessons").glob("*.md"))]


def test_every_generated_block_in_the_docs_equals_what_the_results_give():
    assert facts.update(DOCS, check=True) == [], "run `python -m nanopeft facts` and commit"


def test_the_docs_use_the_blocks_they_quote_from():
    used = {m["name"] for path in DOCS for m in facts.MARKER.finditer(path.read_text())}
    assert {"showdown", "claims", "step-times", "lr-sweep", "dora-study", "memory"} <= used


def test_an_unknown_block_is_an_error(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- facts: nonsense -->\nold\n<!-- /facts -->\n")
    with pytest.raises(ValueError, match="unknown facts block 'nonsense'"):
        facts.update([page])
