"""The planner's companions: a real training step metered on the CPU (what the planner is checked against), and the
pictures and knobs of notebook 07."""
from __future__ import annotations

import torch

from ..adapters import add_adapters
from ..qlora import quantize_model
from .device import DTYPES
from .live import in_notebook
from .memory import LiveTensors, tensor_breakdown
from .planner import DEVICES, GIB, PEAK_PARTS, SETUPS, load_config, plan, presets


# ----------------------------------------------------------------------------------------------- measurement
def random_model(model, dtype=torch.float32, seed: int = 0):
    """A randomly initialised model of this config, built on the meta device then materialised (no weights needed):
    the memory of the real one, none of its knowledge."""
    from transformers import AutoModelForCausalLM

    config = load_config(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config, dtype=dtype)
    m = m.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02, generator=gen)
        for name, b in m.named_buffers():
            if b.is_floating_point() and "inv_freq" in name:
                b.copy_(1.0 / (config.rope_theta if hasattr(config, "rope_theta") else 10000.0) ** (
                    torch.arange(0, b.numel() * 2, 2, dtype=torch.float32) / (b.numel() * 2)))
    if getattr(config, "tie_word_embeddings", False):
        m.tie_weights()
    return m


def measure_step(model, method: str = "lora", r: int = 8, targets="all-linear", batch: int = 1, seq: int = 128,
                 checkpointing: bool = False, optimizer: str = "adamw", dtype: str = "float32",
                 double_quant: bool = True, dora_norm: str = "exact", steps: int = 2, seed: int = 0,
                 runner=None) -> dict:
    """Run `steps` real training steps of `model` (a torch model, float32, on the CPU: it is changed in place) with
    the method applied, and meter them with `memory.LiveTensors`. Returns the peak, the moment it happened and the
    persistent parts, in bytes. `runner(model, optimizer, ids, autocast, steps)` replaces the metered loop (another
    meter's run)."""
    if method not in ("full-fp32", "full-mixed"):
        model.to(DTYPES[dtype])
    if method in ("qlora", "qdora"):
        quantize_model(model, double_quant=double_quant, compute_dtype=DTYPES[dtype])
    if method.startswith("full"):
        model.requires_grad_(True)
    else:
        options = {"norm": dora_norm} if method in ("dora", "qdora") else {}
        torch.manual_seed(seed)
        add_adapters(model, "dora" if method in ("dora", "qdora") else "lora", r=r, alpha=2 * r, targets=targets,
                     **options)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-5)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=1e-5)
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-5)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    autocast = torch.autocast("cpu", dtype=DTYPES[dtype], enabled=method == "full-mixed")
    if runner is not None:
        return runner(model, opt, ids, autocast, steps)
    meter = LiveTensors(model, opt, ids)
    with meter:
        for _ in range(steps):
            meter.phase = "forward"
            with autocast:
                out = model(input_ids=ids, labels=ids)
            meter.phase = "backward"
            out.loss.backward()
            meter.phase = "optimizer step"
            grads = tensor_breakdown(model)["gradients"]
            opt.step()
            opt.zero_grad(set_to_none=True)
            del out
            meter.phase = "between steps"
    parts = {**tensor_breakdown(model, opt), "gradients": grads}
    return {"peak_bytes": meter.peak, "moment": meter.peak_phase, "persistent": parts,
            "phase_peaks": dict(meter.phase_peaks)}


# ------------------------------------------------------------------------------------------------ pictures
COLORS = {"frozen weights": "#9e9e9e", "trainable weights": "#4c72b0", "gradients": "#55a868",
          "optimizer state": "#c44e52", "activations": "#dd8452", "logits and loss": "#8172b3",
          "temporaries": "#937860", "CUDA context": "#333333"}


def plot_plans(plans: list, labels: list, capacity=None, ax=None, title=None):
    """Stacked bars of each plan's parts at its peak (GiB), and the device's line when `capacity` (bytes) is given."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(1.6 + 1.5 * len(plans), 3.6))
    bottom = [0.0] * len(plans)
    for part in PEAK_PARTS:
        heights = [p.parts.get(part, 0) / GIB for p in plans]
        if any(heights):
            ax.bar(labels, heights, bottom=bottom, label=part, color=COLORS[part])
            bottom = [b + h for b, h in zip(bottom, heights)]
    if capacity:
        ax.axhline(capacity / GIB, color="black", linestyle="--", linewidth=1)
        ax.text(len(plans) - 0.5, capacity / GIB, f" {capacity / GIB:.1f} GiB", va="bottom", ha="right")
    ax.set_ylabel("GiB at the peak")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title, fontsize=10)
    ax.figure.tight_layout()
    return ax


def explore(model="llama-2-7b", method="qlora", batch=1, seq=512, checkpointing=True, device="t4"):
    """Knobs for the planner (model, method, batch, sequence, checkpointing, GPU) and the stacked bar they give.
    Where widgets cannot be drawn (a terminal, a test run), it shows the starting configuration once."""
    import matplotlib.pyplot as plt

    def show(model, method, batch, seq, checkpointing, device):
        p = plan(model, method, r=8, batch=batch, seq=seq, checkpointing=checkpointing, device=device)
        plot_plans([p], [method], p.capacity, title=f"{model}, batch {batch} x {seq}")
        plt.show()
        print(p)

    if not in_notebook():
        return show(model, method, batch, seq, checkpointing, device)
    import ipywidgets as w
    from IPython.display import display

    controls = dict(
        model=w.Dropdown(options=list(presets()), value=model, description="model"),
        method=w.Dropdown(options=list(SETUPS), value=method, description="method"),
        batch=w.IntSlider(value=batch, min=1, max=32, description="batch"),
        seq=w.SelectionSlider(options=[128, 256, 512, 1024, 2048, 4096], value=seq, description="sequence"),
        checkpointing=w.Checkbox(value=checkpointing, description="gradient checkpointing"),
        device=w.Dropdown(options=list(DEVICES), value=device, description="GPU"))
    out = w.interactive_output(show, controls)
    display(w.VBox([w.HBox([controls["model"], controls["method"], controls["device"]]),
                    w.HBox([controls["batch"], controls["seq"], controls["checkpointing"]]), out]))
