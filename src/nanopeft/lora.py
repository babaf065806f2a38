"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

Freeze a pretrained weight W0 (out, in) and learn a low-rank update instead of a full one:

    h = W0 x + (alpha / r) * B A x        A: (r, in), B: (out, r), r << min(in, out)

B starts at zero, so at step 0 the model is exactly the pretrained one; A starts random (Kaiming-uniform, as
`nn.Linear` does). Only A and B train: r * (in + out) numbers instead of in * out. After training the update can
be folded into the weight, W = W0 + (alpha / r) B A, so inference costs nothing extra (`merge()`).

rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead, which keeps the update's size
stable as r grows.

The names `lora_A`, `lora_B`, `scaling` and `base_layer` are those of loralib and peft, so our weights map onto a
peft adapter file by a rename (`lora_A` <-> `lora_A.weight`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A frozen `base` linear layer plus a trainable low-rank update.

    base:    the pretrained layer, W0 (out, in) and optional bias; frozen here.
    r:       the rank of the update, 1 <= r <= min(in, out).
    alpha:   the update is scaled by alpha / r (or alpha / sqrt(r) with `rslora`).
    dropout: dropout probability on the LoRA branch's input only; the base path never sees it.
    init:    "peft" replays peft's random-number order, so with the same seed `lora_A` equals peft's bit for bit;
             "kaiming" draws A once (same distribution, different numbers).

    A and B are kept in float32 whatever the base's dtype (as peft does): the input is cast to float32 for the
    LoRA branch and the sum is cast back to the base output's dtype.
    """

    # our parameter name -> the key suffix in a peft adapter file
    PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "peft"):
        super().__init__()
        check_hyperparameters(r, alpha, dropout, base.in_features, base.out_features)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        # scaling = alpha / r      (rsLoRA: alpha / sqrt(r))
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        A, B = init_lora_weights(self.in_features, self.out_features, r, init)
        device, dtype = base.weight.device, base.weight.dtype  # a 4-bit base (LinearNF4) stores uint8 here
        if init == "peft" and dtype.is_floating_point:
            # peft first moves a new adapter to the base layer's dtype and only then up-casts it to float32, so on a
            # float16/bfloat16 base its A has been rounded to that precision. Do the same to get the same A.
            # (A 4-bit base's packed weight is not a float, and peft then moves the adapter without a cast.)
            A = A.to(dtype).float()
        self.lora_A = nn.Parameter(A.to(device))  # (r, in)
        self.lora_B = nn.Parameter(B.to(device))  # (out, r), zeros
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update folded into W0 by `merge()`: (alpha / r) * B @ A, in float32."""
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    def effective_weight(self) -> torch.Tensor:
        """The weight this layer applies: W0 + (alpha / r) B A, (out, in), in float32."""
        if self.merged:
            return base_weight(self.base_layer).float()
        return base_weight(self.base_layer).float() + self.delta_weight()

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) * B A dropout(x), for x already in the adapter's dtype."""
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling  # (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # W0 x + b                                   (..., out)
        if self.merged:  # W0 already holds the update
            return result
        # h = W0 x + b + (alpha / r) * B A x, the branch computed in float32
        return (result + self.lora_branch(x.to(self.lora_A.dtype))).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + (alpha / r) B A. The layer then computes the same function with one matmul."""
        self._check_can_merge()
        weight = base_weight(self.base_layer)
        # The float32 update is added in float32 and rounded once to the weight's dtype (as peft's merge does).
        weight += self.delta_weight()
        self.merged = True

    def _check_can_merge(self) -> None:
        if self.merged:
            raise RuntimeError(f"This {type(self).__name__} is already merged; call unmerge() first.")
        check_mergeable(self.base_layer)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - (alpha / r) B A: back to the frozen base plus a separate update."""
        if not self.merged:
            raise RuntimeError("This LoRA layer is not merged; there is nothing to unmerge.")
        weight = base_weight(self.base_layer)
        # peft rounds the update to the weight's dtype before subtracting; so do we, to give back peft's weights.
        # (In half precision W0 is therefore recovered only up to rounding: keep a copy if you need it exactly.)
        weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.rslora}, merged={self.merged}"


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight W0 (out, in): the tensor merges write to; for a 4-bit base (`LinearNF4`), a
    dequantized copy in the original dtype (QLoRA: the adapters see the same W0 the forward pass uses)."""
    if hasattr(base, "dequantize"):
        return base.dequantize()
    return base.weight


def check_mergeable(base: nn.Module) -> None:
    """In-place merging needs a full-precision base weight; a 4-bit one cannot hold W0 + s B A exactly."""
    if hasattr(base, "dequantize"):
        raise ValueError(
            "The base layer is 4-bit (LinearNF4): W0 + s B A does not fit on the NF4 grid, so it cannot be merged in "
            "place. Use nanopeft.nf4.merge_quantized(model, requantize=False) to keep the merged weights in high "
            "precision, or requantize=True to store them in NF4 again (the rounding error is reported).")


def init_lora_weights(in_features: int, out_features: int, r: int, init: str = "peft"):
    """Initial A (r, in), Kaiming-uniform like `nn.Linear`, and B (out, r), zeros; drawn on the CPU in float32.

    Why "peft" draws three times: peft builds `lora_A = nn.Linear(in, r)` and `lora_B = nn.Linear(r, out)`, whose
    constructors each initialise their weight (consuming random numbers), and only then re-draws A with
    `kaiming_uniform_` and zeroes B. To get peft's A from the same seed we must consume the same numbers in the
    same order.
    """
    A = torch.empty(r, in_features)  # (r, in)
    B = torch.empty(out_features, r)  # (out, r)
    if init == "peft":
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear(in, r).__init__ draws this, then it is overwritten
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))  # nn.Linear(r, out).__init__ draws this, then B is zeroed
    elif init != "kaiming":
        raise ValueError(f"init must be 'peft' or 'kaiming', got {init!r}.")
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # the A that is kept
    nn.init.zeros_(B)  # B = 0, so B A = 0 and the model starts as the pretrained one
    return A, B


def check_hyperparameters(r, alpha, dropout, in_features, out_features) -> None:
    """Clear errors for ranks, alphas and dropouts that cannot work."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}.")
    if r > min(in_features, out_features):
        raise ValueError(
            f"r={r} is larger than this layer allows: a ({out_features} x {in_features}) weight has rank at most "
            f"{min(in_features, out_features)}, so B A cannot use rank {r}. Choose r <= {min(in_features, out_features)}."
        )
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
