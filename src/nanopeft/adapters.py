"""Model surgery shared by every method, and the table of methods: put adapter layers into a model, take them out.

    add_adapters(model, method="lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
        replaces each target layer in place by an adapter layer wrapping it, and freezes everything else;
    add_adapters(model, LoraConfig(...))  the same from a peft config, so that one config drives both libraries;
    merge_adapters / unmerge_adapters     fold the updates into the base weights and back;
    remove_adapters(model, merge=False)   gives back the plain model (with the updates folded in if merge=True).

Targets follow peft's rules: a list of names matches a module whose path is the name or ends in "." + name
("q_proj" matches "model.layers.0.self_attn.q_proj"); a single string other than "all-linear" is a regular
expression that must match the whole path. Unlike peft, a name or pattern that matches nothing is an error.

Every argument and every target is checked before the first change, so a call that raises leaves the model, its
weights and its requires_grad flags as they were.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from .dora import DoRALinear
from .lora import LoRALinear, check_hyperparameters
from .merged import MergedLoRALinear
from .pissa import PiSSALinear
from .targets import CLASSIFIER_HEADS, ModuleToSave, find_targets, modules_to_save, saved_paths

# ------------------------------------------------------------------------------------------------- the methods
# Every method nanopeft has, by name: its adapter layer class. The class says what the rest of the package reads (its
# name and title, how peft's LoraConfig selects it, the tensors it adds and their names in a peft file, its Options,
# its reference: see the top of LoRALinear). To add one: CONTRIBUTING.md, "Adding a method"; tests/test_methods.py.
METHODS = {cls.name: cls for cls in (LoRALinear, DoRALinear, PiSSALinear, MergedLoRALinear)}


def method_class(name: str) -> type:
    """The adapter layer class of method `name`, or a ValueError listing the methods there are."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[name]


def method_from_peft(config) -> str:
    """The method a peft LoraConfig (or its JSON as a dict) selects, by the fields in each class's `peft_config`; a
    field missing from the file has peft's default (LoRA's value)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    peft = {n: c for n, c in METHODS.items() if c.peft_config is not None}  # "merged" has no peft form
    found = [n for n, cls in peft.items() if all(get(k, LoRALinear.peft_config[k]) == v for k, v in cls.peft_config.items())]
    if len(found) != 1:
        said = ", ".join(f"{k}={get(k, v)!r}" for k, v in LoRALinear.peft_config.items())
        known = "; ".join(f"{n}: " + ", ".join(f"{k}={v!r}" for k, v in c.peft_config.items()) for n, c in peft.items())
        raise ValueError(f"No nanopeft method is selected by {said}. nanopeft's methods are selected by {known}.")
    return found[0]


@dataclass(frozen=True)
class AdapterConfig:
    """Everything `add_adapters` needs, checked. Field names are ours; `from_peft_config` maps peft's onto them."""

    method: str = "lora"  # a name in METHODS: "lora", "dora", "pissa"
    r: int = 8  # the rank of B A
    alpha: float = 16  # the update is scaled by alpha / r (rsLoRA: alpha / sqrt(r))
    targets: object = ("q_proj", "v_proj")  # names (a path or its last parts), a regex string, or "all-linear"
    options: object = None  # the method's own options (its class's Options: dropout, rslora, DoRA's norm...); None: defaults
    modules_to_save: object = "auto"  # modules trained fully and saved with the adapter; "auto": a classifier's head
    layers_to_transform: tuple | None = None  # only targets in these layer indices (peft's layers_to_transform)
    layers_pattern: str | None = None  # the name of the list of layers ("layers", "h", "block"); None: any

    def __post_init__(self):
        if self.options is None and self.method in METHODS:
            object.__setattr__(self, "options", METHODS[self.method].Options())


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
    cls = method_class(c.method)
    if type(c.options) is not cls.Options:
        raise TypeError(f"Method {c.method!r} takes {cls.Options.__name__}, got {type(c.options).__name__}.")
    c.options.check()
    if adapter_layers(model):
        raise ValueError("This model already has adapters: call remove_adapters(model) before adding new ones.")
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
    check_hyperparameters(c.r, c.alpha)
    targets = find_targets(model, c.targets, c.layers_to_transform, c.layers_pattern, skip=saved)
    modules = dict(model.named_modules())
    for name in targets:
        cls.check_base(modules[name], c.r)
    return targets, saved


def config_from(method="lora", **fields) -> AdapterConfig:
    """An AdapterConfig from keywords (the method's options among them), with a clear error for a keyword the method
    does not have: another method's option, or peft's name for one of ours."""
    cls = method_class(method)
    common = {f.name for f in dataclasses.fields(AdapterConfig)} - {"method", "options"}
    own = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(fields) - common - own)
    if unknown:
        owners = {f.name: n for n, c in METHODS.items() for f in dataclasses.fields(c.Options) if f.name not in own}
        ours = {"target_modules": "targets", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora",
                "use_dora": "method='dora'", "init_lora_weights": "method='pissa' for 'pissa'"}
        hints = [f"{k} (an option of method {owners[k]!r})" if k in owners else
                 f"{k} (peft's name; nanopeft calls it {ours[k]})" if k in ours else k for k in unknown]
        raise TypeError(f"add_adapters(method={method!r}) got unknown keyword(s): {', '.join(hints)}. Its keywords "
                        f"are {sorted(common | own)}; or pass a peft LoraConfig as the second argument.")
    options = cls.Options(**{k: v for k, v in fields.items() if k in own})
    return AdapterConfig(method=method, options=options, **{k: v for k, v in fields.items() if k in common})


