"""The showdown: every method on the same task with the same budget, measured the same way.

    result = showdown(methods=METHODS, seeds=range(2), steps=40)     # `python -m nanopeft showdown`
    table(result)                                                    # one row per method, mean and spread over seeds
    sweep = ratio_sweep(ratios=(1, 2, 4, 8, 16, 32), seeds=range(2)) # LoRA+ learning-rate ratios

Every run starts from the same pretrained weights and trains on the same batches (same seed) for `steps` steps of
`batch_size` tickets, scoring the held-out tickets every `eval_every` steps. Only the method differs:

    full          full fine-tuning of the target matrices (the baseline adapters are measured against)
    lora, dora    rank r adapters on the full-precision (float32) base
    qlora, qdora  the same adapters on an NF4 base with double quantization (`nanopeft.nf4`)
    lora+         LoRA with B's learning rate `ratio` times A's (`nanopeft.loraplus`)
    qlora+lora+   both
    lora-lr4x     plain LoRA with 4 times the learning rate for A and B: the control for LoRA+ (is it the ratio
                  that helps, or just a larger learning rate?)
"""
from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time

import torch

from .memory import CATEGORIES

# method -> (adapter method or None for full fine-tuning, 4-bit base?, LoRA+?, learning-rate multiplier)
METHODS = {
    "full": (None, False, False, 1),
    "lora": ("lora", False, False, 1),
    "dora": ("dora", False, False, 1),
    "qlora": ("lora", True, False, 1),
    "qdora": ("dora", True, False, 1),
    "lora+": ("lora", False, True, 1),
    "qlora+lora+": ("lora", True, True, 1),
    "lora-lr4x": ("lora", False, False, 4),
}
# lr 5e-4 for A (and B without LoRA+): LoRA's usual range; full fine-tuning of the same matrices needs less.
DEFAULTS = dict(steps=40, batch_size=4, r=8, targets="all-linear", lr=5e-4, full_lr=1e-4, ratio=16, eval_every=10,
                target_accuracy=0.6)


def _adapter_file_bytes(model, adapted: bool, targets) -> int:
    """Size of what you would ship: the peft adapter file, or for full fine-tuning the trained matrices as a
    safetensors file."""
    with tempfile.TemporaryDirectory() as d:
        if adapted:
            from .peft_format import save_adapter

            save_adapter(model, d)
            return os.path.getsize(os.path.join(d, "adapter_model.safetensors"))
        from safetensors.torch import save_file

        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, os.path.join(d, "weights.safetensors"))
        return os.path.getsize(os.path.join(d, "weights.safetensors"))


def run_method(name: str, base, tokenizer, task, seed: int = 0, progress=None, **config) -> dict:
    """Train one method from a copy of `base` (left untouched) and return what was measured, JSON-ready."""
    from .adapters import add_adapters, train_only, trainable_parameters
    from .data import evaluate
    from .loraplus import create_loraplus_optimizer
    from .nf4 import prepare_for_kbit_training, quantize_model
    from .train import encode, forward_backward, summarize, train

    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose from {list(METHODS)}.")
    c = {**DEFAULTS, **config}
    method, four_bit, loraplus, lr_scale = METHODS[name]
    ratio = c["ratio"] if loraplus else None
    lr = c["lr"] * lr_scale
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    if four_bit:
        quantize_model(model)  # NF4, blocks of 64, double quantization
        prepare_for_kbit_training(model, gradient_checkpointing=False)
    if method is None:
        train_only(model, c["targets"])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=c["full_lr"])
    else:
        add_adapters(model, method=method, r=c["r"], alpha=2 * c["r"], targets=c["targets"])
        if ratio:
            optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, ratio=ratio)
        else:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    test = task.test
    curve = {0: None}

    def callback(record):
        if record["step"] % c["eval_every"] == 0 or record["last"]:
            curve[record["step"]] = evaluate(model, tokenizer, test)

    history = train(model, tokenizer, task.train, c["steps"], optimizer, batch_size=c["batch_size"], seed=seed,
                    callback=callback, progress=progress, desc=f"{name} seed {seed}")
    curve.pop(0)
    s = summarize(history)
    # activations: the bytes autograd saves for the backward, on one batch of the same size (measured exactly)
    _, activations = forward_backward(model, encode(tokenizer, task.train[: c["batch_size"]]))
    model.zero_grad(set_to_none=True)
    hit = [step for step, acc in sorted(curve.items()) if acc >= c["target_accuracy"]]
    out = {
        "method": name, "seed": seed, "lr": c["full_lr"] if method is None else lr, "ratio": ratio,
        "accuracy": curve[c["steps"]], "curve": curve,
        "steps_to_target": hit[0] if hit else None,
        "loss": [round(h["loss"], 5) for h in history],
        "mean_step_time": s["mean step time"], "peak_memory": s["peak memory"],
        "peak_memory_kind": s["peak memory kind"],
        "memory": {**{k: v for k, v in history[-1]["memory"].items() if k in CATEGORIES}, "activations": activations},
        "trainable_parameters": trainable_parameters(model).trainable,
        "file_bytes": _adapter_file_bytes(model, method is not None, c["targets"]),
    }
    del model, optimizer
    return out


