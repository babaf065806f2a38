"""The claims learners arrive with, each set against what a saved showdown measured, and the decision guide.

The claims themselves -- their words, their sources by title and author, what is measured and the range that would
make them true -- are data, in claims.json: rewording a claim never means editing Python. This file computes the
quantities they name and gives each its verdict.

    rows = claims(load_result("showdown"))      # pure functions of saved results: same numbers, same verdicts
    print(format_claims(rows))
    print(advise("memory", result, model_billions=7, gpu_gb=15))

Every verdict comes from one rule (`nanopeft.course.stats.verdict`): the claim is a range for an effect, and it holds
when the whole 95% interval of the measured effect lies in that range, does not hold when the interval lies
wholly outside, and is not settled otherwise. Quantities without sampling noise (parameter counts, bytes) have
intervals of width zero; figures computed rather than measured (7B, 65B) say so.
"""
from __future__ import annotations

import json
import math
from importlib import resources

from ..lab.planner import DEVICES, HEADROOM, plan
from .estimates import LLAMA_7B, NF4_BITS, gb, training_memory
from .report import correct_matrix, groups, interleaved_step_time, table, time_matrix
from .results import load_result
from .stats import FAILS, HOLDS, UNSETTLED, exact, first_crossing, paired_bootstrap, verdict

# What "close" and "near" mean in the claims below, stated once. These are conventions, not laws:
CLOSE = 0.05  # accuracies within 5 points are "close"/"matching": on a 6-way task at this budget, less than the
#               spread between two seeds of one method (see the seed accuracies in the table)
NEAR = 1.10  # step times within 10% are "near the same speed": less than the run-to-run noise of a shared machine
COMPARABLE = 1.15  # memory within 15% is "comparable"
GPU_SHARE = 0.8  # the advice's rule of thumb: the weights and adapter states may take 80% of the GPU; the rest is
#                  for activations (which grow with batch x length) and the CUDA context (about 0.5 GB)


ABOUT = 0.25  # "~N GB" holds when the planned peak lies within 25% of N: the articles round, and batch and length move
#               the activations by more than that
PLANNED = dict(batch=1, seq=512, checkpointing=True, dtype="bfloat16", optimizer="adamw", targets="all-linear")
PLANNED_WORDS = "planned for {model}, {method}{rank} on all linear layers, batch 1 x 512 tokens, bf16, gradient checkpointing, AdamW (float32 adapters, its state on the GPU), on a GPU"


def _t4_usable() -> float:
    return DEVICES["t4"][1] * 2**20 / (1 + HEADROOM)


CONSTANTS = {"CLOSE": CLOSE, "-CLOSE": -CLOSE, "NEAR": NEAR, "COMPARABLE": COMPARABLE, "ABOUT_LOW": 1 - ABOUT,
             "ABOUT_HIGH": 1 + ABOUT}


def _bound(value, default):
    """A rule's bound: a number, a constant's name, or "NAME*number"."""
    if value is None:
        return default
    if value == "T4_USABLE":
        return _t4_usable()
    if isinstance(value, str) and "*" in value:
        name, factor = value.split("*")
        return CONSTANTS[name] * float(factor)
    return CONSTANTS.get(value, value)
CLAIMS_FILE = resources.files(__package__) / "claims.json"  # the claims' words, sources and rules: data, not code


def load_claims() -> dict:
    """{"sources": {key: citation}, "claims": [entry, ...]} from claims.json. Each entry: the claim as its source
    words it, the keys of its sources, the measured `quantity` (a function below) and its `args`, a `measured`
    template filled with what the quantity reports, and the `rule`: the range [low, high] the effect must lie in
    (a number, or the name of a constant above) and how the page says it."""
    return json.loads(CLAIMS_FILE.read_text())


def claims(showdown: dict, timings: dict | None = None) -> list:
    """Each claim in claims.json with: claim, source, measured, interval (text), rule, verdict.

    timings: a `step_times` result (methods timed step by step, interleaved); the step-time claims use it when
    given, else the showdown's own step times (runs apart in time, so other work on the machine weighs in)."""
    data = load_claims()
    q = Quantities(showdown, timings)
    constants = {**CONSTANTS, "CLOSE_PTS": f"{CLOSE * 100:.0f}", "ABOUT_PCT": f"{ABOUT * 100:.0f}",
                 "HEADROOM_PCT": f"{HEADROOM * 100:.0f}"}
    out = []
    for entry in data["claims"]:
        if entry.get("needs") and entry["needs"] not in q.by:
            continue
        interval, shown, values = getattr(q, entry["quantity"])(*entry["args"])
        rule = entry["rule"]
        low, high = _bound(rule.get("low"), -math.inf), _bound(rule.get("high"), math.inf)
        out.append({"claim": entry["claim"], "source": "; ".join(data["sources"][k] for k in entry["sources"]),
                    "measured": entry["measured"].format(**q.context, **values), "interval": shown,
                    "rule": rule["says"].format(**constants), "verdict": verdict(interval, low, high)})
    return out


