"""DoRA's two speed-ups, chosen by `DoRALinear`'s options: the same function as `dora.py`, computed with less.

norm="factored": the row norms without an (out, in) matrix. Expanding the square,

    ||W0 + s B A||^2 = ||W0||^2 + 2 s rowsum(B * (W0 A^T)) + s^2 rowsum((B (A A^T)) * B)

where ||W0||^2 is fixed (W0 is frozen), W0 A^T is (out, r) and A A^T is (r, r). The exact norm (`dora.py`, peft's
way) builds W0 + s B A and takes its norms; the two agree to float rounding.

fused=True: a backward that keeps only the output. The plain backward of

    h = W0 x + b + (g - 1) * W0 x + g * s * B A x          g = m / n, n = ||W0 + s B A|| (a constant: detach_norm)

keeps W0 x and B A x, two (tokens, out) tensors per layer, for m's gradient. One is enough, and it can be the output
h itself: for each output i, h_i - b_i = g_i (W0 x + s B A x)_i, so dh_i/dm_i = (W0 x + s B A x)_i / n_i = (h - b)_i / m_i,
and the backward needs only h, m, n and b:

    dL/d(W0 x + b) = g * dL/dh      dL/d(B A x) = g * s * dL/dh      dL/dm = sum over tokens of dL/dh * (h - b) / m

(a trainable b also gets (1 - g) * dL/dh through the "- b", so dL/dh in all). That is one (tokens, out) tensor per
layer instead of two; the gradients equal the plain ones within the rounding of h (the output's dtype), and
(h - b) / m needs m != 0 (a magnitude trained or loaded as 0; a zero row of W0 breaks DoRA in any form, since then
n = 0 at the start). What each costs and saves, measured, is in benchmarks/README.md.
"""
from __future__ import annotations

import torch


def factored_norm(A: torch.Tensor, B: torch.Tensor, s: float, weight: torch.Tensor,
                  weight_sq: torch.Tensor) -> torch.Tensor:
    """||W0 + s B A|| per output row from small products: A (r, in), B (out, r), W0 `weight` (out, in) in A's dtype,
    `weight_sq` = ||W0||^2 per row (out,), kept by the caller since W0 is frozen. Returns (out,)."""
    # 2 s rowdot(W0, B A) + s^2 ||B A||^2 = rowsum(B * (2 s W0 A^T + s^2 B (A A^T))): one (out, r) matrix,
    # built by one addmm, and one row-wise dot product (few kernels: on a GPU each launch costs time)
    inner = torch.addmm(weight @ A.T, B, A @ A.T, beta=2 * s, alpha=s * s)  # (out, r)
    # clamp: the terms can cancel to a tiny negative number by rounding; a norm is never negative
    return (weight_sq + torch.linalg.vecdot(B, inner)).clamp(min=0).sqrt()  # (out,)


class FusedDoRAOutput(torch.autograd.Function):
    """h = result + ((g - 1) * (result - b) + g * s * lora), g = m / n, in peft's order of operations (so the outputs
    equal the plain path's bit for bit); the backward keeps only h, m, n and b (module docstring).

    result = W0 x + b carries b's gradient g * dL/dh back through the base layer; the (1 - g) * dL/dh that b gets
    through the "- b" is returned here, so a trainable bias gets dL/dh in all, as in peft."""

    @staticmethod
    def forward(ctx, result, lora, magnitude, norm, bias, s):
        g = (magnitude / norm).view(1, -1)  # (1, out)
        base = result - bias if bias is not None else result  # W0 x
        h = (result + ((g - 1) * base + g * lora * s)).to(result.dtype)  # (..., out), as DoRALinear.forward
        ctx.save_for_backward(h, magnitude, norm, bias)
        ctx.s, ctx.result_dtype, ctx.lora_dtype = s, result.dtype, lora.dtype
        return h

    @staticmethod
    def backward(ctx, grad):
        h, magnitude, norm, bias = ctx.saved_tensors
        grad = grad.to(magnitude.dtype)  # (..., out), float32 like the adapter
        g = magnitude / norm  # (out,)
        d_result = d_lora = d_magnitude = None
        if ctx.needs_input_grad[0]:
            d_result = (grad * g).to(ctx.result_dtype)
        if ctx.needs_input_grad[1]:
            d_lora = (grad * (g * ctx.s)).to(ctx.lora_dtype)
        if ctx.needs_input_grad[2]:
            direction = h.to(magnitude.dtype) - bias if bias is not None else h.to(magnitude.dtype)  # h - b
            # (h - b) / m needs m != 0: for a magnitude trained or loaded as 0, use fused=False
            d_magnitude = (grad * direction).reshape(-1, grad.shape[-1]).sum(0) / magnitude  # (out,)
        d_bias = None
        if ctx.needs_input_grad[4]:
            d_bias = ((1 - g) * grad).reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)  # (out,)
        return d_result, d_lora, d_magnitude, None, d_bias, None
