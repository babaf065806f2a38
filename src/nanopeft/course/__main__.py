"""The long runs behind the course's results (they ship in nanopeft/course/results/), each a few hours on a CPU:

    python -m nanopeft.course lr-sweep                  # each method's learning rate, chosen on the validation split
    python -m nanopeft.course showdown --seeds 5        # every method, 5 seeds, at the chosen learning rates
    python -m nanopeft.course showdown --seeds 5 --resume   # after an interruption: keep the runs already saved
    python -m nanopeft.course loraplus-sweep --seeds 3  # LoRA+ ratios 1..32
    python -m nanopeft.course dora-study --seeds 3      # DoRA's magnitude/direction study (notebook 02)
    python -m nanopeft.course step-times                # every method's step time, interleaved (the time ratios)

Each writes one JSON file (--out, under runs/ by default); `make results` runs them all.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..lab.device import quiet_upstream_warnings
from . import experiments
from .experiments import SHOWDOWN, Budget
from .report import format_table, table

RESULTS_DIR = Path(__file__).parent / "results"  # the shipped results (their chosen learning rates are defaults)


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
    parser = argparse.ArgumentParser(prog="python -m nanopeft.course", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

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
    st = sub.add_parser("dora-study", help="full fine-tuning vs LoRA vs DoRA: how the weights move")
    st.add_argument("--steps", type=int, default=40)
    st.add_argument("--seeds", type=int, default=3)
    st.add_argument("--out", default="runs/dora_study.json")
    args = parser.parse_args(argv)
    quiet_upstream_warnings()
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
