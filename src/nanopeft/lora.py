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

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LoRAOptions:
    """LoRA's own options (r and alpha are every method's). A field's `peft` metadata names peft's LoraConfig field."""

    dropout: float = field(default=0.0, metadata={"peft": "lora_dropout"})  # on the LoRA branch's input only
    rslora: bool = field(default=False, metadata={"peft": "use_rslora"})  # scale by alpha / sqrt(r), not alpha / r

    def check(self) -> None:
        """Every check of these options, in one place: a ValueError that says what to pass instead."""
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {d!r}.")
        if not isinstance(self.rslora, bool):
            raise ValueError(f"rslora must be True or False, got {self.rslora!r}.")


class LoRALinear(nn.Module):
    """A frozen `base` linear layer plus a trainable low-rank update.

    base:    the pretrained layer: an `nn.Linear` (weight W0 of shape (out, in)), transformers' `Conv1D` (GPT-2;
             the same layer with its weight stored transposed, (in, out)), or a 4-bit `LinearNF4` (QLoRA).
    r:       the rank of the update, r >= 1 (above min(in, out) it adds nothing, as in peft).
    alpha:   the update is scaled by alpha / r (or alpha / sqrt(r) with `rslora`).
    dropout: dropout probability on the LoRA branch's input only; the base path never sees it.

    A and B are kept in float32 whatever the base's dtype (as peft does): the input is cast to float32 for the
    LoRA branch and the sum is cast back to the base output's dtype.
    """

    # What the rest of the package reads about a method (the table of methods is METHODS in adapters.py):
    name = "lora"  # add_adapters(model, "lora")
    title = "LoRA"  # how tables and plots call it
    peft_config = {"use_dora": False, "init_lora_weights": True}  # the LoraConfig fields that select it (peft's defaults)
    PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}  # our parameter -> its key in a peft file
    Options = LoRAOptions  # the method's own options
    reference = "peft"  # what tests/test_methods.py checks it against
    random_init = True  # A is drawn at random (the tests replay peft's draws to compare equal weights)

    @classmethod
    def check_base(cls, base: nn.Module, r: int) -> None:
        """Raise if this method cannot wrap `base` at rank r (add_adapters asks before it changes anything)."""
        features(base)  # a TypeError naming the layer's type if LoRA cannot wrap it

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = features(base)
        check_hyperparameters(r, alpha)
        LoRAOptions(dropout, rslora).check()
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.dropout, self.rslora = r, alpha, dropout, rslora
        # scaling = alpha / r      (rsLoRA: alpha / sqrt(r))
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        A, B = torch.empty(r, self.in_features), torch.empty(self.out_features, r)  # (r, in), (out, r)
        # initialize A the same way as the default for nn.Linear and B to zero: B A = 0, the model starts as the base
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)
        # drawn on the CPU, so that a seed gives the same A on every device; then moved to the base's device
        self.lora_A = nn.Parameter(A.to(base.weight.device))
        self.lora_B = nn.Parameter(B.to(base.weight.device))
        self.merged = False

    @property
    def options(self):
        """This layer's options as its method's Options dataclass."""
        return self.Options(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self.Options)})

    # Models that look inside a layer (T5 reads `wo.weight.dtype`) see the wrapped layer's tensors, as with peft.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def quantized_base(self) -> bool:
        """True on a 4-bit base (QLoRA): its weight is rebuilt from codes, never written to."""
        return is_4bit(self.base_layer)

    def delta_weight(self) -> torch.Tensor:
        """The update folded into W0 by `merge()`: (alpha / r) * B @ A, (out, in), in float32."""
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
        update = self.lora_branch(x.to(self.lora_A.dtype))  # (alpha / r) B A x, in float32
        if self.quantized_base:
            # peft's 4-bit layer rounds the update to the output's dtype before adding it; its full-precision layer
            # adds in float32 and rounds once (below). Both orders are copied so half-precision outputs match peft's.
            return result + update.to(result.dtype)
        # h = W0 x + b + (alpha / r) * B A x
        return (result + update).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + (alpha / r) B A. The layer then computes the same function with one matmul."""
        self._check_can_merge()
        weight = base_weight(self.base_layer)  # (out, in); for Conv1D a transposed view of its (in, out) weight
        # The float32 update is added in float32 and rounded once to the weight's dtype (as peft's merge does).
        weight += self.delta_weight()
        self.merged = True

    def _check_can_merge(self) -> None:
        if self.merged:
            raise RuntimeError(f"This {type(self).__name__} is already merged; call unmerge() first.")
        if self.quantized_base:
            raise ValueError(
                "The base layer is 4-bit (LinearNF4): W0 + s B A does not fit on the NF4 grid, so it cannot be merged "
                "in place. Use nanopeft.qlora.merge_quantized(model, requantize=False) to keep the merged weights in "
                "high precision, or requantize=True to store them in NF4 again (the rounding error is reported).")

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - (alpha / r) B A: back to the frozen base plus a separate update."""
        if not self.merged:
            raise RuntimeError(f"This {type(self).__name__} is not merged; there is nothing to unmerge.")
        weight = base_weight(self.base_layer)
        # peft rounds the update to the weight's dtype before subtracting; so do we, to give back peft's weights.
        # (In half precision W0 is therefore recovered only up to rounding: keep a copy if you need it exactly.)
        weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    @classmethod
    def parameter_shapes(cls, r: int, in_features: int, out_features: int) -> dict:
        """{parameter name: shape} of this method's adapter at rank r (what a loaded file is checked against)."""
        return {"lora_A": (r, in_features), "lora_B": (out_features, r)}

    def saved_as(self):
        """(class, r, alpha, {our parameter name: tensor}): what `save_adapter` writes for this layer."""
        return type(self), self.r, self.alpha, {name: getattr(self, name) for name in self.PEFT_NAMES}

    def restore_base(self) -> nn.Module:
        """The base layer as it was before this adapter wrapped it (what `remove_adapters(merge=False)` puts back)."""
        if self.merged:
            self.unmerge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.rslora}, merged={self.merged}"


