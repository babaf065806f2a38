"""CUDA paths: skipped on machines without a GPU (CI), run on a GPU by `pytest -m gpu`."""
import copy

import pytest
import torch

from nanopeft import adapter_layers, add_adapters, merge_adapters
from nanopeft.lab.device import pick_dtype
from nanopeft.lab.memory import MemoryMeter
from nanopeft.lab.models import tiny_llama
from nanopeft.lab.twins import replay_peft_init

pytestmark = pytest.mark.gpu


def test_compute_dtype_matches_the_hardware():
    major, _ = torch.cuda.get_device_capability()
    assert pick_dtype("cuda", verbose=False) == (torch.bfloat16 if major >= 8 else torch.float16)


def test_meter_reports_cuda_peaks_and_activations():
    model = tiny_llama().cuda()
    add_adapters(model, targets="all-linear")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with MemoryMeter(model, opt) as meter:
        model(input_ids=torch.randint(0, 256, (8, 128), device="cuda")).logits.sum().backward()
        opt.step()
        meter.sample()
    report = meter.report()
    assert report["cuda peak allocated"] >= report["tensors total"] > 0
    assert report["activations and temporaries"] > 0


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lora_and_dora_match_peft_on_cuda(dtype, method):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama().to("cuda", dtype)
    ours = add_adapters(copy.deepcopy(base), method=method, r=8, alpha=16, targets="all-linear", dropout=0.1)
    replay_peft_init(ours, seed=0)
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                            lora_dropout=0.1, use_dora=method == "dora"))
    with torch.no_grad():
        for path, layer in adapter_layers(ours).items():
            ref = theirs.get_submodule("base_model.model." + path)
            assert torch.equal(layer.lora_A, ref.lora_A["default"].weight)  # the init replay holds on CUDA too
            assert layer.lora_A.dtype == torch.float32  # adapters stay fp32 on a half-precision base, as in peft
            layer.lora_B.normal_(0, 0.1)
            ref.lora_B["default"].weight.copy_(layer.lora_B)
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    outs = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(1)
        out = model(input_ids=ids).logits
        out.float().pow(2).mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for path, layer in adapter_layers(ours).items():
        ref = theirs.get_submodule("base_model.model." + path)
        torch.testing.assert_close(layer.lora_A.grad, ref.lora_A["default"].weight.grad, rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B.grad, ref.lora_B["default"].weight.grad, rtol=0, atol=0)
        if method == "dora":
            torch.testing.assert_close(layer.magnitude.grad, ref.lora_magnitude_vector["default"].weight.grad,
                                       rtol=0, atol=0)
    merge_adapters(ours)
    merged = theirs.merge_and_unload()
    for path, layer in adapter_layers(ours).items():
        torch.testing.assert_close(layer.base_layer.weight, merged.get_submodule(path).weight, rtol=0, atol=0)
