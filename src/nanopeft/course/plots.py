"""Pictures of saved results: the showdown, the LoRA+ ratio sweep, and the DoRA study. Each function returns the
figure and saves it to `path` if given. matplotlib is imported inside each function: it is optional
(`nanopeft[notebooks]`) and slow to import, and the command line runs without it.
"""
from __future__ import annotations

import statistics

from .analysis import slope
from ..lab.live import PART_COLORS
from ..lab.memory import COUNTED
from .report import groups, table
from .stats import curve_at

METHOD_COLORS = {"full": "black", "lora": "tab:blue", "dora": "tab:orange", "qlora": "tab:green", "qdora": "tab:red",
          "lora+": "tab:purple", "qlora+lora+": "tab:brown"}

def _mean_curve(runs):
    steps = sorted(int(k) for k in runs[0]["curve"])
    return steps, [statistics.mean(curve_at(r["curve"], s) for r in runs) for s in steps]


def plot_showdown(result: dict, path=None):
    """Validation accuracy during training, test accuracy with its 95% interval (dots: seeds), tensor memory by
    part, and step time."""
    import matplotlib.pyplot as plt

    rows = table(result)
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for name, runs in groups(result).items():
        steps, acc = _mean_curve(runs)
        axes[0].plot(steps, acc, "o-", color=METHOD_COLORS.get(name), label=name)
    axes[0].set(xlabel="step", ylabel="validation accuracy", ylim=(0, 1),
                title=f"validation accuracy during training\n(mean of {len(result['config']['seeds'])} seeds)")
    axes[0].legend(fontsize=8)
    for i, r in enumerate(rows):
        iv = r["interval"]
        axes[1].bar(i, iv.estimate, color=METHOD_COLORS.get(r["method"]), alpha=0.6)
        axes[1].errorbar(i, iv.estimate, yerr=[[iv.estimate - iv.low], [iv.high - iv.estimate]], color="black",
                         capsize=4)
        axes[1].plot([i] * len(r["seed_accuracies"]), r["seed_accuracies"], "k.", ms=6)
    axes[1].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[1].set(ylabel="test accuracy", ylim=(0, 1),
                title=f"test accuracy after {result['config']['steps']} steps\n(bar: mean, line: 95% interval, dots: seeds)")
    mib = 2 ** 20
    bottom = [0.0] * len(rows)
    for part in COUNTED + ("activations",):
        vals = [r["memory"][part] / mib for r in rows]
        axes[2].bar(range(len(rows)), vals, bottom=bottom, label=part, color=PART_COLORS[part])
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[2].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[2].set(ylabel="MiB", title=f"tensor memory by part\n(batch {result['config']['batch_size']}, counted exactly)")
    axes[2].legend(fontsize=8)
    axes[3].bar(range(len(rows)), [r["step_time"] for r in rows], color=[METHOD_COLORS.get(n) for n in names])
    axes[3].set_xticks(range(len(names)), names, rotation=30, ha="right")
    hw = result["config"]["hardware"]
    axes[3].set(ylabel="seconds", title=f"step time (forward + backward + AdamW)\n"
                                        f"{hw.get('gpu') or str(hw['cpu_count']) + '-core CPU'}, each method's own runs "
                                        f"(not interleaved)")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


def plot_sweep(result: dict, path=None):
    """LoRA+ ratio sweep: validation accuracy during training per ratio, training loss, and test accuracy against
    the ratio with its 95% interval."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    cmap = plt.get_cmap("viridis")
    ratios = result["config"]["ratios"]
    by = groups(result, key="ratio")
    for i, ratio in enumerate(ratios):
        runs, color = by[ratio], cmap(i / max(1, len(ratios) - 1))
        steps, acc = _mean_curve(runs)
        axes[0].plot(steps, acc, "o-", color=color, label=f"ratio {ratio}")
        loss = [statistics.mean(vals) for vals in zip(*(r["loss"] for r in runs))]
        axes[1].plot(range(1, len(loss) + 1), loss, color=color, label=f"ratio {ratio}")
    rows = table(result, key="ratio")
    xs = [r["ratio"] for r in rows]
    axes[2].errorbar(xs, [r["accuracy"] for r in rows], yerr=[[r["accuracy"] - r["interval"].low for r in rows],
                                                              [r["interval"].high - r["accuracy"] for r in rows]],
                     fmt="o-", color="black", capsize=4)
    for r in rows:
        axes[2].plot([r["ratio"]] * len(r["seed_accuracies"]), r["seed_accuracies"], ".", color="gray", ms=6)
    seeds = len(result["config"]["seeds"])
    over = "mean over seeds" if seeds > 1 else "one seed"
    axes[0].set(xlabel="step", ylabel="validation accuracy", ylim=(0, 1), title=f"validation accuracy ({over})")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="step", ylabel="training loss", ylim=(0, 4), title=f"training loss ({over})")
    axes[2].set(xscale="log", xlabel="ratio lr_B / lr_A", ylabel="test accuracy", ylim=(0, 1),
                title=f"test accuracy after {result['config']['steps']} steps\n"
                      f"(95% interval; {seeds} seed{'s' if seeds > 1 else ''}, dots: seeds)")
    axes[2].set_xticks(ratios, [str(r) for r in ratios])
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


STUDY_COLORS = {"full": "tab:gray", "lora": "tab:blue", "dora": "tab:red"}


def plot_dora_study(study: dict, path=None):
    """The DoRA paper's figure on our model: dD against dM for every target matrix at every checkpoint (first seed),
    one panel per method, on shared axes so that the slopes can be compared by eye."""
    import matplotlib.pyplot as plt
    import numpy as np

    cfg = study["config"]
    methods = cfg["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4.4), sharex=True, sharey=True)
    for ax, method in zip(axes, methods):
        per_seed = []
        for run in (r for r in study["runs"] if r["method"] == method):
            points = [(v[0], v[1], int(step)) for layer in run["changes"].values() for step, v in layer.items()]
            per_seed.append(slope([p[0] for p in points], [p[1] for p in points]))
            if run["seed"] == cfg["seeds"][0]:
                x, y = np.array([p[0] for p in points]), np.array([p[1] for p in points])
                sc = ax.scatter(x, y, c=[p[2] for p in points], cmap="viridis", s=10)
                k, b = np.polyfit(x, y, 1)
                xs = np.linspace(x.min(), x.max(), 10)
                ax.plot(xs, k * xs + b, color=STUDY_COLORS.get(method, "black"))
        signs = "".join("+" if v > 0 else "-" for v in per_seed)
        ax.set_title(f"{method}: slope, mean over seeds {np.mean(per_seed):+.3g} (signs: {signs})", fontsize=10)
        ax.set_xlabel("dM (mean |change of row length|)")
        ax.tick_params(axis="x", labelrotation=30)
    axes[0].set_ylabel("dD (mean 1 - cos)")
    fig.colorbar(sc, ax=axes, label="step", shrink=0.85)
    fig.suptitle(f"How the target matrices moved: each dot is one matrix at one checkpoint (seed {cfg['seeds'][0]}, "
                 f"{cfg['steps']} steps, {'/'.join(cfg['targets'])}, r={cfg['r']})", y=1.02, fontsize=11)
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig
