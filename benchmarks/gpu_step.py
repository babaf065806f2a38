"""Where a training step's time goes, per dtype: the real loop against a bare one, profiled.

    python benchmarks/gpu_step.py --device cuda                      # float32, float16 and bfloat16
    python benchmarks/gpu_step.py --device cuda --compile            # also torch.compile, default and CUDA graphs
    python benchmarks/gpu_step.py                                    # the same on the CPU (op counts, times)

For each dtype of the frozen base (LoRA r=8 on every linear layer, float32 adapters, batch 4 tickets):

  real loop   nanopeft.lab.train.training_step: the step the notebooks train with (saved-tensor counting, loss
              scaling in float16, gradient clipping, AdamW);
  bare loop   forward, loss, backward, AdamW step, nothing else;

each timed over interleaved steps (medians), and profiled over a few steps with torch.profiler: how many kernels
the GPU runs per step, how long it is busy, and how long the step takes on the clock. A 135M model at batch 4 gives
each kernel little work: the GPU finishes a kernel faster than Python can launch the next, so it mostly waits
("launch-bound"). torch.compile fuses kernels (fewer launches); mode="reduce-overhead" also records the step as a
CUDA graph, replayed with one launch. The target: half precision never slower than float32.
"""
import argparse
import copy
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bare_step(model, batch, optimizer):
    from nanopeft.lab.train import answer_loss

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=batch["keep"]).logits
    answer_loss(logits, batch["labels"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def real_step(model, batch, optimizer, scaler):
    from nanopeft.lab.train import training_step

    trainable = [p for p in model.parameters() if p.requires_grad]
    training_step(model, batch, optimizer, scaler, trainable)
    optimizer.zero_grad(set_to_none=True)


def timed(fn, device, steps):
    for _ in range(2):  # warm-up (and compilation)
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile(fn, device, steps=3):
    """(kernels or ops per step, device-busy seconds per step, wall seconds per step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    start = time.perf_counter()
    with run_profiler(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy = sum(e.device_time for e in kernels) / 1e6 / steps
        return len(kernels) / steps, busy, wall
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    return ops / steps, None, wall


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--random", action="store_true", help="SmolLM2-shaped random weights (no model package needed)")
    p.add_argument("--compile", action="store_true", help="also torch.compile (default and reduce-overhead)")
    args = p.parse_args()

    from nanopeft import add_adapters
    from nanopeft.lab.data import load_task
    from nanopeft.course.experiments import hardware
    from nanopeft.lab.models import load_base_model, smollm2_shaped
    from nanopeft.lab.train import encode

    device = torch.device(args.device)
    if args.random:
        from transformers import AutoTokenizer

        from nanopeft.lab.models import bundled_model_folder

        base, tokenizer = smollm2_shaped(), AutoTokenizer.from_pretrained(bundled_model_folder())
    else:
        base, tokenizer = load_base_model()
    batch = encode(tokenizer, load_task().train[:4], device)
    print(f"{hardware()}; batch {tuple(batch['input_ids'].shape)}, LoRA r=8 on all linear layers\n")
    what = "kernels" if device.type == "cuda" else "aten ops"
    print(f"{'dtype':>9} {'loop':>22} {'ms/step':>8} {what + '/step':>14} {'GPU busy ms':>12} {'busy %':>7}")
    results = {}
    for name in args.dtypes:
        dtype = getattr(torch, name)
        model = copy.deepcopy(base).to(device, dtype)
        torch.manual_seed(0)
        add_adapters(model, "lora", r=8, alpha=16, targets="all-linear")
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        loops = {"real (training_step)": lambda: real_step(model, batch, optimizer, scaler),
                 "bare": lambda: bare_step(model, batch, optimizer)}
        if args.compile:
            for mode in ("default", "reduce-overhead"):
                compiled = torch.compile(model, mode=mode)
                loops[f"bare, compile {mode}"] = lambda c=compiled: bare_step(c, batch, optimizer)
        for loop, fn in loops.items():
            ms = timed(fn, device, args.steps) * 1e3
            count, busy, _ = profile(fn, device)
            results[(name, loop)] = ms
            busy_text = f"{busy * 1e3:12.1f} {100 * busy * 1e3 / ms:6.0f}%" if busy is not None else f"{'-':>12} {'-':>7}"
            print(f"{name:>9} {loop:>22} {ms:8.1f} {count:14.0f} {busy_text}", flush=True)
        del model, optimizer
    fp32 = results.get(("float32", "real (training_step)"))
    for name in args.dtypes:
        if name != "float32" and fp32:
            r = results[(name, "real (training_step)")] / fp32
            print(f"{name} / float32, real loop: {r:.2f}   (target: <= 1.0, half precision never slower)")


if __name__ == "__main__":
    main()
