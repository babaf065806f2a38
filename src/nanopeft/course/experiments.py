"""Experiments: every method trained and measured the same way, from one recipe.

    model, optimizer = build("qlora", base, lr=1e-3)                  # a recipe -> model + optimizer
    run = run_method("qlora", base, tokenizer, task, seed=0, lr=1e-3) # train, score, measure: a JSON-ready dict
    sweep = lr_sweep(SHOWDOWN)                   # each method's learning rate, chosen on the validation split
    result = showdown(SHOWDOWN, seeds=range(5), lrs=sweep["chosen"])  # `python -m nanopeft.course showdown`
    ratios = ratio_sweep((1, 2, 4, 8, 16, 32), seeds=range(3), lr=...)    # LoRA+ ratios
    study = dora_study(seeds=range(3))           # how the weights move: full fine-tuning, LoRA, DoRA

Every run starts from the same pretrained weights and trains on the same batches (same seed) for the same budget;
only the recipe and its learning rate differ. The validation split is scored every `eval_every` steps (the curve,
and the choice of learning rates); the test split is scored once, at the end, ticket by ticket (what
`nanopeft.course.stats` resamples).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from ..adapters import METHODS, adapter_layers, add_adapters
from ..targets import trainable_parameters
from ..loraplus import create_loraplus_optimizer
from ..peft_format import save_adapter
from ..qlora import prepare_for_kbit_training, quantize_model
from ..targets import find_targets
from .analysis import WeightRecorder, per_neuron_change
from ..lab.data import correct, evaluate, load_task
from ..lab.memory import COUNTED
from ..lab.models import load_base_model
from ..lab.train import encode, summarize, train, training_step


@dataclass(frozen=True)
class Recipe:
    """What a method is, as far as training goes."""

    adapter: str | None  # a method in nanopeft.METHODS; None: full fine-tuning of the target matrices (the baseline)
    four_bit: bool = False  # quantize the base to NF4 (blocks of 64, double quantization) first: QLoRA, QDoRA
    loraplus_ratio: float | None = None  # B's learning rate = ratio x A's (LoRA+); None: one learning rate


RECIPES = {
    "full": Recipe(None),
    # every method in the table that adapts whole layers ("lora", "dora", "pissa"; "merged" needs a fused layer)
    **{name: Recipe(name) for name, cls in METHODS.items() if cls.name != "merged"},
    "qlora": Recipe("lora", four_bit=True),
    "qdora": Recipe("dora", four_bit=True),
    "lora+": Recipe("lora", loraplus_ratio=16),
    "qlora+lora+": Recipe("lora", four_bit=True, loraplus_ratio=16),
}
SHOWDOWN = ("full", "lora", "dora", "qlora", "qdora", "lora+")  # the methods of `python -m nanopeft.course showdown`


@dataclass(frozen=True)
class Budget:
    """The same for every method."""

    steps: int = 40  # optimizer steps: 40 x 4 = 160 tickets, under one pass over the 240 training tickets
    batch_size: int = 4  # tickets per step
    r: int = 8  # adapter rank; alpha = 2r, so the update is scaled by 2
    targets: str = "all-linear"  # every linear layer but the head; full fine-tuning trains these same matrices
    eval_every: int = 10  # validation accuracy every this many steps (the curve)


# Learning-rate grids for `lr_sweep`: four points, a factor of 2 apart, around each kind of method's usual range.
# Every method gets the same number of points and the same budget; LoRA+'s grid is for A (B trains 16x faster).
ADAPTER_GRID = (5e-4, 1e-3, 2e-3, 4e-3)
LR_GRIDS = {
    "full": (2.5e-5, 5e-5, 1e-4, 2e-4),
    **{name: ADAPTER_GRID for name in RECIPES if name != "full"},  # every adapter method: the same four points
    "lora+": (1.25e-4, 2.5e-4, 5e-4, 1e-3), "qlora+lora+": (1.25e-4, 2.5e-4, 5e-4, 1e-3),
}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"Unknown method {name!r}; choose from {list(RECIPES)}.")
    return RECIPES[name]


def train_only(model, targets):
    """Full fine-tuning of the target layers' weights only (the baseline adapters are compared with): every
    parameter is frozen except the weights of the layers `targets` names (same rules as `add_adapters`)."""
    names = find_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].weight.requires_grad_(True)
    return model


def build(name: str, base, lr: float, budget: Budget = Budget(), seed: int = 0, ratio: float | None = None,
          targets=None):
    """A copy of `base` prepared by recipe `name`, and its AdamW optimizer: (model, optimizer). `base` is untouched.
    ratio: overrides the recipe's LoRA+ ratio (the ratio sweep); targets: overrides the budget's."""
    r = recipe(name)
    targets = budget.targets if targets is None else targets
    model = copy.deepcopy(base)
    if r.adapter is None and next(model.parameters()).dtype == torch.float16:
        model.float()  # full fine-tuning keeps its trained weights in float32 (float16 would lose small updates)
    torch.manual_seed(seed)
    if r.four_bit:
        # the 4-bit matmuls compute in the base's dtype (bitsandbytes' compute dtype); prepare_for_kbit_training then
        # keeps the small tensors (norms, embeddings) in float32, as peft does
        dtype = next(model.parameters()).dtype
        quantize_model(model, compute_dtype=None if dtype == torch.float32 else dtype)
        prepare_for_kbit_training(model, gradient_checkpointing=False)
    if r.adapter is None:
        train_only(model, targets)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    add_adapters(model, r.adapter, r=budget.r, alpha=2 * budget.r, targets=targets)
    ratio = r.loraplus_ratio if ratio is None else ratio
    if ratio:
        return model, create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, ratio=ratio)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def shipped_bytes(model) -> int:
    """Size of what you would ship: the peft adapter file, or for full fine-tuning the trained matrices as a
    safetensors file."""
    with tempfile.TemporaryDirectory() as d:
        if adapter_layers(model):
            save_adapter(model, d)
            return os.path.getsize(os.path.join(d, "adapter_model.safetensors"))
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, os.path.join(d, "weights.safetensors"))
        return os.path.getsize(os.path.join(d, "weights.safetensors"))


def hardware() -> dict:
    """Where a result was measured, saved with it."""
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "processor": _cpu_name()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def run_method(name: str, base, tokenizer, task, lr: float, seed: int = 0, budget: Budget = Budget(),
               ratio: float | None = None, score_test: bool = True, progress=None) -> dict:
    """Train recipe `name` from a copy of `base` and return what was measured, JSON-ready.

    curve: validation accuracy every `budget.eval_every` steps; test_correct: 0/1 per test ticket after the last
    step (only if `score_test`); step_times: every step's seconds; memory: the counted parts at the last step and
    the largest activations."""
    start = time.perf_counter()
    model, optimizer = build(name, base, lr, budget, seed, ratio)
    curve = {}

    def callback(record):
        if record["step"] % budget.eval_every == 0 or record["last"]:
            curve[record["step"]] = evaluate(model, tokenizer, task.validation)

    history = train(model, tokenizer, task.train, budget.steps, optimizer, batch_size=budget.batch_size, seed=seed,
                    callback=callback, progress=progress, desc=f"{name} lr {lr:g} seed {seed}")
    s = summarize(history)
    test = correct(model, tokenizer, task.test) if score_test else None
    last = history[-1]["memory"]
    out = {
        "method": name, "seed": seed, "lr": lr, "ratio": recipe(name).loraplus_ratio if ratio is None else ratio,
        "curve": curve, "validation_accuracy": curve[budget.steps],
        "test_correct": None if test is None else [int(t) for t in test],
        "accuracy": None if test is None else sum(test) / len(test),
        "loss": [round(h["loss"], 5) for h in history],
        "step_times": [round(h["step_time"], 4) for h in history],
        "mean_step_time": s["mean step time"],
        "memory": {**{k: last[k] for k in COUNTED}, "activations": s["activations"]},
        "peak_memory": s["peak memory"], "peak_memory_kind": s["peak memory kind"],
        "trainable_parameters": trainable_parameters(model).trainable,
        "file_bytes": shipped_bytes(model),
    }
    out["wall_time"] = time.perf_counter() - start
    del model, optimizer
    return out


def _setup(base, tokenizer, tickets=None):
    """The model (loaded if not given) and the task; `tickets` shrinks validation and test for quick checks."""
    if base is None:
        base, tokenizer = load_base_model()
    task = load_task() if tickets is None else load_task(n_validation=tickets, n_test=tickets)
    return base, tokenizer, task


def lr_sweep(methods=SHOWDOWN, grids=None, seed: int = 0, budget: Budget = Budget(), base=None, tokenizer=None,
             progress=None, callback=None, tickets=None) -> dict:
    """Each method at each learning rate of its grid, one seed, scored on the validation split only; returns
    {"config", "runs", "chosen": {method: lr}}. The chosen lr has the best final validation accuracy (ties: the
    lower final training loss)."""
    grids = {**LR_GRIDS, **(grids or {})}
    base, tokenizer, task = _setup(base, tokenizer, tickets)
    runs = []
    final_only = dataclasses.replace(budget, eval_every=budget.steps)  # choosing needs the final accuracy only
    for name in methods:
        for lr in grids[name]:
            run = run_method(name, base, tokenizer, task, lr, seed, final_only, score_test=False, progress=progress)
            runs.append(run)
            if callback:
                callback(run)
    chosen = {}
    for name in methods:
        mine = [r for r in runs if r["method"] == name]
        best = max(mine, key=lambda r: (r["validation_accuracy"], -statistics.mean(r["loss"][-5:])))
        chosen[name] = best["lr"]
    return {"config": {**dataclasses.asdict(budget), "methods": list(methods), "seed": seed,
                       "grids": {m: list(grids[m]) for m in methods}, "hardware": hardware()},
            "runs": runs, "chosen": chosen}


def showdown(methods=SHOWDOWN, seeds=range(5), lrs=None, budget: Budget = Budget(), base=None, tokenizer=None,
             progress=None, callback=None, tickets=None, done=()) -> dict:
    """Every method for every seed at its learning rate (`lrs`: {method: lr}, e.g. `lr_sweep(...)["chosen"]`);
    returns {"config", "runs"}, JSON-ready. `callback(run)` is called after each new run (for a live table, or to
    save progress); `done`: runs of an interrupted call with the same settings, kept instead of trained again."""
    lrs = lrs or {}
    missing = [m for m in methods if m not in lrs]
    if missing:
        raise ValueError(f"No learning rate for {missing}: pass lrs={{method: lr}}, chosen on the validation split "
                         f"(lr_sweep).")
    base, tokenizer, task = _setup(base, tokenizer, tickets)
    base_test = correct(base, tokenizer, task.test)
    finished = {(r["method"], r["seed"]): r for r in done}
    runs = []
    for seed in seeds:
        for name in methods:
            if (name, seed) in finished:
                runs.append(finished[(name, seed)])
                continue
            run = run_method(name, base, tokenizer, task, lrs[name], seed, budget, progress=progress)
            runs.append(run)
            if callback:
                callback(run)
    return {"config": {**dataclasses.asdict(budget), "methods": list(methods), "seeds": list(seeds), "lrs": lrs,
                       "base_accuracy": sum(base_test) / len(base_test), "test_tickets": len(task.test),
                       "validation_tickets": len(task.validation), "hardware": hardware()},
            "runs": runs}


def ratio_sweep(ratios=(1, 2, 4, 8, 16, 32), seeds=range(3), lr: float = 5e-4, budget: Budget = Budget(), base=None,
                tokenizer=None, progress=None, callback=None, reuse: dict | None = None, tickets=None,
                done=()) -> dict:
    """LoRA+ at each ratio (ratio 1 = plain LoRA) with A's learning rate `lr`; returns {"config", "runs"}.

    reuse: a `showdown` result whose "lora+" runs used the same budget and lr: they stand for their ratio instead
    of being trained again (same code, same seeds: they would be the same runs). done: runs of an interrupted call
    with the same settings, kept as they are."""
    base, tokenizer, task = _setup(base, tokenizer, tickets)
    reusable = {}
    if reuse and all(reuse["config"].get(k) == v for k, v in dataclasses.asdict(budget).items()):
        reusable = {(r["ratio"], r["seed"]): r for r in reuse["runs"] if r["method"] == "lora+" and r["lr"] == lr}
    finished = {(r["ratio"], r["seed"]): r for r in done}
    runs = []
    for seed in seeds:
        for ratio in ratios:
            if (ratio, seed) in finished:
                runs.append(finished[(ratio, seed)])
                continue
            if (ratio, seed) in reusable:
                run = {**reusable[(ratio, seed)], "reused": True}
            else:
                run = run_method("lora+", base, tokenizer, task, lr, seed, budget, ratio=ratio, progress=progress)
            run["ratio"] = ratio
            runs.append(run)
            if callback:
                callback(run)
    return {"config": {**dataclasses.asdict(budget), "ratios": list(ratios), "seeds": list(seeds), "lr": lr,
                       "hardware": hardware()}, "runs": runs}


def dora_study(methods=("full", "lora", "dora"), seeds=range(3), steps: int = 40, targets=("q_proj", "v_proj"),
               r: int = 8, lrs=None, batch_size: int = 4, checkpoints=None, neuron_layers=(0, 10, 20, 29),
               base=None, tokenizer=None, progress=None) -> dict:
    """Train each method with the same budget and record how the target weights move (the DoRA paper's figure).

    Returns a JSON-ready dict: for every (method, seed) the loss curve, dM and dD of every target layer at each
    checkpoint, and per-neuron changes for the layers in `neuron_layers` (first seed only). full = full
    fine-tuning of the same target matrices (the paper's FT); lora and dora with rank r, alpha = 2r."""
    lrs = {"full": 1e-4, "lora": 2e-3, "dora": 2e-3, **(lrs or {})}
    checkpoints = list(checkpoints or sorted({max(1, steps // 4), steps // 2, 3 * steps // 4, steps}))
    budget = Budget(steps=steps, batch_size=batch_size, r=r)
    base, tokenizer, task = _setup(base, tokenizer)
    runs, seeds = [], list(seeds)
    for seed in seeds:
        for name in methods:
            model, optimizer = build(name, base, lrs[name], budget, seed, targets=list(targets))
            layers = find_targets(model, list(targets)) if name == "full" else list(adapter_layers(model))
            recorder = WeightRecorder(model, layers=layers, steps=checkpoints)
            history = train(model, tokenizer, task.train, steps, optimizer, batch_size=batch_size, seed=seed,
                            callback=recorder, progress=progress, desc=f"{name} seed {seed}")
            changes = {}
            for (layer, step), (dM, dD) in recorder.changes().items():
                changes.setdefault(layer, {})[step] = [dM, dD]
            neurons = {}
            for layer in layers:
                index = int(layer.split(".layers.")[1].split(".")[0]) if ".layers." in layer else -1
                if index in neuron_layers and seed == seeds[0]:  # per-neuron data for the first seed only
                    neurons[layer] = {step: [[float(f"{v:.4g}") for v in t.tolist()]
                                             for t in per_neuron_change(recorder.snapshots[0][layer], snap[layer])]
                                      for step, snap in recorder.snapshots.items() if step}
            runs.append({"method": name, "seed": seed, "lr": lrs[name], "loss": [h["loss"] for h in history],
                         "mean_step_time": summarize(history)["mean step time"], "changes": changes,
                         "neurons": neurons})
            del model, recorder
    return {"config": {"methods": list(methods), "seeds": seeds, "steps": steps, "checkpoints": checkpoints,
                       "targets": list(targets), "r": r, "lrs": lrs, "batch_size": batch_size,
                       "hardware": hardware()}, "runs": runs}


def step_times(methods=SHOWDOWN, lrs=None, steps: int = 30, budget: Budget = Budget(), base=None, tokenizer=None,
               progress=None) -> dict:
    """Seconds per training step of every method, measured interleaved: all models built first, then step k of
    every method before step k + 1 of any, on the same batches. Whatever else the machine does then slows all
    methods alike, so the ratios between methods are what this measures well (the showdown's own step times come
    from runs hours apart)."""
    lrs = lrs or {}
    base, tokenizer, task = _setup(base, tokenizer, tickets=6)
    built = {name: build(name, base, lrs.get(name, 1e-4), budget) for name in methods}
    scalers = {name: torch.amp.GradScaler(next(m.parameters()).device.type, enabled=False) for name, (m, _) in
               built.items()}
    device = next(base.parameters()).device
    times = {name: [] for name in methods}
    for model, _ in built.values():
        model.train()
    for k in range(steps):
        batch = encode(tokenizer, task.train[k * budget.batch_size % len(task.train):][: budget.batch_size], device)
        for name, (model, optimizer) in built.items():
            trainable = [p for p in model.parameters() if p.requires_grad]
            _, _, seconds = training_step(model, batch, optimizer, scalers[name], trainable)
            optimizer.zero_grad(set_to_none=True)
            times[name].append(seconds)
        if progress:
            print(f"step {k + 1}/{steps}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    return {"config": {**dataclasses.asdict(budget), "methods": list(methods), "steps": steps,
                       "hardware": hardware()}, "times": times}
