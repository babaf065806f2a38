"""`python -m nanopeft demo`: the tour -- every method checked against its reference library (one table), then one
short LoRA fine-tune of the bundled model on the ticket task, with its loss and memory drawn to runs/demo/.

`python -m nanopeft plan`: will it fit? The peak memory of one training step, part by part, from a model's config
(a preset, or a config.json), for a method, batch, sequence and GPU; for example
    python -m nanopeft plan --model llama-2-7b --method qlora --r 16 --batch 4 --seq 512 --checkpointing --device t4

The long runs behind the course's results are `python -m nanopeft.course --help`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .adapters import add_adapters
from .lab.bnb_cpu import describe_cpu_path
from .lab.data import evaluate, load_task
from .lab.device import pick_device, pick_dtype, quiet_upstream_warnings
from .lab.live import LiveDisplay
from .lab.memory import memory_summary
from .lab.planner import plan
from .lab.models import load_base_model
from .lab.train import summarize, train
from .lab.verify import verification_table


def demo(args) -> None:
    """The tour: every method against its reference, then one short LoRA fine-tune on the chosen device."""
    quiet_upstream_warnings()
    start = time.perf_counter()
    print("== nanoPEFT tour ==")
    device = pick_device()
    dtype = pick_dtype(device)
    print("\n1. every method against its reference (tiny Llama, all linear layers; NF4 on a 192x576 matrix)")
    rows = verification_table()
    print(f"  {'method':>6} | {'reference':<19} | {'compared':<44} | max |diff| | pass")
    for method, ref, what, diff, tol, ok in rows:
        print(f"  {method:>6} | {ref:<19} | {what:<44} | {diff:10.1e} | {ok}")
    print(f"  {describe_cpu_path()}")
    if not all(r[-1] for r in rows):
        raise SystemExit("A method does not match its reference: see the table above.")

    print(f"\n2. LoRA on the bundled SmolLM2-135M-Instruct: {args.steps} steps of 4 tickets, all linear layers, r=8")
    model, tokenizer = load_base_model(dtype=dtype, device=device)
    task = load_task()
    held_out = task.test[: args.tickets]
    before = evaluate(model, tokenizer, held_out)
    torch.manual_seed(0)
    add_adapters(model, "lora", r=8, alpha=16, targets="all-linear")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    live = LiveDisplay("LoRA", every=max(1, args.steps // 5), widgets=False)
    history = train(model, tokenizer, task.train, args.steps, optimizer, batch_size=4, callback=live)
    after = evaluate(model, tokenizer, held_out)
    s = summarize(history)
    print(f"  accuracy on {len(held_out)} held-out tickets: {before:.1%} -> {after:.1%}; "
          f"{s['mean step time']:.2f} s/step on {device}")
    print(f"  {memory_summary(history)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    try:
        fig = live.figure()
        fig.savefig(out / "lora.png", dpi=110)
        print(f"  loss and memory drawn to {(out / 'lora.png').resolve()}")
    except ImportError:
        print(f"  history written to {out.resolve()}/history.json (install matplotlib for the picture)")
    print(f"\n{time.perf_counter() - start:.0f} s in all. Next: `make lab` for the notebooks; every method compared: "
          f"python -m nanopeft.course showdown")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanopeft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the tour: verify every method, then one short fine-tune with its plot")
    d.add_argument("--steps", type=int, default=int(os.environ.get("NANOPEFT_STEPS", 30)))
    d.add_argument("--tickets", type=int, default=60, help="held-out tickets scored before and after")
    d.add_argument("--out", default="runs/demo", help="folder for the picture and the history")

    p = sub.add_parser("plan", help="will it fit? predict the peak memory of one training step, part by part")
    p.add_argument("--model", default="smollm2-135m", help="a preset name or a config.json path "
                   "(presets: smollm2-135m, llama-2-7b, llama-3-70b, ...; see nanopeft/lab/model_presets.json)")
    p.add_argument("--method", default="lora", help="full-fp32, full-mixed, full-bf16, lora, loraplus, dora, qlora, "
                   "qdora")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", default="all-linear", help="all-linear, or names separated by commas")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    p.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit or sgd")
    p.add_argument("--dtype", default="bfloat16", help="float32, float16 or bfloat16: the base's storage and compute")
    p.add_argument("--device", default=None, help="t4, rtx4090, a100-40, a100-80, h100, cpu, or a number of GiB")
    p.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantization")
    p.add_argument("--dora-norm", default="exact", help="DoRA's row norms: exact or factored (lesson 02)")
    p.add_argument("--ranks", type=int, default=1, help="one of N ranks under FSDP2 (--batch is each rank's)")
    p.add_argument("--json", action="store_true", help="print one JSON object (peak_bytes, parts, fits, ...)")

    args = parser.parse_args(argv)
    quiet_upstream_warnings()
    if args.command == "plan":
        return plan_command(args)
    return demo(args)


def plan_command(args) -> None:
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    try:
        result = plan(args.model, args.method, r=args.r, targets=targets, batch=args.batch, seq=args.seq,
                      checkpointing=args.checkpointing, optimizer=args.optimizer, dtype=args.dtype,
                      device=args.device, double_quant=not args.no_double_quant, dora_norm=args.dora_norm, ranks=args.ranks)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"nanopeft plan: {e}") from None
    print(json.dumps(result.to_dict()) if args.json else result)


if __name__ == "__main__":
    main()
