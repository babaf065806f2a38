"""nanoPEFT: LoRA, DoRA, PiSSA, NF4/QLoRA and LoRA+ from scratch in readable PyTorch, verified against peft and
bitsandbytes.

The methods are the modules of this package, each readable top to bottom with only torch in mind:

    lora.py         LoRALinear: h = W0 x + (alpha / r) B A x
    dora.py         DoRALinear: W' = m (W0 + s B A) / ||W0 + s B A||  (its speed-ups beside it: dora_fast.py)
    pissa.py        PiSSALinear: LoRA started at the top-r singular vectors of W0
    nf4.py          NF4 levels, blockwise quantization, packing, NF4Tensor  (faster lookups: nf4_fast.py, nf4_triton.py)
    qlora.py        LinearNF4; quantize a model, prepare it for k-bit training, merge into a 4-bit base honestly
    loraplus.py     LoRA+'s optimizer groups: B learns `ratio` times faster than A
    adapters.py     the table of methods (METHODS); add / merge / unmerge / remove adapters in any model
    targets.py      which layers to adapt, which modules train fully, parameter counts
    peft_format.py  adapter files peft and transformers load, and load theirs

`nanopeft.lab` holds what the notebooks use to measure them (models, the ticket task, the training loop, memory, the
peft and bitsandbytes twins, exercise graders), and `nanopeft.course` the experiments behind the course's results
(showdown, sweeps, statistics, claims, plots); nothing here imports either. Nothing touches the network at import.
"""
from .adapters import (METHODS, AdapterConfig, add_adapters, adapter_layers, merge_adapters, remove_adapters,
                       unmerge_adapters)
from .dora import DoRALinear
from .lora import LoRALinear
from .loraplus import create_loraplus_optimizer, loraplus_param_groups
from .nf4 import dequantize_nf4, quantize_nf4
from .peft_format import load_adapter, save_adapter
from .pissa import PiSSALinear
from .qlora import LinearNF4, merge_quantized, prepare_for_kbit_training, quantize_model
from .targets import trainable_parameters

__version__ = "0.2.0"
__all__ = [
    "LoRALinear", "DoRALinear", "add_adapters", "adapter_layers", "merge_adapters", "unmerge_adapters", "remove_adapters",
    "trainable_parameters", "save_adapter", "load_adapter", "LinearNF4", "quantize_nf4", "dequantize_nf4",
    "quantize_model", "prepare_for_kbit_training", "merge_quantized", "create_loraplus_optimizer",
    "loraplus_param_groups", "AdapterConfig", "METHODS", "PiSSALinear",
]
