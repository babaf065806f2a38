"""The claims our learners read, each set against what a saved showdown measured, and the decision guide.

    rows = claims(load_result("showdown"))      # pure functions of saved results: same numbers, same verdicts
    print(format_claims(rows))
    print(advise("memory", result, model_billions=7, gpu_gb=15))

Every verdict comes from one rule (`nanopeft.course.stats.verdict`): the claim is a range for an effect, and it holds
when the whole 95% interval of the measured effect lies in that range, does not hold when the interval lies
wholly outside, and is not settled otherwise. Quantities without sampling noise (parameter counts, bytes) have
intervals of width zero; figures computed rather than measured (7B, 65B) say so.
"""
from __future__ import annotations

import math

from .estimates import LLAMA_7B, LLAMA_65B, NF4_BITS, gb, training_memory
from .report import correct_matrix, groups, interleaved_step_time, table, time_matrix
from .stats import FAILS, HOLDS, UNSETTLED, exact, first_crossing, paired_bootstrap, verdict

# What "close" and "near" mean in the claims below, stated once. These are conventions, not laws:
CLOSE = 0.05  # accuracies within 5 points are "close"/"matching": on a 6-way task at this budget, less than the
#               spread between two seeds of one method (see the seed accuracies in the table)
NEAR = 1.10  # step times within 10% are "near the same speed": less than the run-to-run noise of a shared machine
COMPARABLE = 1.15  # memory within 15% is "comparable"
GPU_SHARE = 0.8  # the advice's rule of thumb: the weights and adapter states may take 80% of the GPU; the rest is
#                  for activations (which grow with batch x length) and the CUDA context (about 0.5 GB)


