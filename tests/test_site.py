"""The course website as a reader sees it: built from the lessons and the executed notebooks (`make docs`), opened
in a real browser (headless Chromium, Debian's `chromium` package, driven by Playwright from PyPI), and checked for
what a person would notice: math typeset (no raw `$$` or `\\frac` left in the text), every image loaded, the
navigation there, no JavaScript errors. Screenshots of the three pages land in build/docs/screenshots/.

Without Chromium the browser tests skip with a message that says how to get it, except under CI (CI=true), where
.ci/run installs it and a skip would hide a broken site."""
import functools
import http.server
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SITE = ROOT / "build" / "docs" / "html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGES = {"home": "docs/index.html", "lesson": "lessons/02_dora.html", "notebook": "notebooks/01_lora.html"}

spec = importlib.util.spec_from_file_location("check_links", ROOT / "tools" / "check_links.py")
check_links = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_links)


def build(source: Path, out: Path) -> subprocess.CompletedProcess:
    """sphinx-build as `make docs` runs it: warnings are errors."""
    return subprocess.run([sys.executable, "-m", "sphinx", "-q", "-W", "--keep-going", "-b", "html", "-c",
                           str(ROOT / "docs"), str(source), str(out)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def site():
    if not (SITE / "docs" / "index.html").is_file():  # `make docs` builds it; a bare pytest run builds it here
        done = build(ROOT, SITE)
        assert done.returncode == 0, done.stderr[-3000:]
    return SITE


def test_every_internal_link_and_anchor_resolves():
    broken, external = check_links.check(check_links.pages())
    assert not broken, "\n".join(f"{p.relative_to(ROOT)}:{line}: {t}: {why}" for p, line, t, why in broken)
    assert any("colab.research.google.com" in url for url in external)  # listed, not fetched


def test_a_planted_broken_link_and_anchor_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Exercises\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#exercises) [gone](missing.md) [no anchor](other.md#summary)\n"
                    "```\n[in code](ignored.md)\n```\n")
    broken, _ = check_links.check([page])
    assert [(t, why) for _, _, t, why in broken] == [("missing.md", "no such file"),
                                                      ("other.md#summary", "no heading with the anchor #summary")]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test reports what matters; the server's log is noise
        pass


def serve(folder: Path):
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def look(url: str, screenshot: Path | None = None) -> dict:
    """Open `url` in headless Chromium and report what a reader would see."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url, wait_until="networkidle")
        # MathJax typesets after the load event: wait until it says it is done (a slow machine takes longer)
        page.evaluate("""() => window.MathJax && MathJax.startup && MathJax.startup.promise
                         ? MathJax.startup.promise.then(() => true) : false""")
        seen = page.evaluate("""() => ({
            text: document.body.innerText,
            math: document.querySelectorAll('mjx-container').length,
            images: [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]),
            nav: [...document.querySelectorAll('nav a, .bd-sidebar a')].map(a => a.textContent.trim())
        })""")
        if screenshot:
            page.screenshot(path=str(screenshot), full_page=False)
        browser.close()
    raw = [s for s in ("$$", "\\frac", "\\sqrt", "\\alpha") if s in seen["text"]]
    return {**seen, "errors": errors, "raw_math": raw, "broken_images": [s for s, ok in seen["images"] if not ok]}


def needs_chromium():
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("Chromium is missing on CI: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("no Chromium: install it to run the browser tests (Debian/Ubuntu: sudo apt-get install chromium; "
                    "macOS: brew install --cask chromium); `make docs` builds the site without it")


@pytest.mark.parametrize("ci", [None, "true"])
def test_without_chromium_a_laptop_skips_and_ci_fails(monkeypatch, ci):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", None)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
            needs_chromium()
    else:
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception, match="missing on CI"):
            needs_chromium()


@pytest.mark.parametrize("name", list(PAGES))
def test_the_site_in_a_real_browser(site, name):
    needs_chromium()
    shots = site.parent / "screenshots"
    shots.mkdir(exist_ok=True)
    server = serve(site)
    try:
        seen = look(f"http://127.0.0.1:{server.server_port}/{PAGES[name]}", shots / f"{name}.png")
    finally:
        server.shutdown()
    assert not seen["errors"], seen["errors"]
    assert not seen["raw_math"], f"untypeset math on {PAGES[name]}: {seen['raw_math']}"
    assert not seen["broken_images"], seen["broken_images"]
    assert any("LoRA" in a for a in seen["nav"]) and any("DoRA" in a for a in seen["nav"]), "no course navigation"
    if name == "lesson":
        assert seen["math"] > 10  # lesson 02's formulas, typeset by the MathJax that ships with the site
    if name == "notebook":
        assert len(seen["images"]) >= 3  # the Colab badge and the notebook's plots
    assert (shots / f"{name}.png").stat().st_size > 10_000


def test_a_planted_raw_math_page_fails_the_check(tmp_path):
    needs_chromium()
    (tmp_path / "raw.html").write_text("<html><body><nav><a>LoRA</a></nav><p>$$h = W_0 x + \\frac{a}{r} B A x$$</p>"
                                       "<img src='missing.png'></body></html>")
    server = serve(tmp_path)
    try:
        seen = look(f"http://127.0.0.1:{server.server_port}/raw.html")
    finally:
        server.shutdown()
    assert seen["raw_math"] == ["$$", "\\frac"]
    assert seen["broken_images"] == ["missing.png"]
    assert seen["errors"]  # the missing image is a console error too


def test_the_front_page_and_the_license():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 130, f"README.md has {len(readme)} lines: it is a front page, the rest has its own page"
    assert "```python" in readme[:60] and any("add_adapters(" in line for line in readme[:60])  # usage early
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject and "LICENSE-docs" in pyproject
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "CC BY 4.0" in (ROOT / "LICENSE-docs").read_text()
    assert "Apache-2.0" in "\n".join(readme) and "CC BY 4.0" in "\n".join(readme)


def test_the_site_footer_states_the_license(site):
    page = (site / "lessons" / "01_lora.html").read_text()
    assert "Apache License 2.0" in page and "CC BY 4.0" in page


def test_the_site_has_search_and_every_course_page(site):
    assert (site / "search.html").is_file() and (site / "searchindex.js").stat().st_size > 10_000
    assert (site / "index.html").read_text().count("docs/index.html") >= 1  # the root sends readers to the home page
    for page in ["lessons/00_start_here", "lessons/06_choosing", "notebooks/06_showdown", "notebooks/exercises/ex1_lora",
                 "notebooks/solutions/ex4_loraplus", "lessons/workshop", "benchmarks/README", "lessons/glossary"]:
        assert (site / f"{page}.html").is_file(), page
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()  # the math renderer ships with the site


def test_the_workshop_slides_follow_the_plan_and_work_in_a_browser(site, tmp_path):
    """The deck is written from lessons/workshop.md (one slide per section a group sees); it moves with the arrow
    keys, typesets its math and loads nothing that is not in the site."""
    needs_chromium()
    spec = importlib.util.spec_from_file_location("slides", ROOT / "tools" / "slides.py")
    slides = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slides)
    slides.main([str(site)])
    deck = (site / "slides" / "workshop.html").read_text()
    titles = [t for t, _ in slides.sections(slides.PLAN.read_text())]
    assert deck.count("<section>") == len(titles) >= 10 and "Discussion questions" in titles
    assert "The instructor" not in titles and "workshop_answers" not in deck  # the plan's notes stay out
    from playwright.sync_api import sync_playwright

    server = serve(site)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                         "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"http://127.0.0.1:{server.server_port}/slides/workshop.html", wait_until="networkidle")
            first = page.inner_text("section.current h1")
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            current = page.inner_text("section.current h2")
            page.evaluate("() => MathJax.startup.promise")
            math = page.evaluate("() => document.querySelectorAll('mjx-container').length")
            raw = [s for s in ("\\text{", "\\frac") if s in page.evaluate("() => document.body.textContent")]
            page.screenshot(path=str(site.parent / "screenshots" / "slides.png"))
            browser.close()
    finally:
        server.shutdown()
    assert first == titles[0] and current == titles[3] and not errors, (first, current, errors)
    assert math >= 1 and not raw, (math, raw)  # the plan's $r(\text{in} + \text{out})$, typeset
