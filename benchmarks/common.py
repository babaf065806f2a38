"""Shared by the step benchmarks: the model and batch, adapters from nanopeft and from peft, interleaved timing.

Memory is measured two ways. On every device: the bytes of the tensors autograd saves for the backward pass
(activations; the model's own parameters excluded), counted exactly through `saved_tensors_hooks`. On CUDA also the
allocator's peak (`max_memory_allocated`) for the step. Timed steps run without the counting hooks.
"""
import argparse
import copy
import os
import platform
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parser(description):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=100, help="with --random: tokens per row")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--random", action="store_true", help="random weights of SmolLM2's shapes and random ids")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def random_batch(vocab_size: int, batch_size: int, seq_len: int) -> dict:
    """Random token ids shaped like a batch of tickets: a two-token answer at the end of each row (seed 0)."""
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]  # a two-token answer at the end, as in the ticket task
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "keep": 3}


def setup(args):
    """(base model, batch, description) on args.device in args.dtype."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.random:
        from nanopeft.lab.models import smollm2_shaped

        base = smollm2_shaped()
        batch = random_batch(base.config.vocab_size, args.batch_size, args.seq_len)
    else:
        from nanopeft.lab.data import load_task
        from nanopeft.lab.models import load_base_model
        from nanopeft.lab.train import encode

        base, tok = load_base_model()
        batch = encode(tok, load_task().train[: args.batch_size])
    base = base.to(device, dtype)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    what = "random SmolLM2-shaped" if args.random else "bundled SmolLM2-135M"
    desc = (f"{what} in {args.dtype} on {where}; batch {tuple(batch['input_ids'].shape)}, r={args.r}, "
            f"targets {TARGETS}, torch {torch.__version__}")
    return base, batch, desc


def nanopeft_model(base, method, r, **options):
    from nanopeft import add_adapters

    torch.manual_seed(0)
    return add_adapters(copy.deepcopy(base), method=method, r=r, alpha=2 * r, targets=TARGETS, **options)


def peft_model(base, method, r):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                          use_dora=method == "dora"))


def step(model, batch, device, count_saved=False):
    """One forward + backward: (seconds, bytes saved for backward or None, CUDA peak bytes or None). The saved
    bytes are counted by hooks on autograd (a Python call per saved tensor), so timed steps run without them."""
    from nanopeft.lab.train import forward_backward

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    _, saved = forward_backward(model, batch, count_saved=count_saved)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    model.zero_grad(set_to_none=True)
    return elapsed, saved, peak


def compare(models: dict, batch, device, repeats: int) -> dict:
    """Interleaved runs (a, b, a, b, ...) after two warm-ups each; medians and maxima per model."""
    saved = {}
    for name, model in models.items():
        model.train()
        saved[name] = step(model, batch, device, count_saved=True)[1]
        step(model, batch, device)
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(step(model, batch, device))
    results = {}
    for name, rows in runs.items():
        times = [r[0] for r in rows]
        results[name] = {"time": statistics.median(times), "min": min(times), "max": max(times),
                         "saved": saved[name], "peak": rows[0][2] and max(r[2] for r in rows)}
        peak = f", CUDA peak {results[name]['peak'] / 2**20:.0f} MiB" if results[name]["peak"] else ""
        print(f"{name:>15}: median {1000 * results[name]['time']:.1f} ms/step (min {1000 * min(times):.1f}, "
              f"max {1000 * max(times):.1f}, n={len(times)}); saved for backward "
              f"{results[name]['saved'] / 2**20:.1f} MiB{peak}")
    return results


def ratio(results, a, b, target=None, peak_target=None):
    t = results[a]["time"] / results[b]["time"]
    m = results[a]["saved"] / results[b]["saved"]
    line = f"{a} / {b}: time {t:.3f}" + (f" (target <= {target})" if target else "")
    line += f", saved-for-backward memory {m:.3f}"
    if results[a]["peak"]:
        line += f", CUDA peak {results[a]['peak'] / results[b]['peak']:.3f}"
        line += f" (target <= {peak_target})" if peak_target else ""
    print(line)


def hardware(device=None) -> str:
    """The machine a benchmark ran on, as its tables name it: the GPU, or the CPU model and torch's thread count."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "CPU"
    return f"{name}, {torch.get_num_threads()} threads"
