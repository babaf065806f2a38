"""Step time and memory of DoRA: nanopeft's exact norm, nanopeft's factored norm, peft's DoRA, and LoRA, on the
same model and batch, interleaved.

    python benchmarks/dora_step.py                      # bundled SmolLM2-135M, a batch of 8 real tickets, CPU
    python benchmarks/dora_step.py --random --device cuda --dtype bfloat16 --batch-size 8 --seq-len 256
    python benchmarks/dora_step.py --random --device cuda --dtype float16 --batch-size 32 --seq-len 256

Learners read both "DoRA is 1.3-1.5x slower than LoRA per step" and "near identical". DoRA's extra cost per layer is
the row norm of W0 + s B A: the exact norm (peft's way) builds that (out, in) matrix every step, the factored norm
(`DoRALinear(norm="factored")`) gets the same norms from (out, r) and (r, r) products; `fused=True` also keeps
only the layer's output for the backward instead of W0 x and B A x. Targets: on a GPU, factored
DoRA / LoRA step time <= 1.15 and CUDA peak <= 1.10; on the CPU, factored no slower than exact (<= 1.0).
Step times move by a few percent between runs, more than the norm costs; so the norms alone are timed too (all
adapted layers, as one step computes them, interleaved): the only work in which exact and factored differ.
"""
import statistics
import time

import torch

from common import compare, nanopeft_model, parser, peft_model, ratio, setup


def norms_alone(models: dict, names, device, repeats: int) -> None:
    """Median time of one step's row norms (every DoRA layer's weight_norm(), as the forward computes them)."""
    from nanopeft.dora import DoRALinear

    layers = {name: [m for m in models[name].modules() if isinstance(m, DoRALinear)] for name in names}
    times = {name: [] for name in names}
    with torch.no_grad():
        for _ in range(repeats + 1):  # interleaved; the first round is a warm-up
            for name in names:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                for layer in layers[name]:
                    layer.weight_norm()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t[1:]) for name, t in times.items()}
    a, b = names
    print(f"the norms alone, {len(layers[a])} layers per step: " + ", ".join(f"{n} {med[n] * 1e3:.2f} ms" for n in names)
          + f" -> {a.removeprefix('nanopeft DoRA, ')} / exact {med[a] / med[b]:.3f}")

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--compile", action="store_true", help="torch.compile every model (fewer, fused kernels)")
    args = p.parse_args()
    base, batch, desc = setup(args)
    models = {"nanopeft DoRA": nanopeft_model(base, "dora", args.r),
              "nanopeft DoRA, factored": nanopeft_model(base, "dora", args.r, norm="factored"),
              "nanopeft DoRA, factored + fused": nanopeft_model(base, "dora", args.r, norm="factored", fused=True),
              "peft DoRA": peft_model(base, "dora", args.r), "nanopeft LoRA": nanopeft_model(base, "lora", args.r)}
    del base
    if args.compile:
        models = {name: torch.compile(model) for name, model in models.items()}
        desc += ", each model through torch.compile"
    print(desc)
    device = torch.device(args.device)
    results = compare(models, batch, device, args.repeats)
    ratio(results, "nanopeft DoRA", "peft DoRA", target=1.05)
    ratio(results, "nanopeft DoRA", "nanopeft LoRA")
    gpu = device.type == "cuda"
    ratio(results, "nanopeft DoRA, factored", "nanopeft LoRA", target=1.15 if gpu else None,
          peak_target=1.10 if gpu else None)
    ratio(results, "nanopeft DoRA, factored", "nanopeft DoRA", target=None if gpu else 1.0)
    ratio(results, "nanopeft DoRA, factored + fused", "nanopeft LoRA", target=1.15 if gpu else None,
          peak_target=1.10 if gpu else None)
    ratio(results, "nanopeft DoRA, factored + fused", "nanopeft DoRA", target=None if gpu else 1.0)
    norms_alone(models, ["nanopeft DoRA, factored", "nanopeft DoRA"], device, 5 * args.repeats)
