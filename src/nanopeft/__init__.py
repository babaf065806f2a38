"""nanoPEFT: LoRA, DoRA, NF4/QLoRA and LoRA+ from scratch in readable PyTorch, verified against peft and bitsandbytes.

Nothing here touches the network at import time.
"""
from .adapters import (add_adapters, adapter_layers, merge_adapters, remove_adapters, trainable_parameters,
                       unmerge_adapters)
from .dora import DoRALinear  # also registers method="dora" with add_adapters
from .lora import LoRALinear
from .peft_format import load_adapter, save_adapter

__version__ = "0.1.0"
__all__ = [
    "LoRALinear", "DoRALinear", "add_adapters", "adapter_layers", "merge_adapters", "unmerge_adapters", "remove_adapters",
    "trainable_parameters", "save_adapter", "load_adapter",
]
