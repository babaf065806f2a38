"""DoRA at 7B shapes: one layer, forward and backward, ours (each norm/backward option) against peft's DoRA layer
and against LoRA, interleaved.

    python benchmarks/dora_layer.py                                  # CPU, float32
    python benchmarks/dora_layer.py --device cuda --dtype bfloat16   # a GPU; also float16

The 135M model's layers (576 wide) are too small for DoRA's extra work to show; a 7B model's are 4096 x 4096
(attention) and 11008 x 4096 (the MLP's up and gate projections). DoRA's extra work per step is the row norm of
W0 + s B A: peft (and our exact norm) build that (out, in) matrix, which at 11008 x 4096 is 45 million numbers; the
factored norm gets the same norms from (out, r) and (r, r) products (dora_fast.py). The base weight is frozen and
the input needs no gradient, so the backward is the adapter's alone: what DoRA adds shows at full size.
Each configuration is timed `--repeats` times, every variant once per round (interleaved), after one warm-up round;
the medians are printed, with the ratios the benchmarks page (benchmarks/README.md) quotes, and the bytes saved for backward.
"""
import argparse
import datetime
import json
import statistics
import time

import torch
from torch import nn

from common import hardware
from nanopeft import add_adapters
from nanopeft.lab.memory import SavedTensors

SHAPES = [(4096, 4096, 512), (4096, 4096, 4096), (11008, 4096, 512), (11008, 4096, 4096)]  # (out, in, tokens)
VARIANTS = {  # name -> (library, method, options)
    "ours LoRA": ("nanopeft", "lora", {}),
    "ours DoRA exact": ("nanopeft", "dora", {}),
    "ours DoRA factored": ("nanopeft", "dora", {"norm": "factored"}),
    "ours DoRA factored+fused": ("nanopeft", "dora", {"norm": "factored", "fused": True}),
    "peft DoRA": ("peft", "dora", {}),
    "peft LoRA": ("peft", "lora", {}),
}


def layer(library, method, options, out_features, in_features, r, dtype, device):
    """One Linear (out, in) of `dtype`, its weights drawn like a trained model's (std 0.02), with an adapter of rank
    r (alpha = 2r) from `library`; B set non-zero, as after training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    nn.init.normal_(model[0].weight, std=0.02)
    model = model.to(device, dtype)
    if library == "nanopeft":
        model = add_adapters(model, method, r=r, alpha=2 * r, targets=["0"], **options)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"],
                                                 use_dora=method == "dora"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    return model


def step(model, x, device):
    """One forward and backward (loss: the mean square of the output); seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model(x).float().pow(2).mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def saved_bytes(model, x):
    with SavedTensors(model) as saved:
        loss = model(x).float().pow(2).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved.nbytes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shapes", default="all", help="'all' or a comma list of indices into SHAPES (0-3)")
    p.add_argument("--out", default=None, help="write the medians as JSON here; the pages quote the CPU run shipped "
                   "as src/nanopeft/course/results/dora_layer.json (`make facts`)")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    print(f"one layer, forward + backward, r = {args.r}, {args.dtype}, {args.repeats} interleaved rounds after a "
          f"warm-up; {hardware(device)}; torch {torch.__version__}")
    print("| layer (out x in), tokens | ours DoRA (factored+fused) / peft DoRA | ours DoRA exact / peft DoRA | "
          "ours DoRA (factored+fused) / ours LoRA | peft DoRA / peft LoRA | medians (ms): "
          + ", ".join(VARIANTS) + " |")
    print("|---|---|---|---|---|---|")
    rows = []
    for out_f, in_f, tokens in shapes:
        x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        models = {name: layer(*spec, out_f, in_f, args.r, dtype, device) for name, spec in VARIANTS.items()}
        saved = {name: saved_bytes(m, x) for name, m in models.items()}
        times = {name: [] for name in models}
        for round_ in range(args.repeats + 1):
            for name, model in models.items():
                t = step(model, x, device)
                if round_:  # the first round warms up
                    times[name].append(t)
        med = {name: statistics.median(t) for name, t in times.items()}
        best = med["ours DoRA factored+fused"]
        print(f"| {out_f} x {in_f}, {tokens} | {best / med['peft DoRA']:.2f}x | "
              f"{med['ours DoRA exact'] / med['peft DoRA']:.2f}x | {best / med['ours LoRA']:.2f}x | "
              f"{med['peft DoRA'] / med['peft LoRA']:.2f}x | "
              + ", ".join(f"{med[n] * 1e3:.0f}" for n in VARIANTS) + " |", flush=True)
        print("    saved for backward (MiB): " + ", ".join(f"{n} {saved[n] / 2**20:.0f}" for n in VARIANTS),
              flush=True)
        rows.append({"out": out_f, "in": in_f, "tokens": tokens, "median_seconds": med, "saved_bytes": saved})
        del models
    if args.out:
        import peft

        result = {"date": datetime.date.today().isoformat(), "hardware": hardware(device), "dtype": args.dtype,
                  "r": args.r, "repeats": args.repeats, "torch": torch.__version__, "peft": peft.__version__,
                  "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
