"""nanoPEFT: LoRA, DoRA, NF4/QLoRA and LoRA+ from scratch in readable PyTorch, verified against peft and bitsandbytes.

The methods are the modules of this package, each readable top to bottom with only torch in mind:

    lora.py         LoRALinear: h = W0 x + (alpha / r) B A x
    dora.py         DoRALinear: W' = m (W0 + s B A) / ||W0 + s B A||
    nf4.py          NF4 levels, blockwise quantization, packing, NF4Tensor, LinearNF4
    qlora.py        quantize a model, prepare it for k-bit training, merge into a 4-bit base honestly
    loraplus.py     LoRA+'s optimizer groups: B learns `ratio` times faster than A
    adapters.py     add / merge / unmerge / remove adapters in any model
    peft_format.py  adapter files peft and transformers load, and load theirs

`nanopeft.lab` holds what measures them (models, the ticket task, the training loop, memory, the peft and
bitsandbytes twins, experiments, statistics, plots); nothing here imports it. Nothing touches the network at import.
"""
from .adapters import (AdapterConfig, add_adapters, adapter_layers, merge_adapters, remove_adapters,
                       trainable_parameters, unmerge_adapters)
from .dora import DoRALinear
from .lora import LoRALinear
from .loraplus import create_loraplus_optimizer, loraplus_param_groups
from .nf4 import LinearNF4, dequantize_nf4, quantize_nf4
from .peft_format import load_adapter, save_adapter
from .qlora import merge_quantized, prepare_for_kbit_training, quantize_model

__version__ = "0.2.0"
__all__ = [
    "LoRALinear", "DoRALinear", "add_adapters", "adapter_layers", "merge_adapters", "unmerge_adapters", "remove_adapters",
    "trainable_parameters", "save_adapter", "load_adapter", "LinearNF4", "quantize_nf4", "dequantize_nf4",
    "quantize_model", "prepare_for_kbit_training", "merge_quantized", "create_loraplus_optimizer",
    "loraplus_param_groups", "AdapterConfig",
]
