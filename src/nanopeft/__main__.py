"""`python -m nanopeft demo`: the tour -- every method checked against its reference library (one table), then a
short showdown of the methods on the bundled model and the ticket task, with the plots written to a folder.

    python -m nanopeft showdown --steps 40 --seeds 2        # the full comparison (results/showdown.json + .png)
    python -m nanopeft loraplus-sweep --steps 40 --seeds 2  # LoRA+ ratios 1..32 (results/loraplus_sweep.json + .png)
    python -m nanopeft dora-study                           # DoRA's magnitude/direction study (notebook 02)
"""
from __future__ import annotations

import argparse
import json
import os
import time


def demo(args) -> None:
    """The tour: every method against its reference, then a short showdown on the bundled model, plots saved."""
    from pathlib import Path

    from .memory import pick_compute_dtype, pick_device
    from .reference import verification_table
    from .showdown import format_table, plot_showdown, showdown, table

    import warnings

    # peft 0.21 calls a transformers 5 property that warns of its own deprecation: not ours to fix, and noise here
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    print("== nanoPEFT tour ==")
    device = pick_device()
    pick_compute_dtype(device)  # printed for reference; the tour trains in float32 on the CPU
    print("\n1. every method against its reference (tiny Llama, all linear layers; NF4 on a 192x576 matrix)")
    rows = verification_table()
    print(f"  {'method':>6} | {'reference':<19} | {'compared':<44} | max |diff| | pass")
    for method, ref, what, diff, tol, ok in rows:
        print(f"  {method:>6} | {ref:<19} | {what:<44} | {diff:10.1e} | {ok}")
    if not all(r[-1] for r in rows):
        raise SystemExit("A method does not match its reference: see the table above.")

    print(f"\n2. a short showdown on the ticket task: {', '.join(args.methods)}; {args.steps} steps, "
          f"seed {args.seed}, batch 4, all linear layers, r=8")
    start = time.perf_counter()
    result = showdown(methods=args.methods, seeds=[args.seed], steps=args.steps, eval_every=args.steps,
                      callback=lambda run: print(f"  {run['method']:>12}: accuracy {run['accuracy']:.1%}, "
                                                 f"{run['mean_step_time']:.2f} s/step ({run['wall_time']:.0f} s)"))
    print(f"  accuracy before fine-tuning: {result['config']['base_accuracy']:.1%}; "
          f"{time.perf_counter() - start:.0f} s in all\n")
    print(format_table(table(result), target=f"{result['config']['target_accuracy']:.0%}"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "showdown.json").write_text(json.dumps(result, indent=1))
    try:
        plot_showdown(result, out / "showdown.png")
        print(f"\nplots and results written to {out.resolve()}/ (showdown.png, showdown.json)")
    except ImportError:
        print(f"\nresults written to {out.resolve()}/showdown.json (install matplotlib for the plots)")
    print("The full showdown with several seeds: python -m nanopeft showdown --steps 40 --seeds 2")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanopeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the tour: verify every method, then a short showdown with plots")
    d.add_argument("--steps", type=int, default=int(os.environ.get("NANOPEFT_STEPS", 20)))
    d.add_argument("--methods", nargs="+", default=["lora", "qlora", "lora+", "dora"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="runs/demo", help="folder for the plots and results")
    sd = sub.add_parser("showdown", help="every method on the ticket task, same budget, several seeds")
    sd.add_argument("--steps", type=int, default=40)
    sd.add_argument("--seeds", type=int, default=2)
    sd.add_argument("--methods", nargs="+", default=None, help="default: all seven")
    sd.add_argument("--out", default="results/showdown.json")
    sw = sub.add_parser("loraplus-sweep", help="LoRA+ with ratios 1, 2, 4, 8, 16, 32")
    sw.add_argument("--steps", type=int, default=40)
    sw.add_argument("--seeds", type=int, default=2)
    sw.add_argument("--ratios", nargs="+", type=float, default=[1, 2, 4, 8, 16, 32])
    sw.add_argument("--reuse", default=None, help="a showdown JSON with the same settings: reuse its lora/lora+ runs")
    sw.add_argument("--out", default="results/loraplus_sweep.json")
    st = sub.add_parser("dora-study", help="full fine-tuning vs LoRA vs DoRA: how weights move, accuracy over seeds")
    st.add_argument("--steps", type=int, default=40)
    st.add_argument("--seeds", type=int, default=3)
    st.add_argument("--out", default="results/dora_study.json")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args)
    elif args.command in ("showdown", "loraplus-sweep"):
        from pathlib import Path

        from .showdown import METHODS, format_table, plot_showdown, plot_sweep, ratio_sweep, showdown, table

        def report(run):
            label = run["method"] if args.command == "showdown" else f"ratio {run['ratio']:g}"
            print(f"{label:>12} seed {run['seed']}: accuracy {run['accuracy']:.1%}, steps to target "
                  f"{run['steps_to_target']}, {run['mean_step_time']:.2f} s/step", flush=True)

        if args.command == "showdown":
            result = showdown(methods=args.methods or list(METHODS), seeds=range(args.seeds), steps=args.steps,
                              progress=True, callback=report)
            rows, key, plot = table(result), "method", plot_showdown
        else:
            reuse = json.loads(Path(args.reuse).read_text()) if args.reuse else None
            ratios = [int(r) if float(r).is_integer() else r for r in args.ratios]
            result = ratio_sweep(ratios=ratios, seeds=range(args.seeds), steps=args.steps, progress=True,
                                 callback=report, reuse=reuse)
            rows, key, plot = table(result, key="ratio"), "ratio", plot_sweep
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(format_table(rows, key=key, target=f"{result['config']['target_accuracy']:.0%}"))
        try:
            plot(result, out.with_suffix(".png"))
            print(f"wrote {out} and {out.with_suffix('.png')}")
        except ImportError:
            print(f"wrote {out} (install matplotlib for the plot)")
    elif args.command == "dora-study":
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