def is_conv1d(layer: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 and its family): a linear layer that stores its weight transposed, (in, out),
    and computes x @ W + b. peft calls this layout `fan_in_fan_out=True`. Recognised by its class name and its `nf`
    (number of outputs) attribute, so that this file needs only torch."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def is_4bit(layer: nn.Module) -> bool:
    """A 4-bit layer (QLoRA's `LinearNF4`, qlora.py): it says so (`is_4bit = True`) and rebuilds its weight with
    `dequantize()`. Recognised by that attribute, so that this file needs only torch."""
    return getattr(layer, "is_4bit", False) is True


def features(layer: nn.Module) -> tuple:
    """(in_features, out_features) of a layer LoRA can wrap; a TypeError naming the layer's type otherwise."""
    if is_conv1d(layer):
        return tuple(layer.weight.shape)  # stored (in, out)
    if isinstance(layer, nn.Linear) or is_4bit(layer):
        return layer.in_features, layer.out_features
    raise TypeError(f"LoRA adapts nn.Linear, transformers' Conv1D and LinearNF4 layers, not {type(layer).__name__}.")


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight W0 as (out, in): the tensor merges write to (for a Conv1D, a transposed view of its
    stored weight); for a 4-bit base (`LinearNF4`), a dequantized copy in the original dtype (QLoRA: the adapters see
    the same W0 the forward pass uses)."""
    if is_4bit(base):
        return base.dequantize()
    return base.weight.T if is_conv1d(base) else base.weight


def check_hyperparameters(r, alpha) -> None:
    """Clear errors for ranks and alphas that cannot work. (An r above min(in, out) works, as in peft: B A then has
    rank min(in, out) and some of A and B is redundant.)"""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}.")
