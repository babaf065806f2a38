"""Step time and memory of nanopeft's DoRA vs peft's DoRA, and of DoRA vs LoRA: same model, same batch, interleaved.

    python benchmarks/dora_step.py                      # bundled SmolLM2-135M, a batch of 8 real tickets, CPU
    python benchmarks/dora_step.py --random --device cuda --dtype bfloat16

Learners read both "DoRA is 1.3-1.5x slower than LoRA per step" and "near identical"; the last line measures it
here. DoRA's extra cost per layer is the row norm of W0 + s B A (an (out, in) matrix built every step) and the
extra elementwise work; the detached norm keeps that matrix out of the backward pass.
"""
import torch

from common import compare, nanopeft_model, parser, peft_model, ratio, setup

if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    base, batch, desc = setup(args)
    print(desc)
    models = {"nanopeft DoRA": nanopeft_model(base, "dora", args.r), "peft DoRA": peft_model(base, "dora", args.r),
              "nanopeft LoRA": nanopeft_model(base, "lora", args.r)}
    del base
    results = compare(models, batch, torch.device(args.device), args.repeats)
    ratio(results, "nanopeft DoRA", "peft DoRA", target=1.05)
    ratio(results, "nanopeft DoRA", "nanopeft LoRA")