def showdown(methods=tuple(METHODS), seeds=(0, 1), progress=None, base=None, tokenizer=None, callback=None,
             **config) -> dict:
    """Run every method for every seed; returns {"config", "runs"} (JSON-ready). Pass `base`/`tokenizer` to
    reuse a loaded model; `callback(run)` is called after each run (for a live table)."""
    from .data import evaluate, load_task
    from .models import load_base_model

    c = {**DEFAULTS, **config}
    if base is None:
        base, tokenizer = load_base_model()
    task = load_task()
    before = evaluate(base, tokenizer, task.test)
    runs = []
    for seed in seeds:
        for name in methods:
            start = time.perf_counter()
            run = run_method(name, base, tokenizer, task, seed=seed, progress=progress, **c)
            run["wall_time"] = time.perf_counter() - start
            runs.append(run)
            if callback:
                callback(run)
    return {"config": {**c, "methods": list(methods), "seeds": list(seeds), "base_accuracy": before,
                       "torch": torch.__version__, "threads": torch.get_num_threads()}, "runs": runs}


def ratio_sweep(ratios=(1, 2, 4, 8, 16, 32), seeds=(0, 1), progress=None, base=None, tokenizer=None, callback=None,
                reuse: dict | None = None, **config) -> dict:
    """LoRA+ with each ratio (ratio 1 = plain LoRA), same budget; returns {"config", "runs"}.

    reuse: a `showdown` result run with the same settings; its "lora" runs stand for ratio 1 and its "lora+" runs
    for its ratio, instead of training them again (same code, same seeds: they would be the same runs).
    """
    from .data import load_task
    from .models import load_base_model

    c = {**DEFAULTS, **config}
    reusable = {}
    if reuse:
        same = all(reuse["config"].get(k) == c[k] for k in ("steps", "batch_size", "r", "targets", "lr", "eval_every"))
        if same:
            for run in reuse["runs"]:
                if run["method"] == "lora":
                    reusable[(1, run["seed"])] = run
                elif run["method"] == "lora+":
                    reusable[(reuse["config"]["ratio"], run["seed"])] = run
    if base is None:
        base, tokenizer = load_base_model()
    task = load_task()
    runs = []
    for seed in seeds:
        for ratio in ratios:
            if (ratio, seed) in reusable:
                run = {**reusable[(ratio, seed)], "reused": True}
            else:
                run = run_method("lora+", base, tokenizer, task, seed=seed, progress=progress, **{**c, "ratio": ratio})
            run["ratio"] = ratio
            runs.append(run)
            if callback:
                callback(run)
    return {"config": {**c, "ratios": list(ratios), "seeds": list(seeds)}, "runs": runs}


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(result: dict, key: str = "method") -> list:
    """One row per method (or ratio): means and spreads over seeds, as a list of dicts."""
    rows = []
    for value in dict.fromkeys(r[key] for r in result["runs"]):
        runs = [r for r in result["runs"] if r[key] == value]
        acc, acc_sd = _mean_sd([r["accuracy"] for r in runs])
        reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
        rows.append({
            key: value, "seeds": len(runs), "accuracy": acc, "accuracy_sd": acc_sd,
            "accuracy_min": min(r["accuracy"] for r in runs), "accuracy_max": max(r["accuracy"] for r in runs),
            "steps_to_target": statistics.mean(reached) if reached else None,
            "reached_target": f"{len(reached)}/{len(runs)}",
            "trainable_parameters": runs[0]["trainable_parameters"], "file_bytes": runs[0]["file_bytes"],
            # the fastest seed's mean: timing noise (other work on the machine) only ever adds time
            "step_time": min(r["mean_step_time"] for r in runs),
            "peak_memory": max(r["peak_memory"] for r in runs),
            "memory": runs[0]["memory"], "total_memory": sum(runs[0]["memory"].values()),
            "final_loss": statistics.mean(statistics.mean(r["loss"][-5:]) for r in runs),
        })
    return rows


