"""NF4 and QLoRA, nanopeft vs bitsandbytes (+ transformers + peft), measured side by side in one run.

    python benchmarks/nf4.py                 # bundled SmolLM2-135M on the CPU
    python benchmarks/nf4.py --steps 5       # more QLoRA steps

1. Quantize and dequantize throughput on the bundled model's weight matrices (all 210 of them, each of the four
   shapes timed separately), with double quantization, ours vs `bitsandbytes.functional.quantize_4bit` /
   `dequantize_4bit`. Interleaved runs, medians; ratio = our time / theirs (target: <= 2 on the CPU).
   On the CPU bitsandbytes quantizes in PyTorch (as we do) but dequantizes with a C kernel (AVX512 here); its own
   PyTorch dequantize path (used where that kernel is not available) is timed too.
2. A QLoRA training step (all linear layers, r=8, a batch of real tickets): ours (`quantize_model` + `add_adapters`)
   vs transformers' `BitsAndBytesConfig(nf4, double quant)` + peft's `prepare_model_for_kbit_training` +
   `get_peft_model`. Step time (median), and peak memory as the exact bytes of the tensors alive at the backward:
   weights (4-bit codes and their quantization state included, which bitsandbytes keeps outside the module's
   parameters), adapters, gradients, optimizer state and the activations autograd saves (target: ours/theirs
   <= 1.05). The process's RSS is not used: both models live in one process.
"""
import argparse
import copy
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timeit(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(model, repeats):
    import bitsandbytes.functional as bf
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    from nanopeft.nf4 import dequantize_nf4, quantize_nf4

    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            shapes.setdefault(tuple(m.weight.shape), []).append(m.weight.detach())
    print(f"1. quantize / dequantize (NF4, blocks of 64, double quantization), median of {repeats}, "
          f"{torch.get_num_threads()} threads")
    totals = {"q ours": 0, "q bnb": 0, "d ours": 0, "d bnb": 0, "d bnb torch": 0}
    code = bf.get_4bit_type("nf4", device="cpu")
    for shape, weights in shapes.items():
        w = weights[0]
        q = quantize_nf4(w, double_quant=True)
        packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        t = {}
        for _ in range(2):  # interleave: ours, theirs, ours, theirs
            t["q ours"] = timeit(lambda: quantize_nf4(w, double_quant=True), repeats)
            t["q bnb"] = timeit(lambda: bf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                         compress_statistics=True), repeats)
            t["d ours"] = timeit(lambda: dequantize_nf4(q), repeats)
            t["d bnb"] = timeit(lambda: bf.dequantize_4bit(packed, state), repeats)
            # bitsandbytes' PyTorch path, with the absmax decoded as its dequantize_4bit does first
            t["d bnb torch"] = timeit(lambda: _dequantize_4bit_compute(
                packed.reshape(-1), bf.dequantize_blockwise(state.absmax, state.state2) + state.offset, code, 64,
                state.shape, torch.float32), repeats)
        for k in totals:
            totals[k] += t[k] * len(weights)
        mps = w.numel() / 1e6
        print(f"  {str(shape):>12} x{len(weights):>2}: quantize ours {mps / t['q ours']:6.0f} M/s, bnb "
              f"{mps / t['q bnb']:6.0f} M/s (ratio {t['q ours'] / t['q bnb']:.2f}); dequantize ours "
              f"{mps / t['d ours']:6.0f} M/s, bnb {mps / t['d bnb']:6.0f} M/s (ratio {t['d ours'] / t['d bnb']:.2f}), "
              f"bnb's PyTorch path {mps / t['d bnb torch']:6.0f} M/s (ratio {t['d ours'] / t['d bnb torch']:.2f})")
    print(f"  all {sum(len(v) for v in shapes.values())} matrices: quantize ours {totals['q ours']:.3f} s, bnb "
          f"{totals['q bnb']:.3f} s -> ratio {totals['q ours'] / totals['q bnb']:.2f}   (target <= 2)")
    print(f"  all matrices: dequantize ours {totals['d ours']:.3f} s, bnb {totals['d bnb']:.3f} s -> ratio "
          f"{totals['d ours'] / totals['d bnb']:.2f}   (target <= 2); bnb's PyTorch path "
          f"{totals['d bnb torch']:.3f} s -> ratio {totals['d ours'] / totals['d bnb torch']:.2f}")


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


def qlora_step(models, batch, steps):
    from nanopeft.lab.train import forward_backward

    print(f"\n2. QLoRA step (all linear layers, r=8, batch {tuple(batch['input_ids'].shape)}), {steps} interleaved "
          f"steps each after one warm-up")
    results = {}
    optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for n, m in models.items()}
    times = {n: [] for n in models}
    saved_max = dict.fromkeys(models, 0)
    peak = dict.fromkeys(models, 0)
    for i in range(steps + 1):
        for name, model in models.items():
            model.train()
            start = time.perf_counter()
            _, saved = forward_backward(model, batch)
            held = model_tensor_bytes(model, optimizers[name])  # with gradients, before the step frees nothing
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if i:
                times[name].append(time.perf_counter() - start)
            saved_max[name] = max(saved_max[name], saved)
            peak[name] = max(peak[name], held + saved)
    for name in models:
        results[name] = (statistics.median(times[name]), peak[name], saved_max[name])
        print(f"  {name:>32}: {statistics.median(times[name]):.2f} s/step, tensors at the backward "
              f"{peak[name] / 2**20:.1f} MiB (of which saved activations {saved_max[name] / 2**20:.1f} MiB)")
    (ta, pa, _), (tb, pb, _) = results.values()
    print(f"  ours / theirs: step time {ta / tb:.3f}, peak tensor memory {pa / pb:.3f}   (target <= 1.05)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()

    import bitsandbytes
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from nanopeft import add_adapters
    from nanopeft.lab.data import load_task
    from nanopeft.lab.models import bundled_model_folder, load_base_model
    from nanopeft.qlora import prepare_for_kbit_training, quantize_model
    from nanopeft.lab.train import encode

    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, peft {peft.__version__}, "
          f"transformers {transformers.__version__}; CPU, {torch.get_num_threads()} threads\n")
    base, tok = load_base_model()
    throughput(base, args.repeats)

    ours = copy.deepcopy(base)
    quantize_model(ours, double_quant=True)
    prepare_for_kbit_training(ours, gradient_checkpointing=False)
    torch.manual_seed(0)
    add_adapters(ours, "lora", r=8, alpha=16, targets="all-linear")
    del base

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(bundled_model_folder(), quantization_config=config,
                                                  dtype=torch.float32, device_map="cpu")
    theirs = prepare_model_for_kbit_training(theirs, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    theirs = get_peft_model(theirs, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))

    batch = encode(tok, load_task().train[: args.batch_size])
    qlora_step({"nanopeft (quantize_model + add_adapters)": ours,
                "transformers + bitsandbytes + peft": theirs}, batch, args.steps)


if __name__ == "__main__":
    main()
