"""Which arithmetic bitsandbytes uses for a 4-bit matmul on this CPU, and how every comparison pins the exact one.

bitsandbytes 0.50 multiplies by an NF4 weight on the CPU in one of two ways (`bnb.nn.Linear4bit.forward`):

    exact    dequantize W (code * absmax, float32) to the compute dtype, then `F.linear`: the arithmetic of
             nanopeft's `LinearNF4`, so the two agree to the last bit. Taken in train mode, whenever the input
             needs a gradient, and on every CPU without AVX512-BF16.
    packed   on a CPU with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids and newer), for a layer in eval mode whose
             input needs no gradient (inference: `model.eval()` under `torch.no_grad()`): the layer first *repacks
             its weight in place* into a tiled layout (`_convert_weight_packed_for_cpu`; a nested absmax is decoded
             and kept in bfloat16), then multiplies in bfloat16 (`gemv_4bit`): x and absmax rounded to bfloat16, the
             sums rounded to bfloat16, whatever the compute dtype. Faster, and about 3 significant digits.

Neither is wrong; they are different arithmetic. A comparison that asks for equal numbers must run bitsandbytes on
the exact path on every CPU, so every `Linear4bit` nanoPEFT builds for a comparison (`bnb_linear4bit`,
`twins.bnb_quantize`) has the layer's own switch turned off: `support_avx512bf16_for_cpu = False`
(`pin_exact_path`, before the first forward). `emulate_packed_path` computes what the packed path returns, on any
CPU, so the tests can show what the pin prevents.

The repack outlasts the forward that made it, in bitsandbytes 0.50.2: every later forward of that layer, in train
mode too, runs the bfloat16 kernel, which has no backward, so no gradient reaches the layer's input (a UserWarning
says so; a layer with a bias raises instead), and the absmax stays rounded to bfloat16. A QLoRA run evaluated once
(eval mode, no gradients) then trains on wrong gradients on such a CPU: lesson 04 measures it.
"""
from __future__ import annotations

import copy
import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn

from ..nf4 import NF4Tensor, dequantize_nf4


def has_avx512_bf16() -> bool:
    """True on a CPU whose bitsandbytes build reports AVX512-BF16 (`bitsandbytes.functional.has_avx512bf16`)."""
    import bitsandbytes.functional as bf  # heavy and optional: imported where it is used

    return bool(bf.has_avx512bf16())


def cpu_path() -> dict:
    """What bitsandbytes does here: {"cpu", "avx512_bf16", "train", "eval, no grad", "pinned", "why"}."""
    packed = has_avx512_bf16()
    return {
        "cpu": platform.processor() or platform.machine(),
        "avx512_bf16": packed,
        "train": "exact (float32 dequantize, then F.linear)",
        "eval, no grad": "packed bfloat16 (weight repacked in place)" if packed else "exact (float32 dequantize, then F.linear)",
        "pinned": "exact, in every comparison (support_avx512bf16_for_cpu = False)",
        "why": ("this CPU has AVX512-BF16: bitsandbytes answers eval-mode 4-bit matmuls in bfloat16 unless told not to"
                if packed else "this CPU has no AVX512-BF16: bitsandbytes always takes the exact path here"),
    }


def describe_cpu_path() -> str:
    """One line for a table or a notebook: the path bitsandbytes takes on this CPU, and the one comparisons use."""
    p = cpu_path()
    if p["avx512_bf16"]:
        return ("bitsandbytes on this CPU (AVX512-BF16): eval-mode 4-bit matmuls without gradients would run in "
                "bfloat16 on a repacked weight; every comparison here pins the exact float32 path.")
    return "bitsandbytes on this CPU (no AVX512-BF16): the exact float32 path, always (and pinned in every comparison)."


