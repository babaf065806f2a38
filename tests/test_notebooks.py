"""Hygiene of the committed notebooks: what nbval will compare must be reproducible on another machine."""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed_top_to_bottom_without_errors(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1)), "restart and run all"
    for c in cells:
        assert not any(o["output_type"] == "error" for o in c["outputs"]), "".join(c["source"])[:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_checked_cells_print_nothing_machine_specific(path):
    # nbval compares stderr too: warnings carry file paths, so a checked cell must print none.
    for c in json.loads(path.read_text())["cells"]:
        if c["cell_type"] == "code" and "NBVAL_CHECK_OUTPUT" in "".join(c["source"]):
            streams = [o for o in c["outputs"] if o["output_type"] == "stream"]
            assert all(o["name"] == "stdout" for o in streams), "".join(c["source"])[:80]
            assert c["outputs"], "a checked cell with no output checks nothing"


PACKAGE = Path(__file__).parent.parent / "src" / "nanopeft"


def defined_names(source: str) -> set:
    return set(re.findall(r"^\s*(?:def|class)\s+(\w+)", source, flags=re.M))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_never_copy_package_code(path):
    # One source of truth: notebooks import nanopeft and show its code with inspect.getsource; a notebook that
    # defines a function or class of the same name as one in the package has copied it.
    package = set().union(*(defined_names(f.read_text()) for f in PACKAGE.glob("*.py")))
    assert {"LoRALinear", "quantize_nf4", "loraplus_param_groups"} <= package
    for c in json.loads(path.read_text())["cells"]:
        if c["cell_type"] == "code":
            copied = defined_names("".join(c["source"])) & package
            assert not copied, f"{path.name} defines {copied}, which nanopeft already has: import it instead"
