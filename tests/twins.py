"""Shared by the reference tests: the same base model adapted by nanopeft and by peft, with equal weights."""
import copy

import torch
from peft import LoraConfig, get_peft_model

from nanopeft import add_adapters, adapter_layers

TARGETS = ("q_proj", "v_proj")


def peft_layer(peft_model, path):
    return peft_model.get_submodule("base_model.model." + path)


def peft_params(peft_model, path):
    """{our name: peft's parameter} for one adapted layer."""
    ref = peft_layer(peft_model, path)
    out = {"lora_A": ref.lora_A["default"].weight, "lora_B": ref.lora_B["default"].weight}
    if "default" in getattr(ref, "lora_magnitude_vector", {}):
        out["magnitude"] = ref.lora_magnitude_vector["default"].weight
    return out


def twin_models(base, seed=0, method="lora", **kw):
    """Our model and peft's, built from the same base with the same seed, with B made non-zero (and DoRA's
    magnitude moved off its initial value), the same in both, so that every check sees a real update."""
    kw = {"r": 8, "alpha": 16, "targets": TARGETS, "dropout": 0.0, "rslora": False, **kw}
    torch.manual_seed(seed)
    ours = add_adapters(copy.deepcopy(base), method=method, **kw)
    torch.manual_seed(seed)
    targets = kw["targets"] if kw["targets"] == "all-linear" else list(kw["targets"])
    config = LoraConfig(r=kw["r"], lora_alpha=kw["alpha"], target_modules=targets, lora_dropout=kw["dropout"],
                        use_rslora=kw["rslora"], use_dora=method == "dora")
    theirs = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for path, layer in adapter_layers(ours).items():
            refs = peft_params(theirs, path)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            refs["lora_B"].copy_(layer.lora_B)
            if method == "dora":
                layer.magnitude.mul_(1 + 0.1 * torch.randn(layer.magnitude.shape, generator=g))
                refs["magnitude"].copy_(layer.magnitude)
    return ours, theirs


def forward_backward(model, ids, seed=123):
    torch.manual_seed(seed)  # the same dropout masks in both models
    logits = model(input_ids=ids).logits
    (logits.float() ** 2).mean().backward()
    return logits.detach()


def assert_matches_peft(ours, theirs, ids, atol=1e-6):
    """Equal logits and equal gradients of every adapter parameter (A, B and, for DoRA, m)."""
    ours.train(), theirs.train()
    a, b = forward_backward(ours, ids), forward_backward(theirs, ids)
    torch.testing.assert_close(a, b, rtol=0, atol=atol)
    layers = adapter_layers(ours)
    assert layers
    for path, layer in layers.items():
        for name, ref in peft_params(theirs, path).items():
            mine = getattr(layer, name)
            assert mine.grad is not None and mine.grad.abs().sum() > 0, (path, name)
            torch.testing.assert_close(mine.grad, ref.grad, rtol=0, atol=atol)
