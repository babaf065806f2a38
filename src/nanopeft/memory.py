"""Where the memory goes, measured: devices, compute dtypes, a memory meter and a live training display.

Fine-tuning memory has four parts we can count exactly, because they are tensors we hold:
    frozen weights    the base model (and buffers), never updated
    trainable weights the adapters (or whatever requires grad)
    gradients         one per trainable weight, same size
    optimizer state   AdamW keeps two more (exp_avg, exp_avg_sq) per trainable weight
and one we can only measure: activations and temporaries kept for the backward pass. On CUDA the allocator tells
us its peak; on a CPU we sample the process's resident memory (RSS), which also holds Python, the libraries and
allocator slack, so we report it as what it is and never pretend it is the tensor total.
"""
from __future__ import annotations

import os
import threading

import torch

CATEGORIES = ("frozen weights", "trainable weights", "gradients", "optimizer state")


# --- device and dtype ----------------------------------------------------------------------------------------------

def pick_device(verbose: bool = True) -> torch.device:
    """CUDA if there is a GPU, else the CPU; prints the choice."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        why = f"{torch.cuda.get_device_name(0)}, compute capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}"
    else:
        device = torch.device("cpu")
        why = f"no GPU found; {os.cpu_count()} CPU cores"
    if verbose:
        print(f"device: {device} ({why})")
    return device


def pick_compute_dtype(device, verbose: bool = True) -> torch.dtype:
    """bf16 on GPUs with compute capability >= 8.0 (A100, L4, H100), fp16 on older GPUs (T4), fp32 on a CPU.

    We check the capability rather than `torch.cuda.is_bf16_supported()`, which answers True on a T4 (7.5): bf16
    there is emulated, slow, and not what the hardware does. The choice is printed.
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        dtype = torch.bfloat16 if major >= 8 else torch.float16
        why = f"compute capability {major}.{minor} {'>=' if major >= 8 else '<'} 8.0"
    else:
        dtype, why = torch.float32, f"{device.type} computes in float32"
    if verbose:
        print(f"compute dtype: {dtype} ({why})")
    return dtype


# --- exact tensor accounting ----------------------------------------------------------------------------------------

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def tensor_breakdown(model, optimizer=None) -> dict:
    """Bytes held in each category (see module docstring). Shared tensors (tied embeddings) count once.

    Frozen weights include buffers. Optimizer state is every tensor in `optimizer.state` (AdamW: exp_avg,
    exp_avg_sq and a 0-d `step` per parameter).
    """
    seen = set()
    out = dict.fromkeys(CATEGORIES, 0)

    def add(category, t):
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            out[category] += _nbytes(t)

    for p in model.parameters():
        add("trainable weights" if p.requires_grad else "frozen weights", p)
        if p.grad is not None:
            add("gradients", p.grad)
    for b in model.buffers():
        add("frozen weights", b)
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    add("optimizer state", v)
    return out


