"""Every notebook's run time and peak memory, as a learner would run it: copied into an empty folder, executed top
to bottom in a fresh kernel; and what it printed that the committed run did not.

    python benchmarks/notebooks.py                 # full length, as committed
    python benchmarks/notebooks.py --short         # NANOPEFT_QUICK=1: the CI and Binder length (Binder has ~2 GB)
    python benchmarks/notebooks.py --short --only 01_lora
    python benchmarks/notebooks.py --short --dtype float16   # the T4 rehearsal (on a CPU: its arithmetic, slowly)

--dtype sets NANOPEFT_DTYPE for the kernel: every notebook then computes in that dtype, as on a T4 (float16) or an
A100 (bfloat16); on a T4 itself no flag is needed. Each notebook's report lists the cells that raised an error,
printed a line with False where the committed run printed none there, or wrote to stderr (a warning, a library's
notice), so the dress
rehearsal shows what a learner on that GPU would meet.

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


def printed(cell, stream="stdout") -> list:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == stream).splitlines()


def findings(committed, executed) -> list:
    """(cell number, what) for each cell that raised, printed a new line with False, or wrote to stderr (warnings,
    library notices)."""
    out = []
    for i, (old, new) in enumerate(zip(committed.cells, executed.cells)):
        if new.cell_type != "code":
            continue
        for o in new.get("outputs", []):
            if o.get("output_type") == "error":
                out.append((i, f"error: {o['ename']}: {o['evalue'][:200]}"))
        before = set(printed(old))
        out += [(i, f"prints: {line.strip()}") for line in printed(new) if "False" in line and line not in before]
        warned = [line.strip() for line in printed(new, "stderr") if line.strip()]  # warnings, notices, logs
        out += [(i, f"stderr: {line[:200]}") for line in dict.fromkeys(warned)]
    return out


def run(path: Path, short: bool, dtype: str | None = None) -> dict:
    committed = nbformat.read(path, as_version=4)
    nb = nbformat.read(path, as_version=4)
    os.environ["NANOPEFT_PROGRESS"] = "0"
    if short:
        os.environ["NANOPEFT_QUICK"] = "1"
    else:
        os.environ.pop("NANOPEFT_QUICK", None)
    if dtype:
        os.environ["NANOPEFT_DTYPE"] = dtype
    nb.cells.insert(0, nbformat.v4.new_code_cell(START))
    nb.cells.append(nbformat.v4.new_code_cell(END))
    folder = tempfile.mkdtemp(prefix="nanopeft-notebook-")
    try:
        client = NotebookClient(nb, timeout=1800, kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": folder}})
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    peaks = json.loads(nb.cells[-1].outputs[-1]["text"])
    nb.cells = nb.cells[1:-1]  # the notebook's own cells, numbered as in the file
    return {"notebook": str(path.relative_to(ROOT / "notebooks")), "seconds": seconds, **peaks,
            "findings": findings(committed, nb)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="NANOPEFT_QUICK=1 (CI and Binder length)")
    p.add_argument("--only", nargs="*", default=None, help="notebook names (without .ipynb)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="NANOPEFT_DTYPE for every notebook (float16: a T4's arithmetic)")
    p.add_argument("--out", default=None, help="default: runs/notebooks[-DTYPE].json")
    args = p.parse_args()
    args.out = args.out or str(ROOT / "runs" / f"notebooks{'-' + args.dtype if args.dtype else ''}.json")
    paths = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
    if args.only:
        paths = [p for p in paths if p.stem in args.only]
    sys.path.insert(0, str(ROOT / "src"))
    from nanopeft.course.experiments import hardware

    rows = []
    print(f"{hardware()}; {'short' if args.short else 'full'} runs, dtype {args.dtype or 'as stamp() picks'}")
    print(f"{'notebook':>26} {'seconds':>8} {'peak RSS':>9} {'GPU reserved':>13}")
    for path in paths:
        row = run(path, args.short, args.dtype)
        rows.append(row)
        print(f"{row['notebook']:>26} {row['seconds']:8.0f} {row['rss_peak'] / 2**30:8.2f}G "
              f"{row['gpu_reserved_peak'] / 2**30:12.2f}G", flush=True)
        for cell, what in row["findings"]:
            print(f"{'':>28}cell {cell}: {what}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"short": args.short, "dtype": args.dtype, "hardware": hardware(),
                                          "notebooks": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
