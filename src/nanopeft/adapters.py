"""Model surgery shared by every method: put adapter layers into a model, take them out, count what trains.

    add_adapters(model, method="lora", r=8, alpha=16, targets=("q_proj", "v_proj"))
        replaces each target `nn.Linear` in place by an adapter layer wrapping it, and freezes everything else;
    merge_adapters / unmerge_adapters     fold the updates into the base weights and back;
    remove_adapters(model, merge=False)   gives back the plain model (with the updates folded in if merge=True);
    trainable_parameters(model)           counts, as peft's `print_trainable_parameters` does, plus a table.

Every check runs before the first change, so a call that raises leaves the model as it was.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .lora import LoRALinear, check_hyperparameters
from .nf4 import LinearNF4

METHODS = {"lora": LoRALinear}  # dora.py adds "dora"
LINEAR_TYPES = (nn.Linear, LinearNF4)  # what adapters wrap: full-precision Linear, or a 4-bit one (QLoRA)


def adapter_layers(model: nn.Module) -> dict:
    """{module path: adapter layer} for every adapter in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def path_matches(name: str, target: str) -> bool:
    """peft's rule: a module path matches a name if it is the name or ends in "." + name."""
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets) -> list:
    """The module paths that `targets` names, checked: every name must match, and every match must be a Linear.

    A name matches a module whose path is the name or ends in "." + name (peft's rule), so "q_proj" matches
    "model.layers.0.self_attn.q_proj". "all-linear" means every nn.Linear or LinearNF4 except the output head.
    Unlike peft, a name that matches nothing is an error even when other names match: a typo must not silently
    train less.
    """
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets is empty: name the layers to adapt, e.g. ('q_proj', 'v_proj') or 'all-linear'.")
    modules = dict(model.named_modules())
    if "all-linear" in targets:
        if len(targets) > 1:
            raise ValueError("'all-linear' stands alone; do not combine it with other target names.")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found = [n for n, m in modules.items() if isinstance(m, LINEAR_TYPES) and m is not head]
        if not found:
            raise ValueError(f"'all-linear' found no nn.Linear layers in {type(model).__name__}.")
        return found

    unmatched = [t for t in targets if not any(path_matches(n, t) for n in modules)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, LINEAR_TYPES)})
        raise ValueError(
            f"Target name(s) {unmatched} match no module in {type(model).__name__}. Linear layers it has: {leaves}."
        )
    # in named_modules() order, the order peft creates (and draws random numbers for) its layers
    found = [n for n in modules if any(path_matches(n, t) for t in targets)]
    for name in found:
        if isinstance(modules[name], LoRALinear):
            raise ValueError(f"{name} already has an adapter: call remove_adapters(model) before adding new ones.")
        if not isinstance(modules[name], LINEAR_TYPES):
            raise TypeError(
                f"Target {name} is a {type(modules[name]).__name__}, not an nn.Linear: LoRA here adapts Linear "
                f"layers only. Name its Linear sub-layers instead."
            )
    return found


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def add_adapters(model: nn.Module, method: str = "lora", r: int = 8, alpha: float = 16, targets=("q_proj", "v_proj"),
                 dropout: float = 0.0, rslora: bool = False, **method_kwargs) -> nn.Module:
    """Wrap every target Linear of `model` in an adapter layer of `method`, freeze all else; returns `model`.

    method: "lora" (or "dora" once `nanopeft.dora` is imported; `import nanopeft` does that). On a model quantized
            with `nanopeft.nf4.quantize_model` this is QLoRA (QDoRA): the adapters wrap the LinearNF4 layers.
    r, alpha, dropout, rslora: see `LoRALinear`. Extra keywords go to the adapter class (e.g. init="kaiming").
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(METHODS)}.")
    if adapter_layers(model):
        raise ValueError("This model already has adapters: call remove_adapters(model) before adding new ones.")
    names = find_targets(model, targets)
    modules = dict(model.named_modules())
    for name in names:  # check every layer before changing any
        check_hyperparameters(r, alpha, dropout, modules[name].in_features, modules[name].out_features)

    model._nanopeft_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_module(model, name, METHODS[method](modules[name], r, alpha, dropout=dropout, rslora=rslora,
                                                 **method_kwargs))
    return model


def train_only(model: nn.Module, targets) -> nn.Module:
    """Full fine-tuning of the target Linear weights only (the baseline adapters are compared with): every
    parameter is frozen except the weights of the layers `targets` names (same rules as `add_adapters`)."""
    names = find_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].weight.requires_grad_(True)
    return model


def _layers_or_raise(model) -> dict:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("This model has no adapters: call add_adapters(model, ...) first.")
    return layers


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter's update into its base weight (inference then costs one matmul per layer)."""
    layers = _layers_or_raise(model)
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"Adapters are already merged ({merged[0]} and {len(merged) - 1} more): unmerge first.")
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo `merge_adapters`."""
    layers = _layers_or_raise(model)
    if not all(layer.merged for layer in layers.values()):
        raise RuntimeError("Adapters are not merged: there is nothing to unmerge.")
    for layer in layers.values():
        layer.unmerge()
    return model


def remove_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """Give back the plain model: each adapter layer is replaced by its base Linear.

    merge=False: the base weights as they were before adapters were added (unmerging first if needed).
    merge=True: the updates folded in (peft's `merge_and_unload`). The requires_grad flags are restored.
    """
    layers = _layers_or_raise(model)
    for name, layer in layers.items():
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        _set_module(model, name, layer.base_layer)
    for n, p in model.named_parameters():
        p.requires_grad_(getattr(model, "_nanopeft_requires_grad", {}).get(n, True))
    if hasattr(model, "_nanopeft_requires_grad"):
        del model._nanopeft_requires_grad
    return model


@dataclass
class ParameterCount:
    trainable: int
    total: int
    table: list  # (module path, parameter name, shape, count) for each trainable tensor

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts (shared tensors counted once) and a per-tensor table."""
    trainable = total = 0
    table = []
    for name, p in model.named_parameters():  # named_parameters() already skips tied duplicates
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            module, _, pname = name.rpartition(".")
            table.append((module, pname, tuple(p.shape), p.numel()))
    return ParameterCount(trainable, total, table)
