"""The numbers the README and the lessons quote, written from the shipped results, so that each fact has one source.

In a Markdown file, a block between two markers is generated:

    <!-- facts: showdown -->
    ...a table written by `blocks()["showdown"]`...
    <!-- /facts -->

    python tools/facts.py            # rewrite every block in the README, lessons/*.md and benchmarks/README.md
    python tools/facts.py --check    # exit 1 if a block differs from what the results give (a test runs this)

`make facts` runs the first. This tool edits the repository, so it is not part of the installed package.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from nanopeft import METHODS
from nanopeft.course.analysis import slope
from nanopeft.course.claims import claims, loraplus_speedup
from nanopeft.course.estimates import LLAMA_7B, LLAMA_65B, NF4_BITS, gb, training_memory
from nanopeft.course.report import correct_matrix, groups, interleaved_step_time, table
from nanopeft.course.results import load_result
from nanopeft.course.stats import paired_bootstrap, verdict
from nanopeft.lab.memory import fmt_bytes

MARKER = re.compile(r"(<!-- facts: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /facts -->)", re.S)
NAMES = {"full": "full fine-tuning (same matrices)", **{n: c.title for n, c in METHODS.items()},
         "qlora": "QLoRA", "qdora": "QDoRA", "lora+": "LoRA+ (ratio 16)"}  # the methods' own titles from the table


def _pct(iv) -> str:
    return f"{100 * iv.estimate:.1f}% [{100 * iv.low:.1f}, {100 * iv.high:.1f}]"


def showdown_table(result) -> str:
    cfg = result["config"]
    lines = [f"| method ({cfg['steps']} steps, batch {cfg['batch_size']}, r = {cfg['r']}, {cfg['targets']}) | lr "
             f"(chosen on validation) | test accuracy, {len(cfg['seeds'])} seeds x {cfg['test_tickets']} tickets "
             f"[95% interval] | frozen weights | all tensors | trainable parameters |",
             "|---|---|---|---|---|---|",
             f"| base model, no fine-tuning | | {100 * cfg['base_accuracy']:.1f}% | | | |"]
    for r in table(result):
        lines.append(f"| {NAMES.get(r['method'], r['method'])} | {r['lr']:g} | {_pct(r['interval'])} | "
                     f"{fmt_bytes(r['memory']['frozen weights'])} | {fmt_bytes(r['total_memory'])} | "
                     f"{r['trainable_parameters']:,} |")
    return "\n".join(lines)


def claims_table(result, timings) -> str:
    lines = ["| claim | source | measured | effect [95% interval] | claim's range | verdict |", "|---|---|---|---|---|---|"]
    for c in claims(result, timings):
        cells = [c["claim"], c["source"], c["measured"], c["interval"], c["rule"], f"**{c['verdict']}**"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")  # a | in a cell ends it
    return "\n".join(lines)


def step_time_table(timings) -> str:
    cfg = timings["config"]
    lora = interleaved_step_time(timings, "lora")
    lines = [f"| method | s/step | / LoRA |", "|---|---|---|"]
    for m in timings["times"]:
        s = interleaved_step_time(timings, m)
        lines.append(f"| {NAMES.get(m, m)} | {s:.2f} | {s / lora:.2f}x |")
    hw = cfg["hardware"]
    lines.append(f"\n{cfg['steps']} interleaved steps per method (the first dropped), batch {cfg['batch_size']}, "
                 f"r = {cfg['r']} on {cfg['targets']}; {hw['processor']}, {hw['threads']} threads, "
                 f"torch {hw['torch']}.")
    return "\n".join(lines)


def lr_table(sweep) -> str:
    lines = ["| method | grid (4 points, x2 apart) | validation accuracy at each | chosen |", "|---|---|---|---|"]
    for m in sweep["config"]["methods"]:
        runs = [r for r in sweep["runs"] if r["method"] == m]
        grid = ", ".join(f"{r['lr']:g}" for r in runs)
        accuracies = ", ".join(f"{100 * r['validation_accuracy']:.0f}%" for r in runs)
        lines.append(f"| {NAMES.get(m, m)} | {grid} | {accuracies} | {sweep['chosen'][m]:g} |")
    return "\n".join(lines)


def _seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n != 1 else "")


def ratio_table(sweep) -> str:
    cfg = sweep["config"]
    lines = [f"| ratio lr_B / lr_A (A's lr {cfg['lr']:g}) | test accuracy, {_seeds(len(cfg['seeds']))} [95% interval] |",
             "|---|---|"]
    for r in table(sweep, key="ratio"):
        lines.append(f"| {r['ratio']} | {_pct(r['interval'])} |")
    return "\n".join(lines)


def loraplus_lines(result) -> str:
    by = groups(result)
    s = loraplus_speedup(result)
    gap = paired_bootstrap(correct_matrix(by["lora+"]), correct_matrix(by["lora"]))
    return (f"- LoRA+ (A's lr {result['config']['lrs']['lora+']:g}, ratio 16) - LoRA (lr "
            f"{result['config']['lrs']['lora']:g}), test accuracy: {gap.format(100, ' points')}.\n"
            f"- Steps to LoRA's final validation accuracy ({100 * s['target']:.1f}%), first crossing against first "
            f"crossing, per seed: LoRA {s['lora']}, LoRA+ {s['lora+']}; speed-up "
            f"{s['interval'].format(digits=2, unit='x')}.")


def dora_lines(study, result) -> str:
    cfg, out = study["config"], []
    dm, negative = {}, []
    for m in cfg["methods"]:
        runs = [r for r in study["runs"] if r["method"] == m]
        points = [[v for layer in r["changes"].values() for v in layer.values()] for r in runs]
        slopes = [slope([p[0] for p in pts], [p[1] for p in pts]) for pts in points]
        dm[m] = float(np.mean([p[0] for pts in points for p in pts]))
        negative.append(f"{NAMES.get(m, m)} {sum(s < 0 for s in slopes)} of {len(slopes)}")
        out.append(f"| {NAMES.get(m, m)} | {' / '.join(f'{s:+.3f}' for s in slopes)} | {dm[m]:.3g} |")
    gap = paired_bootstrap(correct_matrix(groups(result)["dora"]), correct_matrix(groups(result)["lora"]))
    head = [f"| method ({cfg['steps']} steps, {'/'.join(cfg['targets'])}, r = {cfg['r']}) | slope of dD on dM, seeds "
            f"{'/'.join(map(str, cfg['seeds']))} | mean dM |", "|---|---|---|"]
    tail = (f"\nNegative slopes (the paper's sign for full fine-tuning and DoRA), seeds: {', '.join(negative)}. "
            f"DoRA's mean dM is {dm['dora'] / dm['lora']:.1f}x LoRA's. Test accuracy in the showdown (all linear "
            f"layers, each at its own learning rate, {len(result['config']['seeds'])} seeds): DoRA - LoRA "
            f"{gap.format(100, ' points')}.")
    return "\n".join(head + out) + tail


def qlora_table(result, timings) -> str:
    rows = {r["method"]: r for r in table(result)}
    t = {m: interleaved_step_time(timings, m) for m in ("lora", "qlora", "qdora")}
    lines = ["| | LoRA (base in the model's dtype) | QLoRA | QDoRA |", "|---|---|---|---|"]
    for label, key in (("frozen weights", "frozen weights"), ("activations saved for the backward", "activations")):
        lines.append(f"| {label} | " + " | ".join(fmt_bytes(rows[m]["memory"][key]) for m in t) + " |")
    adapters = {m: sum(rows[m]["memory"][k] for k in ("trainable weights", "gradients", "optimizer state")) for m in t}
    lines.append("| adapters + gradients + AdamW state | " + " | ".join(fmt_bytes(adapters[m]) for m in t) + " |")
    lines.append("| all tensors | " + " | ".join(f"{fmt_bytes(rows[m]['total_memory'])} "
                                                  f"({rows[m]['total_memory'] / rows['lora']['total_memory']:.2f}x)"
                                                  for m in t) + " |")
    lines.append("| test accuracy [95% interval] | " + " | ".join(_pct(rows[m]["interval"]) for m in t) + " |")
    lines.append("| step time, interleaved (CPU) | " + " | ".join(f"{t[m]:.2f} s ({t[m] / t['lora']:.2f}x)"
                                                                   for m in t) + " |")
    return "\n".join(lines)


def weight_ratios() -> str:
    lines = ["| model | not in linear layers | weights, all fp32 | NF4 linear layers + the rest in fp32 | ratio | "
             "the same, rest in 16 bits vs all 16 bits |", "|---|---|---|---|---|---|"]
    for arch in (LLAMA_7B, LLAMA_65B):
        nf4 = arch.linear_params * NF4_BITS / 8
        fp32, mixed = 4 * arch.params, nf4 + 4 * arch.other_params
        half, mixed16 = 2 * arch.params, nf4 + 2 * arch.other_params
        lines.append(f"| {arch.name} | {arch.other_params / arch.params:.1%} | {gb(fp32):.1f} GB | {gb(mixed):.1f} GB | "
                     f"{fp32 / mixed:.1f}x | {half / mixed16:.1f}x |")
    lines.append(f"\nThe linear layers alone shrink 32 / {NF4_BITS:.3f} = {32 / NF4_BITS:.2f}x from float32.")
    return "\n".join(lines)


def memory_table() -> str:
    lines = ["| method | Llama-2 7B | LLaMA 65B |", "|---|---|---|"]
    for key, label in (("full-fp32", "full fine-tuning, fp32 weights + AdamW"),
                       ("full-mixed", "full fine-tuning, mixed precision + AdamW (fp32 master copy)"),
                       ("full-mixed-8bit-adam", "full fine-tuning, mixed precision + 8-bit AdamW"),
                       ("lora-16bit", "LoRA r = 8 on a 16-bit base"), ("qlora", "QLoRA r = 8 (NF4 + double quant)")):
        a, b = training_memory(LLAMA_7B, key), training_memory(LLAMA_65B, key)
        lines.append(f"| {label} | {gb(a['total']):.1f} GB ({a['total'] / LLAMA_7B.params:.2f} B/param) | "
                     f"{gb(b['total']):.1f} GB |")
    lines.append("\nComputed by `nanopeft.course.estimates` from each model's shapes; activations not included.")
    return "\n".join(lines)


def pissa_lines(sweep, pissa_sweep, pissa, result) -> str:
    """PiSSA against LoRA on the ticket task: the same budget and the same four learning rates tried on the
    validation split; then test accuracy over the seeds PiSSA ran, paired with LoRA's runs of the same seeds."""
    lora_sweep = {r["lr"]: r["validation_accuracy"] for r in sweep["runs"] if r["method"] == "lora"}
    grid = pissa_sweep["config"]["grids"]["pissa"]
    pissa_sweep = {r["lr"]: r["validation_accuracy"] for r in pissa_sweep["runs"]}
    lines = ["| learning rate | " + " | ".join(f"{lr:g}" for lr in grid) + " |", "|---" * (len(grid) + 1) + "|"]
    for name, acc in (("LoRA", lora_sweep), ("PiSSA", pissa_sweep)):
        lines.append(f"| {name}, validation accuracy (seed 0) | " + " | ".join(f"{100 * acc[lr]:.1f}%" for lr in grid)
                     + " |")
    runs = pissa["runs"]
    seeds = sorted(r["seed"] for r in runs)
    lora = [r for r in groups(result)["lora"] if r["seed"] in seeds]
    gap = paired_bootstrap(correct_matrix(runs), correct_matrix(lora))
    cfg = pissa["config"]
    curve = {m: {int(k): float(np.mean([r["curve"][k] for r in rs])) for k in rs[0]["curve"]}
             for m, rs in (("LoRA", lora), ("PiSSA", runs))}
    steps = sorted(curve["LoRA"])
    lines += ["", "| validation accuracy after step | " + " | ".join(map(str, steps)) + " |",
              "|---" * (len(steps) + 1) + "|"]
    for m, lr in (("LoRA", result["config"]["lrs"]["lora"]), ("PiSSA", cfg["lrs"]["pissa"])):
        lines.append(f"| {m} (lr {lr:g}), mean of seeds {'/'.join(map(str, seeds))} | "
                     + " | ".join(f"{100 * curve[m][k]:.1f}%" for k in steps) + " |")
    ahead = sum(curve["PiSSA"][k] > curve["LoRA"][k] for k in steps)
    lines.append(f"\nOn the validation split PiSSA's mean is above LoRA's at {ahead} of {len(steps)} evaluations.")
    lines.append(f"Test accuracy, PiSSA - LoRA, each at the learning rate its own sweep chose, seeds "
                 f"{'/'.join(map(str, seeds))} x {len(runs[0]['test_correct'])} tickets: {gap.format(100, ' points')}; "
                 f"the paper's claim (PiSSA scores better than LoRA at the same rank): **{verdict(gap, 1e-9, 1)}**. "
                 f"{cfg['steps']} steps of {cfg['batch_size']} tickets, r = {cfg['r']}, {cfg['targets']}; PiSSA's runs "
                 f"on {cfg['hardware']['processor']}, LoRA's on {result['config']['hardware']['processor']} (the same "
                 f"recipe and seeds; float results can differ slightly between CPUs; times are not compared).")
    return "\n".join(lines)


