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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import METHODS
from .lora import LoRALinear, base_weight


class DoRALinear(LoRALinear):
    """LoRA's A and B (inherited: init, scaling, dropout, rsLoRA) plus a trainable magnitude m (out,).

    detach_norm: treat ||W0 + s B A|| as a constant for autograd (the paper's choice and peft's); False
                 differentiates through it (same outputs, different gradients, more memory).
    """

    PEFT_NAMES = {**LoRALinear.PEFT_NAMES, "magnitude": "lora_magnitude_vector"}

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "peft", detach_norm: bool = True):
        super().__init__(base, r, alpha, dropout=dropout, rslora=rslora, init=init)
        self.detach_norm = detach_norm
        with torch.no_grad():
            # m = ||W0 + s B A|| = ||W0|| row by row, since B = 0: then W' = W0 at the start. Taken in the base's
            # dtype and then up-cast, as peft does (it moves a new adapter to the base's dtype before this step).
            self.magnitude = nn.Parameter(torch.linalg.norm(base_weight(base), dim=1).to(self.lora_A.dtype))  # (out,)
        self._merged_norm = None

    def lora_weight(self) -> torch.Tensor:
        """B A, as (out, in). peft computes it as B(A(I))^T, one identity matmul: the same numbers, bit for bit."""
        eye = torch.eye(self.in_features, device=self.lora_A.device, dtype=self.lora_A.dtype)  # (in, in)
        return F.linear(F.linear(eye, self.lora_A), self.lora_B).T  # (in, r) -> (in, out) -> (out, in)

    def weight_norm(self, lora_weight: torch.Tensor | None = None) -> torch.Tensor:
        """||W0 + s B A|| for each output row, in the adapter's dtype: (out,)."""
        if lora_weight is None:
            lora_weight = self.lora_weight()
        weight = base_weight(self.base_layer).to(self.lora_A.dtype)  # (out, in)
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1)  # (out,)

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
        scale = (self.magnitude / norm).view(1, -1)  # m / ||W0 + s B A||           (1, out)

        if isinstance(self.lora_dropout, nn.Dropout) and self.training:
            x = self.lora_dropout(x)
            base = F.linear(x, base_weight(self.base_layer).to(x.dtype))  # W0 dropout(x), no bias
        else:
            bias = self.base_layer.bias
            base = result - bias if bias is not None else result  # W0 x, reused

        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)  # B A x                  (..., out)
        # h = W0 x + b + (m/n - 1) W0 x + (m/n) s B A x
        return (result + ((scale - 1) * base + scale * lora * self.scaling)).to(result.dtype)

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
        weight.data = (factor * (weight + delta)).to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W' / (m / n) - s B A, with the n kept by `merge`."""
        if not self.merged:
            raise RuntimeError("This DoRA layer is not merged; there is nothing to unmerge.")
        weight = base_weight(self.base_layer)
        factor = (self.magnitude / self._merged_norm).view(-1, 1)
        weight.data = (weight / factor - self.delta_weight()).to(weight.dtype)
        self._merged_norm = None
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + f", detach_norm={self.detach_norm}"


METHODS["dora"] = DoRALinear
