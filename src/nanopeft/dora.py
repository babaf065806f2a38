"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).

Write each row of a weight (one output neuron) as a length times a direction, and adapt the two separately:

    W' = m * (W0 + s B A) / ||W0 + s B A||          m: (out,), the norm taken per output row

The direction is LoRA's W0 + s B A, normalised row by row; the magnitude m is a trainable vector, initialised to
the row norms of W0 so that at step 0 W' = W0 (B = 0). (The paper writes weights as (in, out) and so calls this a
"column" norm; on PyTorch's (out, in) weights it is the norm of each row.)

The norm ||W0 + s B A|| is treated as a constant in the backward pass (`detach_norm=True`, the paper's section 4.3):
the forward pass is unchanged, the gradients differ, and no graph is kept through the (out, in) weight.

As in peft, the layer never builds W' for the forward pass. Since W' x = (m / n) * (W0 x + s B A x):

    h = W0 x + b + (m / n - 1) * W0 x + (m / n) * s * B A x

which reuses the base output W0 x + b (bias removed) when there is no dropout; with dropout, W0 is applied again
to the dropped input, as peft does. Two options compute the same function with less (`dora_fast.py`):
norm="factored" takes the row norms from (out, r) and (r, r) products, and fused=True keeps one (tokens, out)
tensor per layer for the backward instead of two.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dora_fast import FusedDoRAOutput, factored_norm
from .lora import LoRALinear, LoRAOptions, base_weight


@dataclass(frozen=True)
class DoRAOptions(LoRAOptions):
    """DoRA's options: LoRA's, and how the norm is computed and differentiated."""

    detach_norm: bool = True  # the norm is a constant for autograd (the paper's section 4.3 and peft's choice)
    norm: str = "exact"  # "exact": build W0 + s B A, as peft does; "factored": from small products (dora_fast.py)
    fused: bool = False  # True: the backward keeps only the output (dora_fast.py); needs detach_norm

    def check(self) -> None:
        super().check()
        if not isinstance(self.detach_norm, bool) or not isinstance(self.fused, bool):
            raise ValueError(f"detach_norm and fused must be True or False, got {self.detach_norm!r}, {self.fused!r}.")
        if self.norm not in ("exact", "factored"):
            raise ValueError(f"norm must be 'exact' or 'factored', got {self.norm!r}.")
        if self.fused and not self.detach_norm:
            raise ValueError("fused=True treats the norm as a constant for autograd; it needs detach_norm=True. "
                             "Use fused=False to differentiate through the norm.")


class DoRALinear(LoRALinear):
    """LoRA's A and B (inherited: init, scaling, dropout, rsLoRA) plus a trainable magnitude m (out,).

    detach_norm: treat ||W0 + s B A|| as a constant for autograd (the paper's choice and peft's); False
                 differentiates through it (same outputs, different gradients, more memory).
    norm:        "exact" builds W0 + s B A (out, in) to take its row norms, bit for bit as peft does; "factored"
                 gets the same norms from small products (`dora_fast.factored_norm`; equal within float rounding).
    fused:       True: the backward keeps only the output (`dora_fast.FusedDoRAOutput`): the same outputs, gradients
                 equal within float rounding, one (tokens, out) tensor less per layer. Needs detach_norm=True and
                 every m != 0; with dropout active it falls back to the plain path.

        forward: x (..., in) -> (..., out)
    """

    name, title = "dora", "DoRA"
    peft_config = {"use_dora": True, "init_lora_weights": True}
    PEFT_NAMES = {**LoRALinear.PEFT_NAMES, "magnitude": "lora_magnitude_vector"}
    Options = DoRAOptions

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 detach_norm: bool = True, norm: str = "exact", fused: bool = False):
        DoRAOptions(dropout, rslora, detach_norm, norm, fused).check()
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

    @classmethod
    def parameter_shapes(cls, r: int, in_features: int, out_features: int) -> dict:
        return {**super().parameter_shapes(r, in_features, out_features), "magnitude": (out_features,)}

    def lora_weight(self) -> torch.Tensor:
        """B A, as (out, in). peft computes it as B(A(I))^T, an identity matmul; so do we, for the same rounding."""
        eye = torch.eye(self.in_features, device=self.lora_A.device, dtype=self.lora_A.dtype)  # (in, in)
        return F.linear(F.linear(eye, self.lora_A), self.lora_B).T  # (in, r) -> (in, out) -> (out, in)

    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A|| for each output row, in the adapter's dtype: (out,)."""
        weight = base_weight(self.base_layer).to(self.lora_A.dtype)  # (out, in)
        if self.norm == "factored":  # no (out, in) matrix from A and B (dora_fast.py)
            if self._weight_sq is None or self._weight_sq.device != weight.device:
                self._weight_sq = torch.linalg.vector_norm(weight.detach(), dim=1).pow(2)  # ||W0||^2 (out,)
            return factored_norm(self.lora_A, self.lora_B, self.scaling, weight, self._weight_sq)
        return torch.linalg.norm(weight + self.scaling * self.lora_weight(), dim=1)  # (out,)

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
        if self.fused and not dropping:  # one autograd step that keeps only the output (dora_fast.py)
            return FusedDoRAOutput.apply(result, lora, self.magnitude, norm, self.base_layer.bias, self.scaling)
        if dropping:
            base = F.linear(x, base_weight(self.base_layer).to(x.dtype))  # W0 dropout(x), no bias
        else:
            bias = self.base_layer.bias
            base = result - bias if bias is not None else result  # W0 x, reused
        g = (self.magnitude / norm).view(1, -1)  # m / ||W0 + s B A||                 (1, out)
        # h = W0 x + b + (m/n - 1) W0 x + (m/n) s B A x, in peft's order of operations (the same roundings)
        return (result + ((g - 1) * base + g * lora * self.scaling)).to(result.dtype)

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
