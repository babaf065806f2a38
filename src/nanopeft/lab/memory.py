"""Where the memory goes, measured: exact tensor accounting, activations, and the peaks of the device.

Fine-tuning memory has four parts we can count exactly, because they are tensors we hold:
    frozen weights    the base model (and buffers), never updated
    trainable weights the adapters (or whatever requires grad)
    gradients         one per trainable weight, same size
    optimizer state   AdamW keeps two more (exp_avg, exp_avg_sq) per trainable weight
and the activations: what autograd saves in the forward pass for the backward, counted exactly by hooking autograd
(`SavedTensors`, any device). Beyond those, a device holds temporaries (freed as soon as an operation ends) and
allocator slack. On CUDA the allocator reports its peak, so "activations and temporaries" is the peak minus the
counted tensors; on a CPU we sample the process's resident memory (RSS), which also holds Python, the libraries
and the allocator's caches, and report it as what it is: an upper bound, never the tensor total.
"""
from __future__ import annotations

import functools
import os
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

COUNTED = ("frozen weights", "trainable weights", "gradients", "optimizer state")  # the tensors we hold


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def tensor_breakdown(model, optimizer=None, view=None) -> dict:
    """Bytes held in each counted category (see the module docstring). Shared tensors (tied embeddings) count once.

    Frozen weights include buffers. Optimizer state is every tensor in `optimizer.state` (AdamW: exp_avg,
    exp_avg_sq and a 0-d `step` per parameter).
    """
    seen = set()
    out = dict.fromkeys(COUNTED, 0)

    def add(category, t):
        t = view(t) if view is not None else t  # e.g. a sharded tensor's local part (lab/sharding.py)
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
        saved.nbytes        # the most bytes of saved tensors alive at one time; `model`'s parameters excluded

    Works on every device (it hooks autograd, not the allocator). Each saved storage is counted once, from when it
    is saved until it is freed (a weak reference says when). A branch of the graph dropped during the forward (peft's
    DoRA builds B A with autograd but uses only its detached value for the norm, so that graph is freed when the
    layer returns) stops counting when it is freed; if the allocator gives its address to a later saved tensor, that
    one counts as a new storage. `nbytes` is the peak: it equals what the backward pass starts with when the peak
    falls at the end of the forward, as in a training step, where the loss's tensors are saved last.
    """

    def __init__(self, model=None):
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
        self.nbytes = 0  # the peak of `_alive_bytes`
        self._alive = {}  # data_ptr -> weak reference to the saved storage there
        self._alive_bytes = 0
        self._lock = threading.RLock()  # a storage may be freed on autograd's own thread (CUDA backward)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)  # unpack: the same tensor

    def _pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        with self._lock:
            counted = self._alive.get(ptr)
            if ptr not in self.exclude and (counted is None or counted() is not storage):
                size = storage.nbytes()
                self._alive[ptr] = weakref.ref(storage, functools.partial(self._freed, ptr, size))
                self._alive_bytes += size
                self.nbytes = max(self.nbytes, self._alive_bytes)
        return t.detach()  # not t: a saved output would hold its own graph node, a cycle that is never freed

    def _freed(self, ptr, size, ref):
        with self._lock:
            self._alive_bytes -= size
            if self._alive.get(ptr) is ref:
                del self._alive[ptr]

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def process_rss() -> int:
    """Resident memory of this process, in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux without psutil
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryMeter:
    """Peaks over a block of code, plus the exact tensor breakdown.

        with MemoryMeter(model, optimizer) as meter:
            ...train...               # the loop calls meter.step(activations) once per step
        meter.report()                # dict: the largest of each category, and the device's peaks

    On CUDA: the allocator's peak allocated and reserved bytes, over the block and for the last step. On a CPU: the
    process's peak RSS, sampled every `interval` seconds by a background thread (it would only steal time from a
    GPU loop, so none runs there).
    """

    def __init__(self, model=None, optimizer=None, device=None, interval: float = 0.02):
        self.model, self.optimizer, self.interval = model, optimizer, interval
        if device is None and model is not None:
            device = next(model.parameters()).device
        self.device = torch.device(device or "cpu")
        self.cuda = self.device.type == "cuda"
        self.peaks = dict.fromkeys(COUNTED + ("activations",), 0)
        self._stop = threading.Event()
        self._thread = None
        self.rss_start = self.rss_peak = 0
        self.cuda_peak_allocated = self.cuda_peak_reserved = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_start = self.rss_peak = process_rss()
        self._stop.clear()
        if not self.cuda:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.rss_peak = max(self.rss_peak, process_rss())
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.cuda_peak_allocated = torch.cuda.max_memory_allocated(self.device)
            self.cuda_peak_reserved = torch.cuda.max_memory_reserved(self.device)
        return False

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.rss_peak = max(self.rss_peak, process_rss())

    def sample(self) -> dict:
        """The counted tensors now; also updates the per-category peaks."""
        now = tensor_breakdown(self.model, self.optimizer)
        for k, v in now.items():
            self.peaks[k] = max(self.peaks[k], v)
        return now

    def step(self, activations: int = 0) -> dict:
        """One step's record, taken after the backward (gradients alive, the peak reached): the counted tensors,
        the activations saved for that step, and the device's peak so far."""
        record = {**self.sample(), "activations": activations}
        self.peaks["activations"] = max(self.peaks["activations"], activations)
        counted = sum(record[k] for k in COUNTED)
        if self.cuda:
            allocated = torch.cuda.max_memory_allocated(self.device)
            record.update({"cuda allocated peak": allocated,
                           "cuda reserved peak": torch.cuda.max_memory_reserved(self.device),
                           # what the allocator held at its peak beyond the tensors we hold: activations + temporaries
                           "activations and temporaries": max(0, allocated - counted),
                           "peak": allocated, "kind": "cuda allocated"})
        else:
            record.update({"peak": self.rss_peak, "kind": "cpu rss"})
        return record

    def report(self) -> dict:
        out = {"device": str(self.device), **self.peaks, "counted total": sum(self.peaks[k] for k in COUNTED)}
        if self.cuda:
            out["cuda peak allocated"] = self.cuda_peak_allocated
            out["cuda peak reserved"] = self.cuda_peak_reserved
            out["activations and temporaries"] = max(0, (self.cuda_peak_allocated or 0) - out["counted total"])
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


