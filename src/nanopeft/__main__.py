"""`python -m nanopeft demo`: the tour -- every method checked against its reference library (one table), then one
short LoRA fine-tune of the bundled model on the ticket task, with its loss and memory drawn to runs/demo/.

The long runs behind the notebooks (their results ship in nanopeft/lab/results/):

    python -m nanopeft lr-sweep                  # each method's learning rate, chosen on the validation split
    python -m nanopeft showdown --seeds 5        # every method, 5 seeds, at the chosen learning rates
    python -m nanopeft showdown --seeds 5 --resume   # after an interruption: keep the runs already saved
    python -m nanopeft loraplus-sweep --seeds 3  # LoRA+ ratios 1..32
    python -m nanopeft dora-study --seeds 3      # DoRA's magnitude/direction study (notebook 02)
    python -m nanopeft step-times                # every method's step time, interleaved (the time ratios)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path

import torch

from .adapters import add_adapters
from .lab import experiments, facts
from .lab.data import evaluate, load_task
from .lab.device import pick_device, pick_dtype
from .lab.experiments import SHOWDOWN, Budget
from .lab.live import LiveDisplay
from .lab.memory import memory_summary
from .lab.models import load_base_model
from .lab.report import format_table, table
from .lab.train import summarize, train
from .lab.verify import verification_table

RESULTS_DIR = Path(__file__).parent / "lab" / "results"  # where the committed results live in a source checkout


def _quiet_upstream_warnings():
    # peft 0.21 calls a transformers 5 property that warns of its own deprecation: not ours to fix, and noise here
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def demo(args) -> None:
    """The tour: every method against its reference, then one short LoRA fine-tune on the chosen device."""
    _quiet_upstream_warnings()
    start = time.perf_counter()
    print("== nanoPEFT tour ==")
    device = pick_device()
    dtype = pick_dtype(device)
    print("\n1. every method against its reference (tiny Llama, all linear layers; NF4 on a 192x576 matrix)")
    rows = verification_table()
    print(f"  {'method':>6} | {'reference':<19} | {'compared':<44} | max |diff| | pass")
    for method, ref, what, diff, tol, ok in rows:
        print(f"  {method:>6} | {ref:<19} | {what:<44} | {diff:10.1e} | {ok}")
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
          f"python -m nanopeft showdown")


def _write(result: dict, out: str) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def _checkpoint(args, settings: dict):
    """(runs kept from OUT.partial if --resume, a callback that prints each new run and saves it to OUT.partial).

    Long runs take hours on a CPU: saving after every run means an interrupted call loses one run, not all."""
    partial = Path(f"{args.out}.partial")
    runs = []
    if args.resume and partial.is_file():
        saved = json.loads(partial.read_text())
        if saved["settings"] != settings:
            raise SystemExit(f"{partial} was saved with other settings ({saved['settings']}); rerun without "
                             f"--resume to start over, or with the same --steps/--lrs/--lr/--tickets.")
        runs = saved["runs"]
        print(f"resuming: {len(runs)} runs kept from {partial}", flush=True)

    def save(run):
        print(_run_line(run), flush=True)
        runs.append(run)
        _write({"settings": settings, "runs": runs}, str(partial))

    return list(runs), save


def _run_line(run: dict) -> str:
    score = f"test {run['accuracy']:.1%}" if run.get("accuracy") is not None else ""
    return (f"{run['method']:>12} lr {run['lr']:.2e} seed {run['seed']} ratio {run.get('ratio')}: validation "
            f"{run['validation_accuracy']:.1%} {score}, {run['mean_step_time']:.2f} s/step")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanopeft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the tour: verify every method, then one short fine-tune with its plot")
    d.add_argument("--steps", type=int, default=int(os.environ.get("NANOPEFT_STEPS", 30)))
    d.add_argument("--tickets", type=int, default=60, help="held-out tickets scored before and after")
    d.add_argument("--out", default="runs/demo", help="folder for the picture and the history")

    def budget_args(p, methods=True):
        p.add_argument("--steps", type=int, default=Budget.steps)
        p.add_argument("--tickets", type=int, default=None,
                       help="score only this many validation and test tickets (quick checks; default: all)")
        if methods:
            p.add_argument("--methods", nargs="+", default=list(SHOWDOWN))

    lr = sub.add_parser("lr-sweep", help="each method's learning rate on the validation split (one seed)")
    budget_args(lr)
    lr.add_argument("--out", default="runs/lr_sweep.json")
    sd = sub.add_parser("showdown", help="every method on the ticket task, same budget, several seeds")
    budget_args(sd)
    sd.add_argument("--seeds", type=int, default=5)
    sd.add_argument("--lrs", default=str(RESULTS_DIR / "lr_sweep.json"),
                    help="a lr-sweep JSON whose chosen learning rates to use")
    sd.add_argument("--out", default="runs/showdown.json")
    sd.add_argument("--resume", action="store_true", help="keep the runs saved in OUT.partial by an interrupted call")
    sw = sub.add_parser("loraplus-sweep", help="LoRA+ with ratios 1, 2, 4, 8, 16, 32")
    budget_args(sw, methods=False)
    sw.add_argument("--seeds", type=int, default=3)
    sw.add_argument("--ratios", nargs="+", type=float, default=[1, 2, 4, 8, 16, 32])
    sw.add_argument("--lr", type=float, default=None, help="A's learning rate (default: lora+'s chosen one)")
    sw.add_argument("--lrs", default=str(RESULTS_DIR / "lr_sweep.json"))
    sw.add_argument("--reuse", default=None, help="a showdown JSON: reuse its lora+ runs at the same lr")
    sw.add_argument("--out", default="runs/loraplus_sweep.json")
    sw.add_argument("--resume", action="store_true", help="keep the runs saved in OUT.partial by an interrupted call")
    tm = sub.add_parser("step-times", help="every method's step time, measured interleaved (for the ratios)")
    tm.add_argument("--steps", type=int, default=12, help="steps per method (the shipped table: 12)")
    tm.add_argument("--methods", nargs="+", default=list(SHOWDOWN))
    tm.add_argument("--lrs", default=str(RESULTS_DIR / "lr_sweep.json"))
    tm.add_argument("--out", default="runs/step_times.json")
    fc = sub.add_parser("facts", help="rewrite the results' numbers in README.md and lessons/*.md (or --check them)")
    fc.add_argument("--check", action="store_true", help="exit 1 if a block differs from the results")
    st = sub.add_parser("dora-study", help="full fine-tuning vs LoRA vs DoRA: how the weights move")
    st.add_argument("--steps", type=int, default=40)
    st.add_argument("--seeds", type=int, default=3)
    st.add_argument("--out", default="runs/dora_study.json")
    args = parser.parse_args(argv)
    _quiet_upstream_warnings()
    if args.command == "demo":
        return demo(args)
    if args.command == "facts":
        stale = facts.update(["README.md", *sorted(Path("lessons").glob("*.md"))], check=args.check)
        print(("differ from the results: " if args.check else "rewrote: ") + (", ".join(stale) or "nothing"))
        raise SystemExit(1 if args.check and stale else 0)

    report = lambda run: print(_run_line(run), flush=True)  # noqa: E731
    budget = Budget() if args.command == "step-times" else Budget(steps=args.steps)
    if args.command == "step-times":
        lrs = json.loads(Path(args.lrs).read_text())["chosen"]
        result = experiments.step_times(args.methods, lrs=lrs, steps=args.steps, budget=budget, progress=True)
    elif args.command == "lr-sweep":
        result = experiments.lr_sweep(args.methods, budget=budget, progress=True, callback=report,
                                      tickets=args.tickets)
        print("chosen on validation:", result["chosen"])
    elif args.command == "showdown":
        lrs = json.loads(Path(args.lrs).read_text())["chosen"]
        done, save = _checkpoint(args, {"budget": dataclasses.asdict(budget), "lrs": lrs, "tickets": args.tickets})
        result = experiments.showdown(args.methods, seeds=range(args.seeds), lrs=lrs, budget=budget, progress=True,
                                      callback=save, tickets=args.tickets, done=done)
        print(format_table(table(result)))
    elif args.command == "loraplus-sweep":
        lr = args.lr or json.loads(Path(args.lrs).read_text())["chosen"]["lora+"]
        reuse = json.loads(Path(args.reuse).read_text()) if args.reuse else None
        ratios = [int(r) if float(r).is_integer() else r for r in args.ratios]
        done, save = _checkpoint(args, {"budget": dataclasses.asdict(budget), "lr": lr, "tickets": args.tickets})
        result = experiments.ratio_sweep(ratios, seeds=range(args.seeds), lr=lr, budget=budget, progress=True,
                                         callback=save, reuse=reuse, tickets=args.tickets, done=done)
        print(format_table(table(result, key="ratio"), key="ratio"))
    else:
        result = experiments.dora_study(seeds=range(args.seeds), steps=args.steps, progress=True)
    print(f"wrote {_write(result, args.out)}")
    Path(f"{args.out}.partial").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
