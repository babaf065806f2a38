"""PiSSA: Principal Singular Values and Singular Vectors Adaptation (Meng et al., 2024, arXiv:2404.02948).

LoRA starts with B = 0, so B first grows along a random direction A (A's gradient is zero until B moves). PiSSA starts the adapter on the
part of W0 that matters most, its top r singular directions, and freezes the rest:

    W0 = U S V^T                        (the SVD; singular values S sorted, largest first)
    A  = diag(sqrt(S_r / s)) V_r^T   (r, in)    B = U_r diag(sqrt(S_r / s))   (out, r)    so  s B A = U_r S_r V_r^T
    W_res = W0 - s B A                  written back into the frozen base

At step 0 the layer computes W_res x + s B A x = W0 x, as LoRA does, but the gradients now reach the principal
directions at once: the paper reports faster convergence and better final scores than LoRA at the same rank.
The forward, merge, dropout and rsLoRA are LoRA's: this class changes the start, and so what saving writes and what
removing the adapter gives back.

Two consequences to keep in mind:
- The base weight is changed: the adapter only works on W_res. So `save_adapter` writes what peft writes with
  `path_initial_model_for_weight_conversion`: the update as an ordinary LoRA adapter of rank 2r on the untouched
  W0, A' = [A; A0], B' = [B, -B0] (s B' A' = s B A - s B0 A0, with A0, B0 the start; alpha doubles with the rank,
  times sqrt 2 with rsLoRA, so s stays), which peft and nanopeft load onto the original model. `remove_adapters(model)` adds s B0 A0 back (W0 up to float rounding).
- A 4-bit base cannot hold W_res without quantizing it again (the paper's QPiSSA); nanopeft refuses it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .lora import LoRALinear, base_weight, features, is_4bit


class PiSSALinear(LoRALinear):
    """LoRA whose A and B start at the top-r singular triplets of W0, with W0 - s B A left in the frozen base.
    Equal to peft's `LoraConfig(init_lora_weights="pissa")` (the exact SVD).

        forward: x (..., in) -> (..., out)
    """

    name, title = "pissa", "PiSSA"
    peft_config = {"use_dora": False, "init_lora_weights": "pissa"}
    random_init = False  # A and B come from the SVD of W0

    @classmethod
    def check_base(cls, base: nn.Module, r: int) -> None:
        super().check_base(base, r)
        if is_4bit(base):
            raise ValueError("PiSSA writes W0 - s B A back into the base weight, and a 4-bit base cannot hold it "
                             "without quantizing it again (the paper's QPiSSA, not in nanopeft). Use method='lora' "
                             "on a 4-bit base, or PiSSA on a full-precision one.")
        if r > min(features(base)):
            raise ValueError(f"PiSSA starts from the top r singular vectors: r={r} is more than this layer has "
                             f"(min(in, out) = {min(features(base))}).")

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        self.check_base(base, r)
        super().__init__(base, r, alpha, dropout=dropout, rslora=rslora)
        with torch.no_grad():
            weight = base_weight(base)  # (out, in); for GPT-2's Conv1D a transposed view of its weight
            # W0 = U S V^T, in float32 whatever the base's dtype
            U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)  # (out, k), (k,), (k, in)
            root = torch.sqrt(S[:r] / self.scaling)  # sqrt(S_r / s): s B A then gives back U_r S_r V_r^T  (r,)
            A = torch.diag(root) @ Vh[:r]  # (r, in)
            B = U[:, :r] @ torch.diag(root)  # (out, r)
            # W_res = W0 - s B A, rounded once to the base's dtype
            weight.copy_((weight.float() - self.scaling * B @ A).to(weight.dtype))
            if weight.dtype != torch.float32:  # peft then moves the adapter to the base's dtype and back (rounding)
                A, B = A.to(weight.dtype).float(), B.to(weight.dtype).float()
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
        # the start, kept to convert the trained adapter to one for W0 (not saved in the state dict)
        self.register_buffer("lora_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("lora_B0", self.lora_B.detach().clone(), persistent=False)

    def saved_as(self):
        """(class, r, alpha, tensors) for `save_adapter`: the ordinary LoRA adapter of rank 2r on the original W0,
        A' = [A; A0] (2r, in), B' = [B, -B0] (out, 2r). alpha doubles with r (rsLoRA: times sqrt 2), so s stays."""
        alpha = self.alpha * (math.sqrt(2) if self.rslora else 2)
        tensors = {"lora_A": torch.cat([self.lora_A, self.lora_A0], dim=0),
                   "lora_B": torch.cat([self.lora_B, -self.lora_B0], dim=1)}
        return LoRALinear, 2 * self.r, alpha, tensors

    @torch.no_grad()
    def restore_base(self) -> nn.Module:
        """The base with W0 = W_res + s B0 A0 back in it (up to float rounding): what the layer wrapped."""
        base = super().restore_base()
        weight = base_weight(base)
        weight.copy_((weight.float() + self.scaling * self.lora_B0 @ self.lora_A0).to(weight.dtype))
        return base