def memory_summary(history: list) -> str:
    """One line a learner can compare across notebooks: the largest value of each part over a training run."""
    peak = {k: max(r["memory"].get(k, 0) for r in history) for k in COUNTED + ("activations",)}
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in peak.items())
    last = history[-1]["memory"]
    if last["kind"] == "cuda allocated":
        device = (f"CUDA peak allocated {fmt_bytes(max(r['memory']['cuda allocated peak'] for r in history))}, "
                  f"reserved {fmt_bytes(max(r['memory']['cuda reserved peak'] for r in history))}")
    else:
        device = f"process RSS peak {fmt_bytes(last['peak'])} (CPU: includes Python and the libraries)"
    return f"memory: {parts}; {device}"


class LiveTensors:
    """Our own meter of tensor memory: the bytes of every tensor storage alive, and their peak, over a block.

        with LiveTensors(model, optimizer) as live:   # counts the model, gradients and optimizer state already there
            live.phase = "forward"; loss = ...; live.phase = "backward"; loss.backward(); ...
        live.peak, live.peak_phase

    Every operation is seen (a `TorchDispatchMode`), each new storage counted once from when an operation creates it
    until it is freed (a weak reference says when), whatever its device. Unlike a device's allocator it counts exact
    tensor bytes: no rounding to blocks, no cache, no context. Slower than a plain run (a Python call per operation).
    """

    def __init__(self, *objects):
        self.live = self.peak = 0
        self.phase = self.peak_phase = "start"
        self.phase_peaks = {}  # phase -> the most bytes alive while it was the phase
        self._refs = {}
        self._lock = threading.RLock()
        for obj in objects:  # modules, optimizers, tensors or lists of them
            for t in _tensors_of(obj):
                self._count(t)
        self.start = self.peak = self.live

    def _count(self, t):
        storage = t.untyped_storage()
        key = storage._cdata
        with self._lock:
            if key in self._refs or storage.nbytes() == 0:
                return
            size = storage.nbytes()
            self._refs[key] = weakref.ref(storage, functools.partial(self._freed, key, size))
            self.live += size
            if self.live > self.peak:
                self.peak, self.peak_phase = self.live, self.phase
            if self.live > self.phase_peaks.get(self.phase, 0):
                self.phase_peaks[self.phase] = self.live

    def _freed(self, key, size, ref):
        with self._lock:
            if self._refs.get(key) is ref:
                del self._refs[key]
                self.live -= size

    def __enter__(self):
        self._mode = _CountOutputs(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


class _CountOutputs(TorchDispatchMode):
    """Hands every tensor an operation returns to a LiveTensors meter."""

    def __init__(self, meter):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.meter._count(t)
        return out


def _tensors_of(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
        yield from (p.grad for p in obj.parameters() if p.grad is not None)
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_of(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_of(v)
