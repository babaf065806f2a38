"""LoRA+ against peft 0.21's create_loraplus_optimizer: same parameters in the same groups with the same learning
rates and weight decay, and the same losses over several steps from identical starts."""
import pytest
import torch

from nanopeft import add_adapters, adapter_layers
from nanopeft.loraplus import create_loraplus_optimizer, loraplus_param_groups
from nanopeft.lab.models import tiny_llama, tiny_qwen2
from nanopeft.lab.twins import peft_params, peft_twin, quantized_bases, train_steps
from peft.optimizers import create_loraplus_optimizer as peft_loraplus


def peft_name_map(ours, theirs):
    """id(peft parameter) -> our parameter name, layer by layer."""
    out = {}
    for path, layer in adapter_layers(ours).items():
        for name, ref in peft_params(theirs, path).items():
            out[id(ref)] = f"{path}.{name}"
    return out


def group_signature(optimizer, names):
    """[(sorted parameter names, lr, weight_decay)] of the non-empty groups, in order."""
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
            for g in optimizer.param_groups if g["params"]]


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_groups_equal_peft(method, make, weight_decay):
    ours, theirs = peft_twin(make(), method=method, targets="all-linear")
    opt = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, ratio=16, weight_decay=weight_decay)
    ref = peft_loraplus(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=weight_decay)
    our_names = {id(p): n for n, p in ours.named_parameters()}
    mine = group_signature(opt, our_names)
    theirs_sig = group_signature(ref, peft_name_map(ours, theirs))
    assert mine == theirs_sig
    by_name = {g["name"]: g for g in opt.param_groups}
    assert all("lora_A" in n for n in by_name["A"]["param_names"])
    assert by_name["B"]["lr"] == 16 * by_name["A"]["lr"]
    if method == "dora":  # the 1-D magnitudes join B, as in peft
        assert any(n.endswith("magnitude") for n in by_name["B"]["param_names"])


def test_groups_equal_peft_on_a_4bit_base():
    base = tiny_llama()
    ours_base, theirs_base = quantized_bases(base, double_quant=False)
    ours, theirs = peft_twin(ours_base, method="lora", targets="all-linear", peft_base=theirs_base)
    opt = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, ratio=8)
    ref = peft_loraplus(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8)
    our_names = {id(p): n for n, p in ours.named_parameters()}
    assert group_signature(opt, our_names) == group_signature(ref, peft_name_map(ours, theirs))


def test_layer_norm_and_bias_parameters_land_where_peft_puts_them():
    """Trainable 1-D parameters beyond adapters: biases go to B without decay, RMSNorm weights to B with decay
    (transformers counts only nn.LayerNorm as a norm)."""
    ours, theirs = peft_twin(tiny_qwen2(), method="lora", targets="all-linear")
    for model in (ours, theirs):
        for n, p in model.named_parameters():
            if n.endswith("q_proj.bias") or n.endswith("q_proj.base_layer.bias") or n.endswith("norm.weight"):
                p.requires_grad_(True)
    opt = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, ratio=16, weight_decay=0.05)
    ref = peft_loraplus(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.05)
    ours_by_group = [sorted(n.replace(".base_layer", "") for n in g["param_names"]) for g in opt.param_groups]
    theirs_names = {id(p): n.replace("base_model.model.", "").replace(".base_layer", "").replace(".default", "")
                    .replace(".weight", "") if "lora_" in n else n.replace("base_model.model.", "").replace(
                        ".base_layer", "") for n, p in theirs.named_parameters()}
    theirs_by_group = [sorted(theirs_names[id(p)] for p in g["params"]) for g in ref.param_groups if g["params"]]
    assert [len(g) for g in ours_by_group] == [len(g) for g in theirs_by_group]
    assert any(n.endswith("bias") for n in ours_by_group[-1])  # biases: B without decay
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in ref.param_groups
                                                             if g["params"]]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_five_steps_give_the_same_losses_as_peft(method):
    ours, theirs = peft_twin(tiny_llama(), method=method, targets="all-linear", perturb=False)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    optimizers = (create_loraplus_optimizer(ours, torch.optim.AdamW, lr=2e-3, ratio=16, weight_decay=0.01),
                  peft_loraplus(theirs, torch.optim.AdamW, lr=2e-3, loraplus_lr_ratio=16,
                                loraplus_weight_decay=0.01))
    curves = [train_steps(model, opt, ids) for model, opt in zip((ours, theirs), optimizers)]
    assert curves[0][-1] < curves[0][0]
    assert max(abs(a - b) for a, b in zip(*curves)) <= 1e-6


def test_the_ratio_really_changes_training():
    """So that the equality above is not trivially true: ratio 1 and ratio 16 give different losses."""
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    finals = []
    for ratio in (1, 16):
        torch.manual_seed(0)
        model = add_adapters(tiny_llama(), "lora", targets="all-linear")
        opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-3, ratio=ratio)
        finals.append(train_steps(model, opt, ids, steps=3)[-1])
    assert finals[0] != finals[1]


@pytest.mark.parametrize("kw, match", [
    (dict(lr=1e-3, ratio=0), "ratio"), (dict(lr=1e-3, ratio=-2), "ratio"), (dict(lr=0.0, ratio=16), "lr"),
    (dict(lr=-1e-3, ratio=16), "lr"), (dict(lr=float("nan"), ratio=16), "lr"),
])
def test_bad_rates_are_clear_errors(kw, match):
    model = add_adapters(tiny_llama(), "lora")
    with pytest.raises(ValueError, match=match):
        loraplus_param_groups(model, **kw)


def test_a_model_without_adapters_is_a_clear_error():
    with pytest.raises(ValueError, match="no adapters"):
        create_loraplus_optimizer(tiny_llama(), torch.optim.AdamW, lr=1e-3)
