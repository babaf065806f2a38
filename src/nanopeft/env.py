"""The environment stamp at the top of every notebook, and the knobs that shorten runs in CI."""
from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

from .memory import pick_compute_dtype, pick_device

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "safetensors", "gguf", "nanopeft")


def quick() -> bool:
    """True under `make test` (NANOPEFT_QUICK=1): notebooks train for fewer steps so CI stays fast."""
    return os.environ.get("NANOPEFT_QUICK") == "1"


def steps(full: int, quick_steps: int) -> int:
    """A step count: $NANOPEFT_STEPS if set, else `quick_steps` under `make test`, else `full`."""
    if os.environ.get("NANOPEFT_STEPS"):
        return int(os.environ["NANOPEFT_STEPS"])
    return quick_steps if quick() else full


def stamp():
    """Print versions, the machine, and the device and compute dtype nanoPEFT will use; returns (device, dtype)."""
    print(f"python {platform.python_version()} on {platform.machine()} ({os.cpu_count()} cores)")
    for name in PACKAGES:
        try:
            print(f"{name:>13} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"{name:>13} not installed")
    print(f"torch threads: {torch.get_num_threads()}")
    device = pick_device()
    return device, pick_compute_dtype(device)
