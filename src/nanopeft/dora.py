"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).

Write each row of a weight (one output neuron) as a length times a direction, and adapt the two separately:

    W' = m * (W0 + s B A) / ||W0 + s B A||          m: (out,), the norm taken per output row

The direction is LoRA's W0 + s B A, normalised row by row; the magnitude m is a trainable vector, initialised to
the row norms of W0 so that at step 0 W' = W0 exactly. (The paper writes weights as (in, out) and so calls this a
"column" norm; on PyTorch's (out, in) weights it is the norm of each row.)

The norm ||W0 + s B A|| is treated as a constant in the backward pass (`detach_norm=True`, the paper's section 4.3):
the forward pass is unchanged, the gradients differ, and no graph is kept through the (out, in) weight.

As in peft, the layer never builds W' for the forward pass. Since W' x = (m / n) * (W0 x + s B A x):

    h = W0 x + b + (m / n - 1) * W0 x + (m / n) * s * B A x

which reuses the base output W0 x + b (bias removed) when there is no dropout; with dropout, W0 is applied again
to the dropped input, as peft does.

The row norms themselves need no (out, in) matrix either (`norm="factored"`): expanding the square,

    ||W0 + s B A||^2 = ||W0||^2 + 2 s rowsum(B * (W0 A^T)) + s^2 rowsum((B (A A^T)) * B)

where ||W0||^2 is fixed (W0 is frozen), W0 A^T is (out, r) and A A^T is (r, r). `norm="exact"` (the default, and
peft's way) builds W0 + s B A and takes its norms; the two agree to float rounding.

The backward pass of the combination above keeps W0 x and B A x, two (tokens, out) tensors per layer, for m's
gradient. One is enough, and it can be the output h itself (`fused=True`). Write n = ||W0 + s B A|| (out,), a
constant for autograd (detach_norm), g = m / n (out,), b the bias; all broadcast over tokens, and for each output i:

    h - b = g * (W0 x + s B A x)     so     dh_i/dm_i = (W0 x + s B A x)_i / n_i = (h - b)_i / m_i

and the backward needs only h, m, n and b:

    dL/d(W0 x + b) = g * dL/dh      dL/d(B A x) = g * s * dL/dh      dL/dm = sum over tokens of dL/dh * (h - b) / m

(a trainable b also gets (1 - g) * dL/dh through the "- b", so dL/dh in all).

That costs one (tokens, out) tensor per layer instead of two; the gradients equal the unfused ones within the
rounding of h (the output's dtype), and (h - b) / m needs m != 0 (a magnitude trained or loaded as 0; a zero row of
W0 breaks DoRA in any form, since then n = 0 at the start).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALinear, base_weight

NORMS = ("exact", "factored")


def _combine(result, base, lora, g, s):
    """h = W0 x + b + (g - 1) W0 x + g s B A x, g = m / n of shape (1, out), in peft's order of operations."""
    return (result + ((g - 1) * base + g * lora * s)).to(result.dtype)


class _DoRAOutput(torch.autograd.Function):
    """h = result + ((g - 1) * (result - b) + g * s * lora), g = m / n, computed as peft computes it; the backward
    keeps only h, m, n and b (module docstring: dh/dm = (h - b) / m), so W0 x and B A x are not kept for it.

    result = W0 x + b carries b's gradient g * dL/dh back through the base layer; the (1 - g) * dL/dh that b gets
    through the "- b" is returned here, so a trainable bias gets dL/dh in all, as in peft."""

    @staticmethod
    def forward(ctx, result, lora, magnitude, norm, bias, s):
        g = (magnitude / norm).view(1, -1)  # (1, out)
        base = result - bias if bias is not None else result  # W0 x
        h = _combine(result, base, lora, g, s)  # (..., out)
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


class DoRALinear(LoRALinear):
    """LoRA's A and B (inherited: init, scaling, dropout, rsLoRA) plus a trainable magnitude m (out,).

    detach_norm: treat ||W0 + s B A|| as a constant for autograd (the paper's choice and peft's); False
                 differentiates through it (same outputs, different gradients, more memory).
    norm:        "exact" builds W0 + s B A (out, in) to take its row norms, as peft does (bit for bit equal to
                 peft); "factored" gets the same norms from (out, r) and (r, r) products (equal within float
                 rounding; no (out, in) matrix from A and B, though a half-precision or 4-bit W0 is still cast
                 or dequantized to float32 each step; on our CPU the norms alone took 0.37x-0.38x the exact ones',
                 saving about 1% of a step; on an H100 the step time did not change).
    fused:       False: autograd keeps W0 x and B A x for the backward, as in peft (bit for bit equal to peft).
                 True: one autograd step keeps only the output (module docstring); the same outputs as with
                 fused=False, gradients equal within float rounding, one (tokens, out) tensor less per layer.
                 Needs detach_norm=True and every m != 0; with dropout active it falls back to the False path
                 (W0 x is then computed on the dropped input).
    """

    use_dora = True
    PEFT_NAMES = {**LoRALinear.PEFT_NAMES, "magnitude": "lora_magnitude_vector"}

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 detach_norm: bool = True, norm: str = "exact", fused: bool = False):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
        if fused and not detach_norm:
            raise ValueError("fused=True treats the norm as a constant for autograd; it needs detach_norm=True. "
                             "Use fused=False to differentiate through the norm.")
        super().__init__(base, r, alpha, dropout=dropout, rslora=rslora)
        self.detach_norm, self.norm, self.fused = detach_norm, norm, fused
        with torch.no_grad():
            # m = ||W0 + s B A|| = ||W0|| row by row, since B = 0: then W' = W0 at the start. peft takes this norm in
            # the base's dtype on a float base (it moves the new adapter to that dtype first) and in float32 on a
            # 4-bit base (whose packed weight is no float to move to); we do the same, so our m equals peft's.
            weight = base_weight(base)  # (out, in)
            if self.quantized_base:
                weight = weight.float()
            self.magnitude = nn.Parameter(torch.linalg.norm(weight, dim=1).to(self.lora_A.dtype))  # (out,)
        self._merged_norm = None
        self._weight_sq = None  # ||W0||^2 per row, float32, kept for norm="factored" (W0 is frozen)

    def lora_weight(self) -> torch.Tensor:
        """B A, as (out, in). peft computes it as B(A(I))^T, an identity matmul; so do we, for the same rounding."""
        eye = torch.eye(self.in_features, device=self.lora_A.device, dtype=self.lora_A.dtype)  # (in, in)
        return F.linear(F.linear(eye, self.lora_A), self.lora_B).T  # (in, r) -> (in, out) -> (out, in)

    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A|| for each output row, in the adapter's dtype: (out,)."""
        if self.norm == "factored":
            return self.factored_norm()
        weight = base_weight(self.base_layer).to(self.lora_A.dtype)  # (out, in)
        return torch.linalg.norm(weight + self.scaling * self.lora_weight(), dim=1)  # (out,)

    def factored_norm(self) -> torch.Tensor:
        """The same row norms from small products (module docstring): no (out, in) matrix is built from A and B."""
        A, B, s = self.lora_A, self.lora_B, self.scaling
        weight = base_weight(self.base_layer).to(A.dtype)  # (out, in); a copy only for a half-precision or 4-bit base
        if self._weight_sq is None or self._weight_sq.device != weight.device:
            self._weight_sq = torch.linalg.vector_norm(weight.detach(), dim=1).pow(2)  # ||W0||^2       (out,)
        # 2 s rowdot(W0, B A) + s^2 ||B A||^2 = rowsum(B * (2 s W0 A^T + s^2 B (A A^T))): one (out, r) matrix,
        # built by one addmm, and one row-wise dot product (few kernels: on a GPU each launch costs time)
        inner = torch.addmm(weight @ A.T, B, A @ A.T, beta=2 * s, alpha=s * s)  # (out, r)
        # clamp: the terms can cancel to a tiny negative number by rounding; a norm is never negative
        return (self._weight_sq + torch.linalg.vecdot(B, inner)).clamp(min=0).sqrt()  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # W0 x + b                                   (..., out)
        if self.merged:
            return result
        x = x.to(self.lora_A.dtype)
        if self.detach_norm:  # section 4.3: the norm is a constant for autograd, so build it without a graph
            with torch.no_grad():
                norm = self.weight_norm()  # (out,)
        else:
            norm = self.weight_norm()
        dropping = isinstance(self.lora_dropout, nn.Dropout) and self.training
        if dropping:
            x = self.lora_dropout(x)
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)  # B A x                  (..., out)
        if self.fused and not dropping:  # one autograd step that keeps only the output (module docstring)
            return _DoRAOutput.apply(result, lora, self.magnitude, norm, self.base_layer.bias, self.scaling)

        if dropping:
            base = F.linear(x, base_weight(self.base_layer).to(x.dtype))  # W0 dropout(x), no bias
        else:
            bias = self.base_layer.bias
            base = result - bias if bias is not None else result  # W0 x, reused
        scale = (self.magnitude / norm).view(1, -1)  # m / ||W0 + s B A||           (1, out)
        # h = W0 x + b + (m/n - 1) W0 x + (m/n) s B A x
        return _combine(result, base, lora, scale, self.scaling)

    def effective_weight(self) -> torch.Tensor:
        """W' = (m / ||W0 + s B A||) * (W0 + s B A), (out, in), in float32."""
        if self.merged:
            return base_weight(self.base_layer).float()
        directional = base_weight(self.base_layer).float() + self.delta_weight()  # W0 + s B A
        return (self.magnitude / torch.linalg.norm(directional, dim=1)).view(-1, 1) * directional

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- (m / ||W0 + s B A||) * (W0 + s B A), as peft computes it; the norm is kept for `unmerge`."""
        self._check_can_merge()
        weight = base_weight(self.base_layer)
        delta = self.delta_weight()  # s B A, float32                             (out, in)
        norm = torch.linalg.norm(weight + delta, dim=1)  # (out,)
        self._merged_norm = norm
        factor = (self.magnitude / norm).view(-1, 1)  # (out, 1)
        weight.copy_((factor * (weight + delta)).to(weight.dtype))
        self._weight_sq = None  # W0 changed
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W' / (m / n) - s B A, with the n kept by `merge`."""
        if not self.merged:
            raise RuntimeError("This DoRALinear is not merged; there is nothing to unmerge.")
        weight = base_weight(self.base_layer)
        factor = (self.magnitude / self._merged_norm).view(-1, 1)
        weight.copy_((weight / factor - self.delta_weight()).to(weight.dtype))
        self._merged_norm = self._weight_sq = None
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + f", detach_norm={self.detach_norm}, norm={self.norm!r}, fused={self.fused}"
