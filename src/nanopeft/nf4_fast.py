"""NF4's faster paths, chosen by `dequantize_nf4` and `quantize_nf4` (`nf4.py`): the same numbers with less work.

The readable dequantize splits each byte into its two 4-bit codes, looks each code up among the 16 levels and
multiplies by the block's absmax. Two things make it faster without changing a single number:

- On a CPU (`lookup_pairs`): look each byte up once, in a 256 x 2 table of value pairs (byte b -> (nf4[b >> 4],
  nf4[b & 15])) read as 256 eight-byte words, so one gather fetches both values of a byte. The gather runs one row
  per block of the packed weight, which PyTorch splits across the CPU threads (a flat lookup runs on one thread).
- On a CUDA GPU (`nf4_triton.py`): one Triton kernel per quantize or dequantize, with every step in registers.

`use_triton` is the dispatch: Triton for a CUDA tensor where Triton is installed (it comes with CUDA builds of
torch), else PyTorch. What each path costs, measured, is in benchmarks/README.md.
"""
from __future__ import annotations

import torch

try:  # one GPU kernel for each direction, where Triton is installed
    from .nf4_triton import dequantize_kernel, quantize_kernel
except ImportError:  # CPU-only installs: the PyTorch paths serve every device
    dequantize_kernel = quantize_kernel = None

KERNELS = ("auto", "torch", "gather", "triton")


def use_triton(kernel: str, t: torch.Tensor, direction: str) -> bool:
    """Whether `kernel` ("auto", "torch", "gather" or "triton") means the Triton kernel for tensor `t`; `direction`:
    "quantize" or "dequantize". A clear error for a name we do not have, or for "triton" without Triton."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    available = (quantize_kernel if direction == "quantize" else dequantize_kernel) is not None
    if kernel == "triton" and not available:
        raise ImportError("kernel='triton' needs Triton (pip install triton; CUDA builds of torch include it).")
    return kernel == "triton" or (kernel == "auto" and t.is_cuda and available)


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2): row b holds (code[b >> 4], code[b & 15]), the two values that byte b stands for."""
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # high nibble first


def lookup_pairs(packed: torch.Tensor, pairs: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The levels of every packed byte, (2 * bytes,) float32 in order (high, low, high, low, ...), unscaled.
    `pairs`: `pair_table(nf4_code())` on the bytes' device. Equal to `code[unpack(packed)]` bit for bit."""
    words = pairs.view(torch.int64).view(1, 256)  # both values of a byte in one eight-byte word
    codes = packed.view(-1).long()
    half = blocksize // 2  # bytes per block
    # one row per block: torch.gather splits rows across CPU threads (a flat index_select runs on one thread)
    codes = codes.view(-1, half) if codes.numel() % half == 0 else codes.view(1, -1)
    values = torch.gather(words.expand(codes.shape[0], 256), 1, codes)  # (rows, bytes per row), eight-byte words
    return values.view(torch.float32).view(-1)  # (2 * bytes,)
