"""Model surgery shared by every method: put adapter layers into a model, take them out, count what trains.

    add_adapters(model, method="lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
        replaces each target layer in place by an adapter layer wrapping it, and freezes everything else;
    add_adapters(model, LoraConfig(...))  the same from a peft config, so that one config drives both libraries;
    merge_adapters / unmerge_adapters     fold the updates into the base weights and back;
    remove_adapters(model, merge=False)   gives back the plain model (with the updates folded in if merge=True);
    trainable_parameters(model)           counts, as peft's `print_trainable_parameters` does, plus a table.

Targets follow peft's rules: a list of names matches a module whose path is the name or ends in "." + name
("q_proj" matches "model.layers.0.self_attn.q_proj"); a single string other than "all-linear" is a regular
expression that must match the whole path. Unlike peft, a name or pattern that matches nothing is an error.

Every argument and every target is checked before the first change, so a call that raises leaves the model, its
weights and its requires_grad flags as they were.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from torch import nn

from .dora import DoRALinear
from .lora import LoRALinear, check_hyperparameters
from .targets import CLASSIFIER_HEADS, find_targets, saved_paths

@dataclass(frozen=True)
class AdapterConfig:
    """Everything `add_adapters` needs, checked. Field names are ours; `from_peft_config` maps peft's onto them."""

    method: str = "lora"  # "lora" or "dora"
    r: int = 8  # the rank of B A
    alpha: float = 16  # the update is scaled by alpha / r (rsLoRA: alpha / sqrt(r))
    targets: object = ("q_proj", "v_proj")  # names (a path or its last parts), a regex string, or "all-linear"
    dropout: float = 0.0  # on the LoRA branch's input only
    rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    modules_to_save: object = "auto"  # modules trained fully and saved with the adapter; "auto": a classifier's head
    layers_to_transform: tuple | None = None  # only targets in these layer indices (peft's layers_to_transform)
    layers_pattern: str | None = None  # the name of the list of layers ("layers", "h", "block"); None: any
    detach_norm: bool = True  # DoRA only: the norm is a constant for autograd (paper, section 4.3)
    norm: str = "exact"  # DoRA only: "exact" (peft's way) or "factored" (from small products)
    fused: bool = False  # DoRA only: the backward keeps only the output (dora.py; gradients equal within rounding)