# peft LoraConfig fields and what we do with them. Fields not listed here, nor in a method's `peft_config` or
# Options, must keep peft's default value.
PEFT_FIELDS = {"r": "r", "lora_alpha": "alpha", "target_modules": "targets", "modules_to_save": "modules_to_save",
               "layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern"}
PEFT_IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                "fan_in_fan_out", "auto_mapping"}  # read below, or bookkeeping that does not change the layers


def peft_options(cls) -> dict:
    """{peft's LoraConfig field: our option name} for a method's Options (the fields whose metadata names peft's)."""
    return {f.metadata["peft"]: f.name for f in dataclasses.fields(cls.Options) if "peft" in f.metadata}


def from_peft_config(config, model: nn.Module | None = None) -> AdapterConfig:
    """Map a peft `LoraConfig` onto an AdapterConfig, one field to one field; its method from `method_from_peft`. A
    field we do not implement (e.g. rank_pattern, bias) is refused by name if it differs from peft's default.

    fan_in_fan_out needs no setting here: each layer's layout is read from the layer (peft also corrects it per
    layer, with a warning). task_type "SEQ_CLS" trains the classifier head fully, as peft does."""
    defaults = type(config)()
    cls = METHODS[method_from_peft(config)]
    mapped = set(PEFT_FIELDS) | PEFT_IGNORED | set(LoRALinear.peft_config) | set(peft_options(cls))
    refused = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
               if f.name not in mapped and getattr(config, f.name) != getattr(defaults, f.name)]
    if getattr(config, "peft_type", "LORA") not in ("LORA", getattr(defaults, "peft_type", "LORA")):
        refused.append(f"peft_type={config.peft_type!r}")
    if getattr(config, "inference_mode", False):
        refused.append("inference_mode=True (nanopeft's adapters always train; freeze them yourself)")
    if refused:
        raise ValueError(f"This LoraConfig sets field(s) nanopeft does not implement: {', '.join(refused)}. "
                         f"nanopeft maps {sorted(set(PEFT_FIELDS) | set(peft_options(cls)))}, fan_in_fan_out and "
                         f"the fields that choose a method ({sorted(LoRALinear.peft_config)}).")
    targets = config.target_modules
    if targets is None:
        raise ValueError("The LoraConfig has no target_modules (peft would pick defaults per model type): name them.")
    if not isinstance(targets, str):
        targets = sorted(targets)  # peft keeps a set
    task = str(getattr(config, "task_type", None) or "")
    saved = list(config.modules_to_save or [])
    if task.endswith("SEQ_CLS") and model is not None:  # peft adds its head names; only those the model has count
        saved += [n for n in CLASSIFIER_HEADS if saved_paths(model, [n]) and n not in saved]
    layers, pattern = config.layers_to_transform, config.layers_pattern
    if not isinstance(pattern, (str, type(None))):
        if len(pattern) != 1:
            raise ValueError(f"nanopeft takes one layers_pattern, got {list(pattern)}.")
        pattern = pattern[0]
    options = cls.Options(**{ours: getattr(config, theirs) for theirs, ours in peft_options(cls).items()})
    return AdapterConfig(
        method=cls.name, r=config.r, alpha=config.lora_alpha, targets=targets, options=options,
        modules_to_save=saved, layers_pattern=pattern,
        layers_to_transform=None if layers is None else tuple([layers] if isinstance(layers, int) else layers))


# ----------------------------------------------------------------------------------------------- add and remove
def add_adapters(model: nn.Module, method="lora", **fields) -> nn.Module:
    """Wrap every target layer of `model` in an adapter layer and freeze all else; returns `model`.

    method: a name in METHODS, "lora", "dora" or "pissa" (on a model quantized with `nanopeft.qlora.quantize_model`,
            "lora" and "dora" are QLoRA and QDoRA: the adapters wrap the LinearNF4 layers); an AdapterConfig; or a
            peft `LoraConfig`, whose fields then set everything.
    fields: those of `AdapterConfig` -- r, alpha, targets, modules_to_save, layers_to_transform, layers_pattern --
            and the method's options (its Options: dropout, rslora; DoRA's detach_norm, norm and fused).
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
        raise TypeError(f"method must be a name in {sorted(METHODS)}, an AdapterConfig or a peft LoraConfig, "
                        f"got {method!r}.")
    names, saved = check_config(model, config)

    layer_class = METHODS[config.method]
    options = dataclasses.asdict(config.options)
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


def _layers_or_raise(model) -> dict:
    if not (layers := adapter_layers(model)):
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
        set_module(model, name, layer.base_layer if merge else layer.restore_base())
    for name, wrapper in modules_to_save(model).items():
        set_module(model, name, wrapper.trained if merge else wrapper.original_module)
    flags = getattr(model, "_nanopeft_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    if hasattr(model, "_nanopeft_requires_grad"):
        del model._nanopeft_requires_grad
    return model
