"""Will it fit? The peak memory of one training step, predicted part by part from a model's config alone.

    plan("llama-2-7b", method="qlora", r=16, batch=4, seq=512, checkpointing=True, device="t4")

A training step holds, at its peak:
    frozen weights        the base, by storage format: NF4 (+ its scales), 16-bit, 32-bit; tied weights counted once
    trainable weights     the adapters (float32, as peft keeps them), or the whole model in full fine-tuning
    gradients             one per trainable weight (present from the backward to the optimizer step)
    optimizer state       AdamW: two moments per trainable weight (float32; bf16 in pure-bf16 training);
                          8-bit AdamW (bitsandbytes): one byte each, plus a float32 scale per 256 values, for
                          tensors of 4,096 elements or more (smaller ones stay 32-bit, bitsandbytes' rule); SGD: none
    activations           what autograd saves for the backward, counted by running the model's own modules on fake
                          tensors (no memory, no weights): exact for this architecture, batch and sequence. With
                          gradient checkpointing each layer keeps its input; one layer is rebuilt at a time.
    logits and loss       the logits (batch x sequence x vocabulary) the model returns, and the two float32 buffers of
                          the same size the loss's backward creates
    temporaries           AdamW's square root of its second moments (on a GPU for all tensors at once, on a CPU
                          one tensor at a time); a 4-bit layer's weight rebuilt for its matmul; tied embeddings'
                          two gradients summed
    CUDA context          on a GPU only: the driver's and kernels' memory, outside PyTorch's allocator (a constant)
    gathered (FSDP)       with ranks=N: the weights FSDP2 gathers whole (embeddings and head, two decoder layers)

The peak is the largest of a few moments: the start of the backward, the backward through a 4-bit layer, the backward
with checkpointing (a layer rebuilt), the end of the backward, the optimizer step. `will_it_fit.measure_step` runs the
same step for real and meters it; the tests hold the two together on a grid of models, methods and shapes.
"""
from __future__ import annotations

import dataclasses
import json
import math
from functools import lru_cache

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..adapters import add_adapters, set_module
from ..nf4 import NF4Tensor, _code_on
from ..qlora import LinearNF4
from .device import DTYPES
from .model_configs import load_config, presets

SETUPS = {  # name -> what it trains and how the base is stored
    "full-fp32": "full fine-tuning, float32 weights, gradients and AdamW state",
    "full-mixed": "full fine-tuning in mixed precision: float32 master weights, compute in --dtype (autocast)",
    "full-bf16": "full fine-tuning in pure bfloat16: weights, gradients and optimizer state in bf16",
    "lora": "LoRA: the base frozen in --dtype, float32 adapters",
    "loraplus": "LoRA+: LoRA's memory (only the learning rates differ)",
    "dora": "DoRA: LoRA plus a magnitude per output row",
    "qlora": "QLoRA: linear layers in NF4, the rest in --dtype, float32 adapters",
    "qdora": "QDoRA: DoRA on an NF4 base",
}
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
GIB = 2**30
# Usable MiB as nvidia-smi reports them; the CUDA context (outside PyTorch's allocator) is assumed until measured.
DEVICES = {"t4": ("NVIDIA T4 (Colab, Kaggle)", 15_360), "rtx4090": ("RTX 4090", 24_564),
           "a100-40": ("A100 40 GB", 40_960), "a100-80": ("A100 80 GB", 81_920), "h100": ("H100 80 GB", 81_559)}
CUDA_CONTEXT = 500 * 2**20
# "Fits" keeps this share of the device free: it covers the planner's largest under-prediction on the CPU grid
# (0.9%, benchmarks/memory_planner.py) and some of the CUDA allocator's rounding and fragmentation.
HEADROOM = 0.05
MIN_8BIT_SIZE = 4096  # bitsandbytes' optimizers keep tensors smaller than this in 32-bit state
PEAK_PARTS = ("frozen weights", "trainable weights", "gradients", "optimizer state", "activations", "logits and loss",
              "temporaries", "CUDA context", "gathered weights (FSDP)")


