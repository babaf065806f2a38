"""Forward + backward step time (and peak memory) of nanopeft's LoRA vs peft's: same model, same batch, interleaved.

    python benchmarks/lora_step.py                      # bundled SmolLM2-135M, a batch of 8 real tickets, CPU
    python benchmarks/lora_step.py --random --device cuda --dtype bfloat16   # GPU machine without the model package

Both models start from the same weights with adapters on q/k/v/o. Runs alternate (ours, peft, ours, peft, ...) so
that drift of the machine (heat, other processes) hits both alike; we report medians and their ratio. `--random`
builds a randomly initialised model with SmolLM2-135M's shapes (same cost) and random token ids of a ticket batch's
shape, for machines where the bundled model and tokenizer are not installed.
"""
import argparse
import copy
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=100, help="with --random: tokens per row")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--random", action="store_true", help="random weights of SmolLM2's shapes, random ids")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    from nanopeft import add_adapters
    from nanopeft.train import answer_loss

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.random:
        from nanopeft.models import smollm2_shaped

        base = smollm2_shaped()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, -2:] = ids[:, -2:]  # a two-token answer at the end, as in the ticket task
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "keep": 3}
    else:
        from nanopeft.data import load_task
        from nanopeft.models import load_base_model
        from nanopeft.train import encode

        base, tok = load_base_model()
        batch = encode(tok, load_task().train[: args.batch_size])
    base = base.to(device, dtype)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    torch.manual_seed(0)
    ours = add_adapters(copy.deepcopy(base), r=args.r, alpha=2 * args.r, targets=targets)
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets))
    del base
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{'random SmolLM2-shaped' if args.random else 'bundled SmolLM2-135M'} in {args.dtype} on {where}; "
          f"batch {tuple(batch['input_ids'].shape)}, r={args.r}, targets {targets}, torch {torch.__version__}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(model):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=batch["keep"]).logits
        answer_loss(logits, batch["labels"]).backward()
        sync()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        model.zero_grad(set_to_none=True)
        return elapsed, peak

    for model in (ours, theirs):  # warm-up
        model.train()
        step(model)
        step(model)
    times, peaks = {"nanopeft": [], "peft": []}, {"nanopeft": [], "peft": []}
    for _ in range(args.repeats):
        for name, model in (("nanopeft", ours), ("peft", theirs)):
            t, p = step(model)
            times[name].append(t)
            peaks[name].append(p)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        mem = f", peak allocated {max(peaks[k]) / 2**20:.0f} MiB" if peaks[k][0] is not None else ""
        print(f"{k:>9}: median {1000 * med[k]:.1f} ms/step (min {1000 * min(v):.1f}, max {1000 * max(v):.1f}, "
              f"n={len(v)}){mem}")
    print(f"ratio nanopeft / peft, time: {med['nanopeft'] / med['peft']:.3f} (target <= 1.05)")
    if peaks["peft"][0] is not None:
        print(f"ratio nanopeft / peft, peak memory: {max(peaks['nanopeft']) / max(peaks['peft']):.3f}")


if __name__ == "__main__":
    main()
