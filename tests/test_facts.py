"""The numbers in the README, the lessons and the benchmarks page that come from the results are the results'
numbers; the tool that writes them (tools/facts.py) is not part of the installed package."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import nanopeft

ROOT = Path(__file__).parent.parent
spec = importlib.util.spec_from_file_location("facts", ROOT / "tools" / "facts.py")
facts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(facts)
DOCS = facts.pages()


def test_every_generated_block_in_the_docs_equals_what_the_results_give():
    assert facts.update(DOCS, check=True) == [], "run `make facts` and commit"


def test_the_installed_package_has_no_command_that_writes_the_repository():
    out = subprocess.run([sys.executable, "-m", "nanopeft", "--help"], capture_output=True, text=True, check=True)
    commands = out.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert "facts" not in commands and set(commands) <= {"demo", "plan"}, commands
    package = Path(nanopeft.__file__).parent
    assert not [p for p in package.rglob("*.py") if "write_text" in p.read_text() and "README" in p.read_text()]


def test_the_docs_use_the_blocks_they_quote_from():
    used = {m["name"] for path in DOCS for m in facts.MARKER.finditer(path.read_text())}
    assert {"showdown", "claims", "step-times", "lr-sweep", "dora-study", "memory"} <= used


def test_an_unknown_block_is_an_error(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- facts: nonsense -->\nold\n<!-- /facts -->\n")
    with pytest.raises(ValueError, match="unknown facts block 'nonsense'"):
        facts.update([page])


def test_generated_tables_keep_their_columns():
    """A | inside a cell would end it: GitHub and the site would show a broken row (it is written \\| instead)."""
    import re

    for name, text in facts.blocks().items():
        rows = [line for line in text.splitlines() if line.startswith("|")]
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in rows}
        assert len(widths) <= 1, f"block {name!r} has rows of different widths: {widths}"
