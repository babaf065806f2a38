"""bitsandbytes' two CPU paths for 4-bit layers, measured on the bundled model (nanopeft.lab.bnb_cpu explains them).

    python benchmarks/bnb_cpu_paths.py             # about a minute on 2 cores

1. Inference (eval mode, no gradients) through bitsandbytes' `Linear4bit` (NF4, no double quantization): the packed
   bfloat16 path against the exact float32 path, on 8 real tickets: the logits' difference, how often the next-token
   prediction agrees, and the median time of a forward (interleaved, 5 each). Where the CPU lacks AVX512-BF16 the
   packed path is emulated (its arithmetic, not its speed: no time is printed).
2. What the repack does to training afterwards (AVX512-BF16 CPUs only): transformers-style QLoRA (peft's LoRA, r=8,
   every linear layer) evaluated once, then one training step on the same batch, against the same model pinned to the
   exact path: the relative error of every adapter gradient, and its size against the exact one.
"""
import copy
import os
import statistics
import time

import torch
from common import hardware

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def forward(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def main():
    from peft import LoraConfig, get_peft_model

    from nanopeft.lab.bnb_cpu import describe_cpu_path, has_avx512_bf16, linear4bit_layers, packed_copy
    from nanopeft.lab.data import load_task
    from nanopeft.lab.device import quiet_upstream_warnings
    from nanopeft.lab.models import load_base_model
    from nanopeft.lab.train import encode
    from nanopeft.lab.twins import bnb_quantize

    quiet_upstream_warnings()
    real = has_avx512_bf16()
    print(f"{hardware()}, torch {torch.__version__}\n{describe_cpu_path()}")
    base, tokenizer = load_base_model()
    batch = encode(tokenizer, load_task().train[:8])
    exact = bnb_quantize(copy.deepcopy(base), double_quant=False).eval()  # pinned to the exact path
    packed = packed_copy(exact).eval()
    y_exact, y_packed = forward(exact, batch), forward(packed, batch)
    mask = batch["attention_mask"].bool()
    diff = (y_packed - y_exact)[mask].abs()
    agree = (y_packed.argmax(-1) == y_exact.argmax(-1))[mask].float().mean().item()
    print(f"\n1. inference, {'measured' if real else 'emulated (no such path on this CPU)'}: packed bfloat16 vs exact "
          f"logits: max |diff| {diff.max():.3f}, mean {diff.mean():.4f} (logits up to {y_exact[mask].abs().max():.1f}); "
          f"next-token predictions agree at {agree:.1%} of {int(mask.sum())} positions")
    if real:
        times = {"exact": [], "packed": []}
        for _ in range(5):
            for name, model in (("exact", exact), ("packed", packed)):
                start = time.perf_counter()
                forward(model, batch)
                times[name].append(time.perf_counter() - start)
        t = {k: statistics.median(v) for k, v in times.items()}
        print(f"   forward time, median of 5: exact {t['exact']:.2f} s, packed {t['packed']:.2f} s "
              f"(packed / exact {t['packed'] / t['exact']:.2f})")
    else:
        print("\n2. needs a CPU with AVX512-BF16: skipped")
        return

    grads = {}
    for name in ("pinned", "evaluated once, unpinned"):
        model = bnb_quantize(copy.deepcopy(base), double_quant=False)
        if name != "pinned":
            for layer in linear4bit_layers(model).values():
                layer.support_avx512bf16_for_cpu = True  # as bitsandbytes builds it on this CPU
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        with torch.no_grad():
            for p in model.parameters():  # B off zero, so every adapter gradient is non-zero
                if p.requires_grad and p.dim() == 2 and p.shape[1] == 8:
                    p.normal_(0, 0.01, generator=torch.Generator().manual_seed(p.numel()))
        if name != "pinned":
            forward(model.eval(), batch)  # one evaluation: every Linear4bit repacks its weight
        model.train()
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    after = grads["evaluated once, unpinned"]
    errors = sorted(((after[n] - g).norm() / g.norm()).item() for n, g in grads["pinned"].items())
    sizes = sorted((after[n].norm() / g.norm()).item() for n, g in grads["pinned"].items())
    print(f"\n2. one training step after one evaluation (peft QLoRA, {len(errors)} adapter tensors), against the exact "
          f"path: relative error median {statistics.median(errors):.1%}, max {errors[-1]:.1%}, "
          f"{sum(e > 0.01 for e in errors) / len(errors):.0%} of the tensors off by more than 1%; gradient norm "
          f"{statistics.median(sizes):.2%} of the exact one (median; from {sizes[0]:.3%} to {sizes[-1]:.0%})")


if __name__ == "__main__":
    main()