def adapter_layers(model: nn.Module) -> dict:
    """{module path: adapter layer} for every adapter in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path` ("model.layers.0.self_attn.q_proj") in place of what is there."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


# --------------------------------------------------------------------------------------------------- the config
def check_config(model: nn.Module, c: AdapterConfig) -> tuple:
    """Check every field against the model; returns (target paths, paths of modules to save). Changes nothing."""
    layer_class = {"lora": LoRALinear, "dora": DoRALinear}.get(c.method)
    if layer_class is None:
        raise ValueError(f"Unknown method {c.method!r}; choose 'lora' or 'dora'.")
    if adapter_layers(model):
        raise ValueError("This model already has adapters: call remove_adapters(model) before adding new ones.")
    if not isinstance(c.rslora, bool):
        raise ValueError(f"rslora must be True or False, got {c.rslora!r}.")
    if c.method == "lora" and (c.detach_norm is not True or c.norm != "exact" or c.fused is not False):
        raise ValueError("detach_norm, norm and fused are DoRA's options; they mean nothing for method='lora'.")
    if c.fused and not c.detach_norm:
        raise ValueError("fused=True treats DoRA's norm as a constant for autograd; it needs detach_norm=True.")
    if c.norm not in ("exact", "factored"):
        raise ValueError(f"norm must be 'exact' or 'factored', got {c.norm!r}.")
    if c.layers_to_transform is not None and (
            isinstance(c.layers_to_transform, (str, bool)) or
            not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in c.layers_to_transform)):
        raise ValueError(f"layers_to_transform must be a list of layer indices, got {c.layers_to_transform!r}.")
    if c.layers_to_transform is not None and isinstance(c.targets, str) and c.targets.lower() != "all-linear":
        raise ValueError("layers_to_transform works with a list of target names; with a regular expression, put the "
                         "layer indices in the pattern (peft silently ignores layers_to_transform there).")
    if c.modules_to_save == "auto":  # a sequence classifier's new head trains fully, as under peft's "SEQ_CLS"
        sequence_classifier = type(model).__name__.endswith("ForSequenceClassification")
        saved = saved_paths(model, CLASSIFIER_HEADS if sequence_classifier else ())
    else:
        names = [c.modules_to_save] if isinstance(c.modules_to_save, str) else list(c.modules_to_save or ())
        for name in names:
            if not saved_paths(model, [name]):
                raise ValueError(f"modules_to_save names {name!r}, which matches no module of {type(model).__name__}.")
        saved = saved_paths(model, names)
    check_hyperparameters(c.r, c.alpha, c.dropout)
    return find_targets(model, c.targets, c.layers_to_transform, c.layers_pattern, skip=saved), saved


def config_from(method="lora", **fields) -> AdapterConfig:
    """An AdapterConfig from keywords, with a clear error for a keyword we do not have (and peft's name for it)."""
    known = {f.name for f in dataclasses.fields(AdapterConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        ours = {"target_modules": "targets", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora",
                "use_dora": "method='dora'"}
        hints = [f"{k} (peft's name; nanopeft calls it {ours[k]})" if k in ours else k for k in unknown]
        raise TypeError(f"add_adapters got unknown keyword(s): {', '.join(hints)}. Its keywords are {sorted(known)}; "
                        f"or pass a peft LoraConfig as the second argument.")
    return AdapterConfig(method=method, **fields)


# peft LoraConfig fields and what we do with them. Fields not listed here must keep peft's default value.
PEFT_FIELDS = {"r": "r", "lora_alpha": "alpha", "target_modules": "targets", "lora_dropout": "dropout",
               "use_rslora": "rslora", "modules_to_save": "modules_to_save",
               "layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern"}
PEFT_IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "use_dora",
                "fan_in_fan_out", "auto_mapping"}  # read below, or bookkeeping that does not change the layers


def from_peft_config(config, model: nn.Module | None = None) -> AdapterConfig:
    """Map a peft `LoraConfig` onto an AdapterConfig, one field to one field. A field we do not implement (e.g.
    rank_pattern, bias, init_lora_weights other than True) is refused by name if it differs from peft's default.

    fan_in_fan_out needs no setting here: each layer's layout is read from the layer (peft also corrects it per
    layer, with a warning). task_type "SEQ_CLS" trains the classifier head fully, as peft does."""
    defaults = type(config)()
    refused = []
    for field in dataclasses.fields(config):
        name = field.name
        if name in PEFT_FIELDS or name in PEFT_IGNORED:
            continue
        if getattr(config, name) != getattr(defaults, name):
            refused.append(f"{name}={getattr(config, name)!r}")
    if getattr(config, "peft_type", "LORA") not in ("LORA", getattr(defaults, "peft_type", "LORA")):
        refused.append(f"peft_type={config.peft_type!r}")
    if getattr(config, "inference_mode", False):
        refused.append("inference_mode=True (nanopeft's adapters always train; freeze them yourself)")
    if refused:
        raise ValueError(f"This LoraConfig sets field(s) nanopeft does not implement: {', '.join(refused)}. "
                         f"nanopeft maps {sorted(PEFT_FIELDS)}, use_dora and fan_in_fan_out.")
    targets = config.target_modules
    if targets is None:
        raise ValueError("The LoraConfig has no target_modules (peft would pick defaults per model type): name them.")
    if not isinstance(targets, str):
        targets = sorted(targets)  # peft keeps a set
    task = str(getattr(config, "task_type", None) or "")
    saved = list(config.modules_to_save or [])
    if task.endswith("SEQ_CLS") and model is not None:  # peft adds its head names; only those the model has count
        saved += [n for n in CLASSIFIER_HEADS if saved_paths(model, [n]) and n not in saved]
    layers = config.layers_to_transform
    return AdapterConfig(
        method="dora" if config.use_dora else "lora", r=config.r, alpha=config.lora_alpha, targets=targets,
        dropout=config.lora_dropout, rslora=config.use_rslora, modules_to_save=saved,
        layers_to_transform=None if layers is None else tuple([layers] if isinstance(layers, int) else layers),
        layers_pattern=config.layers_pattern if isinstance(config.layers_pattern, (str, type(None)))
        else _one_pattern(config.layers_pattern))


def _one_pattern(patterns):
    if len(patterns) != 1:
        raise ValueError(f"nanopeft takes one layers_pattern, got {list(patterns)}.")
    return patterns[0]


# ----------------------------------------------------------------------------------------------- add and remove
class ModuleToSave(nn.Module):
    """A module trained fully beside the adapters (peft's `modules_to_save`): a trainable copy does the work, and
    the original stays untouched so that `remove_adapters(model)` can give it back. Attributes a model reads
    (`weight`, `out_features`, ...) come from the trained copy."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.trained = copy.deepcopy(module).requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.trained(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("trained"), name)


def add_adapters(model: nn.Module, method="lora", **fields) -> nn.Module:
    """Wrap every target layer of `model` in an adapter layer and freeze all else; returns `model`.

    method: "lora" or "dora" (on a model quantized with `nanopeft.qlora.quantize_model` this is QLoRA or QDoRA:
            the adapters wrap the LinearNF4 layers); or a peft `LoraConfig`, whose fields then set everything.
    fields: those of `AdapterConfig` -- r, alpha, targets, dropout, rslora, modules_to_save, layers_to_transform,
            layers_pattern, and DoRA's detach_norm, norm and fused.
    """
    if isinstance(method, str):
        config = config_from(method, **fields)
    elif dataclasses.is_dataclass(method) and hasattr(method, "target_modules"):
        if fields:
            raise TypeError(f"Pass either a LoraConfig or keywords, not both (got {sorted(fields)}).")
        config = from_peft_config(method, model)
    elif isinstance(method, AdapterConfig):
        config = dataclasses.replace(method, **fields)
    else:
        raise TypeError(f"method must be 'lora', 'dora', an AdapterConfig or a peft LoraConfig, got {method!r}.")
    names, saved = check_config(model, config)

    layer_class = {"lora": LoRALinear, "dora": DoRALinear}[config.method]
    options = {"dropout": config.dropout, "rslora": config.rslora}
    if config.method == "dora":
        options.update(detach_norm=config.detach_norm, norm=config.norm, fused=config.fused)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    placed = []
    try:  # from here on the model changes; if anything fails, put it back as it was
        for p in model.parameters():
            p.requires_grad_(False)
        for name in saved:
            set_module(model, name, ModuleToSave(modules[name]))
            placed.append(name)
        for name in names:
            layer = layer_class(modules[name], config.r, config.alpha, **options)
            if isinstance(modules.get(name.rpartition(".")[0]), nn.TransformerEncoderLayer):
                # In eval mode without gradients PyTorch runs TransformerEncoderLayer as one fused kernel that reads
                # linear1.weight directly and never calls this layer's forward (peft's adapters are skipped there
                # silently). Any forward hook inside the layer turns that path off, so the adapter is applied.
                layer.register_forward_pre_hook(_keeps_the_fused_path_off)
            set_module(model, name, layer)
            placed.append(name)
    except BaseException:
        for name in placed:
            set_module(model, name, modules[name])
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        raise
    model._nanopeft_requires_grad = flags
    return model


def _keeps_the_fused_path_off(module, args):
    return None  # does nothing; its presence is what matters (see add_adapters)


def modules_to_save(model: nn.Module) -> dict:
    """{module path: ModuleToSave} for every module trained fully beside the adapters."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ModuleToSave)}


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
        layer._check_can_merge()  # every layer before the first merge: a 4-bit base refuses
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
    """Give back the plain model: each adapter layer is replaced by its base layer.

    merge=False: the model as it was before `add_adapters` (unmerging first if needed), the original of every
                 module trained fully included (peft's `unload` keeps their trained copies instead).
    merge=True:  the updates folded in, and the trained copies of the modules trained fully (peft's
                 `merge_and_unload`). The requires_grad flags are restored either way.
    """
    layers = _layers_or_raise(model)
    if merge:
        for layer in layers.values():
            if not layer.merged:
                layer._check_can_merge()
    for name, layer in layers.items():
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        set_module(model, name, layer.base_layer)
    for name, wrapper in modules_to_save(model).items():
        set_module(model, name, wrapper.trained if merge else wrapper.original_module)
    flags = getattr(model, "_nanopeft_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
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
