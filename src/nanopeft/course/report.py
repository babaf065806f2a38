"""The showdown's results as a table: one row per method (or LoRA+ ratio), with 95% intervals, and as text.

    rows = table(result)          # list of dicts
    print(format_table(rows))
"""
from __future__ import annotations

import statistics

import numpy as np

from ..lab.memory import fmt_bytes
from .stats import paired_bootstrap


def correct_matrix(runs: list) -> np.ndarray:
    """(seeds, tickets) of 0/1 for a list of runs, ordered by seed."""
    return np.array([r["test_correct"] for r in sorted(runs, key=lambda r: r["seed"])], dtype=np.float64)


def time_matrix(runs: list) -> np.ndarray:
    """(seeds, steps) of step times, the first (warm-up) step dropped, ordered by seed."""
    return np.array([r["step_times"][1:] for r in sorted(runs, key=lambda r: r["seed"])], dtype=np.float64)


def interleaved_step_time(timings: dict, method: str) -> float:
    """A method's mean seconds per step in a `step_times` result, the first (warm-up) step dropped."""
    return float(np.mean(timings["times"][method][1:]))


def groups(result: dict, key: str = "method") -> dict:
    """{value of `key`: runs}, in the order the values first appear."""
    out = {}
    for run in result["runs"]:
        out.setdefault(run[key], []).append(run)
    return out


def table(result: dict, key: str = "method") -> list:
    """One row per method (or ratio): accuracy with its 95% interval over seeds and tickets, and the costs (step
    time: the median over every step of every seed, the warm-up step left out)."""
    rows = []
    for value, runs in groups(result, key).items():
        acc = paired_bootstrap(correct_matrix(runs))
        rows.append({
            key: value, "seeds": len(runs), "lr": runs[0]["lr"], "accuracy": acc.estimate, "interval": acc,
            "seed_accuracies": [r["accuracy"] for r in sorted(runs, key=lambda r: r["seed"])],
            "validation_accuracy": statistics.mean(r["validation_accuracy"] for r in runs),
            "trainable_parameters": runs[0]["trainable_parameters"], "file_bytes": runs[0]["file_bytes"],
            "step_time": float(np.median(time_matrix(runs))),  # median: one seed slowed by another job moves it little
            "memory": runs[0]["memory"], "total_memory": sum(runs[0]["memory"].values()),
            "peak_memory": max(r["peak_memory"] for r in runs), "peak_memory_kind": runs[0]["peak_memory_kind"],
            "final_loss": statistics.mean(statistics.mean(r["loss"][-5:]) for r in runs),
        })
    return rows


def format_table(rows: list, key: str = "method") -> str:
    """The table as fixed-width text."""
    head = (f"{key:>12} | {'lr':>7} | test accuracy [95% interval] | trainable | file | frozen | train+grad+optim | "
            f"activations | s/step")
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["memory"]
        adapters = m["trainable weights"] + m["gradients"] + m["optimizer state"]
        lines.append(
            f"{str(r[key]):>12} | {r['lr']:7.1e} | {r['interval'].format(100, '%'):>27} | "
            f"{r['trainable_parameters']:>10,} | {fmt_bytes(r['file_bytes']):>9} | {fmt_bytes(m['frozen weights']):>9} | "
            f"{fmt_bytes(adapters):>9} | {fmt_bytes(m['activations']):>9} | {r['step_time']:.2f}")
    return "\n".join(lines)
