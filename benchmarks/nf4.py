"""NF4 and QLoRA, nanopeft vs bitsandbytes (+ transformers + peft), measured side by side in one run.

    python benchmarks/nf4.py                       # on the CPU (and on the GPU too, when there is one)
    python benchmarks/nf4.py --device cuda         # the GPU only
    python benchmarks/nf4.py --steps 5             # more QLoRA steps
    python benchmarks/nf4.py --random              # SmolLM2-shaped random weights (no model package needed)

1. Quantize and dequantize (NF4, blocks of 64, double quantization) on the bundled model's weight matrices (210 of
   them, each of the four shapes timed), interleaved runs, medians; ratio = our time / bitsandbytes'.
   CPU: ours (kernel="gather", the default there: nf4_fast.py; and kernel="torch", the readable steps of nf4.py)
   against bitsandbytes' C kernel (AVX512 or AVX2, by the CPU) and its own PyTorch path.
   CUDA: ours in PyTorch, ours as one Triton kernel (nanopeft/nf4_triton.py) and, with --compile, the readable
   version through torch.compile, against bitsandbytes' CUDA kernel; throughput in GB/s against the bandwidth a
   plain device-to-device copy reaches in the same run. Targets: CPU dequantize <= 2, quantize <= 1; CUDA <= 1.2.
2. A QLoRA training step (all linear layers, r=8, a batch of real tickets): ours (`quantize_model` + `add_adapters`)
   vs transformers' `BitsAndBytesConfig(nf4, double quant)` + peft's `prepare_model_for_kbit_training` +
   `get_peft_model`: median step time and the exact bytes of the tensors alive at the backward (target <= 1.05).
"""
import argparse
import copy
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGETS = {"cpu": {"quantize": 1.0, "dequantize": 2.0}, "cuda": {"quantize": 1.2, "dequantize": 1.2}}


def timeit(fn, repeats, device):
    fn()  # warm-up (and, for torch.compile, the compilation)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device, repeats):
    """GB/s of a plain device-to-device copy of 256 MiB (read + write): the bound for a memory-bound kernel."""
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / timeit(lambda: y.copy_(x), repeats, device) / 1e9


