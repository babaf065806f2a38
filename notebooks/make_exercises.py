"""Write the exercise notebooks from the solution notebooks (fastbook's way): one source of truth, two notebooks.

    python notebooks/make_exercises.py          # notebooks/solutions/*.ipynb -> notebooks/exercises/*.ipynb

In a solution notebook, the code a learner writes sits between two marker lines:

        ### BEGIN SOLUTION: what to write (shown to the learner as the hint)
        ...the solution...
        ### END SOLUTION

The exercise notebook gets, in its place, one line `blank("what to write")` at the same indentation: running it
stops the grader with "fill this in: what to write". Outputs and execution counts are removed, the note saying
"solution notebook" becomes the exercise's note, and the Colab badge points at the exercise. `make test` checks
that the committed exercise notebooks are exactly what this script writes.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).parent
BEGIN = re.compile(r"^(?P<indent>\s*)### BEGIN SOLUTION:?\s*(?P<hint>.*)$")
END = re.compile(r"^\s*### END SOLUTION\s*$")
SOLUTION_NOTE = "> **Solution notebook.**"
SOLUTION_TITLE = ": worked solution"  # the end of a solution's title ("# Exercise 1 · Write a LoRA layer: worked solution")
EXERCISE_NOTE = ("> **Exercise notebook.** Replace each `blank(...)` with your code, then run the grader cell below "
                 "it. Hints are under each exercise; the worked solution is in `notebooks/solutions/`.")


def strip(source: str) -> str:
    """Replace every solution block by a blank with its hint."""
    out, inside = [], False
    for line in source.split("\n"):
        begin = BEGIN.match(line)
        if begin:
            if inside:
                raise ValueError(f"nested BEGIN SOLUTION: {line!r}")
            inside = True
            hint = begin["hint"].strip().replace('"', "'") or "your code here"
            out.append(f'{begin["indent"]}blank("{hint}")')
        elif END.match(line):
            if not inside:
                raise ValueError("END SOLUTION without BEGIN")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError("BEGIN SOLUTION without END")
    return "\n".join(out)


def exercise_of(solution: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": solution.metadata["kernelspec"],
                                            "language_info": {"name": "python", "pygments_lexer": "ipython3"}})
    for cell in solution.cells:
        source = cell.source
        if cell.cell_type == "markdown":
            lines = [EXERCISE_NOTE if line.startswith(SOLUTION_NOTE) else
                     line.removesuffix(SOLUTION_TITLE) if line.startswith("# ") else line for line in source.split("\n")]
            source = "\n".join(lines).replace(f"notebooks/solutions/{name}", f"notebooks/exercises/{name}")
            new = nbformat.v4.new_markdown_cell(source)
        else:
            new = nbformat.v4.new_code_cell(strip(source))
        new["id"] = cell.get("id", new["id"])  # the solution's ids: the same input gives the same file
        nb.cells.append(new)
    return nb


def main(check: bool = False) -> int:
    stale = []
    for path in sorted((HERE / "solutions").glob("*.ipynb")):
        exercise = exercise_of(nbformat.read(path, as_version=4), path.name)
        target = HERE / "exercises" / path.name
        text = nbformat.writes(exercise) + "\n"
        if check:
            if not target.exists() or target.read_text() != text:
                stale.append(target.name)
        else:
            target.parent.mkdir(exist_ok=True)
            target.write_text(text)
            print(f"wrote {target.relative_to(HERE.parent)}")
    if stale:
        print(f"out of date: {stale}; run python notebooks/make_exercises.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv))