def claims(showdown: dict, timings: dict | None = None) -> list:
    """Each claim with: claim, source, measured, interval (text), rule, verdict.

    timings: a `step_times` result (methods timed step by step, interleaved); the step-time claims use it when
    given, else the showdown's own step times (runs apart in time, so other work on the machine weighs in)."""
    by = groups(showdown)
    rows = {r["method"]: r for r in table(showdown)}
    cfg = showdown["config"]
    hw = cfg["hardware"]
    where = hw.get("gpu") or f"{hw['cpu_count']}-core CPU"
    out = []

    def add(claim, source, measured, interval, rule, result):
        out.append({"claim": claim, "source": source, "measured": measured, "interval": interval, "rule": rule,
                    "verdict": result})

    def accuracy_gap(a, b):
        return paired_bootstrap(correct_matrix(by[a]), correct_matrix(by[b]))

    def time_ratio(a, b):
        if timings is not None:  # one row of interleaved steps, the first (warm-up) one dropped
            return paired_bootstrap([timings["times"][a][1:]], [timings["times"][b][1:]], kind="ratio")
        return paired_bootstrap(time_matrix(by[a]), time_matrix(by[b]), kind="ratio")

    timed = "timed step by step, interleaved," if timings is not None else "during the showdown,"

    def pct(i):
        return i.format(100, " pts")

    t = time_ratio("dora", "lora")
    add("DoRA is 1.3-1.5x slower than LoRA per step", "seed article 'real differences'",
        f"DoRA / LoRA step time, {timed} on this {where}, all linear layers, r={cfg['r']} (on a GPU the ratio "
        f"differs: benchmarks/dora_step.py)", t.format(digits=2, unit="x"), "ratio in [1.3, 1.5]",
        verdict(t, 1.3, 1.5))
    add("DoRA trains at near the same speed as LoRA", "seed article 'compared'",
        f"DoRA / LoRA step time, {timed} on this {where}", t.format(digits=2, unit="x"), f"ratio <= {NEAR}",
        verdict(t, 0, NEAR))
    p = rows["dora"]["trainable_parameters"] / rows["lora"]["trainable_parameters"] - 1
    add("DoRA adds under 5% trainable parameters", "seed article 'variants'",
        f"m adds `out` numbers per layer to LoRA's r x (in + out): +{p:.1%} at r={cfg['r']} (the share halves each "
        f"time r doubles)", exact(p).format(100, "%"), "extra share < 5%", verdict(exact(p), -math.inf, 0.05))
    m = rows["dora"]["total_memory"] / rows["lora"]["total_memory"]
    add("DoRA's memory is comparable to LoRA's", "seed article 'compared'",
        f"all tensors, DoRA / LoRA: the adapters are alike, the activations are not "
        f"({rows['dora']['memory']['activations'] / 2**20:.0f} vs {rows['lora']['memory']['activations'] / 2**20:.0f} "
        f"MiB at batch {cfg['batch_size']})", exact(m).format(digits=2, unit="x"), f"ratio <= {COMPARABLE}",
        verdict(exact(m), 0, COMPARABLE))
    d = accuracy_gap("dora", "lora")
    add("On small data DoRA beats LoRA at the same rank, and not subtly", "seed article 'real differences'",
        f"test accuracy, DoRA - LoRA, each at its own learning rate, {len(cfg['seeds'])} seeds x "
        f"{cfg['test_tickets']} tickets", pct(d), "difference > 0", verdict(d, 1e-9, 1))
    d = accuracy_gap("qlora", "lora")
    add("QLoRA's quality stays very close to LoRA's", "seed articles 'variants', 'compared'",
        "test accuracy, QLoRA - LoRA", pct(d), f"|difference| <= {CLOSE * 100:.0f} pts", verdict(d, -CLOSE, CLOSE))
    q = time_ratio("qlora", "lora")
    add("QLoRA is slower (quantize/dequantize overhead)", "seed article 'compared'",
        f"QLoRA / LoRA step time, {timed} on this {where}", q.format(digits=2, unit="x"), "ratio > 1",
        verdict(q, 1 + 1e-9))
    d = accuracy_gap("qdora", "full")
    add("QDoRA can match or surpass full fine-tuning", "seed article 'compared'",
        "test accuracy, QDoRA - full fine-tuning of the same matrices", pct(d), f"difference >= -{CLOSE * 100:.0f} pts",
        verdict(d, -CLOSE, 1))
    if "lora+" in by:
        d = accuracy_gap("lora+", "lora")
        add("LoRA+ improves on LoRA (not just through a larger learning rate)", "LoRA+ paper",
            "test accuracy, LoRA+ - LoRA, each at the learning rate its own sweep chose", pct(d), "difference > 0",
            verdict(d, 1e-9, 1))
        s = loraplus_speedup(showdown)
        add("LoRA+ reaches the same quality 1.5-2x faster (paper: up to 2x, ratio ~16)",
            "seed article 'variants'; LoRA+ paper",
            f"steps for LoRA / steps for LoRA+ to first reach LoRA's final validation accuracy "
            f"({s['target']:.1%}), validation scored every {cfg['eval_every']} steps; a run that never reaches it "
            f"counts as {cfg['steps'] + cfg['eval_every']} steps", s["interval"].format(digits=2, unit="x"),
            "speed-up >= 1.5", verdict(s["interval"], 1.5))

    # memory: bytes counted exactly here, and the large models computed (nanopeft.course.estimates)
    f = rows["qlora"]["memory"]["frozen weights"] / rows["lora"]["memory"]["frozen weights"]
    q7, l7 = training_memory(LLAMA_7B, "qlora"), training_memory(LLAMA_7B, "lora-16bit")
    add("QLoRA cuts memory a lot (7B: ~6 GB instead of ~16 GB)", "seed article 'variants'",
        f"frozen weights here {f:.2f}x LoRA's (a fifth of this small model is its float32 embedding table); "
        f"computed for {LLAMA_7B.name}, r=8, before activations: QLoRA {gb(q7['total']):.1f} GB, LoRA on a "
        f"16-bit base {gb(l7['total']):.1f} GB", exact(q7["total"] / l7["total"]).format(digits=2, unit="x"),
        "QLoRA under half of LoRA (computed)", verdict(exact(q7["total"] / l7["total"]), 0, 0.5))
    for r in (8, 64):
        q65 = training_memory(LLAMA_65B, "qlora", r=r)
        add(f"A 65B model fine-tunes on one 48 GB GPU with QLoRA (adapters r={r})",
            "QLoRA paper; seed article 'compared'",
            f"computed for {LLAMA_65B.name}: NF4 weights {gb(q65['weights']):.1f} GB, adapters with gradients and "
            f"AdamW state {gb(q65['total'] - q65['weights']):.1f} GB; activations come on top (the paper adds "
            f"gradient checkpointing and paged optimizers)", f"{gb(q65['total']):.1f} GB before activations",
            "total < 48 GB (computed)", verdict(exact(q65["total"]), 0, 48e9))
    full7 = training_memory(LLAMA_7B, "full-mixed")
    add("7B full fine-tuning in fp16 needs ~28 GB", "seed article 'compared' (memory table)",
        f"computed for {LLAMA_7B.name}, mixed precision with AdamW: 16 bytes per parameter (weights, gradients, "
        f"a float32 master copy, two moments) = {gb(full7['total']):.0f} GB before activations; ~28 GB counts the "
        f"16-bit weights and gradients only", f"{gb(full7['total']):.0f} GB", "total <= 28 GB (computed)",
        verdict(exact(gb(full7["total"])), 0, 28))
    add("7B LoRA in fp16 needs ~14 GB", "seed article 'compared' (memory table)",
        f"computed for {LLAMA_7B.name}: 16-bit weights {gb(l7['weights']):.1f} GB, adapters r=8 with gradients "
        f"and AdamW state {gb(l7['total'] - l7['weights']):.2f} GB; activations come on top (here "
        f"{rows['lora']['memory']['activations'] / 2**20:.0f} MiB at batch {cfg['batch_size']})",
        f"{gb(l7['total']):.1f} GB", "total <= 15 GB (computed)", verdict(exact(gb(l7["total"])), 0, 15))
    n = rows["full"]["trainable_parameters"]  # the quantized weights: full fine-tuning trains the same matrices
    kept = rows["lora"]["memory"]["frozen weights"] - 4 * n  # the float32 model minus its linear layers
    bits = 8 * (rows["qlora"]["memory"]["frozen weights"] - kept) / n
    saved = 4.5 - bits
    add("Double quantization saves 0.373 bits per parameter (~3 GB at 65B)", "QLoRA paper; seed article 'compared'",
        f"{bits:.3f} bits per quantized weight in this run's QLoRA model against 4 + 32/64 = 4.500 without double "
        f"quantization: {saved * 65e9 / 8 / 1e9:.2f} GB at 65B", exact(saved).format(digits=3, unit=" bits"),
        "saving within 0.001 of 0.373", verdict(exact(saved), 0.372, 0.374))
    return out


