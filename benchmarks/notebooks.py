"""Every notebook's run time and peak memory, as a learner would run it: copied into an empty folder, executed top
to bottom in a fresh kernel.

    python benchmarks/notebooks.py                 # full length, as committed
    python benchmarks/notebooks.py --short         # NANOPEFT_QUICK=1: the CI and Binder length (Binder has ~2 GB)
    python benchmarks/notebooks.py --short --only 01_lora

Peak memory is the kernel process's peak resident memory (`ru_maxrss`, everything it held: Python, the libraries,
the model, the activations) and, on a GPU, the most the CUDA caching allocator reserved while the notebook ran
(sampled every 10 ms). Results are printed as a table and written to runs/notebooks.json.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent
START = """import json as _json, resource as _resource, threading as _threading, time as _time
_gpu_peak = [0]
def _watch():
    import torch
    while torch.cuda.is_available():
        _gpu_peak[0] = max(_gpu_peak[0], torch.cuda.memory_reserved())
        _time.sleep(0.01)
_threading.Thread(target=_watch, daemon=True).start()"""
END = """print(_json.dumps({"rss_peak": _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "gpu_reserved_peak": _gpu_peak[0]}))"""


def run(path: Path, short: bool) -> dict:
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(START))
    nb.cells.append(nbformat.v4.new_code_cell(END))
    os.environ["CI"] = "1"
    if short:
        os.environ["NANOPEFT_QUICK"] = "1"
    else:
        os.environ.pop("NANOPEFT_QUICK", None)
    folder = tempfile.mkdtemp(prefix="nanopeft-notebook-")
    try:
        client = NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": folder}})
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    peaks = json.loads(nb.cells[-1].outputs[-1]["text"])
    return {"notebook": str(path.relative_to(ROOT / "notebooks")), "seconds": seconds, **peaks}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="NANOPEFT_QUICK=1 (CI and Binder length)")
    p.add_argument("--only", nargs="*", default=None, help="notebook names (without .ipynb)")
    p.add_argument("--out", default=str(ROOT / "runs" / "notebooks.json"))
    args = p.parse_args()
    paths = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
    if args.only:
        paths = [p for p in paths if p.stem in args.only]
    sys.path.insert(0, str(ROOT / "src"))
    from nanopeft.course.experiments import hardware

    rows = []
    print(f"{'notebook':>26} {'seconds':>8} {'peak RSS':>9} {'GPU reserved':>13}   ({'short' if args.short else 'full'})")
    for path in paths:
        row = run(path, args.short)
        rows.append(row)
        print(f"{row['notebook']:>26} {row['seconds']:8.0f} {row['rss_peak'] / 2**30:8.2f}G "
              f"{row['gpu_reserved_peak'] / 2**30:12.2f}G", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"short": args.short, "hardware": hardware(), "notebooks": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
