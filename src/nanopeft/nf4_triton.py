"""NF4 as two short GPU kernels (Triton): the same bytes and numbers as `nanopeft.nf4`'s PyTorch code, in one pass
each.

The readable version runs several PyTorch operations, each reading and writing the whole weight: unpack the bytes,
look the codes up, multiply by the block scales, cast. On a GPU each pass is bound by memory bandwidth, and on small
matrices each launch costs more than its work, so five passes cost about five times one. The kernels do it all
while the numbers are in registers:

    dequantize: byte -> (high nibble, low nibble) -> (level[high], level[low]) -> times its block's absmax -> dtype
    quantize:   block of 64 -> absmax -> scaled to [-1, 1] -> count the midpoints below -> two codes per byte

With double quantization the dequantize kernel decodes each block's absmax in the same pass (dynamic[code] * scale +
offset), and the quantize kernel runs twice: on the weight (4-bit codes, packed) and on the absmax minus their mean
(8-bit codes), with the absmax' mean taken by PyTorch between them; so a weight costs one to three launches, not
the dozen a PyTorch version needs. Dequantizing reads
0.5 bytes per weight (plus the absmax) and writes 2 (float16/bfloat16) or 4 (float32): the least any
dequantization can move. The arithmetic is the readable version's, operation for operation (bitsandbytes' details
included: 1/absmax for full blocks, a division for the tail, 1e-38 for an all-zero block), and compiled with
enable_fp_fusion=False, because a GPU may fuse a * b + c into one multiply-add with one rounding where PyTorch rounds
twice. So the results are equal bit for bit: tested on an H100 (tests/test_gpu.py), and on CPUs through Triton's
interpreter (for dequantize in float32 and float16: the interpreter rounds float32 to bfloat16 by truncation, where
GPUs and torch round to nearest, so bfloat16 is checked on GPUs only).

Triton is imported here and nowhere else: `nanopeft.nf4` uses these kernels where Triton is installed and the weight
is on a CUDA GPU, and the PyTorch path everywhere else.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


BYTES_PER_PROGRAM = 1024  # each program instance handles 1024 bytes = 2048 weights


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, dynamic_ptr, absmax_scale_ptr, offset_ptr, out_ptr, n,
                       BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    byte_index = tl.program_id(0) * BYTES + tl.arange(0, BYTES)  # (BYTES,)
    byte = tl.load(packed_ptr + byte_index, mask=2 * byte_index < n, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4))  # the first weight of the pair: the high nibble
    low = tl.load(code_ptr + (byte & 15))  # the second: the low nibble
    values = tl.reshape(tl.join(high, low), (2 * BYTES,))  # (2 BYTES,): high, low, high, low, ...
    index = tl.program_id(0) * 2 * BYTES + tl.arange(0, 2 * BYTES)  # weight positions
    block = index // BLOCKSIZE
    if DOUBLE_QUANT:  # the absmax is an 8-bit code itself: dynamic[code] * the scale of its 256 blocks + offset
        absmax_code = tl.load(absmax_ptr + block, mask=index < n, other=0).to(tl.int32)
        scale = tl.load(dynamic_ptr + absmax_code) * tl.load(absmax_scale_ptr + block // 256, mask=index < n, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=index < n, other=0.0)  # its block's float32 absmax
    tl.store(out_ptr + index, (values * scale).to(out_ptr.dtype.element_ty), mask=index < n)


def dequantize_kernel(q, code: torch.Tensor, dynamic: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight of NF4Tensor `q` in `dtype`, in one kernel launch (`nanopeft.nf4.dequantize_nf4` calls this on
    CUDA tensors): `code` holds the 16 NF4 levels, `dynamic` the 256 levels that double quantization stores the
    absmax in. enable_fp_fusion=False keeps a * b + c two roundings, as PyTorch computes it (no fused multiply-add),
    so that the result equals the readable version bit for bit."""
    out = torch.empty(q.shape, dtype=dtype, device=q.packed.device)
    n = out.numel()
    dq = q.double_quant
    grid = (triton.cdiv(n, 2 * BYTES_PER_PROGRAM),)
    _dequantize_kernel[grid](q.packed, q.absmax, code, dynamic, q.absmax_scale if dq else q.absmax,
                             q.offset.reshape(1) if dq else q.absmax, out, n, BLOCKSIZE=q.blocksize,
                             BYTES=BYTES_PER_PROGRAM, DOUBLE_QUANT=dq, enable_fp_fusion=False)
    return out