def loraplus_speedup(showdown: dict) -> dict:
    """Steps to LoRA's final validation accuracy, LoRA's first crossing over LoRA+'s, per seed, with an interval
    over seeds. First crossing against first crossing: both curves are read the same way."""
    by, cfg = groups(showdown), showdown["config"]
    runs = {m: sorted(by[m], key=lambda r: r["seed"]) for m in ("lora", "lora+")}
    target = sum(r["validation_accuracy"] for r in runs["lora"]) / len(runs["lora"])
    never = cfg["steps"] + cfg["eval_every"]  # not within the budget: counted as one evaluation past its end

    def steps(run):
        hit = first_crossing(run["curve"], target - 1e-9)  # the tolerance absorbs float rounding of the mean
        return never if hit is None else hit

    lora = [[steps(r)] for r in runs["lora"]]
    plus = [[steps(r)] for r in runs["lora+"]]
    return {"target": target, "lora": [s[0] for s in lora], "lora+": [s[0] for s in plus],
            "interval": paired_bootstrap(lora, plus, kind="ratio")}


def format_claims(rows: list) -> str:
    return "\n".join(f"- {r['claim']} [{r['source']}]\n    measured: {r['measured']}\n    effect: {r['interval']}"
                     f"   (claim: {r['rule']})\n    verdict: {r['verdict']}" for r in rows)