def throughput(model, device, repeats, compile_):
    import bitsandbytes.functional as bf
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    from nanopeft.nf4 import dequantize_nf4, quantize_nf4

    dtype = torch.float32 if device.type == "cpu" else torch.float16
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            shapes.setdefault(tuple(m.weight.shape), []).append(m.weight.detach())
    ours = {"torch": lambda q: dequantize_nf4(q, kernel="torch")}
    if device.type == "cpu":  # the default on a CPU
        ours["gather"] = lambda q: dequantize_nf4(q, kernel="gather")
    if device.type == "cuda":
        ours["triton"] = lambda q: dequantize_nf4(q, kernel="triton")
    if compile_:
        compiled = torch.compile(lambda q: dequantize_nf4(q, kernel="torch"), dynamic=False)
        ours["compiled"] = compiled
    print(f"1. {device}: quantize / dequantize to {dtype} (NF4, blocks of 64, double quantization), medians of "
          f"{repeats}, interleaved; {torch.get_num_threads()} CPU threads")
    bound = copy_bandwidth(device, repeats) if device.type == "cuda" else None
    if bound:
        print(f"   a plain copy moves {bound:.0f} GB/s on this GPU (read + write): the bound for dequantizing")
    totals = {}
    large = {}
    if device.type == "cuda":  # a 7B model's matrices too: there the kernel, not the launch, sets the time
        g = torch.Generator().manual_seed(0)
        large = {shape: [torch.randn(shape, generator=g) * 0.02] for shape in [(4096, 4096), (11008, 4096)]}
    for shape, weights in {**shapes, **large}.items():
        w = weights[0].to(device, dtype)
        q = quantize_nf4(w, double_quant=True)
        packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        bnb_code = bf.get_4bit_type("nf4", device=device)
        t = {}
        for _ in range(2):  # interleave: ours, theirs, ours, theirs
            t["quantize ours"] = timeit(lambda: quantize_nf4(w, double_quant=True), repeats, device)  # Triton on CUDA
            if device.type == "cuda":
                t["quantize ours torch"] = timeit(lambda: quantize_nf4(w, double_quant=True, kernel="torch"), repeats,
                                                  device)
            t["quantize bnb"] = timeit(lambda: bf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                                compress_statistics=True), repeats, device)
            for name, fn in ours.items():
                t[f"dequantize ours {name}"] = timeit(lambda: fn(q), repeats, device)
            t["dequantize bnb"] = timeit(lambda: bf.dequantize_4bit(packed, state), repeats, device)
            if device.type == "cpu":  # bitsandbytes' PyTorch path, its absmax decoded first as dequantize_4bit does
                t["dequantize bnb torch"] = timeit(lambda: _dequantize_4bit_compute(
                    packed.reshape(-1), bf.dequantize_blockwise(state.absmax, state.state2) + state.offset, bnb_code,
                    64, state.shape, dtype), repeats, device)
        if shape in large:
            print(f"  {str(shape):>12} (7B-sized): " + "  ".join(
                f"{k.removeprefix('dequantize ')} {v * 1e3:.3f} ms" for k, v in t.items() if k.startswith("dequantize"))
                + "  -> " + "  ".join(f"{name} / bnb {t[f'dequantize ours {name}'] / t['dequantize bnb']:.2f}"
                                      for name in ours) + f"  (quantize ours / bnb {t['quantize ours'] / t['quantize bnb']:.2f})")
        else:
            for k, v in t.items():
                totals[k] = totals.get(k, 0.0) + v * len(weights)
        moved = w.numel() * (0.5 + dtype.itemsize) + q.absmax.numel()  # bytes read + written by a dequantize
        rates = "  ".join(f"{k.removeprefix('dequantize ')} {moved / v / 1e9:.0f} GB/s" for k, v in t.items()
                          if k.startswith("dequantize"))
        print(f"  {str(shape):>12} x{len(weights):>2}: {rates}" if shape not in large else f"  {str(shape):>12}    : {rates}")
    n = sum(len(v) for v in shapes.values())  # the model's matrices (the 7B-sized ones are reported above)
    target = TARGETS[device.type]
    print(f"  all {n} matrices: quantize ours {totals['quantize ours']:.4f} s, bnb {totals['quantize bnb']:.4f} s -> "
          f"ratio {totals['quantize ours'] / totals['quantize bnb']:.2f}   (target <= {target['quantize']})"
          + (" (ours: the Triton kernel)" if device.type == "cuda" else ""))
    if "quantize ours torch" in totals:
        print(f"  all {n} matrices: quantize ours (torch) {totals['quantize ours torch']:.4f} s -> ratio "
              f"{totals['quantize ours torch'] / totals['quantize bnb']:.2f}")
    for name in ours:
        r = totals[f"dequantize ours {name}"] / totals["dequantize bnb"]
        print(f"  all {n} matrices: dequantize ours ({name}) {totals[f'dequantize ours {name}']:.4f} s, bnb "
              f"{totals['dequantize bnb']:.4f} s -> ratio {r:.2f}   (target <= {target['dequantize']})")
    if "dequantize bnb torch" in totals:
        print(f"  against bitsandbytes' own PyTorch path: ratio "
              f"{totals['dequantize ours torch'] / totals['dequantize bnb torch']:.2f}")
    nearest_level_ways(model, device, repeats)


