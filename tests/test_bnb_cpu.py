"""bitsandbytes' two CPU paths for a 4-bit matmul (nanopeft.lab.bnb_cpu): the exact one every comparison pins, and
the packed bfloat16 one an AVX512-BF16 CPU takes for eval-mode inference.

Everywhere: the pin is in force in every Linear4bit nanoPEFT builds for a comparison, even on a CPU that would not
take the packed path (bitsandbytes is made to believe it has AVX512-BF16 while the layers are built), and the
emulation of the packed arithmetic shows that a QLoRA comparison at atol=0 would fail without the pin.
On an AVX512-BF16 CPU only: the real packed kernel, against the emulation and the exact path.
"""
import copy

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

from nanopeft import load_adapter, quantize_model, save_adapter
from nanopeft.lab.bnb_cpu import (bnb_linear4bit, cpu_path, describe_cpu_path, emulate_packed_path, has_avx512_bf16,
                                  linear4bit_layers, nf4_from_bnb, pin_exact_path, takes_packed_path)
from nanopeft.lab.models import tiny_llama
from nanopeft.lab.twins import bnb_quantize, peft_twin, quantized_bases
from nanopeft.nf4 import dequantize_nf4

needs_avx512_bf16 = pytest.mark.skipif(not has_avx512_bf16(), reason="this CPU has no AVX512-BF16: bitsandbytes "
                                       "has no packed bfloat16 path here (the emulation tests cover it)")

# bfloat16 keeps 8 significant bits: one rounding moves a number by at most 2^-9 of itself. The packed path rounds x,
# absmax, and the sums (and its kernel may round each weight too): at most four roundings of terms whose sizes add
# up to at most sum_i |x_i| |w_i|, so two bfloat16 evaluations of the same product differ by at most
# 4 * 2^-9 = 2^-7 of that sum (float32's own rounding, 2^-24, is far below).
BF16_BOUND = 2 ** -7


@pytest.fixture
def avx512_bf16_pretended(monkeypatch):
    """bitsandbytes believes this CPU has AVX512-BF16 while layers are built (each Linear4bit reads it once, in its
    constructor), and the packed path computes by the emulation: a CPU without the instructions then behaves as one
    with them, without calling the kernel it does not have."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    forward = bnb.nn.Linear4bit.forward

    def packed_or_exact(self, x):
        return emulate_packed_path(self, x) if takes_packed_path(self, x) else forward(self, x)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", packed_or_exact)


def test_the_path_is_named():
    p = cpu_path()
    assert p["avx512_bf16"] == has_avx512_bf16()
    assert p["train"].startswith("exact") and p["pinned"].startswith("exact")
    assert p["eval, no grad"].startswith("packed" if p["avx512_bf16"] else "exact")
    assert ("AVX512-BF16" in describe_cpu_path()) and ("pin" in describe_cpu_path())


def test_every_linear4bit_built_for_a_comparison_is_pinned(avx512_bf16_pretended):
    base = tiny_llama()
    plain = bnb.nn.Linear4bit(64, 64, quant_type="nf4")
    assert plain.support_avx512bf16_for_cpu  # the pretence works: an unpinned layer would take the packed path
    built = {"bnb_quantize": bnb_quantize(copy.deepcopy(base)), "quantized_bases": quantized_bases(base)[1],
             "bnb_linear4bit": bnb_linear4bit(torch.nn.Linear(64, 64))}
    for name, model in built.items():
        layers = linear4bit_layers(model)
        assert layers, name
        assert not any(layer.support_avx512bf16_for_cpu for layer in layers.values()), name
    unpinned = bnb_linear4bit(torch.nn.Linear(64, 64), pinned=False)
    assert unpinned.support_avx512bf16_for_cpu and pin_exact_path(unpinned) == 1
    assert not unpinned.support_avx512bf16_for_cpu


def loaded_both_ways(tmp_path, method="lora"):
    """(ours, peft's on bitsandbytes): one adapter with B non-zero, loaded into each on the same NF4 bytes (no double
    quantization, where bitsandbytes' CPU kernel and ours store the same bytes), both in eval mode."""
    trained, _ = peft_twin(tiny_llama(), method=method, targets="all-linear")
    save_adapter(trained, tmp_path)
    ours = tiny_llama()
    quantize_model(ours, double_quant=False)
    theirs = PeftModel.from_pretrained(bnb_quantize(tiny_llama(), double_quant=False), tmp_path).eval()
    return load_adapter(ours, tmp_path).eval(), theirs


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_without_the_pin_the_comparison_would_fail(avx512_bf16_pretended, tmp_path, method):
    ours, theirs = loaded_both_ways(tmp_path, method)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = ours(input_ids=ids).logits
        assert torch.equal(theirs(input_ids=ids).logits, exact)  # pinned: the exact path, bit for bit
        for layer in linear4bit_layers(theirs).values():  # what a twin built without the pin would do
            layer.support_avx512bf16_for_cpu = True
        packed = theirs(input_ids=ids).logits
    diff = (packed - exact).abs().max().item()
    assert diff > 1e-3, diff  # atol=0 would fail: bfloat16 sums differ in the third significant digit
    assert diff < 0.1 * exact.abs().max().item()  # and yet it is the same model, to bfloat16's precision


def test_a_layer_already_repacked_is_refused_by_the_pin(avx512_bf16_pretended):
    from bitsandbytes.functional import _convert_weight_packed_for_cpu  # what the packed path's first forward does

    layer = bnb_linear4bit(torch.nn.Linear(128, 64), pinned=False).eval()
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                  layer.weight.quant_state)
    with pytest.raises(ValueError, match="already repacked.*before its first forward"):
        pin_exact_path(layer)
    assert layer.support_avx512bf16_for_cpu  # refused: nothing changed