ELEMENTS_PER_PROGRAM = 1024  # quantize: each program instance takes 1024 numbers = 1024 // blocksize whole blocks


@triton.jit
def _quantize_kernel(x_ptr, midpoints_ptr, offset_ptr, codes_ptr, absmax_ptr, n, BLOCKSIZE: tl.constexpr,
                     BLOCKS: tl.constexpr, MIDPOINTS: tl.constexpr, PACK: tl.constexpr, CENTRE: tl.constexpr):
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,) block numbers
    index = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (BLOCKS, BLOCKSIZE) positions
    x = tl.load(x_ptr + index, mask=index < n, other=0.0).to(tl.float32)
    if CENTRE:  # double quantization: the absmax values minus their mean
        x = tl.where(index < n, x - tl.load(offset_ptr), 0.0)
    absmax = tl.max(tl.abs(x), axis=1)  # (BLOCKS,)
    tiny = tl.full((BLOCKS,), 1e-38, tl.float32)  # float32: a bare 1e-38 (below float32's normal range) is float64
    divisor = tl.maximum(absmax, tiny)  # an all-zero block divides by 1e-38, as bitsandbytes does
    tail = (block + 1) * BLOCKSIZE > n  # the last, shorter block is divided by its absmax; full ones multiplied
    scaled = tl.where(tail[:, None], tl.math.div_rn(x, divisor[:, None]), x * tl.math.div_rn(1.0, divisor)[:, None])
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    code = tl.zeros((BLOCKS, BLOCKSIZE), dtype=tl.int32)
    for j in tl.static_range(MIDPOINTS):  # the nearest level's index = how many midpoints lie strictly below
        code += (scaled > tl.load(midpoints_ptr + j)).to(tl.int32)
    blocks_here = block * BLOCKSIZE < n
    tl.store(absmax_ptr + block, tl.where(tail, divisor, absmax), mask=blocks_here)  # the tail's absmax is clamped too
    if PACK:  # two 4-bit codes per byte, the first in the high nibble; past the end, code 7 (NF4's zero)
        code = tl.where(index < n, code, 7)
        high, low = tl.split(tl.reshape(code, (BLOCKS * BLOCKSIZE // 2, 2)))
        byte_index = tl.program_id(0) * (BLOCKS * BLOCKSIZE // 2) + tl.arange(0, BLOCKS * BLOCKSIZE // 2)
        tl.store(codes_ptr + byte_index, ((high << 4) | low).to(tl.uint8), mask=2 * byte_index < n)
    else:
        tl.store(codes_ptr + index, code.to(tl.uint8), mask=index < n)


def quantize_kernel(x: torch.Tensor, midpoints: torch.Tensor, blocksize: int, pack: bool,
                    offset: torch.Tensor | None = None):
    """`nanopeft.nf4.quantize_blockwise` (then `pack` if pack=True) in one kernel launch: (codes uint8, absmax
    float32). x is read flat; offset (a float32 scalar tensor), if given, is subtracted first (double quantization)."""
    x = x.reshape(-1)
    n = x.numel()
    blocks = -(-n // blocksize)
    per_program = max(1, ELEMENTS_PER_PROGRAM // blocksize)
    codes = torch.empty(((n + 1) // 2, 1) if pack else (n,), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(blocks, per_program),)
    _quantize_kernel[grid](x, midpoints, offset if offset is not None else midpoints, codes, absmax, n,
                           BLOCKSIZE=blocksize, BLOCKS=per_program, MIDPOINTS=midpoints.numel(), PACK=pack,
                           CENTRE=offset is not None, enable_fp_fusion=False)
    return codes, absmax