def _fake_model(config, method, r, targets, dtype, double_quant, dora_norm, layers):
    """The model with `layers` decoder layers and the method applied, on fake tensors (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    fields = {**config.to_dict(), "num_hidden_layers": layers}
    if fields.get("layer_types"):  # per-layer attention kinds (Qwen2, Mistral): as many as there are layers
        fields["layer_types"] = fields["layer_types"][:layers]
    config = config.__class__.from_dict(fields)
    weights_dtype = torch.float32 if method in ("full-fp32", "full-mixed") else DTYPES[dtype]
    model = AutoModelForCausalLM.from_config(config, dtype=weights_dtype)
    if method in ("qlora", "qdora"):
        _quantize_shapes(model, double_quant, DTYPES[dtype])
    if method.startswith("full"):
        model.requires_grad_(True)
    else:
        options = {"norm": dora_norm} if method in ("dora", "qdora") else {}
        add_adapters(model, "dora" if method in ("dora", "qdora") else "lora", r=r, alpha=2 * r, targets=targets,
                     **options)
    return model.train()


def _quantize_shapes(model, double_quant, compute_dtype, blocksize=64):
    """`qlora.quantize_model`'s shapes (each Linear but the head -> a LinearNF4 of NF4's tensors), reading no weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            numel = module.weight.numel()
            blocks = math.ceil(numel / blocksize)
            q = NF4Tensor(torch.empty((numel + 1) // 2, 1, dtype=torch.uint8),
                          torch.empty(blocks, dtype=torch.uint8 if double_quant else torch.float32), blocksize,
                          module.weight.shape, module.weight.dtype,
                          torch.empty(math.ceil(blocks / NF4Tensor.DQ_BLOCKSIZE)) if double_quant else None,
                          torch.empty(()) if double_quant else None)
            set_module(model, name, LinearNF4(q, module.bias, compute_dtype))


def _counts(model, optimizer: str) -> dict:
    """Bytes of the persistent parts, from the model's tensors (shared storages once)."""
    out = {"frozen 4-bit": 0, "frozen 16-bit": 0, "frozen 32-bit": 0, "trainable weights": 0, "optimizer state": 0,
           "largest trainable": 0, "head trainable": 0,
           "largest 4-bit": max((m.out_features * m.in_features for m in model.modules() if isinstance(m, LinearNF4)),
                                default=0)}
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        key = t.untyped_storage()._cdata
        if key in seen:
            continue
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        if t.requires_grad:
            out["trainable weights"] += nbytes
            out["largest trainable"] = max(out["largest trainable"], nbytes)
            if name.startswith("lm_head") or "embed" in name:
                out["head trainable"] = max(out["head trainable"], nbytes)
            if optimizer == "adamw":
                out["optimizer state"] += 2 * nbytes + 4  # exp_avg, exp_avg_sq (the parameter's dtype), step
            elif optimizer == "adamw8bit":
                n = t.numel()
                out["optimizer state"] += (2 * n + 2 * 4 * math.ceil(n / 256) if n >= MIN_8BIT_SIZE else 8 * n) + 4
        elif t.dtype == torch.uint8 or t.element_size() == 1 or name.rsplit(".", 1)[-1] in (
                "absmax", "absmax_scale", "offset"):
            out["frozen 4-bit"] += nbytes
        elif t.element_size() == 2:
            out["frozen 16-bit"] += nbytes
        else:
            out["frozen 32-bit"] += nbytes
    return out


def _saved(model, batch, seq, method, dtype, checkpointing) -> dict:
    """Bytes autograd saves in one forward with labels (fake tensors), by storage, parameters excluded."""
    exclude = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in exclude and storage._cdata not in seen:
            seen[storage._cdata] = (storage.nbytes(), t)  # hold it, so its address is not reused in this trace
        return t

    ids = torch.zeros(batch, seq, dtype=torch.long)
    autocast = torch.autocast("cpu", dtype=DTYPES[dtype], enabled=method == "full-mixed" and dtype != "float32")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = model(input_ids=ids, labels=ids)
    return {"saved": sum(n for n, _ in seen.values()), "logits": out.logits.numel() * out.logits.element_size()}


@lru_cache(maxsize=256)
def _trace(config_json, method, r, targets, dtype, double_quant, dora_norm, optimizer, batch, seq) -> dict:
    """Counts and saved bytes at 1 and 2 layers and batch 1 and 2, extended to the model's depth and batch (the
    layers are alike; every saved tensor but the position tables grows with the batch)."""
    for name in ("nf4", "dynamic", "nf4-pairs"):  # the code tables, built from real numbers before the fake mode
        _code_on(name, torch.device("cpu"))
    config = load_config(json.loads(config_json))
    depth = config.num_hidden_layers
    values = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for layers in (1, 2):
            model = _fake_model(config, method, r, targets, dtype, double_quant, dora_norm, layers)
            values[layers] = _counts(model, optimizer)
            for b in (1, 2):
                values[layers, b] = _saved(model, b, seq, method, dtype, False)
    per_layer = {k: values[2][k] - values[1][k] for k in values[1]}
    counts = {k: values[1][k] + (depth - 1) * per_layer[k] for k in values[1]}
    counts["largest trainable"] = max(values[1]["largest trainable"], values[2]["largest trainable"])
    counts["head trainable"] = values[1]["head trainable"]
    counts["largest 4-bit"] = values[1]["largest 4-bit"]
    counts["tied"] = bool(getattr(config, "tie_word_embeddings", False))
    weights = ("frozen 4-bit", "frozen 16-bit", "frozen 32-bit", "trainable weights")
    counts["layer weights"] = sum(per_layer[k] for k in weights)  # one decoder layer's weights, whole
    counts["outside weights"] = sum(values[1][k] for k in weights) - counts["layer weights"]  # embeddings, head

    def at(layers_saved):  # bilinear in layers and batch
        one, two = layers_saved(1), layers_saved(2)
        return one + (batch - 1) * (two - one)

    s11, s12, s21, s22 = (values[1, 1]["saved"], values[1, 2]["saved"], values[2, 1]["saved"], values[2, 2]["saved"])
    layer_1, layer_2 = s21 - s11, s22 - s12  # one layer's saved bytes at batch 1 and 2
    outside_1, outside_2 = s11 - layer_1, s12 - layer_2  # embeddings, final norm, head, loss
    layer = layer_1 + (batch - 1) * (layer_2 - layer_1)
    outside = outside_1 + (batch - 1) * (outside_2 - outside_1)
    logits = values[1, 1]["logits"] * batch
    hidden = batch * seq * config.hidden_size * (4 if method in ("full-fp32",) or dtype == "float32" else 2)
    return {"counts": counts, "layer saved": layer, "outside saved": outside, "logits": logits, "depth": depth,
            "hidden": hidden, "vocab": config.vocab_size}


@dataclasses.dataclass
class Plan:
    """The predicted peak of one training step, its parts, when it happens and whether it fits."""

    setup: dict
    parts: dict  # part -> bytes at the peak
    peak_bytes: int
    moment: str  # "backward start", "backward (a layer rebuilt)", "optimizer step"
    moments: dict  # moment -> predicted bytes
    device: str | None
    capacity: int | None  # bytes the device offers (None: no device given)
    advice: list = dataclasses.field(default_factory=list)

    @property
    def fits(self):
        return None if self.capacity is None else self.peak_bytes * (1 + HEADROOM) <= self.capacity

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "capacity_bytes": self.capacity, "fits": self.fits}

    def __str__(self) -> str:
        s = self.setup
        lines = [f"{s['model']}: {s['method']}, r={s['r']}, batch {s['batch']} x {s['seq']} tokens, {s['dtype']}, "
                 f"{s['optimizer']}, checkpointing {'on' if s['checkpointing'] else 'off'}"
                 + (f"; one of {s['ranks']} FSDP2 ranks" if s["ranks"] > 1 else "")]
        width = max(map(len, self.parts))
        for part, nbytes in self.parts.items():
            if nbytes:
                lines.append(f"  {part:<{width}}  {nbytes / GIB:8.2f} GiB")
        lines.append(f"  {'peak':<{width}}  {self.peak_bytes / GIB:8.2f} GiB   (at the {self.moment})")
        if self.capacity is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {self.device}: {self.capacity / GIB:.2f} GiB -> {verdict} (keeping {HEADROOM:.0%} free)")
        lines += [f"  - {a}" for a in self.advice]
        return "\n".join(lines)