def verdict_counts(rows: list) -> dict:
    return {v: sum(r["verdict"] == v for r in rows) for v in (HOLDS, FAILS, UNSETTLED)}


def advise(constraint: str, result: dict, model_billions: float = 7.0, gpu_gb: float = 15.0,
           timings: dict | None = None) -> str:
    """The decision guide: memory-bound -> QLoRA, quality -> DoRA, speed -> LoRA+, else LoRA. The advice quotes the
    showdown's measured numbers, and computes a `model_billions` model's training memory (scaled from
    Llama-2 7B's bytes per parameter) against `gpu_gb` of GPU memory. timings: a `step_times` result; its
    interleaved means give the step times (the showdown's own ran hours apart), as in `claims` and the facts."""
    choices = ("memory", "quality", "speed", "none")
    if constraint not in choices:
        raise ValueError(f"constraint must be one of {choices}, got {constraint!r}.")
    rows = {r["method"]: dict(r) for r in table(result)}
    if timings is not None:
        for m, row in rows.items():
            if m in timings["times"]:
                row["step_time"] = interleaved_step_time(timings, m)
    scale = model_billions * 1e9 / LLAMA_7B.params
    lora_gb = gb(training_memory(LLAMA_7B, "lora-16bit")["total"]) * scale
    qlora_gb = gb(training_memory(LLAMA_7B, "qlora")["total"]) * scale
    fits = (f"{model_billions:g}B: LoRA on a 16-bit base holds {lora_gb:.1f} GB before activations, QLoRA "
            f"{qlora_gb:.1f} GB ({model_billions * NF4_BITS / 8:.1f} GB of it NF4 weights), on a {gpu_gb:g} GB GPU")

    def acc(m):
        return f"{rows[m]['accuracy']:.1%} [{rows[m]['interval'].low:.1%}, {rows[m]['interval'].high:.1%}]"

    lo = rows["lora"]
    if constraint == "memory" or lora_gb > GPU_SHARE * gpu_gb:
        why = (f"LoRA's {lora_gb:.1f} GB would leave less than a fifth of the GPU for activations"
               if lora_gb > GPU_SHARE * gpu_gb else "memory is your limit")
        q = rows["qlora"]
        return (f"QLoRA: {why}. {fits}. Here QLoRA stored the frozen weights in "
                f"{q['memory']['frozen weights'] / lo['memory']['frozen weights']:.2f}x LoRA's bytes and scored "
                f"{acc('qlora')} vs LoRA's {acc('lora')}, at {q['step_time'] / lo['step_time']:.2f}x the step time.")
    if constraint == "quality":
        d = rows["dora"]
        return (f"DoRA: {fits}. Here DoRA scored {acc('dora')} vs LoRA's {acc('lora')} at "
                f"{d['step_time'] / lo['step_time']:.2f}x the step time: compare over seeds before you pay for it.")
    if constraint == "speed":
        p = rows["lora+"]
        return (f"LoRA+: {fits}. Here LoRA+ (ratio 16) scored {acc('lora+')} vs LoRA's {acc('lora')} after the same "
                f"{result['config']['steps']} steps, each at its own best learning rate, at the same cost per step "
                f"({p['step_time']:.2f} vs {lo['step_time']:.2f} s). Tune LoRA's learning rate first.")
    return (f"LoRA: {fits}. The simplest, and here {acc('lora')} after {result['config']['steps']} steps with "
            f"{lo['trainable_parameters']:,} trainable parameters ({lo['file_bytes'] / 2**20:.1f} MiB adapter file).")
