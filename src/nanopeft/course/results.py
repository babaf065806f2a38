"""The saved results of the long runs, shipped with the package so that a notebook opened anywhere (Colab, an empty
folder after `pip install`) can read them.

    showdown = load_result("showdown")      # src/nanopeft/course/results/showdown.json
    result_path("lr_sweep.json")            # the path of a file in that folder

Each JSON is written by the command named in RESULTS (`python -m nanopeft.course`; `make results` runs them).
"""
from __future__ import annotations

import json
from importlib import resources

OUT = "--out src/nanopeft/course/results/"  # from a source checkout
RESULTS = {
    "lr_sweep": f"python -m nanopeft.course lr-sweep {OUT}lr_sweep.json",
    "showdown": f"python -m nanopeft.course showdown --seeds 5 {OUT}showdown.json",
    "loraplus_sweep": f"python -m nanopeft.course loraplus-sweep --seeds 1 --ratios 1 4 16 32 --reuse "
                      f"{OUT[6:]}showdown.json {OUT}loraplus_sweep.json",
    "dora_study": f"python -m nanopeft.course dora-study --seeds 2 {OUT}dora_study.json",
    "step_times": f"python -m nanopeft.course step-times {OUT}step_times.json",
    "dora_layer": f"python benchmarks/dora_layer.py {OUT}dora_layer.json",
    "planner_grid": f"python benchmarks/memory_planner.py {OUT}planner_grid.json",
    "pissa_lr_sweep": f"python -m nanopeft.course lr-sweep --methods pissa {OUT}pissa_lr_sweep.json",
    "pissa_showdown": f"python -m nanopeft.course showdown --methods pissa --seeds 3 --lrs "
                      f"{OUT[6:]}pissa_lr_sweep.json {OUT}pissa_showdown.json",
}


def result_path(name: str):
    """The path of a file in the package's results folder (a Traversable; str() gives a file system path)."""
    return resources.files(__package__) / "results" / name


def load_result(name: str) -> dict:
    """A saved result by name (one of RESULTS)."""
    if name not in RESULTS:
        raise ValueError(f"Unknown result {name!r}; the package ships {sorted(RESULTS)}.")
    path = result_path(f"{name}.json")
    if not path.is_file():
        raise FileNotFoundError(f"{name}.json is not in this installation's results folder; run `{RESULTS[name]}`.")
    return json.loads(path.read_text())
