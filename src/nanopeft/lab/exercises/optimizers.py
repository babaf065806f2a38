"""Grader for LoRA+ parameter groups written by the learner, against peft's `create_loraplus_optimizer`.

    check_loraplus(my_groups)   # my_groups(model, lr: float, ratio: float) -> list of {"params": [...], "lr": ...}

The model is a tiny Llama with DoRA adapters (so it has A, B and a 1-D magnitude per layer). The grader compares
the learning rate every trainable parameter gets in the learner's groups with the one peft's groups give it.
"""
from __future__ import annotations

import torch

from ...adapters import add_adapters
from ..models import tiny_llama
from .report import CRASHED, Report, attempt

LR, RATIO = 1e-3, 16.0


def _lrs(groups, default_lr):
    """{id(parameter): lr} from optimizer-style groups, and the ids that appear more than once."""
    out, repeated = {}, set()
    for group in groups:
        for p in group["params"]:
            if id(p) in out:
                repeated.add(id(p))
            out[id(p)] = group.get("lr", default_lr)
    return out, repeated


def check_loraplus(fn) -> Report:
    """Grade fn(model, lr, ratio) -> list of parameter-group dicts (each with "params" and "lr")."""
    from peft.optimizers import create_loraplus_optimizer  # optional reference library, imported where it is used

    report = Report("LoRA+ groups")
    torch.manual_seed(0)
    model = add_adapters(tiny_llama(num_hidden_layers=1), "dora", r=4, alpha=8, targets=["q_proj", "v_proj"])
    names = {id(p): n for n, p in model.named_parameters()}
    groups = attempt(report, f"{getattr(fn, '__name__', 'fn')}(model, lr={LR}, ratio={RATIO})", fn, model, LR, RATIO)
    if groups is CRASHED:
        return report
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) and "params" in g for g in groups):
        report.fail("return a list of dicts, each with 'params' (a list of tensors) and 'lr', as optimizers take them")
        return report
    groups = [{**g, "params": list(g["params"])} for g in groups]
    if attempt(report, "building torch.optim.AdamW from your groups", torch.optim.AdamW, groups, lr=LR) is CRASHED:
        return report
    mine, repeated = _lrs(groups, LR)
    reference, _ = _lrs(create_loraplus_optimizer(model, torch.optim.SGD, lr=LR, loraplus_lr_ratio=RATIO).param_groups,
                        LR)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    frozen = [names[i] for i in mine if i not in trainable]
    missing = [names[i] for i in trainable if i not in mine]
    report.check(not repeated, "each parameter is in one group", f"{len(repeated)} parameters are in more than one "
                 f"group, e.g. {names[next(iter(repeated))] if repeated else ''}")
    report.check(not missing, "every trainable parameter is in a group",
                 f"{len(missing)} trainable parameters are in no group, e.g. {missing[:2]}: each needs a learning rate")
    report.check(not frozen, "no frozen parameter is in a group",
                 f"{len(frozen)} frozen parameters (the base model) are in your groups, e.g. {frozen[:2]}: leave "
                 f"out what does not train")
    wrong = {i: mine[i] for i in trainable if i in mine and abs(mine[i] - reference[i]) > 1e-12 * reference[i]}
    report.data = {"peft's learning rate": [reference[i] for i in trainable if i in mine],
                   "your learning rate": [mine[i] for i in trainable if i in mine]}
    if not wrong:
        if not (missing or frozen or repeated):
            report.check(True, "every parameter gets peft's learning rate: A at lr, B and 1-D parameters at "
                               "lr * ratio", "")
        return report
    kinds = {}
    for i, lr in wrong.items():
        name = names[i]
        kind = "B" if "lora_B" in name else ("magnitude" if "magnitude" in name else "A")
        kinds.setdefault(kind, set()).add(lr / LR)
    if "B" in kinds:
        factors = kinds["B"]
        if factors == {1.0}:
            report.fail("B's learning rate must be ratio times A's: you gave B the same rate as A")
        elif all(abs(f - 1 / RATIO) < 1e-9 for f in factors):
            report.fail("B's learning rate must be ratio times A's: you divided lr by the ratio instead")
        else:
            report.fail(f"B's learning rate must be ratio times A's (lr * {RATIO:g}); yours is lr times "
                        f"{sorted(factors)}")
    if "A" in kinds:
        report.fail(f"A's learning rate must be lr itself; yours is lr times {sorted(kinds['A'])}")
    if "magnitude" in kinds:
        report.fail("1-D parameters such as DoRA's magnitude go in B's fast group (lr * ratio), as in peft")
    return report
