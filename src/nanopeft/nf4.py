"""NF4: 4-bit NormalFloat with double quantization, the frozen-base format of QLoRA (Dettmers et al., 2023,
arXiv:2305.14314), byte for byte as bitsandbytes stores it.

Pretrained weights are close to normally distributed, so the 16 levels of a 4-bit code are best spent where a normal
distribution puts its mass: NF4's levels are quantiles of N(0, 1), rescaled to [-1, 1]. A weight is cut into blocks
of `blocksize` (64) consecutive numbers; each block is divided by its largest magnitude (`absmax`), and each number
becomes the index of the nearest level:

    code_i = argmin_j |w_i / absmax_b - q_j|          w_i ~= q[code_i] * absmax_b    (dequantize)

Two 4-bit codes share a byte. The absmax costs 32 bits per 64 numbers (0.5 bits per parameter), so double
quantization stores the absmax themselves in 8 bits (the signed "dynamic" code), in blocks of 256 with one float32
scale each, around their mean: 8/64 + 32/(64*256) = 0.127 bits. In all, 4.5 -> 4.127 bits per parameter.

QLoRA stores the frozen base this way and dequantizes it to the compute dtype in every forward (`LinearNF4`, in
qlora.py); LoRA's A and B stay in high precision and train. The faster lookups live beside this file (nf4_fast.py).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .nf4_fast import dequantize_kernel, lookup_pairs, pair_table, quantize_kernel, use_triton

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes supports
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------- the codes
def _normal_quantile(p: torch.Tensor) -> torch.Tensor:
    """Phi^{-1}(p), the quantile function of the standard normal, in float64."""
    return math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels, sorted, float32: quantiles of N(0, 1) scaled so that the largest is 1.

    QLoRA wants an exact zero (padding and zero weights stay exact) and so builds the two halves separately:
    8 positive levels at the quantiles of probabilities spaced evenly from `offset` down to 0.5, 7 negative ones
    from 1 - `offset` up to 0.5, and 0. The offset 0.9677083 = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 keeps the last
    quantile finite (Phi^{-1}(1) is infinite).
    """
    offset = 0.9677083
    # bitsandbytes' create_normal_map: probabilities in float32, quantiles in float64, normalised in float32
    positive = _normal_quantile(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 values, largest first
    negative = -_normal_quantile(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 values
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return levels / levels.max()  # (16,), the largest is exactly 1


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit "dynamic" code double quantization stores absmax values with (256 levels, sorted).

    Dettmers' dynamic tree quantization (arXiv:1511.04561): a sign, then a decimal exponent 10^-6 ... 10^0 and a
    linear fraction whose resolution grows with the exponent -- fine steps near zero, coarse near 1. For exponent
    10^(i-6), i = 0..6, the fractions are the midpoints of 2^i + 1 points evenly spaced on [0.1, 1]: 2^i levels and
    their negatives, 254 in all, plus 0 and 1. Computed in float32 in the order bitsandbytes' `create_dynamic_map`
    uses, so the levels are the same floats.
    """
    levels = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0  # (2^i,)
        levels += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    levels += [0.0, 1.0]
    return torch.tensor(sorted(levels), dtype=torch.float32)  # (256,)


@functools.cache
def _code_on(name: str, device: torch.device) -> torch.Tensor:
    """A code table built once per device (every forward of every LinearNF4 needs it). Do not modify it."""
    if name == "nf4-pairs":  # byte b -> (nf4[b >> 4], nf4[b & 15]): the fast CPU lookup's table (nf4_fast.py)
        return pair_table(nf4_code()).to(device)  # (256, 2)
    if name.endswith("-midpoints"):  # the rounding boundaries, what the Triton quantize kernel compares against
        return midpoints_of(_code_on(name.removesuffix("-midpoints"), device))
    return {"nf4": nf4_code, "dynamic": dynamic_code}[name]().to(device)


# ------------------------------------------------------------------------------------------- blockwise rounding
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Absmax-scale `x` (flattened row-major) in blocks of `blocksize` and round each number to the nearest level of
    `code` (sorted). Returns (indices int64 (n,), absmax float32 (blocks,)).

    Blocks run across row boundaries; a last, shorter block gets its own absmax. A value exactly half-way between
    two levels goes to the lower one. These are bitsandbytes' rules, including two details of its arithmetic that
    make the bytes equal: full blocks are multiplied by 1/absmax but the tail block is divided by its absmax, and
    an all-zero block divides by 1e-38 instead of 0 (its absmax is stored as 0, the tail's as 1e-38).
    """
    flat = x.reshape(-1).float()  # (n,)  float16/bfloat16 are exact in float32
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n // blocksize,)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)  # w / absmax, in [-1, 1]
    parts, maxes = [scaled.reshape(-1)], [absmax]
    if full < n:  # the tail block
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        parts.append(flat[full:] / tail_max)
        maxes.append(tail_max.view(1))
    scaled = (torch.cat(parts) if len(parts) > 1 else parts[0]).clamp_(-1, 1)  # (n,)
    return nearest_level(scaled, code), torch.cat(maxes)


def midpoints_of(code: torch.Tensor) -> torch.Tensor:
    """The len(code) - 1 points half-way between neighbouring levels of `code` (sorted): the rounding boundaries."""
    return (code[:-1] + code[1:]) / 2


def nearest_level(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The index of the nearest level of `code` (sorted) for each value; a value exactly half-way between two levels
    goes to the lower one. Level j is nearest on (midpoint j-1, midpoint j], so its index is the number of midpoints
    strictly below the value: counted one by one for NF4's 15 midpoints, found by binary search (`bucketize`) for
    the 255 of the 8-bit dynamic code (each the faster there: benchmarks/README.md)."""
    midpoints = midpoints_of(code)
    if midpoints.numel() > 32:
        return torch.bucketize(values, midpoints)
    index = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    for m in midpoints.tolist():
        index += values > m  # (n,): one more for every midpoint below
    return index.long()


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    """code[index] * absmax of its block, float32, flat (n,)."""
    return scale_blocks_(code.index_select(0, indices.view(-1)), absmax, blocksize)  # (n,)


def scale_blocks_(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Multiply values (n,) in [-1, 1] by the absmax of their block, in place (a broadcast, no repeat); returns it."""
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].view(-1, 1))  # (blocks, bs) * (blocks, 1)
    if full < n:
        values[full:].mul_(absmax[-1])  # the last, shorter block
    return values


def pack(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble; an odd count is padded with code 7 (NF4's zero).
    (n,) -> ((n + 1) // 2, 1) uint8, bitsandbytes' layout."""
    codes = indices.to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    return ((codes[0::2] << 4) | codes[1::2]).view(-1, 1)  # high nibble: even positions


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack`: ((n + 1) // 2, 1) uint8 -> (n,) int64 codes."""
    packed = packed.view(-1)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1)  # (2 * bytes,) high, low, high, low...
    return codes[:n].long()


# ------------------------------------------------------------------------------------------------- NF4 tensors
@dataclass
class NF4Tensor:
    """A weight in NF4: everything needed to rebuild it, nothing more. Field names follow bitsandbytes' QuantState.

    packed:    ((numel + 1) // 2, 1) uint8, two codes per byte.
    absmax:    (blocks,) float32 -- or, with double quantization, (blocks,) uint8 indices into `dynamic_code()`.
    blocksize: numbers per absmax block.
    shape, dtype: the original tensor's.
    With double quantization only: `absmax_scale` (ceil(blocks / 256),) float32, the absmax of each block of 256
    centred absmax values; `offset`, a float32 scalar, their mean (absmax ~= dynamic[absmax] * scale + offset).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    absmax_scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    DQ_BLOCKSIZE = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensors(self) -> dict:
        """The stored tensors by name (what `nbytes` counts)."""
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out.update(absmax_scale=self.absmax_scale, offset=self.offset)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_parameter(self) -> float:
        """Stored bits / parameters. The shared code tables (16 and 256 floats) are not counted, as in the paper."""
        return 8 * self.nbytes / self.numel

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every 4-bit block (decoded from 8 bits first under double quantization)."""
        if not self.double_quant:
            return self.absmax
        # absmax ~= dynamic[code] * scale of its block of 256 + offset
        centred = dequantize_blockwise(self.absmax.int(), self.absmax_scale, _code_on("dynamic", self.packed.device),
                                       self.DQ_BLOCKSIZE)
        return centred.add_(self.offset)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}{dq}, "
                f"{self.nbytes:,} bytes = {self.bits_per_parameter:.3f} bits/parameter)")


def check_quantizable(w, blocksize: int, name: str = "tensor") -> None:
    """Clear errors for what NF4 cannot store: raises ValueError/TypeError naming what to change."""
    if isinstance(w, NF4Tensor):
        raise TypeError(f"{name} is already an NF4Tensor: quantizing twice would round the rounding. "
                        f"Dequantize it first (dequantize_nf4) if you really mean to.")
    if not torch.is_tensor(w):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}.")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {w.dtype}; NF4 quantizes float32, float16 or bfloat16 tensors. "
                        f"Convert it first, e.g. w.float().")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}): there is nothing to quantize.")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported; bitsandbytes (and so NF4 files) use one of "
                         f"{BLOCKSIZES}. QLoRA uses 64.")
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"{name} has {bad} NaN/inf value(s): a block's absmax would be inf or NaN and every number "
                         f"in that block would be lost. Fix the weights (torch.nan_to_num) before quantizing.")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False, kernel: str = "auto") -> NF4Tensor:
    """Quantize `w` to NF4 exactly as `bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4",
    compress_statistics=double_quant)` does (same bytes, same absmax). kernel: "torch" or "gather" (this function's
    code), "triton" (the same bytes from one GPU kernel per quantization, `nf4_triton.py`), or "auto": Triton for a
    CUDA tensor where Triton is installed, else torch."""
    check_quantizable(w, blocksize, "w")
    triton = use_triton(kernel, w, "quantize")
    if triton:  # one kernel: absmax, scaling, rounding and packing
        packed, absmax = quantize_kernel(w, _code_on("nf4-midpoints", w.device), blocksize, pack=True)
    else:
        indices, absmax = quantize_blockwise(w, _code_on("nf4", w.device), blocksize)  # (n,), (blocks,)
        packed = pack(indices)
    q = NF4Tensor(packed, absmax, blocksize, w.shape, w.dtype)
    if double_quant:
        # absmax values are all positive and similar: centre them on their mean, then 8 bits in blocks of 256.
        offset = absmax.mean()
        if triton:
            codes, scale = quantize_kernel(absmax, _code_on("dynamic-midpoints", w.device), NF4Tensor.DQ_BLOCKSIZE,
                                           pack=False, offset=offset)
        else:
            codes, scale = quantize_blockwise(absmax - offset, _code_on("dynamic", w.device), NF4Tensor.DQ_BLOCKSIZE)
        q.absmax, q.absmax_scale, q.offset = codes.to(torch.uint8), scale, offset
    return q


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None, kernel: str = "auto") -> torch.Tensor:
    """The weight back, w ~= nf4[code] * absmax of its block, in `dtype` (default: the original dtype), shape q.shape.

    kernel: "torch" runs the three steps below as written; "gather" gets the same levels by looking each byte up
    once (`nf4_fast.lookup_pairs`, several times faster on a CPU); "triton" does it all in one GPU kernel
    (`nf4_triton.py`); "auto" (the default) picks Triton for a CUDA tensor where it is installed, else "gather".
    Every path gives the same numbers bit for bit (tests/test_nf4.py).
    """
    device = q.packed.device
    if use_triton(kernel, q.packed, "dequantize"):
        return dequantize_kernel(q, _code_on("nf4", device), _code_on("dynamic", device), dtype or q.dtype)
    if kernel == "torch":
        codes = unpack(q.packed, q.numel)  # two 4-bit codes per byte                  (n,)
        levels = _code_on("nf4", device).index_select(0, codes)  # nf4[code], in [-1, 1]  (n,)
    else:
        levels = lookup_pairs(q.packed, _code_on("nf4-pairs", device), q.blocksize)[: q.numel]  # the same, faster
    w = scale_blocks_(levels, q.block_absmax(), q.blocksize)  # times the absmax of its block
    return w.view(q.shape).to(dtype or q.dtype)