def product_bound(layer, x):
    """BF16_BOUND * (sum_i |x_i| |w_i| + |bias|), for every output of layer(x): how far two bfloat16 evaluations of
    the same layer may be apart."""
    w = dequantize_nf4(nf4_from_bnb(layer.weight)).float()
    bias = layer.bias.float().abs() if layer.bias is not None else 0
    return BF16_BOUND * (F.linear(x.float().abs(), w.abs()) + bias)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_the_emulation_is_bfloat16_arithmetic_on_the_same_codes(compute_dtype):
    """Runs everywhere: the emulation differs from the exact path by bfloat16 roundings, never by more."""
    torch.manual_seed(0)
    layer = bnb_linear4bit(torch.nn.Linear(256, 128), double_quant=True, compute_dtype=compute_dtype).eval()
    x = torch.randn(3, 5, 256)
    with torch.no_grad():
        exact, emulated = layer(x), emulate_packed_path(layer, x)
    assert emulated.dtype == exact.dtype == x.dtype
    assert not torch.equal(emulated, exact)
    assert ((emulated - exact).abs() <= product_bound(layer, x)).all()


@needs_avx512_bf16
@pytest.mark.parametrize("double_quant", [False, True])
def test_the_real_packed_path_repacks_in_place_and_equals_the_emulation_to_bfloat16(double_quant):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    packed, exact = (bnb_linear4bit(linear, double_quant, pinned=p).eval() for p in (False, True))
    x = torch.randn(3, 5, 256)
    with torch.no_grad():
        y_packed, y_exact, y_emulated = packed(x), exact(x), emulate_packed_path(exact, x)
    assert packed.weight.quant_state.packing_format_for_cpu  # repacked in place by the forward
    assert packed.weight.data.shape == (128, 128) and exact.weight.data.shape == (128 * 256 // 2, 1)
    assert packed.weight.quant_state.absmax.dtype == torch.bfloat16
    assert not torch.equal(y_packed, y_exact)
    assert ((y_packed - y_emulated).abs() <= product_bound(exact, x)).all()
    assert ((y_packed - y_exact).abs() <= product_bound(exact, x)).all()


@needs_avx512_bf16
def test_the_repack_outlasts_the_forward_and_blocks_the_input_gradient():
    """bitsandbytes 0.50.2: once repacked, a layer stays on the bfloat16 kernel in train mode too, and that kernel has
    no backward: the input gets no gradient. If this test fails, bitsandbytes changed it: update lesson 04."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=False)  # (with a bias the training forward raises instead)
    packed, exact = (bnb_linear4bit(linear, pinned=p) for p in (False, True))
    with torch.no_grad():
        packed.eval()(torch.randn(2, 256))  # one evaluation
    x = torch.randn(4, 256, requires_grad=True)
    packed.train()
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        packed(x).sum().backward()
    assert x.grad is None
    exact(x).sum().backward()  # the exact path: the gradient W^T g
    assert x.grad is not None and x.grad.abs().max() > 0


@needs_avx512_bf16
def test_the_unpinned_twin_fails_the_comparison_on_this_cpu(tmp_path):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ours, theirs = loaded_both_ways(tmp_path, "dora")
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        assert torch.equal(theirs(input_ids=ids).logits, expected)  # pinned
        ours, theirs = loaded_both_ways(tmp_path / "unpinned", "dora")
        for layer in linear4bit_layers(theirs).values():
            layer.support_avx512bf16_for_cpu = True  # as bitsandbytes builds it on this CPU
        assert not torch.equal(theirs(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match="already repacked"):
        pin_exact_path(theirs)
