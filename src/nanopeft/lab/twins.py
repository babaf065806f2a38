"""Side by side with the reference libraries: peft's twin of a nanopeft model, and the comparison of the two.

    ours, theirs = peft_twin(base, method="dora", r=16, alpha=32, targets=["q_proj", "v_proj"], dropout=0.05)
    compare_with_peft(ours, theirs, ids)   # {"logits": max |diff|, "lora_A": ..., "lora_B": ..., "magnitude": ...}

Both models start from copies of the same base, and our A is set to the A peft draws from the same seed
(`replay_peft_init`). B is then set non-zero, and DoRA's magnitude moved off its start, identically in both: at
B = 0 many mistakes would not show. peft and bitsandbytes are imported inside the functions that use them: they
are heavy, optional (`pip install nanopeft[reference]`), and bitsandbytes prints a notice when first imported.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..adapters import METHODS, adapter_layers, add_adapters, set_module
from ..lora import is_conv1d
from ..qlora import LinearNF4, quantize_model
from ..targets import modules_to_save, path_matches
from .bnb_cpu import bnb_linear4bit, nf4_from_bnb


@torch.no_grad()
def replay_peft_init(model, seed: int) -> None:
    """Give every adapter of `model` the A that peft's `get_peft_model` draws after `torch.manual_seed(seed)`.

    Why this is needed: peft builds `lora_A = nn.Linear(in, r)` and `lora_B = nn.Linear(r, out)`, whose
    constructors each draw a Kaiming-uniform weight (consuming random numbers), and only then re-draws A and zeroes
    B. Drawing A once gives numbers from the same distribution but not the same numbers; consuming the same random
    numbers in the same order (layers in `named_modules()` order, on the CPU) gives peft's A bit for bit.

    peft then moves the new adapter to the base layer's dtype and up-casts it to float32 again, which rounds A
    through that dtype: the weight's dtype for a 16-bit base, and for a 4-bit base its compute dtype (peft's
    `_get_base_layer_device_and_dtype` reads `compute_dtype` where a layer has one: bitsandbytes' `Linear4bit`, and
    our `LinearNF4`, named the same), which is float16 on a T4.
    """
    torch.manual_seed(seed)
    for layer in adapter_layers(model).values():
        if not layer.random_init:  # PiSSA: A and B come from the SVD, in both libraries
            continue
        A, B = torch.empty(layer.r, layer.in_features), torch.empty(layer.out_features, layer.r)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear(in, r).__init__ draws this, then it is overwritten
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))  # nn.Linear(r, out).__init__ draws this, then B is zeroed
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # the A that is kept
        base = layer.base_layer
        dtype = base.compute_dtype if hasattr(base, "compute_dtype") else base.weight.dtype  # as peft reads it
        if dtype is not None and dtype.is_floating_point:  # (a 4-bit base's uint8 codes, or no compute dtype: no cast)
            A = A.to(dtype).float()
        layer.lora_A.copy_(A)


def peft_params(peft_model, path: str) -> dict:
    """{our parameter name: peft's parameter} for the adapted layer at `path`."""
    ref = peft_model.get_submodule("base_model.model." + path)
    out = {"lora_A": ref.lora_A["default"].weight, "lora_B": ref.lora_B["default"].weight}
    if "default" in getattr(ref, "lora_magnitude_vector", {}):
        out["magnitude"] = ref.lora_magnitude_vector["default"].weight
    return out


def bnb_quantize(model, double_quant: bool = True, compute_dtype=None, skip=("lm_head",)):
    """What `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)` does to a loaded model, done in
    place on `model`: every nn.Linear but the head becomes a `bnb.nn.Linear4bit` holding the same weight in NF4,
    pinned to bitsandbytes' exact CPU path (`nanopeft.lab.bnb_cpu`: on an AVX512-BF16 CPU an eval-mode forward would
    otherwise answer in bfloat16)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and not any(path_matches(n, s) for s in skip)]
    for name in names:
        set_module(model, name, bnb_linear4bit(model.get_submodule(name), double_quant, compute_dtype))
    # what transformers sets on a model it loads in 4 bits: peft then wraps Linear4bit in its own 4-bit LoRA layer
    # (peft.tuners.lora.bnb.Linear4bit), as for every real QLoRA user; without it peft takes its plain Linear layer
    model.is_loaded_in_4bit = True
    return model


def quantized_bases(base, double_quant: bool = False, compute_dtype=None):
    """(ours, bitsandbytes'): copies of `base` quantized by `nanopeft.qlora.quantize_model` and by `bnb_quantize`,
    the two bases of a QLoRA comparison (`peft_twin(ours, ..., peft_base=theirs)`); compute_dtype as
    `BitsAndBytesConfig(bnb_4bit_compute_dtype=...)` sets it (float16 on a T4)."""
    ours = copy.deepcopy(base)
    quantize_model(ours, double_quant=double_quant, compute_dtype=compute_dtype)
    return ours, bnb_quantize(copy.deepcopy(base), double_quant=double_quant, compute_dtype=compute_dtype)


def peft_twin(base, method: str = "lora", seed: int = 0, r: int = 8, alpha: float = 16, targets=("q_proj", "v_proj"),
              dropout: float = 0.0, rslora: bool = False, perturb: bool = True, peft_base=None, config=None, **options):
    """(ours, peft's): `base` adapted by nanopeft and by peft's `get_peft_model`, with equal weights.

    config: a peft `LoraConfig` that both libraries read (then method, r, alpha, targets, dropout and rslora are
    not used). peft_base: the model peft adapts, if not a copy of `base` (QLoRA: `base` quantized by nanopeft,
    `peft_base` the same weights quantized by bitsandbytes). options: more `add_adapters` keywords (DoRA's norm)."""
    from peft import LoraConfig, get_peft_model

    if config is None:
        targets = targets if isinstance(targets, str) else list(targets)
        conv1d = any(is_conv1d(m) for m in base.modules())  # GPT-2's layers store W transposed: peft's fan_in_fan_out
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, use_rslora=rslora,
                            fan_in_fan_out=conv1d, **METHODS[method].peft_config)
        ours = add_adapters(copy.deepcopy(base), method=method, r=r, alpha=alpha, targets=targets, dropout=dropout,
                            rslora=rslora, **options)
    else:
        ours = add_adapters(copy.deepcopy(base), copy.deepcopy(config), **options)
    replay_peft_init(ours, seed)
    torch.manual_seed(seed)
    theirs = get_peft_model(copy.deepcopy(base if peft_base is None else peft_base), copy.deepcopy(config))
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for path, layer in adapter_layers(ours).items():
                refs = peft_params(theirs, path)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
                refs["lora_B"].copy_(layer.lora_B)
                if "magnitude" in refs:
                    noise = torch.randn(layer.magnitude.shape, generator=g).to(layer.magnitude.device)
                    layer.magnitude.mul_(1 + 0.1 * noise)
                    refs["magnitude"].copy_(layer.magnitude)
            for path, wrapper in modules_to_save(ours).items():  # a trained head moved off its start, the same
                refs = dict(trained_copy(theirs, path).named_parameters())
                for name, p in wrapper.trained.named_parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.device))
                    refs[name].copy_(p)
    return ours, theirs


def trained_copy(peft_model, path: str):
    """peft's trainable copy of a module it trains fully (modules_to_save) at `path`."""
    return peft_model.get_submodule("base_model.model." + path).modules_to_save["default"]


def output_of(out) -> torch.Tensor:
    """The tensor a model's output stands for: its logits; else its last hidden state (and pooled output, which
    BERT computes with a layer of its own), flattened; else the output itself."""
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        parts = [out.last_hidden_state, getattr(out, "pooler_output", None)]
        return torch.cat([p.flatten() for p in parts if p is not None])
    return out


def compare_with_peft(ours, theirs, inputs, seed: int = 123) -> dict:
    """Forward and backward through both in train mode (same dropout masks); the largest differences of the
    outputs and of each trained parameter's gradient over all layers. `inputs`: token ids (a tensor, passed as
    input_ids), a dict of keyword arguments, or for a plain nn.Module a tuple of positional arguments."""
    outputs = []
    for model in (ours, theirs):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # the same dropout masks in both
        if isinstance(inputs, dict):
            out = output_of(model(**inputs))
        elif isinstance(inputs, tuple):
            out = output_of(model(*inputs))
        else:
            out = output_of(model(input_ids=inputs))
        out.float().pow(2).mean().backward()
        outputs.append(out.detach())
    diffs = {"logits": (outputs[0].float() - outputs[1].float()).abs().max().item()}
    pairs = [(name, getattr(layer, name), ref) for path, layer in adapter_layers(ours).items()
             for name, ref in peft_params(theirs, path).items()]
    for path, wrapper in modules_to_save(ours).items():
        refs = dict(trained_copy(theirs, path).named_parameters())
        pairs += [(f"saved {name}", p, refs[name]) for name, p in wrapper.trained.named_parameters()]
    for name, mine, ref in pairs:
        if mine.grad is None or ref.grad is None or mine.grad.abs().sum() == 0:
            raise AssertionError(f"{name} got no gradient: the comparison would prove nothing.")
        diffs[name] = max(diffs.get(name, 0.0), (mine.grad - ref.grad).abs().max().item())
    return diffs


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


def copy_bnb_state(ours, theirs, prefix: str = "") -> int:
    """Give every LinearNF4 of `ours` the stored state of the bitsandbytes layer at the same path in `theirs`
    (`prefix` + path, e.g. "base_model.model." for a peft model). With double quantization bitsandbytes' CPU
    kernel picks a neighbouring 8-bit absmax code for a few blocks (see nanopeft.nf4); after this copy the two
    models hold the same bytes, so any remaining difference would be in the computation. Returns the layer count."""
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
