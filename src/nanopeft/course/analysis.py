"""How fine-tuning moved a weight: the magnitude and direction changes of the DoRA paper (arXiv:2402.09353, sec. 2).

Convention: weights are PyTorch's (out, in); each ROW is one output neuron's weight vector. (The paper writes
weights as (in, out) and calls these "columns".) For a weight W0 before and W_t after training:

    m_0, m_t = ||row|| of W0 and of W_t                  (out,)
    dM = mean over output neurons of |m_t - m_0|          how much the lengths changed
    dD = mean over output neurons of 1 - cos(W_t row, W0 row)   how much the directions turned

The paper plots dD against dM at several checkpoints and layers: full fine-tuning and DoRA show a negative slope
(big direction changes with small magnitude changes, and the reverse), LoRA a positive one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import adapter_layers


def per_neuron_change(W0: torch.Tensor, W: torch.Tensor) -> tuple:
    """Per output neuron: |m_t - m_0| and 1 - cos(W_t row, W0 row), each of shape (out,)."""
    if W0.shape != W.shape or W0.dim() != 2:
        raise ValueError(f"Expected two (out, in) matrices of the same shape, got {tuple(W0.shape)} and {tuple(W.shape)}.")
    W0, W = W0.float(), W.float()
    dm = (W.norm(dim=1) - W0.norm(dim=1)).abs()  # (out,)
    dd = 1 - F.cosine_similarity(W, W0, dim=1)  # (out,)
    return dm, dd


def magnitude_direction_change(W0: torch.Tensor, W: torch.Tensor) -> tuple:
    """(dM, dD) between two (out, in) weights: mean |change of row norm| and mean (1 - cosine) of rows."""
    dm, dd = per_neuron_change(W0, W)
    return dm.mean().item(), dd.mean().item()


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a layer applies now: an adapter layer's W0 + update, or a plain Linear's weight; float32."""
    if hasattr(module, "effective_weight"):
        return module.effective_weight()
    return module.weight.float()


class WeightRecorder:
    """A training callback that snapshots the effective weights of chosen layers at chosen steps.

        recorder = WeightRecorder(model, layers=["model.layers.3.self_attn.q_proj"], steps=[10, 20, 40])
        train(..., callback=recorder)
        recorder.changes()   # {(layer, step): (dM, dD)} against the weights before training

    Snapshots are float32 copies on the CPU; step 0 (before training) is taken at construction.
    """

    def __init__(self, model: nn.Module, layers=None, steps=()):
        modules = dict(model.named_modules())
        if layers is None:
            layers = list(adapter_layers(model))
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"WeightRecorder: no module named {missing[0]!r} in {type(model).__name__}.")
        self.modules = {name: modules[name] for name in layers}
        self.steps = set(steps)
        self.snapshots = {0: self._take()}

    @torch.no_grad()
    def _take(self) -> dict:
        return {name: effective_weight(m).detach().to("cpu", copy=True) for name, m in self.modules.items()}

    def __call__(self, record: dict):
        if record["step"] in self.steps:
            self.snapshots[record["step"]] = self._take()

    def changes(self) -> dict:
        """{(layer, step): (dM, dD)} for every snapshot after step 0."""
        start = self.snapshots[0]
        return {(name, step): magnitude_direction_change(start[name], snap[name])
                for step, snap in sorted(self.snapshots.items()) if step for name in snap}


def slope(dM, dD) -> float:
    """Least-squares slope of dD against dM (the sign is what the paper compares)."""
    x, y = torch.tensor(dM, dtype=torch.float64), torch.tensor(dD, dtype=torch.float64)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())