def dora_7b_table() -> str:
    """The shipped dora_layer result (written by `benchmarks/dora_layer.py --out`) as a table."""
    result = load_result("dora_layer")
    lines = ["| layer (out x in), tokens | ours DoRA / peft DoRA (exact; factored; factored + fused) | "
             "DoRA / LoRA, ours (exact; factored; factored + fused) | peft DoRA / peft LoRA | saved for backward, "
             "ours fused / peft DoRA |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        t, b = row["median_seconds"], row["saved_bytes"]
        ours = [t["ours DoRA exact"], t["ours DoRA factored"], t["ours DoRA factored+fused"]]
        lines.append(f"| {row['out']} x {row['in']}, {row['tokens']:,} | "
                     + "; ".join(f"{x / t['peft DoRA']:.2f}x" for x in ours) + " | "
                     + "; ".join(f"{x / t['ours LoRA']:.2f}x" for x in ours) + " | "
                     + f"{t['peft DoRA'] / t['peft LoRA']:.2f}x | "
                     + f"{b['ours DoRA factored+fused'] / 2**20:.0f} / {b['peft DoRA'] / 2**20:.0f} MiB |")
    lines.append(f"\nOne layer, forward and backward, r = {result['r']}, {result['dtype']}, medians of {result['repeats']} "
                 f"interleaved rounds; measured {result['date']} on {result['hardware']} (torch {result['torch']}, "
                 f"peft {result['peft']}) by `benchmarks/dora_layer.py`.")
    return "\n".join(lines)


def seed_memory_table() -> str:
    """The seed article's memory table, corrected by the planner, beside the QLoRA paper and LLaMA-Factory."""
    from nanopeft.course.estimates import SEED_SETUP, SEED_WORDS, seed_memory_rows

    lines = ["| method | model | the article | planned peak | what the peak holds (GB) | QLoRA paper, Fig. 6 | "
             "LLaMA-Factory's rule |", "|---|---|---|---|---|---|---|"]
    short = {"frozen weights": "frozen", "trainable weights": "trainable", "gradients": "grads",
             "optimizer state": "AdamW", "activations": "activations", "logits and loss": "logits",
             "temporaries": "temps", "CUDA context": "CUDA"}
    for row in seed_memory_rows():
        held = ", ".join(f"{short[k]} {v / 1e9:.1f}" for k, v in row["parts"].items() if v >= 5e7)
        fig = f"{row['figure_6_gb']:.1f} GB" if row["figure_6_gb"] else "-"
        lines.append(f"| {SEED_WORDS[row['method']]} | LLaMA {row['model']} | ~{row['article_gb']} GB | "
                     f"{row['planned_gb']:.1f} GB | {held} | {fig} | {row['llamafactory_gb']:g} GB |")
    s = SEED_SETUP
    lines.append(f"\nPlanned with `nanopeft.lab.planner.plan` for r = {s['r']} on all linear layers, batch {s['batch']} x "
                 f"{s['seq']} tokens, {s['dtype']}, gradient checkpointing, AdamW, on a GPU (CUDA context counted); "
                 "\"full fine-tuning (fp16)\" is mixed precision (float32 master weights and AdamW state); the peak is "
                 "taken at its moment (backward or optimizer step). GB = 10^9 bytes.")
    return "\n".join(lines)


def planner_grid_table() -> str:
    """The planner against metered steps (benchmarks/memory_planner.py), with accelerate's and LLaMA-Factory's
    figures for the same configurations."""
    from nanopeft.lab.planner import plan

    result = load_result("planner_grid")
    lines = ["| model | method | batch x seq | checkpointing | measured peak | planner | accelerate estimate-memory | "
             "LLaMA-Factory's rule |", "|---|---|---|---|---|---|---|---|"]
    errors = []
    for r in result["rows"]:
        p = plan(r["model"], r["method"], r=r["r"], batch=r["batch"], seq=r["seq"], checkpointing=r["checkpointing"],
                 dtype=r["dtype"], optimizer=r["optimizer"], advise=False)
        m = r["measured_peak"]

        def cell(x):
            return f"{x / 2**20:,.0f} MiB ({x / m - 1:+.0%})"
        errors.append(abs(p.peak_bytes / m - 1))
        lines.append(f"| {r['model']} | {r['method']} | {r['batch']} x {r['seq']} | {'on' if r['checkpointing'] else 'off'}"
                     f" | {m / 2**20:,.0f} MiB | {p.peak_bytes / 2**20:,.0f} MiB ({p.peak_bytes / m - 1:+.1%}) | "
                     f"{cell(r['accelerate'])} | {cell(r['llamafactory'])} |")
    checked = [r for r in result["rows"] if r["memtracker_peak"]]
    agree = max(abs(r["memtracker_peak"] / r["measured_peak"] - 1) for r in checked)
    lines.append(f"\n{len(result['rows'])} configurations; the planner's largest error {max(errors):.1%}. Each row: two "
                 f"training steps (AdamW, r = 8 on all linear layers, float32 on the CPU; bf16 autocast for full-mixed, "
                 f"bf16 weights for full-bf16) of a randomly initialised model of that shape, every tensor metered by "
                 f"`nanopeft.lab.memory.LiveTensors`; on {len(checked)} rows PyTorch's MemTracker metered the same "
                 f"steps and agreed within {agree:.2%}. accelerate's figure is the largest single part of full "
                 f"fine-tuning with Adam (no activations, no LoRA); LLaMA-Factory's is x GB per billion parameters "
                 f"(18 full, 8 full in 16 bits, 2 LoRA, 0.5 QLoRA). Measured {result['date']} on {result['hardware']} "
                 f"(torch {result['torch']}, transformers {result['transformers']}) by `benchmarks/memory_planner.py`.")
    return "\n".join(lines)


RANK_CASES = [("llama-3-70b", "qlora", 16, "rtx4090", 2), ("llama-3-70b", "qlora", 16, "rtx4090", 4),
              ("llama-3-70b", "qlora", 16, "t4", 2), ("llama-3-8b", "lora", 16, "t4", 1),
              ("llama-3-8b", "lora", 16, "t4", 2), ("llama-3-8b", "qlora", 16, "t4", 1),
              ("llama-3-8b", "qlora", 16, "t4", 2)]


def ranks_table() -> str:
    """The planner for one rank of N under FSDP2: the lesson's "70B on two 24 GB cards?" and "Kaggle's two T4s?"."""
    from nanopeft.lab.planner import DEVICES, GIB, plan

    lines = ["| model, method | GPUs | per rank: NF4/16-bit weights | gathered (FSDP) | activations | peak | fits |",
             "|---|---|---|---|---|---|---|"]
    for model, method, r, device, ranks in RANK_CASES:
        p = plan(model, method, r=r, batch=1, seq=1024, checkpointing=True, dtype="bfloat16", device=device,
                 ranks=ranks, advise=False)
        lines.append(f"| {model}, {method} r={r} | {ranks} x {DEVICES[device][0]} | "
                     f"{p.parts['frozen weights'] / GIB:.1f} GiB | {p.parts['gathered weights (FSDP)'] / GIB:.1f} GiB | "
                     f"{p.parts['activations'] / GIB:.1f} GiB | {p.peak_bytes / GIB:.1f} GiB | "
                     f"{'yes' if p.fits else 'no'} |")
    lines.append("\nPlanned by `python -m nanopeft plan --ranks N` (lesson 07's planner): batch 1 x 1,024 tokens per rank, "
                 "bf16, gradient checkpointing, AdamW, all linear layers; each rank keeps 1/N of every weight, gradient "
                 "and optimizer state and gathers the embeddings, the head and two decoder layers whole. No CPU "
                 "offloading.")
    return "\n".join(lines)


def blocks() -> dict:
    """{block name: Markdown}, from the shipped results."""
    result, timings = load_result("showdown"), load_result("step_times")
    return {"showdown": showdown_table(result), "claims": claims_table(result, timings),
            "step-times": step_time_table(timings), "lr-sweep": lr_table(load_result("lr_sweep")),
            "ratio-sweep": ratio_table(load_result("loraplus_sweep")), "loraplus": loraplus_lines(result),
            "dora-study": dora_lines(load_result("dora_study"), result), "memory": memory_table(),
            "qlora": qlora_table(result, timings), "weight-ratios": weight_ratios(),
            "dora-7b": dora_7b_table(), "seed-memory": seed_memory_table(), "planner-grid": planner_grid_table(),
            "ranks": ranks_table(),
            "pissa": pissa_lines(load_result("lr_sweep"), load_result("pissa_lr_sweep"),
                                 load_result("pissa_showdown"), result)}


def update(paths, check: bool = False) -> list:
    """Rewrite (or, with check, compare) every facts block in `paths`; returns the paths that differ."""
    generated, stale = blocks(), []
    for path in map(Path, paths):
        text = path.read_text()

        def fill(match):
            name = match["name"]
            if name not in generated:
                raise ValueError(f"{path}: unknown facts block {name!r}; known: {sorted(generated)}")
            return f"{match.group(1)}{generated[name]}\n{match.group(4)}"

        new = MARKER.sub(fill, text)
        if new != text:
            stale.append(str(path))
            if not check:
                path.write_text(new)
    return stale


ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "benchmarks/README.md", "lessons/*.md"]  # the files whose facts blocks are generated


def pages() -> list:
    return [p for pattern in PAGES for p in sorted(ROOT.glob(pattern))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a block differs from the results")
    args = parser.parse_args(argv)
    stale = update(pages(), check=args.check)
    print(("differ from the results: " if args.check else "rewrote: ") + (", ".join(stale) or "nothing"))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
