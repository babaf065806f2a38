"""Sphinx configuration of the course's website: the lessons and the executed notebooks, never re-executed.

    make docs          # builds build/docs/html (warnings are errors), then checks every internal link

The source folder is the repository itself (`sphinx-build -c docs . build/docs/html`), so a lesson's link to
`../notebooks/01_lora.ipynb` is the same link on GitHub and on the site. Only the pages in `include_patterns` are
read. MathJax ships with the site (sphinx-mathjax-offline): the pages typeset their math without the network.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()
REPOSITORY = re.search(r'^Repository = "(.+)"', PYPROJECT, re.M)[1]  # the one place the address is written

project = "nanoPEFT"
author = "the nanoPEFT authors"
copyright = "2026, the nanoPEFT authors. Code: Apache-2.0; course text: CC BY 4.0"
release = re.search(r'^version = "(.+)"', PYPROJECT, re.M)[1]

root_doc = "docs/index"
include_patterns = ["docs/*.md", "lessons/*.md", "notebooks/*.ipynb", "notebooks/exercises/*.ipynb",
                    "notebooks/solutions/*.ipynb", "benchmarks/README.md", "CHANGELOG.md", "CONTRIBUTING.md"]
exclude_patterns = ["build", ".venv", "**/.ipynb_checkpoints", "docs/_extra"]

extensions = ["myst_nb", "sphinx-mathjax-offline"]
nb_execution_mode = "off"  # the committed outputs are the content; nothing is re-executed
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # "#exercises" links to the heading "Exercises"
suppress_warnings = ["mystnb.unknown_mime_type"]  # ipywidgets' state: the widgets need a kernel, the site shows text

html_theme = "sphinx_book_theme"
html_title = "nanoPEFT"
html_theme_options = {
    "repository_url": REPOSITORY,
    "use_repository_button": True,
    "path_to_docs": "",
    "home_page_in_toc": True,
    "show_navbar_depth": 1,
    "extra_footer": "Code under the Apache License 2.0; lessons and notebook text under CC BY 4.0 "
                    "(LICENSE, LICENSE-docs in the repository).",
}
html_last_updated_fmt = None
html_extra_path = ["_extra"]  # index.html at the site's root, pointing to the home page (docs/index.html)
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"
html_context = {"default_mode": "light"}  # the theme's light/dark switch starts on light (and says so to its script)
nb_ipywidgets_js = {}  # widgets need a running kernel; the site shows their text and loads no script from a CDN

COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def local_badge(app, pagename, templatename, context, doctree):
    """The notebooks' "Open in Colab" badge image ships with the site (the link still opens Colab)."""
    if "body" in context and COLAB_BADGE in context["body"]:
        context["body"] = context["body"].replace(COLAB_BADGE, context["pathto"]("_static/colab-badge.svg", 1))


# Each notebook page opens with a link to its lesson (on Colab its links go to the repository's pages).
LESSON_OF = {"00_start_here": "00_start_here", "01_lora": "01_lora", "ex1_lora": "01_lora", "02_dora": "02_dora",
             "ex2_dora": "02_dora", "03_nf4": "03_nf4", "ex3_nf4": "03_nf4", "04_qlora": "04_qlora",
             "05_loraplus": "05_loraplus", "ex4_loraplus": "05_loraplus", "06_showdown": "06_choosing",
             "07_will_it_fit": "07_will_it_fit",
             "08_beyond_one_gpu": "08_beyond_one_gpu"}


def lesson_link(app, pagename, templatename, context, doctree):
    if pagename.startswith("notebooks/") and "body" in context:
        lesson = f"lessons/{LESSON_OF[pagename.rsplit('/', 1)[-1]]}"
        title = app.env.titles[lesson].astext()
        banner = (f'<p class="lesson-link">This notebook goes with the lesson <a href="{context["pathto"](lesson)}">'
                  f"{title}</a>.</p>")
        context["body"] = banner + context["body"]


OWN_PAGE = re.compile(r'href="' + re.escape(REPOSITORY) + r'/blob/main/((?:lessons|notebooks)/[^"#]+)\.(?:md|ipynb)(#[^"]*)?"')


def own_pages(app, pagename, templatename, context, doctree):
    """The notebooks link to lessons by the repository's address (so that the links work on Colab); on the site
    those links go to the site's own pages."""
    if "body" in context:
        context["body"] = OWN_PAGE.sub(lambda m: f'href="{context["pathto"](m[1])}{m[2] or ""}"', context["body"])


def setup(app):
    app.connect("html-page-context", own_pages)
    app.connect("html-page-context", local_badge)
    app.connect("html-page-context", lesson_link)
