"""Every relative link in the README, the lessons, the benchmarks page and the notebooks' text points to a file
that exists, and every #anchor to a heading there (GitHub's rule for heading anchors). External links are listed,
not fetched (CI has no network).

    python tools/check_links.py                 # exit 1 on a broken link; writes build/docs/external_links.txt
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[!\[[^\]]*\]\(([^)\s]+)\)\]\(([^)\s]+)\)"  # a badge: an image inside a link
                  r"|(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def pages(root: Path = ROOT) -> list:
    return [root / "README.md", root / "CONTRIBUTING.md", root / "CHANGELOG.md", root / "benchmarks" / "README.md",
            *sorted((root / "lessons").glob("*.md")), *sorted((root / "docs").glob("*.md")),
            *sorted((root / "notebooks").rglob("*.ipynb"))]


def text_of(path: Path) -> str:
    """A page's Markdown: the file, or a notebook's markdown cells (code and outputs are not links to follow)."""
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = json.loads(path.read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set:
    text = FENCE.sub("", text_of(path))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+?) *#*$", text, re.M)}


def links(path: Path):
    """(target, line) of every link on a page, code blocks left out."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text_of(path))
    for m in LINK.finditer(text):
        for target in filter(None, m.groups()):
            yield target, text.count("\n", 0, m.start()) + 1


def repository(root: Path = ROOT) -> str:
    return re.search(r'^Repository = "(.+)"', (root / "pyproject.toml").read_text(), re.M)[1]


def check(paths, root: Path = ROOT) -> tuple:
    """(broken: [(page, line, target, why)], external: sorted set of URLs). A link to a file of this repository by
    its address (as the notebooks write them, to work on Colab) is checked against the checkout."""
    broken, external = [], set()
    own = re.compile(re.escape(repository(root)) + r"/(?:blob|tree)/main/(.*)")
    for page in paths:
        for target, line in links(page):
            inside = own.match(target)
            if re.match(r"[a-z][a-z0-9+.-]*:", target) and not inside:  # https:, mailto:, data:
                external.add(target)
                continue
            file, _, anchor = (inside[1] if inside else target).partition("#")
            base = root if inside else page.parent
            dest = (base / file).resolve() if file else page
            if not dest.exists():
                broken.append((page, line, target, "no such file"))
            elif anchor and dest.suffix in (".md", ".ipynb") and anchor not in anchors(dest):
                broken.append((page, line, target, f"no heading with the anchor #{anchor}"))
    return broken, sorted(external)


def main() -> int:
    broken, external = check(pages())
    out = ROOT / "build" / "docs"
    out.mkdir(parents=True, exist_ok=True)
    (out / "external_links.txt").write_text("\n".join(external) + "\n")
    for page, line, target, why in broken:
        print(f"{page.relative_to(ROOT)}:{line}: {target}: {why}")
    print(f"{len(broken)} broken internal links; {len(external)} external links listed in "
          f"{(out / 'external_links.txt').relative_to(ROOT)} (not fetched)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
