"""What a grader returns, and how a learner's crash or blank is reported.

    report = check_lora(MyLoRA)
    report.passed       # True or False
    report.messages     # what was checked, and for each failure what is wrong and how to fix it
    report              # in a notebook: a short table of ticks and crosses

A wrong answer never raises: the grader catches it and says what went wrong, with the line of the learner's code.
A blank (`blank("...")` left where the exercise says "fill this in") is different: the grader stops there with a
one-line message, so that running a whole exercise notebook stops at the first thing left to do.
"""
from __future__ import annotations

import html
import traceback
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = str(Path(__file__).resolve().parents[2])  # .../nanopeft: frames inside it are the grader's, not yours


class FillThisIn(Exception):
    """Raised by `blank(...)` where an exercise asks for code, and re-raised by the grader. In a notebook it shows
    as one line, not a traceback."""

    def _render_traceback_(self):  # IPython shows this instead of a traceback
        return [f"\u270e fill this in: {self}", "   (then run this cell again)"]


def blank(hint: str = ""):
    """Stands where an exercise wants your code; raises FillThisIn with the hint."""
    raise FillThisIn(hint or "the line the exercise asks for")


@dataclass
class Report:
    exercise: str
    messages: list = field(default_factory=list)  # (ok, text) pairs, in the order checked
    data: dict = field(default_factory=dict)  # numbers to plot: your output next to the reference's

    @property
    def passed(self) -> bool:
        return bool(self.messages) and all(ok for ok, _ in self.messages)

    def check(self, ok: bool, passed_text: str, failed_text: str) -> bool:
        self.messages.append((bool(ok), passed_text if ok else failed_text))
        return bool(ok)

    def fail(self, text: str) -> bool:
        self.messages.append((False, text))
        return False

    @property
    def text(self) -> list:
        return [t for _, t in self.messages]

    def __str__(self) -> str:
        head = f"{self.exercise}: {'passed' if self.passed else 'not yet'}"
        return "\n".join([head] + [f"  {'ok ' if ok else 'NO '} {t}" for ok, t in self.messages])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        color = "#2e7d32" if self.passed else "#c62828"
        rows = "".join(f"<li>{'&#10004;' if ok else '&#10008;'} {html.escape(t)}</li>" for ok, t in self.messages)
        return (f"<div><b style='color:{color}'>{html.escape(self.exercise)}: "
                f"{'passed' if self.passed else 'not yet'}</b><ul style='list-style:none'>{rows}</ul></div>")


def crash_message(err: BaseException) -> str:
    """Where in the learner's code an exception came from: its type, message and line."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(PACKAGE)
              and "site-packages" not in f.filename]
    where = f" at line {frames[-1].lineno}: `{(frames[-1].line or '').strip()}`" if frames else ""
    return f"your code raised {type(err).__name__}: {err}{where}"


CRASHED = object()  # what `attempt` returns when the learner's code raised (None may be a real answer)


def attempt(report: Report, what: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), or CRASHED with the crash written into the report (a blank is raised on)."""
    try:
        return fn(*args, **kwargs)
    except FillThisIn:
        raise
    except Exception as err:  # a wrong answer: reported, never raised
        report.fail(f"{what}: {crash_message(err)}")
        return CRASHED


def plot_report(report: Report, ax=None):
    """Your numbers against the reference's: on the diagonal means equal. matplotlib is imported here (optional)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 4))
    if not report.data:
        ax.text(0.5, 0.5, "nothing to draw yet", ha="center", va="center")
        return ax
    (label_x, xs), (label_y, ys) = list(report.data.items())[:2]
    ax.scatter(xs, ys, s=6, alpha=0.6, color="tab:green" if report.passed else "tab:red")
    lo, hi = min(min(xs), min(ys)), max(max(xs), max(ys))
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls=":")
    ax.set(xlabel=label_x, ylabel=label_y, title=f"{report.exercise}: yours against the reference")
    return ax