def format_table(rows: list, key: str = "method", target=None) -> str:
    """The table as fixed-width text."""
    from .memory import fmt_bytes

    head = (f"{key:>12} | accuracy (mean ± sd, min-max) | steps to {target or 'target'} | trainable | file "
            f"| frozen | train+grad+optim | activations | total | s/step")
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["memory"]
        steps = f"{r['steps_to_target']:.0f} ({r['reached_target']})" if r["steps_to_target"] else \
            f"- ({r['reached_target']})"
        adapters = m["trainable weights"] + m["gradients"] + m["optimizer state"]
        lines.append(
            f"{str(r[key]):>12} | {r['accuracy']:6.1%} ± {r['accuracy_sd']:5.1%} ({r['accuracy_min']:.0%}-"
            f"{r['accuracy_max']:.0%}) | {steps:>12} | {r['trainable_parameters']:>10,} | "
            f"{fmt_bytes(r['file_bytes']):>9} | {fmt_bytes(m['frozen weights']):>9} | {fmt_bytes(adapters):>9} | "
            f"{fmt_bytes(m['activations']):>9} | {fmt_bytes(r['total_memory']):>9} | {r['step_time']:.2f}")
    return "\n".join(lines)


COLORS = {"full": "black", "lora": "tab:blue", "dora": "tab:orange", "qlora": "tab:green", "qdora": "tab:red",
          "lora+": "tab:purple", "qlora+lora+": "tab:brown", "lora-lr4x": "tab:gray"}