class SavedTensors:
    """Count the bytes autograd saves for the backward pass inside a block: the activations, measured exactly.

        with SavedTensors(model) as saved:
            loss = model(ids).logits.sum()
        saved.nbytes        # each saved storage counted once; `model`'s own parameters excluded

    Works on every device (it hooks autograd, not the allocator). It counts what is saved when the forward runs,
    including tensors of graph branches that are freed before the backward, so it is an upper bound on what the
    backward pass finally keeps.
    """

    def __init__(self, model=None):
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
        self.storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.exclude:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def process_rss() -> int:
    """Resident memory of this process, in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux without psutil
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryMeter:
    """Measure peak memory over a block of code, plus the exact tensor breakdown.

        with MemoryMeter(model, optimizer) as meter:
            ...train...
        meter.report()   # dict: peak memory and bytes per category

    On CUDA: peak allocated and reserved (reset at entry). On CPU: peak RSS sampled every `interval` seconds by a
    background thread, and the RSS at entry, so the increase over the block is visible. `sample()` records the
    tensor breakdown now (the training loop calls it after backward, when the gradients exist) and keeps the
    largest seen per category.
    """

    def __init__(self, model=None, optimizer=None, device=None, interval: float = 0.005):
        self.model, self.optimizer, self.interval = model, optimizer, interval
        if device is None and model is not None:
            device = next(model.parameters()).device
        self.device = torch.device(device or "cpu")
        self.peak_breakdown = dict.fromkeys(CATEGORIES, 0)
        self._stop = threading.Event()
        self._thread = None
        self.rss_start = self.rss_peak = 0
        self.cuda_peak_allocated = self.cuda_peak_reserved = None

    # context manager
    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_start = self.rss_peak = process_rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.rss_peak = max(self.rss_peak, process_rss())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak_allocated = torch.cuda.max_memory_allocated(self.device)
            self.cuda_peak_reserved = torch.cuda.max_memory_reserved(self.device)
        if self.model is not None:
            self.sample()
        return False

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.rss_peak = max(self.rss_peak, process_rss())

    def sample(self) -> dict:
        """The tensor breakdown now; also updates the per-category peaks."""
        now = tensor_breakdown(self.model, self.optimizer)
        for k, v in now.items():
            self.peak_breakdown[k] = max(self.peak_breakdown[k], v)
        return now

    def current(self) -> dict:
        """Live numbers for a progress display: peak so far (CUDA allocated, or CPU RSS)."""
        if self.device.type == "cuda":
            return {"peak": torch.cuda.max_memory_allocated(self.device), "kind": "cuda allocated"}
        return {"peak": self.rss_peak, "kind": "cpu rss"}

    def report(self) -> dict:
        out = {"device": str(self.device), **{k: v for k, v in self.peak_breakdown.items()}}
        out["tensors total"] = sum(self.peak_breakdown.values())
        if self.device.type == "cuda":
            out["cuda peak allocated"] = self.cuda_peak_allocated
            out["cuda peak reserved"] = self.cuda_peak_reserved
            # what the allocator held at its peak beyond the tensors we can name: activations and temporaries
            out["activations and temporaries"] = max(0, self.cuda_peak_allocated - out["tensors total"])
        out["process rss at start"] = self.rss_start
        out["process rss peak"] = self.rss_peak
        return out


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_report(report: dict) -> str:
    """A readable table of `MemoryMeter.report()`."""
    return "\n".join(f"{k:>28}: {v if k == 'device' else fmt_bytes(v)}" for k, v in report.items())


# --- live display ---------------------------------------------------------------------------------------------------

def in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


class LiveDisplay:
    """A training callback: loss curve and memory by category, redrawn as training runs.

    In a notebook with ipywidgets it shows a widget (a plot and a table) updated every `every` steps, and when
    training ends replaces it with a static picture, so the executed notebook keeps the result. Elsewhere (a
    terminal, CI) it prints one text line every `every` steps. Use it as `train(..., callback=LiveDisplay())`.
    """

    def __init__(self, title: str = "training", every: int = 1, widgets: bool | None = None):
        self.title, self.every = title, max(1, every)
        self.widgets = in_notebook() if widgets is None else widgets
        self.records = []
        self._out = None
        if self.widgets:
            try:
                import ipywidgets  # noqa: F401
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
            mem = record["memory"]
            print(
                f"[{self.title}] step {step:4d}  loss {record['loss']:.4f}  {record['step_time']:.2f} s/step  "
                f"peak {fmt_bytes(mem['peak'])} ({mem['kind']})  trainable {fmt_bytes(mem['trainable weights'])}  "
                f"grads {fmt_bytes(mem['gradients'])}  optimizer {fmt_bytes(mem['optimizer state'])}",
                flush=True,
            )

    def figure(self):
        """Loss per step and the memory breakdown of the latest step, as a matplotlib figure."""
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
        ax1.plot([r["step"] for r in self.records], [r["loss"] for r in self.records], color="tab:blue")
        ax1.set(xlabel="step", ylabel="loss", title=f"{self.title}: loss")
        mem = self.records[-1]["memory"]
        names = list(CATEGORIES)
        ax2.barh(names, [mem[k] / 2**20 for k in names], color=["#999", "tab:green", "tab:orange", "tab:red"])
        ax2.set(xlabel="MiB", title=f"tensors by category; peak {fmt_bytes(mem['peak'])} ({mem['kind']})")
        ax2.invert_yaxis()
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
