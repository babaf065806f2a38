"""Forward + backward step time and memory of nanopeft's LoRA vs peft's: same model, same batch, interleaved.

    python benchmarks/lora_step.py                      # bundled SmolLM2-135M, a batch of 8 real tickets, CPU
    python benchmarks/lora_step.py --random --device cuda --dtype bfloat16   # GPU machine without the model package

Both models start from the same weights with adapters on q/k/v/o. Runs alternate (ours, peft, ours, peft, ...) so
that drift of the machine (heat, other processes) hits both alike; we report medians and their ratio. `--random`
builds a randomly initialised model with SmolLM2-135M's shapes (same cost) and random token ids of a ticket batch's
shape, for machines where the bundled model and tokenizer are not installed.
"""
import torch

from common import compare, nanopeft_model, parser, peft_model, ratio, setup

if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    base, batch, desc = setup(args)
    print(desc)
    models = {"nanopeft LoRA": nanopeft_model(base, "lora", args.r), "peft LoRA": peft_model(base, "lora", args.r)}
    del base
    results = compare(models, batch, torch.device(args.device), args.repeats)
    ratio(results, "nanopeft LoRA", "peft LoRA", target=1.05)
