"""The live training display: loss curve and memory by part, redrawn while a notebook trains.

    history = train(..., callback=LiveDisplay("LoRA", every=5))

In a notebook (Colab, Jupyter, JupyterLab, VS Code) with ipywidgets it draws into one widget, updated every `every` steps, and when training ends leaves
a static picture behind, so the executed notebook keeps the result. Elsewhere (a terminal, CI) it prints one text
line every `every` steps. matplotlib and ipywidgets are imported only when a picture is drawn (optional libraries).
"""
from __future__ import annotations

import os

from .memory import COUNTED, fmt_bytes

PARTS = COUNTED + ("activations",)
PART_COLORS = {"frozen weights": "#9e9e9e", "trainable weights": "tab:green", "gradients": "tab:orange",
          "optimizer state": "tab:red", "activations": "tab:blue"}


def frontend() -> str:
    """Where this code runs: "colab", "vscode", "jupyter" (Jupyter, JupyterLab: a kernel behind a browser),
    "ipython" (the terminal IPython) or "script" (plain Python, CI). Read off the IPython shell: Colab's is
    `google.colab._shell.Shell`, Jupyter's and VS Code's `ipykernel`'s `ZMQInteractiveShell` (VS Code says so in its
    environment), the terminal's `TerminalInteractiveShell`."""
    try:
        from IPython import get_ipython
    except ImportError:
        return "script"
    shell = get_ipython()
    if shell is None:
        return "script"
    kind = type(shell)
    if kind.__module__.startswith("google.colab"):
        return "colab"
    if any(c.__name__ == "ZMQInteractiveShell" for c in kind.__mro__):
        return "vscode" if "VSCODE_PID" in os.environ or "VSCODE_CWD" in os.environ else "jupyter"
    return "ipython" if any(c.__name__ == "TerminalInteractiveShell" for c in kind.__mro__) else "script"


def in_notebook() -> bool:
    """True where a widget can be drawn: Colab, Jupyter/JupyterLab, VS Code's notebooks."""
    return frontend() in ("colab", "vscode", "jupyter")


class LiveDisplay:
    """A training callback: loss per step, and the memory of the latest step by part, with the device's peaks."""

    def __init__(self, title: str = "training", every: int = 1, widgets: bool | None = None):
        self.title, self.every = title, max(1, every)
        self.widgets = in_notebook() if widgets is None else widgets
        self.records = []
        self._out = None
        if self.widgets:
            try:
                import ipywidgets  # noqa: F401  (optional: the text line is the fallback)
            except ImportError:
                self.widgets = False

    def __call__(self, record: dict):
        self.records.append(record)
        step = record["step"]
        if step % self.every and not record.get("last"):
            return
        if self.widgets:
            self._draw(final=record.get("last", False))
        else:
            print(self.line(record), flush=True)

    def line(self, record: dict) -> str:
        mem = record["memory"]
        peaks = (f"CUDA allocated peak {fmt_bytes(mem['cuda allocated peak'])}, reserved "
                 f"{fmt_bytes(mem['cuda reserved peak'])}" if "cuda allocated peak" in mem
                 else f"RSS peak {fmt_bytes(mem['peak'])}")
        skipped = "  (skipped: float16 overflow, loss scale halved)" if record.get("skipped") else ""
        return (f"[{self.title}] step {record['step']:4d}  loss {record['loss']:.4f}{skipped}  {record['step_time']:.2f} s/step  "
                f"trainable {fmt_bytes(mem['trainable weights'])}  grads {fmt_bytes(mem['gradients'])}  "
                f"optimizer {fmt_bytes(mem['optimizer state'])}  activations {fmt_bytes(mem['activations'])}  {peaks}")

    def figure(self):
        """Loss per step, and the memory of the latest step by part (with the CUDA peaks where there are some)."""
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw={"width_ratios": [1, 1.3]})
        ax1.plot([r["step"] for r in self.records], [r["loss"] for r in self.records], color="tab:blue")
        skipped = [r for r in self.records if r.get("skipped")]
        if skipped:  # float16: steps the loss scaler skipped (an overflow; no weight moved)
            ax1.scatter([r["step"] for r in skipped], [r["loss"] for r in skipped], color="tab:red", marker="x",
                        zorder=3, label=f"skipped ({len(skipped)}): float16 overflow")
            ax1.legend(fontsize=7)
        ax1.set(xlabel="step", ylabel="loss", title=f"{self.title}: training loss")
        mem = self.records[-1]["memory"]
        mib = 2 ** 20
        left = 0.0
        for part in PARTS:  # one stacked bar: each part a colour, the legend in the same order
            ax2.barh(0, mem[part] / mib, left=left, color=PART_COLORS[part], label=f"{part} {fmt_bytes(mem[part])}")
            left += mem[part] / mib
        if "cuda allocated peak" in mem:
            for key, style in (("cuda allocated peak", "-"), ("cuda reserved peak", "--")):
                ax2.axvline(mem[key] / mib, color="black", ls=style, lw=1, label=f"{key} {fmt_bytes(mem[key])}")
            where = "CUDA"
        else:
            ax2.axvline(mem["peak"] / mib, color="black", ls=":", lw=1,
                        label=f"process RSS peak {fmt_bytes(mem['peak'])}")
            where = "CPU"
        ax2.set(xlabel="MiB", yticks=[], title=f"memory at step {self.records[-1]['step']} ({where})")
        ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3, frameon=False)
        fig.tight_layout()
        return fig

    def _draw(self, final: bool):
        import matplotlib.pyplot as plt
        from IPython.display import display

        if self._out is None:
            import ipywidgets

            self._out = ipywidgets.Output()
            display(self._out)
        fig = self.figure()
        if final:  # leave a static picture behind in the saved notebook
            self._out.close()
            display(fig)
        else:
            with self._out:
                self._out.clear_output(wait=True)
                display(fig)
        plt.close(fig)
