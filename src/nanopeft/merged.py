"""LoRA on part of a fused projection: loralib's `MergedLinear`, as the LoRA paper trained GPT-2.

GPT-2 computes the query, key and value of attention in one fused layer, `c_attn` (768 -> 3 x 768). The LoRA paper
(Hu et al., 2021, section 7.1 and Table 3) adapted only the query and value thirds. The output is split into equal
slices and each enabled slice gets its own low-rank update; the others get none:

    enable_lora = [True, False, True]            q, k, v: adapt q and v, leave k frozen
    h[slice g] = W0[slice g] x + (alpha / r) B_g A_g x      for each enabled g   (A_g: (r, in), B_g: (out/k, r))
    h[slice g] = W0[slice g] x                               for the others

Our tensors, one A and one B per enabled slice stacked on a first axis: `lora_A` (n, r, in), `lora_B` (n, out/k, r),
n = number of enabled slices. loralib stores the same numbers as `lora_A` (n * r, in) and `lora_B` (n * out/k, r)
and multiplies them with a grouped 1-d convolution; `from_loralib` / `to_loralib` reshape between the two.

peft dropped MergedLinear and its adapter format has no way to say "slices 0 and 2 of this layer", so
`save_adapter` refuses these layers with the reason (save the model's state dict with safetensors instead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .lora import LoRALinear, check_hyperparameters, features


@dataclass(frozen=True)
class MergedOptions:
    """Which equal slices of the output to adapt (loralib's `enable_lora`, one True/False per slice), and dropout."""

    enable_lora: tuple = None  # no peft field: peft cannot say which slices
    dropout: float = field(default=0.0, metadata={"peft": "lora_dropout"})

    def check(self, out_features: int | None = None) -> None:
        """A ValueError that says what to pass instead; with `out_features`, also that the slices divide it."""
        e = self.enable_lora
        if e is None:
            raise ValueError("enable_lora is required: one True/False per equal slice of the layer's output, e.g. "
                             "enable_lora=[True, False, True] for GPT-2's fused q, k, v (adapt q and v).")
        if not isinstance(e, (list, tuple)) or len(e) < 2 or not all(isinstance(x, bool) for x in e):
            raise ValueError(f"enable_lora must be a list of at least 2 True/False values (one per slice of the "
                             f"output), got {e!r}. For a layer adapted whole, use method='lora'.")
        if not any(e):
            raise ValueError(f"enable_lora={list(e)} adapts no slice: set at least one entry to True.")
        if out_features is not None and out_features % len(e):
            raise ValueError(f"enable_lora has {len(e)} entries, which do not divide the layer's {out_features} "
                             f"outputs into equal slices.")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {d!r}.")


class MergedLoRALinear(LoRALinear):
    """A frozen fused layer (`nn.Linear`, or transformers' `Conv1D` as in GPT-2) with LoRA on some of its equal
    output slices. Forward, merge and unmerge are LoRALinear's; only the shape of the update differs."""

    name = "merged"
    title = "LoRA on output slices (loralib MergedLinear)"
    peft_config = None  # peft cannot express it: never selected by a LoraConfig, never written as a peft file
    PEFT_NAMES = {}  # nothing of it goes into a peft file
    Options = MergedOptions
    reference = "loralib"  # tests/test_methods.py and tests/test_merged.py compare it with loralib.MergedLinear
    random_init = True

    @classmethod
    def check_base(cls, base: nn.Module, r: int) -> None:
        features(base)

    def __init__(self, base: nn.Module, r: int, alpha: float, enable_lora=None, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = features(base)
        check_hyperparameters(r, alpha)
        enable_lora = tuple(enable_lora) if isinstance(enable_lora, list) else enable_lora
        MergedOptions(enable_lora, dropout).check(self.out_features)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.dropout, self.rslora = r, alpha, dropout, False
        self.enable_lora = enable_lora
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        n, part = sum(enable_lora), self.out_features // len(enable_lora)
        # A as loralib draws its stacked (n * r, in) one: Kaiming-uniform over the fan-in `in`; B zero
        A, B = torch.empty(n * r, self.in_features), torch.zeros(n, part, r)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A = nn.Parameter(A.view(n, r, self.in_features).to(base.weight.device))  # (n, r, in)
        self.lora_B = nn.Parameter(B.to(base.weight.device))  # (n, out/k, r)
        self.merged = False

    def _spread(self, update: torch.Tensor) -> torch.Tensor:
        """(..., n, out/k) updates of the enabled slices -> (..., out), zeros in the slices left alone."""
        full = update.new_zeros(*update.shape[:-2], len(self.enable_lora), update.shape[-1])
        full[..., list(self.enable_lora), :] = update
        return full.flatten(-2)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) * [B_g A_g x for each enabled slice g, 0 elsewhere], for x in the adapter's dtype."""
        ax = torch.einsum("...i,nri->...nr", self.lora_dropout(x), self.lora_A)  # (..., n, r)
        return self._spread(torch.einsum("...nr,nor->...no", ax, self.lora_B)) * self.scaling  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * the stacked B_g A_g placed in their slices: (out, in), zero rows for the frozen slices."""
        per_slice = torch.bmm(self.lora_B, self.lora_A)  # (n, out/k, r) @ (n, r, in) -> (n, out/k, in)
        full = per_slice.new_zeros(len(self.enable_lora), *per_slice.shape[1:])  # (k, out/k, in)
        full[list(self.enable_lora)] = per_slice
        return full.reshape(self.out_features, self.in_features) * self.scaling

    @classmethod
    def parameter_shapes(cls, r: int, in_features: int, out_features: int, enable_lora=(True, True)) -> dict:
        n, part = sum(enable_lora), out_features // len(enable_lora)
        return {"lora_A": (n, r, in_features), "lora_B": (n, part, r)}

    def saved_as(self):
        raise ValueError("peft's adapter format cannot hold LoRA on part of a layer's outputs (loralib's MergedLinear; "
                         "peft has no enable_lora), so save_adapter writes nothing for this model. Save the trained "
                         "tensors with safetensors (safetensors.torch.save_file(model.state_dict(), path)), or merge "
                         "the update into the weights (merge_adapters) and save the model.")

    # --- loralib's layout: lora_A (n * r, in), lora_B (n * out/k, r)
    def to_loralib(self) -> dict:
        n, r = self.lora_A.shape[:2]
        return {"lora_A": self.lora_A.detach().reshape(n * r, -1), "lora_B": self.lora_B.detach().reshape(-1, r)}

    @torch.no_grad()
    def from_loralib(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        self.lora_A.copy_(lora_A.view_as(self.lora_A))
        self.lora_B.copy_(lora_B.view_as(self.lora_B))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, enable_lora={list(self.enable_lora)}, merged={self.merged}"
