"""NF4 dequantization as one GPU kernel (Triton): the same numbers as `nanopeft.nf4.dequantize_nf4`, in one pass.

The readable version runs several PyTorch operations, each reading and writing the whole weight: unpack the bytes,
look the codes up, multiply by the block scales, cast. On a GPU each pass is bound by memory bandwidth, so five
passes cost about five times one. This kernel does it all per byte while the byte is in registers:

    byte -> (high nibble, low nibble) -> (level[high], level[low]) -> times the absmax of their block -> out dtype

It reads 0.5 bytes per weight (plus the absmax) and writes 2 (float16/bfloat16) or 4 (float32): the least any
dequantization can move. The arithmetic is the readable version's (a float32 level times a float32 absmax, rounded
once to the output dtype), so the outputs are equal bit for bit: tested on GPUs (tests/test_gpu.py), and on CPUs
through Triton's interpreter for float32 and float16 (the interpreter rounds float32 to bfloat16 by truncation,
where GPUs and torch round to nearest, so bfloat16 is checked on GPUs only).

Triton is imported here and nowhere else: `nanopeft.nf4` uses this kernel where Triton is installed and the weight is
on a CUDA GPU, and the PyTorch path everywhere else.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


BYTES_PER_PROGRAM = 1024  # each program instance handles 1024 bytes = 2048 weights


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr):
    byte_index = tl.program_id(0) * BYTES + tl.arange(0, BYTES)  # (BYTES,)
    byte = tl.load(packed_ptr + byte_index, mask=2 * byte_index < n, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4))  # the first weight of the pair: the high nibble
    low = tl.load(code_ptr + (byte & 15))  # the second: the low nibble
    values = tl.reshape(tl.join(high, low), (2 * BYTES,))  # (2 BYTES,): high, low, high, low, ...
    index = tl.program_id(0) * 2 * BYTES + tl.arange(0, 2 * BYTES)  # weight positions
    scale = tl.load(absmax_ptr + index // BLOCKSIZE, mask=index < n, other=0.0)  # its block's absmax
    tl.store(out_ptr + index, (values * scale).to(out_ptr.dtype.element_ty), mask=index < n)


def dequantize_kernel(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape, blocksize: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The weight `shape` in `dtype` from its packed codes, the float32 absmax of each block and the 16 levels, in
    one kernel launch (`nanopeft.nf4.dequantize_nf4` calls this on CUDA tensors)."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n = out.numel()
    grid = (triton.cdiv(n, 2 * BYTES_PER_PROGRAM),)
    _dequantize_kernel[grid](packed, absmax, code, out, n, BLOCKSIZE=blocksize, BYTES=BYTES_PER_PROGRAM)
    return out
