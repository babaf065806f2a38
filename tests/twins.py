"""Shared by the reference tests: nanopeft.lab.twins builds the twins; here, the assertion."""
import torch

from nanopeft import adapter_layers
from nanopeft.lab.twins import compare_with_peft, peft_params, peft_twin

TARGETS = ("q_proj", "v_proj")


def peft_layer(peft_model, path):
    return peft_model.get_submodule("base_model.model." + path)


def twin_models(base, seed=0, method="lora", **kw):
    kw.setdefault("targets", TARGETS)
    return peft_twin(base, method=method, seed=seed, **kw)


def assert_matches_peft(ours, theirs, ids, atol=1e-6):
    """Equal logits and equal gradients of every adapter parameter (A, B and, for DoRA, m), within atol."""
    diffs = compare_with_peft(ours, theirs, ids)
    names = {"logits"} | {name for path in adapter_layers(ours) for name in peft_params(theirs, path)}
    assert set(diffs) == names, diffs
    assert all(d <= atol for d in diffs.values()), diffs


def snapshot(model):
    """Every module's type and every parameter's value and requires_grad flag (what a refused call must not change)."""
    return {"modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}}


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["modules"] == snap["modules"]
    for n, (t, rg) in snap["params"].items():
        assert torch.equal(now["params"][n][0], t) and now["params"][n][1] == rg, n
