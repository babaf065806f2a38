"""The graders: the reference solutions pass, planted mistakes fail with the right diagnosis, a crash is a report,
a blank stops with "fill this in"; and the exercise notebooks are exactly what the generator makes of the solutions."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from nanopeft import DoRALinear, LoRALinear, loraplus_param_groups
from nanopeft.lab.exercises import FillThisIn, check_dora, check_lora, check_loraplus, check_nf4
from nanopeft.nf4 import quantize_nf4

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
SOLUTIONS = {"lora": ("ex1_lora", "MyLoRA", check_lora), "dora": ("ex2_dora", "MyDoRA", check_dora),
             "nf4": ("ex3_nf4", "my_quantize", check_nf4), "loraplus": ("ex4_loraplus", "my_groups", check_loraplus)}


def solution_source(exercise: str) -> str:
    """The code cell of the solution notebook that holds the solution blocks."""
    nb = nbformat.read(NOTEBOOKS / "solutions" / f"{SOLUTIONS[exercise][0]}.ipynb", as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code" and "### BEGIN SOLUTION" in c.source)


def load(exercise: str, replace=()):
    """The learner's answer: the solution's code, with (old, new) replacements planted in it."""
    source = solution_source(exercise)
    for old, new in replace:
        assert old in source, old
        source = source.replace(old, new)
    namespace = {}
    exec("import math\nimport torch\nfrom torch import nn\nfrom nanopeft.lab.exercises import blank\n" + source,
         namespace)
    return namespace[SOLUTIONS[exercise][1]]


@pytest.mark.parametrize("exercise", list(SOLUTIONS))
def test_the_reference_solutions_pass(exercise):
    report = SOLUTIONS[exercise][2](load(exercise))
    assert report.passed, report


@pytest.mark.parametrize("grader, answer", [
    (check_lora, LoRALinear), (check_dora, DoRALinear),
    (check_nf4, lambda w, b: (quantize_nf4(w, b).packed.view(-1), quantize_nf4(w, b).absmax)),
    (check_loraplus, lambda model, lr, ratio: loraplus_param_groups(model, lr, ratio)),
])
def test_the_package_passes_its_own_graders(grader, answer):
    assert grader(answer).passed


PLANTED = [
    ("lora", [("self.scaling = alpha / r", "self.scaling = alpha")],
     "your output is r times too large: the update is scaled by alpha, not alpha / r"),
    ("lora", [("self.scaling = alpha / r", "self.scaling = 1")], "the update is not scaled"),
    ("lora", [("torch.zeros(base.out_features, r)", "torch.randn(base.out_features, r)")],
     "B must start at zero so that the adapted model starts as the pretrained one"),
    ("lora", [("nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))", "nn.init.zeros_(self.lora_A)")],
     "A must start random"),
    ("lora", [("        self.base.requires_grad_(False)  # the pretrained layer stays frozen\n", "")],
     "freeze it"),
    ("lora", [("torch.empty(r, base.in_features))  # (r, in)", "torch.empty(base.in_features, r))"),
              ("x @ self.lora_A.T @", "x @ self.lora_A @")], "lora_A has shape (64, 4), it should be (4, 64)"),
    ("dora", [("directional.norm(dim=1, keepdim=True)", "directional.norm(dim=0, keepdim=True)"),
              ("base.weight.detach().norm(dim=1)", "base.weight.detach().norm(dim=0)")],
     "your norm is taken over the wrong axis: DoRA normalises each output row"),
    ("dora", [("directional.norm(dim=1, keepdim=True).detach()", "directional.norm(dim=1, keepdim=True)")],
     "the norm is not detached: A's gradient differs (paper section 4.3)"),
    ("dora", [("self.scaling = alpha / r", "self.scaling = alpha")], "the update is scaled by alpha, not alpha / r"),
    ("nf4", [("packed = (codes[0::2] << 4) | codes[1::2]", "packed = (codes[1::2] << 4) | codes[0::2]")],
     "nibbles in the wrong order: bitsandbytes puts the first value in the high nibble"),
    ("nf4", [("absmax = blocks.abs().amax(dim=1)  # (blocks,)", "absmax = w.abs().max().view(1)"),
             ("scaled = [(blocks * (1 / absmax).view(-1, 1)).flatten()]", "scaled = [(blocks / absmax).flatten()]"),
             ("        absmax = torch.cat([absmax, tail.view(1)])\n", "")],
     "one absmax per block of 64, not one for the whole tensor"),
    ("nf4", [("codes.new_tensor([7])", "codes.new_tensor([0])")], "padded with code 7"),
    ("nf4", [("torch.bucketize(scaled, midpoints)", "torch.bucketize(scaled, midpoints, right=True)")],
     "half-way between two levels must go to the lower level"),
    ("loraplus", [('{"params": fast, "lr": lr * ratio}', '{"params": fast, "lr": lr}')],
     "B's learning rate must be ratio times A's: you gave B the same rate as A"),
    ("loraplus", [('{"params": fast, "lr": lr * ratio}', '{"params": fast, "lr": lr / ratio}')],
     "you divided lr by the ratio"),
    ("loraplus", [('"lora_B" in name or p.ndim == 1', '"lora_B" in name')],
     "1-D parameters such as DoRA's magnitude go in B's fast group"),
    ("loraplus", [("        if not p.requires_grad:\n            continue\n", "")], "frozen parameters"),
]


@pytest.mark.parametrize("exercise, replace, diagnosis", PLANTED, ids=[p[2][:40] for p in PLANTED])
def test_planted_mistakes_fail_with_their_diagnosis(exercise, replace, diagnosis):
    report = SOLUTIONS[exercise][2](load(exercise, replace))
    assert not report.passed
    assert any(diagnosis in text for text in report.text), report


def test_a_crash_in_the_learners_code_is_a_failed_report_with_its_line():
    class Crashes(LoRALinear):
        def forward(self, x):
            return x @ self.lora_B  # a shape mistake: (5, 64) @ (48, 4)

    report = check_lora(Crashes)  # never raises
    assert not report.passed
    assert any("your code raised RuntimeError" in t and "x @ self.lora_B" in t for t in report.text), report

    def no_tuple(w, blocksize):
        return None

    assert "return a tuple (packed, absmax)" in str(check_nf4(no_tuple))


def test_a_blank_stops_the_grader_with_fill_this_in():
    answer = load("lora", [("        self.lora_A = nn.Parameter(", '        blank("create A")\n        self.lora_A = nn.Parameter(')])
    with pytest.raises(FillThisIn, match="create A"):
        check_lora(answer)
    assert FillThisIn("create A")._render_traceback_()[0] == "\u270e fill this in: create A"


def test_the_exercise_notebooks_are_what_the_generator_makes_of_the_solutions():
    done = subprocess.run([sys.executable, str(NOTEBOOKS / "make_exercises.py"), "--check"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for path in sorted((NOTEBOOKS / "exercises").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), path.name  # a clean template
        assert "### BEGIN SOLUTION" not in path.read_text() and "blank(" in path.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ex1_lora", "ex3_nf4"])
def test_an_exercise_notebook_stops_at_its_first_blank(name, tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(NOTEBOOKS / "exercises" / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(CellExecutionError) as stopped:
        client.execute()
    assert "fill this in" in str(stopped.value)
    errors = [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert len(errors) == 1
    index, error = errors[0]
    assert "check_" in nb.cells[index].source  # it stops at the grader, the first place the blank runs
    assert error["traceback"][0].startswith("\u270e fill this in:") and len(error["traceback"]) <= 3
