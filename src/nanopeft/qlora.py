"""QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers et al., 2023, arXiv:2305.14314), the model-level steps.

QLoRA = a frozen base stored in NF4 (`nanopeft.nf4`) + LoRA adapters in high precision that train on top of it.
This file holds the frozen 4-bit layer, `LinearNF4`, and does the three things around the adapters:

    quantize_model(model)               every nn.Linear but the head -> LinearNF4 (blocks of 64, double quantization)
    prepare_for_kbit_training(model)    freeze, keep small tensors in float32, optionally checkpoint activations
    merge_quantized(model, requantize)  the honest merge: W0 + s B A is not on the NF4 grid, so keep it in high
                                        precision, or re-quantize it and report the rounding error

The adapters themselves are added with `nanopeft.add_adapters`, which wraps LinearNF4 layers as it wraps Linear ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import adapter_layers, set_module
from .nf4 import NF4Tensor, check_quantizable, dequantize_nf4, quantize_nf4
from .targets import path_matches


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly. The backward dequantizes again instead of keeping W (out, in) for
    autograd, as bitsandbytes' MatMul4Bit does: only x's gradient exists, since W is frozen."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), bias)  # (..., in) @ (in, out) + b -> (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None, None  # (..., out) @ (out, in) -> (..., in)


class LinearNF4(nn.Module):
    """A frozen Linear whose weight is stored in NF4 and dequantized to `compute_dtype` in every forward.

    Buffers, named like bitsandbytes' `Linear4bit` state: `weight` (packed uint8), `absmax`, and with double
    quantization `absmax_scale` and `offset`. The bias (if any) is a frozen parameter in its original dtype.
    compute_dtype: the dtype of the matmul (None: the input's dtype, bitsandbytes' default for float32 inputs).
    quant_storage: the dtype `weight` is kept in (bitsandbytes' `quant_storage`). torch.uint8 (the default): a buffer
                   of packed bytes. A float dtype (torch.bfloat16): the same bytes seen as numbers of that dtype, in a
                   frozen parameter, so that FSDP, which shards parameters but not buffers, can shard it; it must
                   then never be cast (`storage_view`).

        forward(x) = F.linear(x.to(cd), dequantize(W).to(cd), bias.to(cd)).to(x.dtype)
    """

    is_4bit = True  # what lora.is_4bit looks for: the weight is rebuilt by dequantize(), never written to

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None,
                 quant_storage: torch.dtype = torch.uint8):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"LinearNF4 needs a 2-D (out, in) weight, got shape {tuple(q.shape)}.")
        self.out_features, self.in_features = q.shape
        self.blocksize, self.weight_shape, self.weight_dtype = q.blocksize, q.shape, q.dtype
        self.compute_dtype, self.quant_storage = compute_dtype, quant_storage
        if quant_storage == torch.uint8:
            self.register_buffer("weight", q.packed)
        else:  # (bytes / itemsize, 1) numbers whose bytes are the codes: a parameter FSDP can shard along dim 0
            self.weight = nn.Parameter(storage_view(q.packed, quant_storage), requires_grad=False)
        for name, t in q.tensors().items():
            if name != "packed":
                self.register_buffer(name, t)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, quant_storage: torch.dtype = torch.uint8) -> "LinearNF4":
        """Quantize a `nn.Linear`'s weight (the Linear itself is left unchanged)."""
        if isinstance(linear, LinearNF4):
            raise TypeError("This layer is already a LinearNF4: quantizing twice would round the rounding.")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}.")
        q = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(q, linear.bias, compute_dtype, quant_storage)

    @property
    def quantized(self) -> NF4Tensor:
        """The stored weight as an NF4Tensor (views of this layer's buffers)."""
        if self.weight.dtype != self.quant_storage:
            raise TypeError(f"LinearNF4's packed weight is stored as {self.quant_storage} but arrived as "
                            f"{self.weight.dtype}: a cast (model.to(dtype), or an FSDP MixedPrecisionPolicy's "
                            f"param_dtype) rewrote its bytes and the 4-bit codes are lost. Quantize with "
                            f"quant_storage equal to the dtype the parameters are cast to, and never cast it.")
        packed = self.weight if self.quant_storage == torch.uint8 else storage_view(self.weight, torch.uint8)
        dq = hasattr(self, "absmax_scale")
        return NF4Tensor(packed, self.absmax, self.blocksize, self.weight_shape, self.weight_dtype,
                         self.absmax_scale if dq else None, self.offset if dq else None)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out, in) in `dtype` (default: the original weight's dtype), rebuilt from the 4-bit codes."""
        return dequantize_nf4(self.quantized, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype or x.dtype
        bias = self.bias.to(cd) if self.bias is not None else None
        return _NF4Matmul.apply(x.to(cd), self, bias).to(x.dtype)  # (..., out)

    def extra_repr(self) -> str:
        q = self.quantized
        storage = "" if self.quant_storage == torch.uint8 else f"quant_storage={self.quant_storage}, "
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={q.double_quant}, compute_dtype={self.compute_dtype}, "
                f"{storage}{q.bits_per_parameter:.3f} bits/parameter")


def storage_view(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same bytes seen as `dtype`: (bytes, 1) uint8 <-> (bytes / itemsize, 1) of `dtype`. A view, never a cast:
    a cast (`.to(dtype)`) would round the numbers and so rewrite the bytes, the 4-bit codes."""
    flat = packed.reshape(-1)  # (bytes,) or (bytes / itemsize,)
    nbytes = flat.numel() * flat.element_size()
    size = torch.empty(0, dtype=dtype).element_size()
    if nbytes % size:
        raise ValueError(f"{nbytes} packed bytes cannot be seen as {dtype} ({size} bytes each): choose a "
                         f"quant_storage whose size divides the byte count, or torch.uint8.")
    return flat.view(dtype).view(-1, 1)


@dataclass
class QuantizeReport:
    layers: int  # Linear layers quantized
    parameters: int  # weights in them
    bytes_before: int  # those weights before (their own dtype)
    bytes_after: int  # packed codes + absmax (+ double-quantization state)
    model_bytes_before: int  # every parameter and buffer of the model, before and after
    model_bytes_after: int

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.bytes_after / self.parameters

    def __str__(self) -> str:
        mib = 2 ** 20
        return (f"quantized {self.layers} Linear layers ({self.parameters:,} weights): "
                f"{self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB, "
                f"{self.bits_per_parameter:.3f} bits/parameter; whole model "
                f"{self.model_bytes_before / mib:.1f} MiB -> {self.model_bytes_after / mib:.1f} MiB")


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, shared tensors (tied embeddings) counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def quantize_model(model: nn.Module, skip=("lm_head",), blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None,
                   quant_storage: torch.dtype = torch.uint8) -> QuantizeReport:
    """Replace every nn.Linear of `model` in place by a LinearNF4, except those whose path is or ends with a name in
    `skip` (the output head, by default, as transformers' bitsandbytes integration does). Returns a report.
    quant_storage: torch.uint8 (packed bytes in a buffer) or a float dtype for FSDP (see LinearNF4).

    Everything is checked before the first layer changes, so an error leaves the model as it was.
    """
    if any(isinstance(m, LinearNF4) for m in model.modules()):
        raise ValueError("This model is already quantized (it has LinearNF4 layers): quantizing twice would round "
                         "the rounding. Start again from the full-precision model.")
    if adapter_layers(model):
        raise ValueError("This model has adapters: quantize the base first, then add adapters (QLoRA), or merge "
                         "and remove them (remove_adapters(model, merge=True)) before quantizing.")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and not any(path_matches(n, s) for s in skip)]
    if not names:
        raise ValueError(f"No nn.Linear layers to quantize in {type(model).__name__} (skip={skip}).")
    modules = dict(model.named_modules())
    size = torch.empty(0, dtype=quant_storage).element_size()
    for name in names:
        check_quantizable(modules[name].weight.detach(), blocksize, f"{name}.weight")
        if (modules[name].weight.numel() + 1) // 2 % size:
            raise ValueError(f"{name}.weight packs into {(modules[name].weight.numel() + 1) // 2} bytes, which cannot "
                             f"be seen as {quant_storage} ({size} bytes each): use quant_storage=torch.uint8.")

    before_model = model_bytes(model)
    params = before = after = 0
    for name in names:
        linear = modules[name]
        layer = LinearNF4.from_linear(linear, blocksize, double_quant, compute_dtype, quant_storage)
        params += linear.weight.numel()
        before += linear.weight.numel() * linear.weight.element_size()
        after += layer.quantized.nbytes
        set_module(model, name, layer)
    return QuantizeReport(len(names), params, before, after, before_model, model_bytes(model))


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """What peft's `prepare_model_for_kbit_training` does, for a model quantized with `quantize_model`:

    1. freeze every parameter (adapters are added afterwards and are the only thing that trains);
    2. cast every float16/bfloat16 parameter that is left (norms, embeddings, head, biases) to float32 -- small
       tensors whose precision matters for stable training; the 4-bit weights stay as they are (a float quant storage
       too: a cast would rewrite its codes);
    3. optionally switch on gradient checkpointing: activations of each decoder layer are recomputed in the backward
       instead of stored, trading about one extra forward for most of the activation memory.

    peft's default checkpointing is the older "reentrant" kind, which needs the embeddings' output to require grad
    (`enable_input_require_grads`); we use the non-reentrant kind PyTorch now recommends, which does not.
    """
    packed = {id(m.weight) for m in model.modules() if isinstance(m, LinearNF4)}  # codes kept as floats: never cast
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and id(p) not in packed:
            p.data = p.data.float()
    if gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable(); pass "
                            f"gradient_checkpointing=False or use a transformers model.")
        if hasattr(model, "config"):
            model.config.use_cache = False  # a cache is useless during training and clashes with recomputation
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


# ------------------------------------------------------------------------------------- merging into a 4-bit base
@dataclass
class MergeReport:
    layers: int
    requantized: bool
    max_abs_error: float  # largest |stored - (W0 + update)| over all merged weights (0 if kept in high precision)
    update_lost: float  # ||stored - (W0 + update)|| / ||update||: how much of the learned update the rounding hides

    def __str__(self) -> str:
        how = "re-quantized to NF4" if self.requantized else "kept in high precision"
        return (f"merged {self.layers} layers, {how}: max |rounding error| {self.max_abs_error:.3e}, "
                f"rounding error / update norm {self.update_lost:.3f}")


@torch.no_grad()
def merge_quantized(model: nn.Module, requantize: bool = False, dtype: torch.dtype = torch.float32) -> MergeReport:
    """Fold adapters that sit on LinearNF4 layers into their weights, the honest way, and remove the adapters.

    There is no exact 4-bit merge: W0 + s B A is not on the NF4 grid. Each layer's W0 is dequantized, the update
    added (DoRA: m / ||.|| applied), and then either
      requantize=False: the merged weight is kept as a plain nn.Linear in `dtype` (exact; the layer is no longer
                        4-bit: 4.127 -> 32 bits per weight in float32), or
      requantize=True:  it is quantized to NF4 again (same block size and double quantization), and the rounding
                        error is measured: the report says how large it is next to the update itself.
    """
    layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m.base_layer, LinearNF4)}
    if not layers:
        raise ValueError("No adapter in this model sits on a LinearNF4 layer: use merge_adapters/remove_adapters.")
    err_sq = upd_sq = 0.0
    max_err = 0.0
    for name, layer in layers.items():
        base = layer.base_layer
        w0 = base.dequantize(torch.float32)  # (out, in)
        merged = layer.effective_weight()  # W0 + s B A (DoRA: scaled by m / norm), float32
        if requantize:
            q = quantize_nf4(merged.to(base.weight_dtype), base.blocksize, double_quant=hasattr(base, "absmax_scale"))
            new = LinearNF4(q, base.bias, base.compute_dtype, base.quant_storage)
            stored = dequantize_nf4(q, torch.float32)
        else:
            new = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                            device=merged.device, dtype=dtype)
            new.weight.copy_(merged)
            if base.bias is not None:
                new.bias.copy_(base.bias)
            new.requires_grad_(False)
            stored = new.weight.float()
        err = stored - merged
        max_err = max(max_err, err.abs().max().item())
        err_sq += err.pow(2).sum().item()
        upd_sq += (merged - w0).pow(2).sum().item()
        set_module(model, name, new)
    return MergeReport(len(layers), requantize, max_err, math.sqrt(err_sq) / max(math.sqrt(upd_sq), 1e-30))
