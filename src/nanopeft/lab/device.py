"""Where the lab runs: one place chooses the device and the dtype, prints the choice, and holds the run-length knobs.

    device, dtype = stamp()     # every notebook's second cell: versions, machine, device and dtype, printed

The choice: CUDA if there is a GPU (bfloat16 on compute capability 8.0 or newer: A100, L4, H100; float16 below:
a T4 is 7.5), Apple's MPS where present, else the CPU in float32. Two environment variables override it:

    NANOPEFT_DEVICE   cpu, cuda, cuda:1, mps
    NANOPEFT_DTYPE    float32, float16, bfloat16

The dtype is that of the frozen base model; adapters always train in float32 (as peft keeps them).
"""
from __future__ import annotations

import os
import platform
import sys
import warnings
from importlib import metadata

import torch

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "safetensors", "gguf", "nanopeft")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_TYPES = ("cpu", "cuda", "mps")


def pick_device(verbose: bool = True) -> torch.device:
    """$NANOPEFT_DEVICE if set (checked), else CUDA, else MPS, else the CPU; prints the choice and why."""
    wanted = os.environ.get("NANOPEFT_DEVICE", "").strip()
    if wanted:
        device = parse_device(wanted)
        why = "from NANOPEFT_DEVICE"
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        why = "a GPU is present"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device, why = torch.device("mps"), "Apple GPU (MPS) is present"
    else:
        device, why = torch.device("cpu"), f"no GPU found; {os.cpu_count()} CPU cores"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        why += f": {name}, compute capability {major}.{minor}"
    if verbose:
        print(f"device: {device} ({why})")
    return device


def parse_device(text: str) -> torch.device:
    """A device from NANOPEFT_DEVICE, with an error that names the value and what would work."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"NANOPEFT_DEVICE={text!r} is not a device; use one of cpu, cuda, cuda:1, mps.") from err
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"NANOPEFT_DEVICE={text!r}: nanoPEFT runs on {DEVICE_TYPES}, not {device.type!r}.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"NANOPEFT_DEVICE={text!r}, but this machine has no CUDA GPU (torch "
                             f"{torch.__version__}); unset it or use cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"NANOPEFT_DEVICE={text!r}, but this machine has {torch.cuda.device_count()} GPU(s), "
                             f"numbered from 0.")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"NANOPEFT_DEVICE={text!r}, but MPS (Apple GPUs) is not available here.")
    return device


def pick_dtype(device, verbose: bool = True) -> torch.dtype:
    """$NANOPEFT_DTYPE if set (checked), else: bf16 on GPUs with compute capability >= 8.0, fp16 on older GPUs
    (T4), fp32 on MPS and on a CPU; prints the choice and why.

    We check the capability rather than `torch.cuda.is_bf16_supported()`, which answers True on a T4 (7.5): bf16
    there is emulated, slow, and not what the hardware does. On MPS and CPUs, a 135M model fits easily in float32.
    """
    device = torch.device(device)
    wanted = os.environ.get("NANOPEFT_DTYPE", "").strip()
    if wanted:
        if wanted not in DTYPES:
            raise ValueError(f"NANOPEFT_DTYPE={wanted!r} is not a dtype nanoPEFT trains in; use one of {list(DTYPES)}.")
        dtype, why = DTYPES[wanted], "from NANOPEFT_DTYPE"
    elif device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        dtype = torch.bfloat16 if major >= 8 else torch.float16
        why = f"compute capability {major}.{minor} {'>=' if major >= 8 else '<'} 8.0"
    else:
        dtype, why = torch.float32, f"{device.type} computes in float32"
    if verbose:
        print(f"dtype: {str(dtype).replace('torch.', '')} for the frozen weights ({why}); adapters train in float32")
    return dtype


def on_colab() -> bool:
    return "google.colab" in sys.modules


def stamp():
    """Print versions, the machine, and the device and dtype nanoPEFT will use; returns (device, dtype)."""
    print(f"python {platform.python_version()} on {platform.machine()} ({os.cpu_count()} cores)"
          + (", Google Colab" if on_colab() else ""))
    for name in PACKAGES:
        try:
            print(f"{name:>13} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"{name:>13} not installed")
    print(f"torch threads: {torch.get_num_threads()}")
    device = pick_device()
    return device, pick_dtype(device)


# --- run-length knobs ----------------------------------------------------------------------------------------------

def short_runs() -> bool:
    """True under `make test` and on Binder (NANOPEFT_QUICK=1): notebooks train for fewer steps."""
    return os.environ.get("NANOPEFT_QUICK") == "1"


def scored(examples: list, short: int = 60) -> list:
    """The tickets to score: all of `examples`, or the first `short` under `make test` (scoring is most of a short
    run's time; the committed outputs score them all)."""
    return examples[:short] if short_runs() else examples


def steps(full: int, short: int) -> int:
    """A step count: $NANOPEFT_STEPS if set, else `short` under `make test`, else `full`."""
    if os.environ.get("NANOPEFT_STEPS"):
        return int(os.environ["NANOPEFT_STEPS"])
    return short if short_runs() else full


def show_progress() -> bool:
    """Progress bars on, unless NANOPEFT_PROGRESS=0 (`make test` sets it: a test log has no use for them)."""
    return os.environ.get("NANOPEFT_PROGRESS", "1") != "0"


def quiet_upstream_warnings() -> None:
    """Silence a warning that is not ours: peft 0.21 calls a transformers 5 property that warns of its own
    deprecation (`is_gradient_checkpointing`), on every forward."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
