"""The workshop as run: each lesson notebook, with the cells the plan (lessons/workshop.md) skips or only shows
from their saved output removed, still runs to the end (a fresh kernel, an empty folder, NANOPEFT_STEPS=4 as the
plan says). A live cell that needs a removed one (a model, a tokenizer, a result) fails here."""
import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent
LESSON_NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("0[0-6]_*.ipynb"))
TAGS = {"workshop-skip", "workshop-saved"}


def test_every_lesson_notebook_of_the_plan_marks_what_it_does_not_run_live():
    plan = (ROOT / "lessons" / "workshop.md").read_text()
    assert "workshop-skip" in plan and "workshop-saved" in plan  # the plan names the tags it is written in
    for path in LESSON_NOTEBOOKS:
        tagged = [c for c in json.loads(path.read_text())["cells"] if TAGS & set(c["metadata"].get("tags", []))]
        assert tagged, f"{path.name} marks no cell for the workshop"
        assert all(c["cell_type"] == "code" for c in tagged)


@pytest.mark.parametrize("path", LESSON_NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebook_runs_to_the_end_without_the_cells_the_workshop_skips(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if not TAGS & set(c.metadata.get("tags", []))]
    monkeypatch.setenv("NANOPEFT_STEPS", "4")
    monkeypatch.setenv("NANOPEFT_QUICK", "1")
    monkeypatch.chdir(tmp_path)  # as a participant opens it: no repository around it
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