def dora_7b_range() -> str:
    """Our DoRA (factored norm, fused backward) / our LoRA, one layer at 7B shapes: "a-bx" over the shipped rows."""
    rows = load_result("dora_layer")["rows"]
    ratios = [r["median_seconds"]["ours DoRA factored+fused"] / r["median_seconds"]["ours LoRA"] for r in rows]
    return f"{min(ratios):.2f}x-{max(ratios):.2f}x"


class Quantities:
    """The measured quantities the claims name: each returns (interval, the effect as shown, values for the
    `measured` text). Context every text may use: timed, where, r, batch, seeds, tickets."""

    def __init__(self, showdown: dict, timings: dict | None):
        self.showdown, self.timings = showdown, timings
        self.by, self.rows, cfg = groups(showdown), {r["method"]: r for r in table(showdown)}, showdown["config"]
        hw = cfg["hardware"]
        self.context = {"timed": "timed step by step, interleaved," if timings is not None else "during the showdown,",
                        "where": hw.get("gpu") or f"{hw['cpu_count']}-core CPU", "r": cfg["r"],
                        "batch": cfg["batch_size"], "seeds": len(cfg["seeds"]), "tickets": cfg["test_tickets"],
                        "dora_7b": dora_7b_range()}

    def step_time_ratio(self, a, b):
        if self.timings is not None:  # one row of interleaved steps, the first (warm-up) one dropped
            t = paired_bootstrap([self.timings["times"][a][1:]], [self.timings["times"][b][1:]], kind="ratio")
        else:
            t = paired_bootstrap(time_matrix(self.by[a]), time_matrix(self.by[b]), kind="ratio")
        return t, t.format(digits=2, unit="x"), {}

    def extra_parameters(self, a, b):
        share = self.rows[a]["trainable_parameters"] / self.rows[b]["trainable_parameters"] - 1
        return exact(share), exact(share).format(100, "%"), {"share": share}

    def memory_ratio(self, a, b):
        m = exact(self.rows[a]["total_memory"] / self.rows[b]["total_memory"])
        return m, m.format(digits=2, unit="x"), {"activations_a": self.rows[a]["memory"]["activations"] / 2**20,
                                                 "activations_b": self.rows[b]["memory"]["activations"] / 2**20}

    def accuracy_gap(self, a, b):
        d = paired_bootstrap(correct_matrix(self.by[a]), correct_matrix(self.by[b]))
        return d, d.format(100, " pts"), {}

    def loraplus_speedup(self):
        s = loraplus_speedup(self.showdown)
        cfg = self.showdown["config"]
        return s["interval"], s["interval"].format(digits=2, unit="x"), {
            "target": s["target"], "eval_every": cfg["eval_every"], "never": cfg["steps"] + cfg["eval_every"]}

    def planned_peak(self, model, method, r=8):
        """The memory planner's peak for a training step of `model` (see PLANNED), on a GPU (the CUDA context
        counted; the 20B claim on a T4)."""
        device = "t4" if "20b" in model else "a100-80"
        p = plan(model, method, r=r, device=device, **PLANNED)
        parts = ", ".join(f"{name} {nbytes / 1e9:.{2 if nbytes < 1e9 else 1}f}" for name, nbytes in p.parts.items()
                          if nbytes >= 5e6)
        values = {"setup": PLANNED_WORDS.format(model=model, method=method, rank="" if method.startswith("full") else f" r={r}"),
                  "parts": f"peak {p.peak_bytes / 1e9:.1f} GB at the {p.moment} = {parts}",
                  "t4_gib": DEVICES["t4"][1] / 1024, "t4_gb": DEVICES["t4"][1] * 2**20 / 1e9,
                  "headroom_pct": f"{HEADROOM * 100:.0f}"}
        return exact(p.peak_bytes), f"{p.peak_bytes / 1e9:.1f} GB at the peak (planned)", values

    def double_quant_saving(self):
        rows = self.rows
        n = rows["full"]["trainable_parameters"]  # the quantized weights: full fine-tuning trains the same matrices
        kept = rows["lora"]["memory"]["frozen weights"] - 4 * n  # the float32 model minus its linear layers
        bits = 8 * (rows["qlora"]["memory"]["frozen weights"] - kept) / n
        saved = exact(4.5 - bits)
        return saved, saved.format(digits=3, unit=" bits"), {"bits": bits, "gb_65b": (4.5 - bits) * 65e9 / 8 / 1e9}


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
