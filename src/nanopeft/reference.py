"""Side by side with the reference library: peft's twin of a nanopeft model, and the comparison of the two.

    ours, theirs = peft_twin(base, method="dora", r=16, alpha=32, targets=("q_proj", "v_proj"), dropout=0.05)
    compare_with_peft(ours, theirs, ids)   # {"logits": max |diff|, "lora_A": ..., "lora_B": ..., "magnitude": ...}

Both models start from copies of the same base with the same seed (so with `init="peft"` their A are equal). B is
then set non-zero, and DoRA's magnitude moved off its start, identically in both: at B = 0 many mistakes would
not show. peft is imported only when these functions run.
"""
from __future__ import annotations

import copy

import torch

from .adapters import add_adapters, adapter_layers


def peft_params(peft_model, path: str) -> dict:
    """{our parameter name: peft's parameter} for the adapted layer at `path`."""
    ref = peft_model.get_submodule("base_model.model." + path)
    out = {"lora_A": ref.lora_A["default"].weight, "lora_B": ref.lora_B["default"].weight}
    if "default" in getattr(ref, "lora_magnitude_vector", {}):
        out["magnitude"] = ref.lora_magnitude_vector["default"].weight
    return out


def peft_twin(base, method: str = "lora", seed: int = 0, r: int = 8, alpha: float = 16, targets=("q_proj", "v_proj"),
              dropout: float = 0.0, rslora: bool = False, perturb: bool = True):
    """(ours, peft's): `base` adapted by nanopeft and by peft's `get_peft_model`, with equal weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    ours = add_adapters(copy.deepcopy(base), method=method, r=r, alpha=alpha, targets=targets, dropout=dropout,
                        rslora=rslora)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets if targets == "all-linear" else list(targets),
                        lora_dropout=dropout, use_rslora=rslora, use_dora=method == "dora")
    theirs = get_peft_model(copy.deepcopy(base), config)
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for path, layer in adapter_layers(ours).items():
                refs = peft_params(theirs, path)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
                refs["lora_B"].copy_(layer.lora_B)
                if "magnitude" in refs:
                    layer.magnitude.mul_(1 + 0.1 * torch.randn(layer.magnitude.shape, generator=g))
                    refs["magnitude"].copy_(layer.magnitude)
    return ours, theirs


def compare_with_peft(ours, theirs, ids, seed: int = 123) -> dict:
    """Forward and backward through both in train mode (same dropout masks); the largest differences of the
    logits and of each adapter parameter's gradient over all layers."""
    logits = []
    for model in (ours, theirs):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # the same dropout masks in both
        out = model(input_ids=ids).logits
        out.float().pow(2).mean().backward()
        logits.append(out.detach())
    diffs = {"logits": (logits[0].float() - logits[1].float()).abs().max().item()}
    for path, layer in adapter_layers(ours).items():
        for name, ref in peft_params(theirs, path).items():
            mine = getattr(layer, name)
            if mine.grad is None or ref.grad is None or mine.grad.abs().sum() == 0:
                raise AssertionError(f"{path}.{name} got no gradient: the comparison would prove nothing.")
            diffs[name] = max(diffs.get(name, 0.0), (mine.grad - ref.grad).abs().max().item())
    return diffs