def plot_showdown(result: dict, path=None):
    """Accuracy over training, final accuracy per seed, memory by category and step time; saved to `path` (PNG)
    if given. Returns the figure."""
    import matplotlib.pyplot as plt

    rows = table(result)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for name in dict.fromkeys(r["method"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["method"] == name]
        steps = sorted(int(k) for k in runs[0]["curve"])
        acc = [statistics.mean(r["curve"][s] if s in r["curve"] else r["curve"][str(s)] for r in runs) for s in steps]
        axes[0].plot([0] + steps, [result["config"].get("base_accuracy") or 0.0] + acc, "o-",
                     color=COLORS.get(name), label=name)
    axes[0].axhline(result["config"]["target_accuracy"], color="gray", ls=":", lw=1)
    axes[0].set(xlabel="step", ylabel="held-out accuracy", title="accuracy during training (mean over seeds)")
    axes[0].legend(fontsize=8)
    names = [r["method"] for r in rows]
    for i, name in enumerate(names):
        accs = [r["accuracy"] for r in result["runs"] if r["method"] == name]
        axes[1].bar(i, statistics.mean(accs), color=COLORS.get(name), alpha=0.7)
        axes[1].plot([i] * len(accs), accs, "k.", ms=8)
    axes[1].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[1].set(ylabel="accuracy", title=f"after {result['config']['steps']} steps (dots: seeds)")
    mib = 2 ** 20
    bottom = [0.0] * len(rows)
    for cat in ("frozen weights", "trainable weights", "gradients", "optimizer state", "activations"):
        vals = [r["memory"][cat] / mib for r in rows]
        axes[2].bar(range(len(rows)), vals, bottom=bottom, label=cat)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[2].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[2].set(ylabel="MiB", title="tensor memory by category"); axes[2].legend(fontsize=8)
    axes[3].bar(range(len(rows)), [r["step_time"] for r in rows], color=[COLORS.get(n) for n in names])
    axes[3].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[3].set(ylabel="seconds", title="step time (fwd + bwd + AdamW; fastest seed)")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


def plot_sweep(result: dict, path=None):
    """LoRA+ ratio sweep: accuracy during training per ratio, and final accuracy against the ratio."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    cmap = plt.get_cmap("viridis")
    ratios = result["config"]["ratios"]
    for i, ratio in enumerate(ratios):
        runs = [r for r in result["runs"] if r["ratio"] == ratio]
        color = cmap(i / max(1, len(ratios) - 1))
        steps = sorted(int(k) for k in runs[0]["curve"])
        acc = [statistics.mean(r["curve"][s] if s in r["curve"] else r["curve"][str(s)] for r in runs) for s in steps]
        axes[0].plot(steps, acc, "o-", color=color, label=f"ratio {ratio}")
        loss = [statistics.mean(vals) for vals in zip(*(r["loss"] for r in runs))]
        axes[1].plot(range(1, len(loss) + 1), loss, color=color, label=f"ratio {ratio}")
        finals = [r["accuracy"] for r in runs]
        axes[2].plot([ratio] * len(finals), finals, ".", color=color, ms=9)
    rows = table(result, key="ratio")
    axes[2].plot([r["ratio"] for r in rows], [r["accuracy"] for r in rows], "k-", lw=1)
    axes[0].axhline(result["config"]["target_accuracy"], color="gray", ls=":", lw=1)
    axes[0].set(xlabel="step", ylabel="held-out accuracy", title="accuracy during training (mean over seeds)")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="step", ylabel="training loss", ylim=(0, 4), title="loss (mean over seeds)")
    axes[2].set(xscale="log", xlabel="ratio lr_B / lr_A", ylabel="accuracy",
                title=f"after {result['config']['steps']} steps (dots: seeds)")
    axes[2].set_xticks(ratios, [str(r) for r in ratios])
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


# --------------------------------------------------------------------------------------- claims and the guide
HOLDS, FAILS, UNSURE = "holds here", "does not hold here", "not settled by the seeds run here"
NEEDS = "needs a GPU or a larger model to test"


def claims(showdown_result: dict, sweep_result: dict | None = None) -> list:
    """The claims our learners read (shared/seeds and the papers), each with what this run measured and a verdict.

    Returns dicts with: claim, source, measured, verdict. The verdicts follow fixed rules written below, so that
    the same numbers always give the same verdict (a difference of accuracy counts only when it exceeds the larger
    spread across seeds).
    """
    rows = {r["method"]: r for r in table(showdown_result)}
    steps = showdown_result["config"]["steps"]
    out = []

    def add(claim, source, measured, verdict):
        out.append({"claim": claim, "source": source, "measured": measured, "verdict": verdict})

    def differs(a, b):
        """+1 if a's accuracy is above b's by more than the larger seed spread, -1 if below, 0 if within it."""
        gap = rows[a]["accuracy"] - rows[b]["accuracy"]
        noise = max(rows[a]["accuracy_sd"], rows[b]["accuracy_sd"], 1 / 60)
        return 0 if abs(gap) <= noise else (1 if gap > 0 else -1)

    def acc(m):
        r = rows[m]
        return f"{r['accuracy']:.1%} ± {r['accuracy_sd']:.1%}"

    t = rows["dora"]["step_time"] / rows["lora"]["step_time"]
    add("DoRA is 1.3-1.5x slower than LoRA per step", "seed article 'real differences'",
        f"DoRA/LoRA step time {t:.2f}x on this CPU, all linear layers adapted (attention only: 1.09x; H100: "
        f"1.31-1.51x; benchmarks/dora_step.py)", HOLDS if 1.25 <= t <= 1.6 else FAILS)
    add("DoRA trains at near the same speed as LoRA", "seed article 'compared'",
        f"DoRA/LoRA step time {t:.2f}x on this CPU (all linear layers)", HOLDS if t <= 1.15 else FAILS)
    p = rows["dora"]["trainable_parameters"] / rows["lora"]["trainable_parameters"] - 1
    add("DoRA adds under 5% trainable parameters", "seed article 'variants'",
        f"+{p:.1%} over LoRA at r={showdown_result['config']['r']} (m adds `out` numbers per layer, LoRA "
        f"r x (in + out): the share halves each time r doubles)", HOLDS if p < 0.05 else FAILS)
    m = rows["dora"]["total_memory"] / rows["lora"]["total_memory"]
    add("DoRA's memory is comparable to LoRA's", "seed article 'compared'",
        f"DoRA/LoRA tensor memory {m:.2f}x: the adapters are alike, the activations are not "
        f"({rows['dora']['memory']['activations'] / 2**20:.0f} vs {rows['lora']['memory']['activations'] / 2**20:.0f}"
        f" MiB at batch {showdown_result['config']['batch_size']})", HOLDS if m <= 1.15 else FAILS)
    d = differs("dora", "lora")
    add("On small data DoRA beats LoRA at the same rank, and not subtly", "seed article 'real differences'",
        f"{steps} steps, 240 tickets: DoRA {acc('dora')} vs LoRA {acc('lora')}",
        HOLDS if d > 0 else (FAILS if d < 0 else UNSURE))
    f = rows["qlora"]["memory"]["frozen weights"] / rows["lora"]["memory"]["frozen weights"]
    total = rows["qlora"]["total_memory"] / rows["lora"]["total_memory"]
    add("QLoRA cuts memory a lot (7B: ~6 GB instead of ~16 GB)", "seed article 'variants'",
        f"frozen weights {f:.2f}x, all tensors {total:.2f}x of LoRA's here (a fifth of this small model is the "
        f"float32 embedding table; activations do not shrink)",
        f"{HOLDS} for the weights; the 7B totals {NEEDS}")
    add("A 65B model fine-tunes on one 48 GB GPU with QLoRA", "QLoRA paper; seed article 'compared'",
        f"65B x 4.127 bits = {65e9 * 4.127 / 8 / 1e9:.1f} GB of weights; whether activations, adapters and "
        f"optimizer state fit in the rest is a question of sequence length and batch", NEEDS)
    d = differs("qlora", "lora")
    add("QLoRA's quality stays very close to LoRA's", "seed articles 'variants', 'compared'",
        f"QLoRA {acc('qlora')} vs LoRA {acc('lora')}", HOLDS if d >= 0 else FAILS)
    q = rows["qlora"]["step_time"] / rows["lora"]["step_time"]
    add("QLoRA is slower (quantize/dequantize overhead)", "seed article 'compared'",
        f"QLoRA/LoRA step time {q:.2f}x on this CPU", HOLDS if q > 1.05 else FAILS)
    d = differs("qdora", "full")
    add("QDoRA can match or surpass full fine-tuning", "seed article 'compared'",
        f"QDoRA {acc('qdora')} vs full fine-tuning of the same matrices {acc('full')}",
        HOLDS if d >= 0 else FAILS)
    full = rows["full"]["memory"]
    k = (full["trainable weights"] + full["gradients"] + full["optimizer state"]) / full["trainable weights"]
    add("7B full fine-tuning in fp16 needs ~28 GB", "seed article 'compared' (memory table)",
        f"full fine-tuning held {k:.1f}x the trained weights' bytes (weights, gradients, 2 AdamW moments) before "
        f"activations; ~28 GB is 7B x 2 bytes x 2, weights and gradients only",
        FAILS if k > 2.5 else HOLDS)
    lora = rows["lora"]["memory"]
    add("7B LoRA in fp16 needs ~14 GB", "seed article 'compared' (memory table)",
        f"frozen weights are {lora['frozen weights'] / sum(lora.values()):.0%} of LoRA's tensors here; the "
        f"activations ({lora['activations'] / 2**20:.0f} MiB at batch 4) are left out of such tables",
        f"{HOLDS} for the weights alone (7B x 2 bytes)")
    # bits per quantized weight, from this run: the NF4 model's frozen bytes minus what stayed float32, over the
    # number of quantized weights (= the weights full fine-tuning trained: the same all-linear targets)
    n = rows["full"]["trainable_parameters"]
    kept = rows["lora"]["memory"]["frozen weights"] - 4 * n  # float32 model minus its linear layers
    bits = 8 * (rows["qlora"]["memory"]["frozen weights"] - kept) / n
    add("Double quantization saves ~3 GB at 65B (0.373 bits per parameter)", "QLoRA paper; seed article 'compared'",
        f"{bits:.3f} bits per quantized weight in this run's QLoRA model, against 4 + 32/64 = 4.500 without double "
        f"quantization (measured equal in tests/test_nf4.py): {4.5 - bits:.3f} bits, "
        f"{65e9 * (4.5 - bits) / 8 / 1e9:.2f} GB at 65B", HOLDS if abs((4.5 - bits) - 0.373) < 0.01 else FAILS)
    if "lora-lr4x" in rows and "lora+" in rows:
        d = differs("lora+", "lora-lr4x")
        add("LoRA+'s gain comes from B's larger learning rate, not just a larger one", "LoRA+ paper",
            f"LoRA+ {acc('lora+')} vs plain LoRA with 4x the learning rate on A and B {acc('lora-lr4x')}",
            HOLDS if d > 0 else f"{FAILS}: a larger learning rate for both did as well")
    if sweep_result is not None:
        by_ratio = {r["ratio"]: r for r in sweep_result["runs"]}
        ratios = {r["ratio"] for r in sweep_result["runs"]}
        if 1 in ratios and 16 in ratios:
            def mean_curve(ratio):
                runs = [r for r in sweep_result["runs"] if r["ratio"] == ratio]
                points = sorted(int(k) for k in runs[0]["curve"])
                return {p: statistics.mean(r["curve"].get(p, r["curve"].get(str(p))) for r in runs) for p in points}

            base, fast = mean_curve(1), mean_curve(16)
            goal = base[steps]  # LoRA's accuracy at the end of the budget
            reached = [p for p, a in fast.items() if a >= goal]
            speed = steps / reached[0] if reached else None
            when = (f"by step {reached[0]} (accuracy checked every {sweep_result['config']['eval_every']} steps): "
                    f"{speed:.1f}x fewer steps" if reached else "not within the budget")
            add("LoRA+ reaches the same quality 1.5-2x faster (paper: up to 2x, ratio ~16)",
                "seed article 'variants'; LoRA+ paper",
                f"LoRA (lr {by_ratio[1]['lr']:.0e}) reached {goal:.1%} in {steps} steps; LoRA+ (ratio 16) {when}",
                HOLDS if speed and speed >= 1.5 else FAILS)
    return out


def format_claims(rows: list) -> str:
    return "\n".join(f"- {r['claim']} [{r['source']}]\n    measured: {r['measured']}\n    verdict: {r['verdict']}"
                     for r in rows)


def advise(constraint: str, result: dict, model_billions: float = 7.0, gpu_gb: float = 15.0) -> str:
    """The decision guide: memory-bound -> QLoRA, quality -> DoRA, speed -> LoRA+, else LoRA; the advice cites the
    showdown's numbers and estimates the weights of a `model_billions` model against `gpu_gb` of GPU memory."""
    choices = ("memory", "quality", "speed", "none")
    if constraint not in choices:
        raise ValueError(f"constraint must be one of {choices}, got {constraint!r}.")
    rows = {r["method"]: r for r in table(result)}
    n = model_billions * 1e9
    fp16_gb, nf4_gb = n * 2 / 1e9, n * 4.127 / 8 / 1e9
    fits = f"{model_billions:g}B weights: {fp16_gb:.1f} GB in fp16, {nf4_gb:.1f} GB in NF4 ({gpu_gb:g} GB GPU)"
    if constraint == "memory" or fp16_gb > 0.8 * gpu_gb:
        why = ("the fp16 weights alone do not fit" if fp16_gb > 0.8 * gpu_gb else "memory is your limit")
        q, lo = rows["qlora"], rows["lora"]
        return (f"QLoRA: {why}. {fits}. Here QLoRA stored the frozen weights in "
                f"{q['memory']['frozen weights'] / lo['memory']['frozen weights']:.2f}x LoRA's bytes, scored "
                f"{q['accuracy']:.1%} vs LoRA's {lo['accuracy']:.1%}, at {q['step_time'] / lo['step_time']:.2f}x "
                f"the step time (CPU).")
    if constraint == "quality":
        d, lo = rows["dora"], rows["lora"]
        return (f"DoRA: {fits}. Here DoRA scored {d['accuracy']:.1%} ± {d['accuracy_sd']:.1%} vs LoRA's "
                f"{lo['accuracy']:.1%} ± {lo['accuracy_sd']:.1%} at {d['step_time'] / lo['step_time']:.2f}x the step "
                f"time; try it when LoRA shows a gap, and compare over seeds.")
    if constraint == "speed":
        p, lo = rows["lora+"], rows["lora"]
        control = (f" But plain LoRA with a 4x learning rate scored {rows['lora-lr4x']['accuracy']:.1%}: tune the "
                   f"learning rate first." if "lora-lr4x" in rows else "")
        return (f"LoRA+: {fits}. Here LoRA+ (ratio 16) scored {p['accuracy']:.1%} vs LoRA's {lo['accuracy']:.1%} "
                f"after the same {result['config']['steps']} steps, at the same cost per step "
                f"({p['step_time']:.2f} vs {lo['step_time']:.2f} s).{control}")
    lo = rows["lora"]
    return (f"LoRA: {fits}. The simplest, and here {lo['accuracy']:.1%} after {result['config']['steps']} steps with "
            f"{lo['trainable_parameters']:,} trainable parameters ({lo['file_bytes'] / 2**20:.1f} MiB adapter file).")
