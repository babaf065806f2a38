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
    assert report["cuda peak allocated"] >= report["counted total"] > 0
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


# --- added for the learner's machine: half precision, QLoRA on CUDA, the live meter, the fast NF4 paths -------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_qlora_and_qdora_match_peft_4bit_layer_on_cuda(dtype, method):
    from nanopeft.lab.twins import compare_with_peft, peft_twin, quantized_bases

    ours_base, theirs_base = quantized_bases(tiny_llama().to("cuda", dtype), double_quant=False)
    ours, theirs = peft_twin(ours_base, method=method, targets="all-linear", dropout=0.1, peft_base=theirs_base)
    assert type(theirs.get_submodule("base_model.model.model.layers.0.mlp.up_proj")).__module__ == "peft.tuners.lora.bnb"
    # bitsandbytes 0.50 multiplies up to 1536 tokens with its own fused 4-bit kernel on CUDA (another summation order:
    # the last bit differs); past that it dequantizes and calls F.linear, as we do always: bit for bit there.
    diffs = compare_with_peft(ours, theirs, torch.randint(0, 256, (4, 400), device="cuda"))
    assert all(d == 0.0 for d in diffs.values()), diffs
    small = compare_with_peft(ours, theirs, torch.randint(0, 256, (2, 16), device="cuda"))
    assert max(small.values()) <= (1e-2 if dtype == torch.bfloat16 else 2e-3), small


def test_peft_twin_works_on_a_cuda_base():
    from nanopeft.lab.twins import compare_with_peft, peft_twin

    ours, theirs = peft_twin(tiny_llama().cuda(), method="dora", targets="all-linear")
    assert max(compare_with_peft(ours, theirs, torch.randint(0, 256, (2, 16), device="cuda")).values()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_training_on_cuda(dtype):
    from transformers import AutoTokenizer

    from nanopeft.lab.data import load_task
    from nanopeft.lab.live import LiveDisplay
    from nanopeft.lab.models import bundled_model_folder
    from nanopeft.lab.train import train

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_folder())
    model = tiny_llama(vocab_size=len(tokenizer)).to("cuda", dtype)
    add_adapters(model, "lora", r=4, alpha=8, targets="all-linear")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lines = []
    display = LiveDisplay("t", widgets=False)
    history = train(model, tokenizer, load_task().train[:8], 6, opt, batch_size=4,
                    callback=lambda r: (display(r), lines.append(display.line(r))))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history) and history[-1]["loss"] < history[0]["loss"]
    mem = history[-1]["memory"]
    assert mem["cuda allocated peak"] >= sum(mem[k] for k in ("frozen weights", "trainable weights", "gradients",
                                                              "optimizer state"))
    assert mem["cuda reserved peak"] >= mem["cuda allocated peak"] and mem["activations"] > 0
    assert "CUDA allocated peak" in lines[-1]


def test_the_dtype_choice_on_this_gpu():
    major, _ = torch.cuda.get_device_capability()
    assert pick_dtype("cuda", verbose=False) == (torch.bfloat16 if major >= 8 else torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_triton_dequantize_equals_torch_on_cuda(dtype, double_quant):
    pytest.importorskip("triton")
    from nanopeft.nf4 import dequantize_nf4, quantize_nf4

    for shape in [(576, 1536), (3, 333), (7, 100), (1, 1)]:
        q = quantize_nf4(torch.randn(shape, device="cuda").to(dtype), double_quant=double_quant)
        assert torch.equal(dequantize_nf4(q, kernel="triton"), dequantize_nf4(q, kernel="torch"))


def test_nf4_bytes_equal_bitsandbytes_on_cuda():
    import bitsandbytes.functional as bf

    from nanopeft.nf4 import dequantize_nf4, quantize_nf4

    w = torch.randn(576, 1536, device="cuda", dtype=torch.float16)
    q = quantize_nf4(w)
    packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(q), bf.dequantize_4bit(packed, state))


def test_factored_dora_norm_on_cuda():
    base = tiny_llama().to("cuda", torch.bfloat16)
    model = add_adapters(base, "dora", targets="all-linear", norm="factored")
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.05)
            factored = layer.weight_norm()
            layer.norm = "exact"
            exact = layer.weight_norm()
            layer.norm = "factored"
            assert ((factored - exact).abs() / exact).max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_factored_dora_against_peft_on_cuda(dtype):
    from nanopeft.lab.twins import compare_with_peft, peft_twin

    ours, theirs = peft_twin(tiny_llama().to("cuda", dtype), method="dora", targets="all-linear", norm="factored",
                             fused=True)
    diffs = compare_with_peft(ours, theirs, torch.randint(0, 256, (2, 16), device="cuda"))
    assert max(diffs.values()) <= (1e-5 if dtype == torch.float32 else 2e-2), diffs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_triton_quantize_gives_bitsandbytes_bytes_on_cuda(dtype, double_quant):
    pytest.importorskip("triton")
    import bitsandbytes.functional as bf

    from nanopeft.nf4 import quantize_nf4

    for shape in [(576, 1536), (11008, 64), (3, 333), (1, 1), (3, 50)]:
        w = torch.randn(shape, device="cuda").to(dtype)
        a, b = quantize_nf4(w, double_quant=double_quant, kernel="triton"), quantize_nf4(w, double_quant=double_quant,
                                                                                         kernel="torch")
        assert all(torch.equal(a.tensors()[k], v) for k, v in b.tensors().items()), shape
        packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        assert torch.equal(a.packed, packed), shape
        if double_quant and w.numel() > 64:
            assert torch.equal(a.absmax, state.absmax) and torch.equal(a.absmax_scale, state.state2.absmax)
            assert torch.equal(a.offset, state.offset)
        elif not double_quant:
            assert torch.equal(a.absmax, state.absmax)
        # (one block under double quantization: its absmax minus their mean is 0, an all-zero block again, below)
        # an all-zero block: our codes are bitsandbytes' CPU codes (zeros divided by 1e-38, NF4's zero level); its
        # CUDA kernel writes other codes there. Times an absmax of 0 every code is 0; under double quantization the
        # block's absmax decodes to a tiny number instead, and only that block's weights differ, by less than it.
        w.view(-1)[64:128] = 0
        a, b = quantize_nf4(w, double_quant=double_quant, kernel="triton"), quantize_nf4(w, double_quant=double_quant,
                                                                                         kernel="torch")
        assert all(torch.equal(a.tensors()[k], v) for k, v in b.tensors().items()), shape
        packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        differ = (a.packed != packed).view(-1).nonzero().view(-1)
        assert ((differ >= 32) & (differ < 64)).all(), (shape, differ[:8])  # bytes 32..63 hold weights 64..127
        theirs, ours = bf.dequantize_4bit(packed, state).view(-1), bf.dequantize_4bit(a.packed, state).view(-1)
        if not double_quant:
            assert torch.equal(theirs, ours)
        elif w.numel() > 64:
            block = bf.dequantize_blockwise(state.absmax, state.state2)[1] + state.offset  # its decoded absmax
            assert torch.equal(theirs[:64], ours[:64]) and torch.equal(theirs[128:], ours[128:])
            assert (theirs[64:128] - ours[64:128]).abs().max() <= 2 * block.abs()
