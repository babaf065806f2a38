"""LoRA on output slices of a fused layer (nanopeft.merged) against loralib's MergedLinear, the reference the LoRA
paper's GPT-2 code used. Tolerances: loralib builds the full update B A with a grouped convolution and multiplies x by
it; we multiply x by A, then by B (never forming B A), as LoRA's forward does. The two orders round differently in
float32, so outputs and gradients agree to float32 rounding (relative 1e-5); merged weights, built the same way on
both sides (B A added to W0), are equal bit for bit."""
import copy

import loralib
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from nanopeft import add_adapters, merge_adapters, save_adapter, unmerge_adapters
from nanopeft.lab.models import tiny_llama
from nanopeft.merged import MergedLoRALinear
from nanopeft.targets import trainable_parameters

from twins import assert_unchanged, snapshot

SHAPES = [(64, 192, [True, False, True], False), (48, 96, [False, True], False), (40, 120, [True, True, True], False),
          (32, 96, [True, False, True], True), (64, 128, [False, True, False, True], True)]


def pair(in_f, out_f, enable, fan_in_fan_out, r=4, alpha=8):
    torch.manual_seed(0)
    ref = loralib.MergedLinear(in_f, out_f, r=r, lora_alpha=alpha, enable_lora=enable, fan_in_fan_out=fan_in_fan_out)
    loralib.mark_only_lora_as_trainable(ref)
    with torch.no_grad():
        ref.lora_B.normal_()  # B = 0 would hide a wrong B
    if fan_in_fan_out:  # GPT-2's layout: the weight stored (in, out), as loralib keeps it with fan_in_fan_out
        base = Conv1D(out_f, in_f)
    else:
        base = nn.Linear(in_f, out_f)
    base.load_state_dict({"weight": ref.weight.detach().clone(), "bias": ref.bias.detach().clone()})
    ours = MergedLoRALinear(base, r, alpha, enable_lora=enable)
    ours.from_loralib(ref.lora_A.detach(), ref.lora_B.detach())
    return ref, ours


def close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("in_f,out_f,enable,fifo", SHAPES)
def test_outputs_and_gradients_equal_loralib(in_f, out_f, enable, fifo):
    ref, ours = pair(in_f, out_f, enable, fifo)
    x = torch.randn(3, 7, in_f, generator=torch.Generator().manual_seed(1))
    ref.train()
    y_ref, y = ref(x), ours(x)
    assert close(y, y_ref)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g)
    grads = {"lora_A": ours.lora_A.grad.reshape_as(ref.lora_A), "lora_B": ours.lora_B.grad.reshape_as(ref.lora_B)}
    assert close(grads["lora_A"], ref.lora_A.grad) and close(grads["lora_B"], ref.lora_B.grad)
    # the frozen slices get no update: their rows of the output are the base layer's
    frozen = torch.tensor(enable).repeat_interleave(out_f // len(enable)).logical_not()
    assert torch.equal(y[..., frozen], ours.base_layer(x)[..., frozen])
    # the trainable count is loralib's
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in ref.parameters() if p.requires_grad)


@pytest.mark.parametrize("in_f,out_f,enable,fifo", SHAPES)
def test_merge_equals_loralibs_and_unmerge_gives_w0_back(in_f, out_f, enable, fifo):
    ref, ours = pair(in_f, out_f, enable, fifo)
    w0 = ours.base_layer.weight.detach().clone()
    x = torch.randn(5, in_f)
    before = ours(x).detach()
    ref.eval()  # loralib merges when a layer leaves training mode
    ours.merge()
    assert torch.equal(ours.base_layer.weight, ref.weight)  # both stored in the same layout, (in, out) for Conv1D
    assert close(ours(x), before)
    ours.unmerge()
    assert torch.allclose(ours.base_layer.weight, w0, atol=1e-6)


def test_gpt2_q_and_v_as_the_paper_counts_them():
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
    add_adapters(model, "merged", r=4, alpha=32, targets=["c_attn"], enable_lora=[True, False, True])
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, MergedLoRALinear) and layer.lora_A.shape == (2, 4, 64) and layer.lora_B.shape == (2, 64, 4)
    assert trainable_parameters(model).trainable == 2 * 2 * 4 * (64 + 64)  # layers x slices x r x (in + out/3)
    ids = torch.randint(0, 256, (2, 10))
    model(input_ids=ids).logits.sum().backward()
    merge_adapters(model)
    unmerge_adapters(model)


@pytest.mark.parametrize("enable,message", [
    ([True, False, True, False, True], "do not divide the layer's 192 outputs"),
    ([False, False, False], "adapts no slice"),
    ([True], "at least 2"),
    ("qv", "at least 2"),
    (None, "enable_lora is required"),
])
def test_bad_enable_lora_is_refused_and_the_model_is_unchanged(enable, message):
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
    before = snapshot(model)
    kwargs = {} if enable is None else {"enable_lora": enable}
    with pytest.raises(ValueError, match=message):
        add_adapters(model, "merged", r=4, alpha=8, targets=["c_attn"], **kwargs)
    assert_unchanged(model, before)


def test_saving_is_refused_with_the_reason_and_writes_nothing(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
    add_adapters(model, "merged", r=4, alpha=8, targets=["c_attn"], enable_lora=[True, False, True])
    with pytest.raises(ValueError, match="peft's adapter format cannot hold"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() or not any((tmp_path / "adapter").iterdir())


def check_against_loralib(model):
    """tests/test_methods.py's OWN_REFERENCES entry: every q_proj of a model, split in two slices with the first
    adapted, against loralib: outputs, and merged weights."""
    for name, module in list(model.named_modules()):
        if name.endswith("q_proj"):
            torch.manual_seed(0)
            ref = loralib.MergedLinear(module.in_features, module.out_features, r=2, lora_alpha=4,
                                       enable_lora=[True, False], bias=False)
            with torch.no_grad():
                ref.weight.copy_(module.weight)
                ref.lora_B.normal_()
            ours = MergedLoRALinear(copy.deepcopy(module), 2, 4, enable_lora=[True, False])
            ours.from_loralib(ref.lora_A.detach(), ref.lora_B.detach())
            x = torch.randn(4, module.in_features)
            ref.train()
            assert close(ours(x), ref(x))
            ref.eval()
            ours.merge()
            assert torch.equal(ours.base_layer.weight, ref.weight)
