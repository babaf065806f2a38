"""nanoPEFT: LoRA, DoRA, NF4/QLoRA and LoRA+ from scratch in readable PyTorch, verified against peft and bitsandbytes.

Nothing here touches the network at import time.
"""
from .adapters import (add_adapters, adapter_layers, merge_adapters, remove_adapters, trainable_parameters,
                       unmerge_adapters)
from .dora import DoRALinear  # also registers method="dora" with add_adapters
from .lora import LoRALinear
from .loraplus import create_loraplus_optimizer, loraplus_param_groups
from .nf4 import LinearNF4, dequantize_nf4, merge_quantized, prepare_for_kbit_training, quantize_model, quantize_nf4
from .peft_format import load_adapter, save_adapter

__version__ = "0.1.0"
__all__ = [
    "LoRALinear", "DoRALinear", "add_adapters", "adapter_layers", "merge_adapters", "unmerge_adapters", "remove_adapters",
    "trainable_parameters", "save_adapter", "load_adapter", "LinearNF4", "quantize_nf4", "dequantize_nf4",
    "quantize_model", "prepare_for_kbit_training", "merge_quantized", "create_loraplus_optimizer",
    "loraplus_param_groups",
]