def _capacity(device):
    if device is None or str(device).lower() == "cpu":
        return None, None
    if isinstance(device, (int, float)) or str(device).replace(".", "", 1).isdigit():
        gib = float(device)
        if gib <= 0:
            raise ValueError(f"device memory must be positive GiB, got {device}.")
        return f"a {gib:g} GiB GPU", int(gib * GIB)
    key = str(device).lower()
    if key not in DEVICES:
        raise ValueError(f"Unknown device {device!r}: use one of {', '.join(DEVICES)}, 'cpu', or a number of GiB.")
    name, mib = DEVICES[key]
    return name, mib * 2**20


def plan(model="smollm2-135m", method: str = "lora", r: int = 8, targets="all-linear", batch: int = 1,
         seq: int = 512, checkpointing: bool = False, optimizer: str = "adamw", dtype: str = "bfloat16",
         device=None, double_quant: bool = True, dora_norm: str = "exact", ranks: int = 1, advise: bool = True) -> Plan:
    """Predict the peak memory of one training step (see the module docstring). `model`: a preset name, a
    config.json path, a dict or a transformers config. `device`: None or "cpu" (no verdict), a name in DEVICES,
    or a number of GiB. `ranks` > 1: one of N ranks under FSDP2, `batch` being each rank's. Raises ValueError, naming
    the bad input, before any work."""
    method = method.lower()
    if method not in SETUPS:
        raise ValueError(f"Unknown method {method!r}: choose one of {', '.join(SETUPS)}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}.")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    for name, value in (("batch", batch), ("seq", seq), ("r", r), ("ranks", ranks)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive whole number, got {value!r}.")
    if method == "full-mixed" and dtype == "float32":
        raise ValueError("full-mixed computes in a 16-bit dtype: pass dtype='bfloat16' or 'float16' "
                         "(or method='full-fp32').")
    device_name, capacity = _capacity(device)
    config = load_config(model)
    targets_key = targets if isinstance(targets, str) else ",".join(targets)
    t = _trace(config.to_json_string(), "lora" if method == "loraplus" else method, r, targets_key, dtype,
               double_quant, dora_norm, optimizer, batch, seq)
    c = t["counts"]
    frozen = c["frozen 4-bit"] + c["frozen 16-bit"] + c["frozen 32-bit"]
    trainable, state = c["trainable weights"], c["optimizer state"]
    grads = trainable
    depth = t["depth"]
    saved_all = t["outside saved"] + depth * t["layer saved"]
    saved_ckpt = t["outside saved"] + depth * t["hidden"]  # each layer keeps its input
    activations = saved_ckpt if checkpointing else saved_all
    loss_buffers = 2 * batch * seq * t["vocab"] * 4  # float32 gradients of the log-probabilities and the logits
    logits_and_loss = t["logits"] + loss_buffers
    context = CUDA_CONTEXT if capacity is not None else 0
    gathered = 0
    if ranks > 1:  # FSDP2: each rank keeps 1/N of every weight, gradient and state, and gathers whole layers to use
        frozen, trainable, state, grads = (-(-x // ranks) for x in (frozen, trainable, state, grads))
        gathered = c["outside weights"] + 2 * c["layer weights"]  # embeddings and head, a layer and the next one
    persistent = frozen + trainable + state + context + gathered
    # AdamW's square root of the second moments: on a GPU torch's default "foreach" path takes it for all tensors
    # at once (one copy of everything trained); on a CPU it goes tensor by tensor (two copies of the largest).
    if optimizer == "sgd":
        step_temp = 0
    elif capacity is not None:
        step_temp = trainable if optimizer == "adamw" else c["largest trainable"]
    else:
        step_temp = 2 * c["largest trainable"]
    # Full fine-tuning with tied embeddings: the table's second gradient (from the embedding lookup) is added to the
    # first (from the head) at the end of the backward, with both and their sum alive for a moment.
    tied_temp = 2 * c["head trainable"] if c["tied"] else 0
    # A 4-bit layer rebuilds its weight in the compute dtype for each matmul, forward and backward: nanopeft's
    # dequantize holds two weight-sized tensors at its peak (measured), the largest layer's counts.
    dequant_temp = 2 * c["largest 4-bit"] * DTYPES[dtype].itemsize
    held = t["logits"]  # the logits the model returned stay alive until the next forward replaces them
    moments = {
        "backward start": persistent + activations + logits_and_loss,
        "backward end": persistent + grads + tied_temp + held,
        "optimizer step": persistent + grads + step_temp + held,
    }
    if dequant_temp:
        moments["backward through a 4-bit layer"] = persistent + activations + held + dequant_temp
    if checkpointing:
        moments["backward (a layer rebuilt)"] = persistent + saved_ckpt + t["layer saved"] + grads + held + dequant_temp
    moment = max(moments, key=moments.get)
    parts = {"frozen weights": frozen, "trainable weights": trainable, "gradients": 0, "optimizer state": state,
             "activations": 0, "logits and loss": held, "temporaries": 0, "CUDA context": context,
             "gathered weights (FSDP)": gathered}
    if moment == "backward start":
        parts.update({"activations": activations, "logits and loss": logits_and_loss})
    elif moment == "optimizer step":
        parts.update({"gradients": grads, "temporaries": step_temp})
    elif moment == "backward end":
        parts.update({"gradients": grads, "temporaries": tied_temp})
    elif moment == "backward through a 4-bit layer":
        parts.update({"activations": activations, "temporaries": dequant_temp})
    else:
        parts.update({"activations": saved_ckpt + t["layer saved"], "gradients": grads, "temporaries": dequant_temp})
    setup = {"model": model if isinstance(model, str) else getattr(config, "_name_or_path", "") or config.model_type,
             "method": method, "r": r, "targets": targets_key, "batch": batch, "seq": seq,
             "checkpointing": checkpointing, "optimizer": optimizer, "dtype": dtype, "ranks": ranks}
    result = Plan(setup, parts, sum(parts.values()), moment, moments, device_name, capacity)
    if advise and result.fits is False:
        result.advice = _advice(model, method, r, targets, batch, seq, checkpointing, optimizer, dtype, device,
                                double_quant, dora_norm, ranks)
    return result


def _advice(model, method, r, targets, batch, seq, checkpointing, optimizer, dtype, device, double_quant,
            dora_norm, ranks) -> list:
    """What would make a configuration that does not fit, fit: the largest batch, then single changes."""
    kw = dict(model=model, method=method, r=r, targets=targets, batch=batch, seq=seq, checkpointing=checkpointing,
              optimizer=optimizer, dtype=dtype, device=device, double_quant=double_quant, dora_norm=dora_norm,
              ranks=ranks, advise=False)
    out = []
    largest = 0
    lo, hi = 1, batch - 1
    while lo <= hi:  # the peak grows with the batch
        mid = (lo + hi) // 2
        if plan(**{**kw, "batch": mid}).fits:
            largest, lo = mid, mid + 1
        else:
            hi = mid - 1
    out.append(f"largest batch that fits: {largest}" if largest else "no batch fits as configured")
    changes = []
    if not checkpointing:
        changes.append(("gradient checkpointing", {"checkpointing": True}))
    if method in ("lora", "loraplus", "dora", "full-fp32", "full-mixed", "full-bf16"):
        changes.append(("QLoRA" if method != "dora" else "QDoRA", {"method": "qdora" if method == "dora" else "qlora"}))
    if r > 4 and not method.startswith("full"):
        changes.append((f"rank {r // 2}", {"r": r // 2}))
    if optimizer == "adamw":
        changes.append(("8-bit AdamW", {"optimizer": "adamw8bit"}))
    fitting = []
    for label, change in changes:
        p = plan(**{**kw, **change})
        fitting.append(p.fits)
        out.append(f"with {label}: {p.peak_bytes / GIB:.2f} GiB ({'fits' if p.fits else 'still does not fit'})")
    if len(changes) > 1 and not any(fitting):
        together = {k: v for _, change in changes for k, v in change.items()}
        p = plan(**{**kw, **together})
        out.append(f"with all of these together: {p.peak_bytes / GIB:.2f} GiB "
                   f"({'fits' if p.fits else 'still does not fit: a smaller batch or sequence, or a larger GPU'})")
    return out
