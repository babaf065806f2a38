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


def bnb_quantize(model, double_quant: bool = True, compute_dtype=None, skip=("lm_head",)):
    """What `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)` does to a loaded model, done in
    place on `model`: every nn.Linear but the head becomes a `bnb.nn.Linear4bit` holding the same weight in NF4."""
    import bitsandbytes as bnb
    from torch import nn

    from .adapters import _set_module, path_matches

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and not any(path_matches(n, s) for s in skip)]
    for name in names:
        lin = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=double_quant)
        layer.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=double_quant, blocksize=64)
        if lin.bias is not None:
            layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        _set_module(model, name, layer.to(lin.weight.device))  # moving a Params4bit to a device quantizes it
    return model


def quantized_bases(base, double_quant: bool = False):
    """(ours, bitsandbytes'): copies of `base` quantized by `nanopeft.nf4.quantize_model` and by `bnb_quantize`,
    the two bases of a QLoRA comparison (`peft_twin(ours, ..., peft_base=theirs)`)."""
    from .nf4 import quantize_model

    ours = copy.deepcopy(base)
    quantize_model(ours, double_quant=double_quant)
    return ours, bnb_quantize(copy.deepcopy(base), double_quant=double_quant)


def peft_twin(base, method: str = "lora", seed: int = 0, r: int = 8, alpha: float = 16, targets=("q_proj", "v_proj"),
              dropout: float = 0.0, rslora: bool = False, perturb: bool = True, peft_base=None):
    """(ours, peft's): `base` adapted by nanopeft and by peft's `get_peft_model`, with equal weights.

    peft_base: the model peft adapts, if not a copy of `base` (QLoRA: `base` quantized by nanopeft, `peft_base` the
    same weights quantized by bitsandbytes)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    ours = add_adapters(copy.deepcopy(base), method=method, r=r, alpha=alpha, targets=targets, dropout=dropout,
                        rslora=rslora)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets if targets == "all-linear" else list(targets),
                        lora_dropout=dropout, use_rslora=rslora, use_dora=method == "dora")
    theirs = get_peft_model(copy.deepcopy(base if peft_base is None else peft_base), config)
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


def nf4_from_bnb(weight):
    """Our NF4Tensor holding exactly the state of a bitsandbytes `Params4bit` (its packed bytes, absmax, and with
    double quantization its 8-bit absmax codes, their scales and the offset): the bytes map one to one."""
    from .nf4 import NF4Tensor

    s = weight.quant_state
    if s.quant_type != "nf4":
        raise ValueError(f"Only NF4 maps onto NF4Tensor; this weight is {s.quant_type!r}.")
    if s.nested:
        return NF4Tensor(weight.data, s.absmax, s.blocksize, s.shape, s.dtype, s.state2.absmax, s.offset)
    return NF4Tensor(weight.data, s.absmax, s.blocksize, s.shape, s.dtype)


def train_steps(model, optimizer, ids, steps: int = 5) -> list:
    """`steps` optimizer steps of language modelling on the token ids `ids` (the same batch each time), in train
    mode; the losses. Used to check that two optimizers move two equal models identically."""
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def verification_table(seed: int = 0) -> list:
    """Every method against its reference, on tiny models (seconds on a CPU): a list of
    (method, reference, what was compared, max |difference|, tolerance, passed)."""
    import bitsandbytes.functional as bf
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    from .loraplus import create_loraplus_optimizer
    from .models import tiny_llama
    from .nf4 import dequantize_nf4, quantize_nf4

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    rows = []

    def row(method, ref, what, diff, tol=0.0):
        rows.append((method, ref, what, diff, tol, diff <= tol))

    for method in ("lora", "dora"):
        d = compare_with_peft(*peft_twin(tiny_llama(), method=method, targets="all-linear", dropout=0.1), ids)
        row(method, "peft 0.21", "logits, grads of " + "/".join(k for k in d if k != "logits"), max(d.values()))

    w = torch.randn(192, 576, generator=torch.Generator().manual_seed(seed))
    q = quantize_nf4(w)
    packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    same = torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    row("nf4", "bitsandbytes 0.50", "packed bytes, absmax (192x576)", 0.0 if same else float("inf"))
    row("nf4", "bitsandbytes 0.50", "dequantized values",
        (dequantize_nf4(q) - bf.dequantize_4bit(packed, state)).abs().max().item())

    for method in ("lora", "dora"):
        ours_base, theirs_base = quantized_bases(tiny_llama(), double_quant=False)
        d = compare_with_peft(*peft_twin(ours_base, method=method, targets="all-linear", dropout=0.1,
                                         peft_base=theirs_base), ids)
        row("q" + method, "peft + bitsandbytes", "logits, grads on an NF4 base", max(d.values()))

    # LoRA+: the same groups, then five AdamW steps from identical starts
    ours, theirs = peft_twin(tiny_llama(), method="dora", targets="all-linear")
    opt_ours = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, ratio=16, weight_decay=0.01)
    opt_theirs = peft_loraplus(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.01)
    losses = [train_steps(ours, opt_ours, ids), train_steps(theirs, opt_theirs, ids)]
    row("lora+", "peft 0.21", "5 AdamW steps (DoRA model): losses",
        max(abs(a - b) for a, b in zip(*losses)), 1e-6)
    return rows


def copy_bnb_state(ours, theirs, prefix: str = "") -> int:
    """Give every LinearNF4 of `ours` the stored state of the bitsandbytes layer at the same path in `theirs`
    (`prefix` + path, e.g. "base_model.model." for a peft model). With double quantization bitsandbytes' CPU
    kernel picks a neighbouring 8-bit absmax code for a few blocks (see nanopeft.nf4); after this copy the two
    models hold the same bytes, so any remaining difference would be in the computation. Returns the layer count."""
    from .nf4 import LinearNF4

    count = 0
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, LinearNF4):
                q = nf4_from_bnb(theirs.get_submodule(prefix + name).weight)
                m.weight.copy_(q.packed)
                for field in ("absmax", "absmax_scale", "offset"):
                    if hasattr(m, field):
                        getattr(m, field).copy_(getattr(q, field))
                count += 1
    return count