def linear4bit_layers(model: nn.Module) -> dict:
    """{path: layer} for every bitsandbytes `Linear4bit` in `model` (a model loaded in 4 bits, a peft model on one)."""
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def pin_exact_path(model: nn.Module) -> int:
    """Make every `Linear4bit` of `model` (or `model` itself) compute on the exact path on every CPU; returns how
    many layers. Call it before the first forward: a layer the packed path already repacked is refused (its absmax
    was rounded to bfloat16 in place, and bitsandbytes' inverse does not restore it)."""
    layers = linear4bit_layers(model)
    repacked = [n for n, layer in layers.items() if getattr(layer.weight.quant_state, "packing_format_for_cpu", False)]
    if repacked:
        raise ValueError(f"{len(repacked)} Linear4bit layer(s) ({repacked[0] or 'the layer'}, ...) were already repacked "
                         f"for bitsandbytes' bfloat16 CPU path by an eval-mode forward without gradients: their absmax "
                         f"is now bfloat16, so no exact comparison is possible. Load or quantize the model again and "
                         f"call pin_exact_path before its first forward.")
    for layer in layers.values():
        layer.support_avx512bf16_for_cpu = False  # the switch bitsandbytes reads in Linear4bit.forward
    return len(layers)


def takes_packed_path(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer(x)` would take the packed bfloat16 path: bitsandbytes' own condition in Linear4bit.forward."""
    return (x.device.type == "cpu" and getattr(layer, "support_avx512bf16_for_cpu", False) and not layer.training
            and not x.requires_grad)


def bnb_linear4bit(linear: nn.Linear, double_quant: bool = True, compute_dtype=None, pinned: bool = True):
    """bitsandbytes' `Linear4bit` (NF4, blocks of 64) holding `linear`'s weight, as `BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4")` builds it, on `linear`'s device; pinned to the exact path
    unless `pinned=False` (to show the packed path)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, blocksize=64)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer = layer.to(linear.weight.device)  # moving a Params4bit to a device quantizes it
    if pinned:
        pin_exact_path(layer)
    return layer


def nf4_from_bnb(weight):
    """Our NF4Tensor holding exactly the state of a bitsandbytes `Params4bit` (its packed bytes, absmax, and with
    double quantization its 8-bit absmax codes, their scales and the offset): the bytes map one to one."""
    s = weight.quant_state
    if s.quant_type != "nf4":
        raise ValueError(f"Only NF4 maps onto NF4Tensor; this weight is {s.quant_type!r}.")
    if s.nested:
        return NF4Tensor(weight.data, s.absmax, s.blocksize, s.shape, s.dtype, s.state2.absmax, s.offset)
    return NF4Tensor(weight.data, s.absmax, s.blocksize, s.shape, s.dtype)


def emulate_packed_path(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the packed AVX512-BF16 path returns for `layer(x)`, computed on any CPU from the layer's stored state:

        y = bf16( bf16(x) @ (code * bf16(absmax))^T ) + bias        (the sums themselves in float32)

    cast to x's dtype as Linear4bit does. bitsandbytes' kernel sums in another order, so on a CPU that has the path
    this equals it up to one bfloat16 rounding of each output (tests/test_bnb_cpu.py checks that bound there)."""
    q = nf4_from_bnb(layer.weight)
    absmax = q.block_absmax().to(torch.bfloat16).float()  # the packed path keeps absmax in bfloat16
    w = dequantize_nf4(NF4Tensor(q.packed, absmax, q.blocksize, q.shape, torch.float32))  # (out, in), float32
    cd = layer.compute_dtype or x.dtype
    y = F.linear(x.to(cd).to(torch.bfloat16).float(), w).to(torch.bfloat16)  # (..., out), rounded to bfloat16
    y = y.to(cd)
    if layer.bias is not None:
        y = y + layer.bias.to(cd)
    return y.to(x.dtype)


def packed_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose `Linear4bit` layers answer eval-mode, no-gradient inputs as the packed bfloat16 path
    does: the real path on a CPU that has it (`has_avx512_bf16()`), the emulation elsewhere. `model` is untouched
    (the real path would repack its weights in place)."""
    twin = copy.deepcopy(model)
    for layer in linear4bit_layers(twin).values():
        if has_avx512_bf16():
            layer.support_avx512bf16_for_cpu = True
        else:
            layer.forward = functools.partial(_emulated_forward, layer)
    return twin


def _emulated_forward(layer, x):
    """Linear4bit.forward on a CPU that lacks the packed path, as if it had it (bitsandbytes' condition, not its switch)."""
    if x.device.type == "cpu" and not layer.training and not x.requires_grad:
        return emulate_packed_path(layer, x)
    return type(layer).forward(layer, x)

