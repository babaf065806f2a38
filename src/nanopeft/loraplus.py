"""LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou, Ghosh and Yu, 2024, arXiv:2402.12354).

LoRA trains A and B with one learning rate. But they are not alike: B starts at zero and A at a random matrix, and
in a wide layer an update of B moves the output far less than the same-sized update of A does (A's update is
multiplied by B, which is tiny early on; B's update is multiplied by A x, which is not). With one learning rate,
either B learns too slowly or A too fast. LoRA+ simply gives B a larger learning rate:

    eta_B = ratio * eta_A            ratio ~ 16 (2^4) works well for language models

Nothing else changes: same layers, same parameters, same cost per step. Only the optimizer's parameter groups do.
The groups are peft's (`peft.optimizers.create_loraplus_optimizer`), in its order:

    A        every trainable parameter that is not B and not 1-D (the lora_A matrices)    lr,          weight_decay
    B        lora_B, and every 1-D trainable parameter (DoRA's magnitude)                 lr * ratio,  weight_decay
    B, no decay: those of B that are biases or LayerNorm parameters                       lr * ratio,  0
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .adapters import adapter_layers


def _no_decay(model: nn.Module) -> set:
    """Names of parameters that never get weight decay: biases and LayerNorm parameters (transformers' rule,
    which peft uses; note that LlamaRMSNorm is not a LayerNorm there, so its weight does get decay)."""
    out = set()
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, nn.LayerNorm) or "bias" in full:
                out.add(full)
    return out


def _check(model, lr, ratio) -> None:
    for name, value in (("lr", lr), ("ratio", ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}. LoRA+ uses lr_B = ratio * lr_A with "
                             f"ratio around 16; ratio=1 is plain LoRA.")
    if not adapter_layers(model):
        raise ValueError("This model has no adapters, so there is no A and B to give different learning rates: call "
                         "nanopeft.add_adapters(model, ...) first.")


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16, weight_decay: float = 0.0) -> list:
    """The optimizer parameter groups of LoRA+ for every trainable parameter of `model` (empty groups left out).

    Each group is a dict an optimizer accepts: `params`, `lr`, `weight_decay`, plus `name` ("A", "B",
    "B_no_decay") and `param_names` so that a learner can print which tensor went where.
    """
    _check(model, lr, ratio)
    no_decay = _no_decay(model)
    groups = {"A": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:  # B, and vectors such as DoRA's magnitude: the fast group
            groups["B_no_decay" if name in no_decay else "B"].append((name, p))
        else:  # A (and any other matrix that trains)
            groups["A"].append((name, p))
    settings = {"A": (lr, weight_decay), "B": (lr * ratio, weight_decay), "B_no_decay": (lr * ratio, 0.0)}
    return [{"name": g, "params": [p for _, p in items], "param_names": [n for n, _ in items],
             "lr": settings[g][0], "weight_decay": settings[g][1]}
            for g, items in groups.items() if items]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls=torch.optim.AdamW, lr: float = 2e-4, ratio: float = 16,
                              weight_decay: float = 0.0, **kwargs) -> torch.optim.Optimizer:
    """`optimizer_cls` over `loraplus_param_groups(model, lr, ratio, weight_decay)`; other keywords (betas, eps)
    go to the optimizer. peft's equivalent: `create_loraplus_optimizer(peft_model, optimizer_cls, lr=lr,
    loraplus_lr_ratio=ratio, loraplus_weight_decay=weight_decay)` (peft ignores a plain `weight_decay=`)."""
    return optimizer_cls(loraplus_param_groups(model, lr, ratio, weight_decay), lr=lr, **kwargs)
