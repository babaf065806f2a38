"""The workshop's slide deck, written from its plan (lessons/workshop.md): one slide per section of the plan, so the
slides and the plan never disagree. A single HTML file with its own few lines of script (arrow keys, space, or a
click to move; `f` for full screen); math is typeset by the MathJax that ships with the site.

    python tools/slides.py build/docs/html     # writes build/docs/html/slides/workshop.html (make docs runs it)
"""
from __future__ import annotations

import html
import posixpath
import re
import sys
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "lessons" / "workshop.md"
SKIP = ("Before the session", "The graders", "Common failure points", "Timing notes")  # for the instructor's eyes
NOTES = ("workshop_answers", "slides/workshop.html", "Back to [the course page]")  # paragraphs that stay out too

STYLE = """
body { margin: 0; font-family: system-ui, sans-serif; background: #f4f6f8; }
section { display: none; box-sizing: border-box; width: 100vw; height: 100vh; padding: 4vh 6vw; overflow: auto;
          background: white; font-size: 2.6vh; line-height: 1.45; }
section.current { display: block; }
section h1 { font-size: 6vh; color: #1f4e79; } section h2, section h3 { font-size: 4.2vh; color: #1f4e79; }
table { border-collapse: collapse; font-size: 2.1vh; } td, th { border: 1px solid #ccd; padding: .3em .6em; }
code { background: #eef1f5; padding: 0 .2em; } .count { position: fixed; right: 2vw; bottom: 2vh; color: #889; }
"""
SCRIPT = """
const slides = [...document.querySelectorAll('section')];
let i = 0;
function show(k) { i = Math.max(0, Math.min(slides.length - 1, k));
  slides.forEach((s, j) => s.classList.toggle('current', j === i));
  document.querySelector('.count').textContent = (i + 1) + ' / ' + slides.length; }
document.addEventListener('keydown', e => {
  if (['ArrowRight', 'PageDown', ' '].includes(e.key)) show(i + 1);
  if (['ArrowLeft', 'PageUp'].includes(e.key)) show(i - 1);
  if (e.key === 'f' && document.documentElement.requestFullscreen) document.documentElement.requestFullscreen(); });
document.addEventListener('click', e => { if (!e.target.closest('a')) show(i + 1); });
show(0);
"""


def sections(text: str) -> list:
    """(title, markdown) for the plan's title block and each of its ## and ### sections a group should see."""
    parts = re.split(r"^(#{1,3} .+)$", text, flags=re.M)
    out, skipping = [], False
    for heading, body in zip(parts[1::2], parts[2::2]):
        title = heading.lstrip("# ").strip()
        if heading.startswith("## "):  # a section: its subsections follow its fate
            skipping = title.startswith(SKIP)
        body = "\n\n".join(para for para in body.split("\n\n")  # the plan's notes to the instructor stay out
                             if not any(note in para for note in NOTES))
        if not skipping and (body.strip() or not out):
            out.append((title, body))
    return out


LOCAL_PAGE = re.compile(r"\]\((?![a-z]+:)([^)#]+?)\.(?:md|ipynb)(#[^)]*)?\)")  # a lesson's or notebook's page


def deck(text: str, mathjax: str) -> str:
    md = MarkdownIt("commonmark").enable("table")
    slides = []
    for n, (title, body) in enumerate(sections(text)):
        body = LOCAL_PAGE.sub(lambda m: f"](../{posixpath.normpath('lessons/' + m[1])}.html{m[2] or ''})", body)
        tag = "h1" if n == 0 else "h2"
        slides.append(f"<section><{tag}>{html.escape(title)}</{tag}>\n{md.render(body)}</section>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>nanoPEFT workshop</title>\n"
            f"<link rel=\"icon\" href=\"{mathjax.split('mathjax/')[0]}favicon.svg\">\n"
            f"<style>{STYLE}</style>\n<script>window.MathJax = {{tex: {{inlineMath: [['$', '$']]}}}};</script>\n"
            f"<script defer src=\"{mathjax}\"></script></head>\n<body>\n" + "\n".join(slides)
            + f"\n<div class=\"count\"></div>\n<script>{SCRIPT}</script>\n</body></html>\n")


def main(argv=None) -> int:
    site = Path((argv or sys.argv[1:] or ["build/docs/html"])[0])
    out = site / "slides" / "workshop.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(deck(PLAN.read_text(), "../_static/mathjax/tex-chtml.js"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
