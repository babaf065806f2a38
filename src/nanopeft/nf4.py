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

The frozen base is stored this way and dequantized to the compute dtype in every forward (and again in the
backward, so no full-size weight is kept for autograd); LoRA's A and B stay in high precision and train.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # one GPU kernel for the dequantization, where Triton is installed (it comes with CUDA builds of torch)
    from .nf4_triton import dequantize_kernel, quantize_kernel
except ImportError:  # CPU-only installs: the PyTorch path serves every device
    dequantize_kernel = quantize_kernel = None

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


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 levels (its other 4-bit type), sorted: a tiny float, 1 sign, 2 exponent and 1 mantissa bit.

    Magnitudes 0, 0.0625 (the one subnormal), 2, 3, 4, 6, 8, 12 -- powers of two and 1.5 times them -- divided by 12.
    bitsandbytes stores both +0 and -0, so two of its 16 codes mean zero; here they are one level (15 in all).
    """
    normal = [m * 2.0 ** e for e in (1, 2, 3) for m in (1.0, 1.5)]  # 2, 3, 4, 6, 8, 12
    magnitudes = torch.tensor([0.0, 0.0625] + normal, dtype=torch.float64) / 12.0
    return torch.cat([-magnitudes[1:], magnitudes]).sort().values.float()  # (15,)


def int4_code() -> torch.Tensor:
    """Plain symmetric INT4 with absmax scaling: 15 evenly spaced levels k/7, k = -7..7 (no normal prior)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7  # (15,)


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
    if name == "nf4-pairs":  # byte b -> (nf4[b >> 4], nf4[b & 15]): both values of a byte in one lookup
        code = nf4_code()
        return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).to(device)  # (256, 2)
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
    strictly below the value. For NF4's 15 midpoints, counting them (15 comparisons per value) was 2-3x faster on
    our CPU than a binary search (on CUDA `bucketize` was faster; there the Triton kernel counts in registers); for the
    255 of the 8-bit dynamic code, the binary search (`bucketize`) wins."""
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


def _use_triton(kernel: str, t: torch.Tensor, fn) -> bool:
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel must be 'auto', 'torch' or 'triton', got {kernel!r}.")
    if kernel == "triton" and fn is None:
        raise ImportError("kernel='triton' needs Triton (pip install triton; CUDA builds of torch include it).")
    return kernel == "triton" or (kernel == "auto" and t.is_cuda and fn is not None)


@functools.cache
def _midpoints_on(name: str, device: torch.device) -> torch.Tensor:
    """`midpoints_of` a code table, built once per device (what the Triton quantize kernel compares against)."""
    return midpoints_of(_code_on(name, device))


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False, kernel: str = "auto") -> NF4Tensor:
    """Quantize `w` to NF4 exactly as `bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4",
    compress_statistics=double_quant)` does (same bytes, same absmax). kernel: "torch" (this function's code),
    "triton" (the same bytes from one GPU kernel per quantization, `nanopeft.nf4_triton`), or "auto": Triton for a
    CUDA tensor where Triton is installed, else torch."""
    check_quantizable(w, blocksize, "w")
    triton = _use_triton(kernel, w, quantize_kernel)
    if triton:  # one kernel: absmax, scaling, rounding and packing
        packed, absmax = quantize_kernel(w, _midpoints_on("nf4", w.device), blocksize, pack=True)
    else:
        indices, absmax = quantize_blockwise(w, _code_on("nf4", w.device), blocksize)  # (n,), (blocks,)
        packed = pack(indices)
    q = NF4Tensor(packed, absmax, blocksize, w.shape, w.dtype)
    if double_quant:
        # absmax values are all positive and similar: centre them on their mean, then 8 bits in blocks of 256.
        offset = absmax.mean()
        if triton:
            codes, scale = quantize_kernel(absmax, _midpoints_on("dynamic", w.device), NF4Tensor.DQ_BLOCKSIZE,
                                           pack=False, offset=offset)
        else:
            codes, scale = quantize_blockwise(absmax - offset, _code_on("dynamic", w.device), NF4Tensor.DQ_BLOCKSIZE)
        q.absmax, q.absmax_scale, q.offset = codes.to(torch.uint8), scale, offset
    return q


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None, kernel: str = "auto") -> torch.Tensor:
    """The weight back, w ~= nf4[code] * absmax, in `dtype` (default: the original dtype), shape `q.shape`.

    Equal to `dequantize_blockwise(unpack(q.packed), absmax, nf4_code())`, but each byte is looked up once in a
    256 x 2 table of value pairs instead of being split into two codes first, and each block is scaled by a
    broadcast. kernel: "torch" (this function's code), "triton" (the same numbers in one GPU kernel,
    `nanopeft.nf4_triton`), or "auto": Triton for a CUDA tensor where Triton is installed, else torch.
    """
    if _use_triton(kernel, q.packed, dequantize_kernel):
        device = q.packed.device
        return dequantize_kernel(q, _code_on("nf4", device), _code_on("dynamic", device), dtype or q.dtype)
    # the 256 x 2 table read as 256 eight-byte words: one gather fetches both values of a byte at once
    words = _code_on("nf4-pairs", q.packed.device).view(torch.int64).view(1, 256)
    codes = q.packed.view(-1).long()
    half = q.blocksize // 2  # bytes per block
    # one row per block: torch.gather splits rows across CPU threads (a flat index_select runs on one thread)
    codes = codes.view(-1, half) if codes.numel() % half == 0 else codes.view(1, -1)
    values = torch.gather(words.expand(codes.shape[0], 256), 1, codes)  # (rows, bytes per row), 8-byte words
    values = values.view(torch.float32).view(-1)[: q.numel]  # (n,) high, low, high, low, ...
    return scale_blocks_(values, q.block_absmax(), q.blocksize).view(q.shape).to(dtype or q.dtype)


# ------------------------------------------------------------------------------------------------- the layer
class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly. The backward dequantizes again instead of keeping W (out, in) for
    autograd, as bitsandbytes' MatMul4Bit does: only x's gradient exists, since W is frozen."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), bias)  # (..., in) @ (in, out) + b -> (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None, None  # (..., out) @ (out, in) -> (..., in)


class LinearNF4(nn.Module):
    """A frozen Linear whose weight is stored in NF4 and dequantized to `compute_dtype` in every forward.

    Buffers, named like bitsandbytes' `Linear4bit` state: `weight` (packed uint8), `absmax`, and with double
    quantization `absmax_scale` and `offset`. The bias (if any) is a frozen parameter in its original dtype.
    compute_dtype: the dtype of the matmul (None: the input's dtype, bitsandbytes' default for float32 inputs).

        forward(x) = F.linear(x.to(cd), dequantize(W).to(cd), bias.to(cd)).to(x.dtype)
    """

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"LinearNF4 needs a 2-D (out, in) weight, got shape {tuple(q.shape)}.")
        self.out_features, self.in_features = q.shape
        self.blocksize, self.weight_shape, self.weight_dtype = q.blocksize, q.shape, q.dtype
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", q.packed)
        for name, t in q.tensors().items():
            if name != "packed":
                self.register_buffer(name, t)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "LinearNF4":
        """Quantize a `nn.Linear`'s weight (the Linear itself is left unchanged)."""
        if isinstance(linear, LinearNF4):
            raise TypeError("This layer is already a LinearNF4: quantizing twice would round the rounding.")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}.")
        q = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(q, linear.bias, compute_dtype)

    @property
    def quantized(self) -> NF4Tensor:
        """The stored weight as an NF4Tensor (views of this layer's buffers)."""
        dq = hasattr(self, "absmax_scale")
        return NF4Tensor(self.weight, self.absmax, self.blocksize, self.weight_shape, self.weight_dtype,
                         self.absmax_scale if dq else None, self.offset if dq else None)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out, in) in `dtype` (default: the original weight's dtype), rebuilt from the 4-bit codes."""
        return dequantize_nf4(self.quantized, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype or x.dtype
        bias = self.bias.to(cd) if self.bias is not None else None
        return _NF4Matmul.apply(x.to(cd), self, bias).to(x.dtype)  # (..., out)

    def extra_repr(self) -> str:
        q = self.quantized
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={q.double_quant}, compute_dtype={self.compute_dtype}, "
                f"{q.bits_per_parameter:.3f} bits/parameter")