def nearest_level_ways(model, device, repeats):
    """The rounding step of quantize alone: counting the 15 midpoints below each value (what nf4.nearest_level does)
    against a binary search (torch.bucketize), on the scaled values of the largest matrix."""
    from nanopeft.nf4 import midpoints_of, nearest_level, nf4_code

    w = max((m.weight.detach() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")), key=torch.numel)
    w = w.to(device, torch.float32).flatten()
    blocks = w.view(-1, 64)
    scaled = (blocks / blocks.abs().amax(1, keepdim=True)).flatten()
    code = nf4_code().to(device)
    midpoints = midpoints_of(code)
    same = torch.equal(nearest_level(scaled, code), torch.bucketize(scaled, midpoints))
    t = {}
    for _ in range(2):
        t["count"] = timeit(lambda: nearest_level(scaled, code), repeats, device)
        t["bucketize"] = timeit(lambda: torch.bucketize(scaled, midpoints), repeats, device)
    print(f"  nearest level of {scaled.numel():,} values: counting midpoints {t['count'] * 1e3:.2f} ms, "
          f"torch.bucketize {t['bucketize'] * 1e3:.2f} ms -> bucketize / counting {t['bucketize'] / t['count']:.2f}x "
          f"(same indices: {same})")


def model_tensor_bytes(model, optimizer):
    """Exact bytes of weights (with bitsandbytes' quant_state tensors), grads and optimizer state."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in list(model.parameters()) + list(model.buffers()):
        add(p)
        add(p.grad)
        state = getattr(p, "quant_state", None)
        if state is not None:  # bitsandbytes keeps absmax & co. on the parameter, not as buffers
            for t in (state.absmax, state.code, state.offset):
                add(t)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
    for s in optimizer.state.values():
        for v in s.values():
            add(v)
    return total


def qlora_step(models, batch, steps, device):
    from nanopeft.lab.train import forward_backward

    print(f"\n2. QLoRA step on {device} (all linear layers, r=8, batch {tuple(batch['input_ids'].shape)}), {steps} "
          f"interleaved steps each after one warm-up")
    optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for n, m in models.items()}
    times, peak = {n: [] for n in models}, dict.fromkeys(models, 0)
    for i in range(steps + 1):
        for name, model in models.items():
            model.train()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            _, saved = forward_backward(model, batch)
            held = model_tensor_bytes(model, optimizers[name])  # with gradients, at the backward
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times[name].append(time.perf_counter() - start)
            peak[name] = max(peak[name], held + saved)
    (a, b) = models
    for name in models:
        print(f"  {name:>42}: {statistics.median(times[name]):.3f} s/step, tensors at the backward "
              f"{peak[name] / 2**20:.1f} MiB")
    print(f"  ours / theirs: step time {statistics.median(times[a]) / statistics.median(times[b]):.3f}, peak tensor "
          f"memory {peak[a] / peak[b]:.3f}   (target <= 1.05)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="cpu or cuda (default: the CPU, and CUDA when present)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the PyTorch dequantize")
    p.add_argument("--random", action="store_true", help="random weights of SmolLM2-135M's shapes, random ids")
    args = p.parse_args()

    import bitsandbytes
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from nanopeft import add_adapters
    from nanopeft.lab.data import load_task
    from nanopeft.course.experiments import hardware
    from nanopeft.lab.models import bundled_model_folder, load_base_model
    from nanopeft.lab.train import encode
    from nanopeft.lab.twins import replay_peft_init
    from nanopeft.qlora import prepare_for_kbit_training, quantize_model

    devices = [torch.device(args.device)] if args.device else \
        [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, peft {peft.__version__}, "
          f"transformers {transformers.__version__}; {hardware()}\n")
    if args.random:  # same shapes, so the same work; saved as safetensors so transformers can load it for bnb
        import tempfile

        from nanopeft.lab.models import smollm2_shaped

        base, folder = smollm2_shaped(), tempfile.mkdtemp()
        base.save_pretrained(folder)
        from common import random_batch

        batch_on_cpu = random_batch(base.config.vocab_size, args.batch_size, 100)
    else:
        base, tok = load_base_model()
        folder = bundled_model_folder()
    for device in devices:
        throughput(base, device, args.repeats, args.compile)
    for device in devices:
        dtype = torch.float32 if device.type == "cpu" else (torch.bfloat16 if torch.cuda.get_device_capability()[0]
                                                             >= 8 else torch.float16)
        ours = copy.deepcopy(base).to(device, dtype)
        quantize_model(ours, double_quant=True, compute_dtype=dtype)
        prepare_for_kbit_training(ours, gradient_checkpointing=False)
        add_adapters(ours, "lora", r=8, alpha=16, targets="all-linear")
        replay_peft_init(ours, seed=0)
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
        theirs = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype,
                                                      device_map={"": 0} if device.type == "cuda" else "cpu")
        theirs = prepare_model_for_kbit_training(theirs, use_gradient_checkpointing=False)
        torch.manual_seed(0)
        theirs = get_peft_model(theirs, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        batch = ({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch_on_cpu.items()} if args.random
                 else encode(tok, load_task().train[: args.batch_size], device))
        qlora_step({"nanopeft (quantize_model + add_adapters)": ours,
                    "transformers + bitsandbytes + peft": theirs}, batch, args.steps, device)
        del ours, theirs


if __name__ == "__main__":
    main()
