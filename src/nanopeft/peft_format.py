"""Adapters in peft's file format, so that peft, transformers and nanopeft load each other's adapters.

A peft adapter is a folder with two files:

    adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight       (r, in)
                                base_model.model.<module path>.lora_B.weight       (out, r)
                                base_model.model.<module path>.lora_magnitude_vector  (out,)   DoRA only
                                base_model.model.<module path>.weight  (and .bias)  modules trained fully

Our layers hold the same tensors under the names `lora_A`, `lora_B` (and `magnitude`), so saving and loading
are renames. Only safetensors is read: a pickled `adapter_model.bin` can run code when loaded, so we refuse it.

`task_type` tells peft which wrapper to load the adapter into (`PeftModelForCausalLM`, `...ForSequenceClassification`,
...); it is read off the model's class, and left out (None) for a model that is not a transformers model, which
peft then loads into a plain `PeftModel`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapters import METHODS, add_adapters, adapter_layers, peft_options
from .lora import features, is_conv1d
from .peft_config import KEYS_OF_FEATURES, method_of_file, refuse_unknown_fields
from .targets import ModuleToSave, modules_to_save, saved_paths

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft wraps the model twice: PeftModel.base_model (LoraModel) .model

# peft's task types, by the end of a transformers model's class name (peft.utils.peft_types.TaskType)
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
              ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
              ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def task_type(model: nn.Module):
    """peft's task_type for this model: by its class name; "FEATURE_EXTRACTION" for another transformers model
    (BertModel), None for a plain nn.Module (peft then loads into a plain PeftModel)."""
    name = type(model).__name__
    for ending, task in TASK_TYPES:
        if name.endswith(ending):
            return task
    return "FEATURE_EXTRACTION" if hasattr(model, "config") and hasattr(model, "get_input_embeddings") else None


def _target_modules(model, paths):
    """peft's `target_modules` for exactly these module paths: their leaf names if those match exactly these
    modules, else an anchored regex of the full paths (peft full-matches a string against module paths)."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    by_leaf = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    if by_leaf == set(paths):
        return leaves
    return "^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def save_adapter(model: nn.Module, folder, task_type_: str | None = "auto") -> Path:
    """Write the model's adapters (and the modules it trains fully) as a peft adapter folder; returns the folder.

    task_type_: peft's task type in adapter_config.json; "auto" reads it off the model (see `task_type`).
    The files are written to temporary names and then renamed, so an interrupted save never leaves a
    half-written adapter behind.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("This model has no adapters to save: call add_adapters(model, ...) first.")
    # what each layer writes: itself, or (PiSSA) the adapter it converts to for the original base
    written = {path: layer.saved_as() for path, layer in layers.items()}
    cls, r, alpha, _ = next(iter(written.values()))
    first = next(iter(layers.values()))
    if any((c, rr, a, l.options) != (cls, r, alpha, first.options) for (c, rr, a, _), l in zip(written.values(),
                                                                                           layers.values())):
        raise ValueError("save_adapter writes one peft config, so every adapter layer must share method, r, alpha "
                         "and options.")
    saved = modules_to_save(model)
    config = {
        "peft_type": "LORA",
        "task_type": task_type(model) if task_type_ == "auto" else task_type_,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _target_modules(model, list(layers)),
        **cls.peft_config,  # the fields that select the method (use_dora, init_lora_weights)
        **{theirs: getattr(first.options, ours) for theirs, ours in peft_options(cls).items()},  # lora_dropout, ...
        "bias": "none",
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for layer in layers.values()),
        "inference_mode": True,
        "modules_to_save": sorted({p.rsplit(".", 1)[-1] for p in saved}) or None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {}
    for path, (_, _, _, weights) in written.items():
        for ours, t in weights.items():
            tensors[f"{PREFIX}{path}.{cls.PEFT_NAMES[ours]}"] = t.detach().to("cpu").contiguous()
    for path, wrapper in saved.items():
        for name, t in wrapper.trained.state_dict().items():
            tensors[f"{PREFIX}{path}.{name}"] = t.detach().to("cpu").contiguous()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in ((WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
                        (CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, folder / name)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return folder


def read_adapter(folder):
    """Read and check a peft adapter folder; returns (config dict, {module path: {our name: tensor}}, {key: tensor}
    of modules trained fully, keyed by their path in the model and their name in it, e.g. "classifier.weight")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Adapter folder {folder} does not exist.")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: it is not a peft adapter folder.")
    if not (folder / WEIGHTS_NAME).is_file():
        extra = (" It has adapter_model.bin, a pickle file, which nanopeft does not load because unpickling can "
                 "run code; re-save it with peft's save_pretrained(safe_serialization=True).") \
            if (folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}.{extra}")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON ({err}); the file is corrupt.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{folder / CONFIG_NAME} must hold a JSON object.")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder} holds a {config.get('peft_type')!r} adapter; nanopeft loads peft_type 'LORA' "
                         f"({', '.join(c.title for c in METHODS.values())}) only.")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"{folder / CONFIG_NAME} has no {key!r}.")
    refuse_unknown_fields(config)
    try:
        tensors = load_file(folder / WEIGHTS_NAME)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{folder / WEIGHTS_NAME} cannot be read ({err}); the file is corrupt.") from err

    method = method_of_file(config, rewritten_base=True)  # the weights' names (load_adapter asks about the base)
    names = {theirs: ours for ours, theirs in METHODS[method].PEFT_NAMES.items()}
    foreign = {theirs: n for n, c in METHODS.items() for theirs in c.PEFT_NAMES.values() if theirs not in names}
    weights, others = {}, {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"Key {key!r} in {WEIGHTS_NAME} does not start with {PREFIX!r}: peft would load it as "
                             f"nothing (B stays zero). Rename the keys to {PREFIX}<module path>.lora_A.weight.")
        rest = key[len(PREFIX):]
        suffix = next((s for s in names if rest.endswith("." + s)), None)
        if suffix is not None:
            weights.setdefault(rest[: -len(suffix) - 1], {})[names[suffix]] = tensor
        elif any(rest.endswith("." + theirs) for theirs in foreign):
            owner = next(n for theirs, n in foreign.items() if rest.endswith("." + theirs))
            raise ValueError(f"{WEIGHTS_NAME} holds {key}, a weight of method {owner!r}, but {CONFIG_NAME} selects "
                             f"{method!r}; the files do not belong together.")
        elif config.get("modules_to_save") and ".lora_" not in rest:
            others[rest] = tensor  # a module trained fully; load_adapter finds its place in the model
        elif any(rest.endswith(f".{k}") for k in KEYS_OF_FEATURES):
            feature = next(f for k, f in KEYS_OF_FEATURES.items() if rest.endswith(f".{k}"))
            raise ValueError(f"{WEIGHTS_NAME} holds {key}: {feature}, which nanopeft does not implement.")
        else:
            raise ValueError(f"Key {key!r} is not a {method} weight nanopeft knows ({sorted(names)}).")
    for path, found in weights.items():
        missing = set(names.values()) - set(found)
        if missing:
            raise ValueError(f"{WEIGHTS_NAME} lacks {sorted(missing)} for {path}.")
    if not weights:
        raise ValueError(f"{WEIGHTS_NAME} holds no adapter weights.")
    return config, weights, others


def load_adapter(model: nn.Module, folder, rewritten_base: bool = False) -> nn.Module:
    """Load a peft adapter folder (written by nanopeft or by peft's `save_pretrained`) into `model`.

    A plain model gets adapters added as the config says, on exactly the modules the file names (and the modules
    it trained fully, from `modules_to_save`); a model that already has adapters must have the same ones (method,
    r, alpha, modules). Every check runs before the model is changed. The adapters are trainable afterwards
    (peft's `is_trainable=False` pitfall does not apply), but for MiCA's B, which stays frozen as in peft.

    How the file's weights were started does not matter (peft's init_lora_weights: True, False, "gaussian", "eva",
    "orthogonal", "mica"), except where that start rewrote the base (OLoRA, CorDA, LoRA-GA, LoftQ, PiSSA by a
    randomized SVD): such a file is refused unless `rewritten_base=True` says that `model` is the base it wrote.
    Exact PiSSA's rewrite is redone here, as peft does.
    """
    config, weights, others = read_adapter(folder)
    method = method_of_file(config, rewritten_base)
    cls = METHODS[method]
    r, alpha = config["r"], config["lora_alpha"]
    defaults = cls.Options()
    options = cls.Options(**{ours: config.get(theirs, getattr(defaults, ours)) or getattr(defaults, ours)
                             for theirs, ours in peft_options(cls).items()})
    modules = dict(model.named_modules())
    existing = adapter_layers(model)

    # where the fully trained modules go: every module whose path matches a name in modules_to_save
    saved_names = config.get("modules_to_save") or []
    homes = saved_paths(model, saved_names)
    placed = {k: next((p for p in homes if k.startswith(p + ".")), None) for k in others}
    homeless = sorted(k for k, p in placed.items() if p is None)
    if homeless:
        raise ValueError(f"{WEIGHTS_NAME} holds {homeless[:3]}, which belong to no module named in modules_to_save "
                         f"{saved_names} of this {type(model).__name__}.")
    for key, path in placed.items():
        target = modules[path].trained if isinstance(modules[path], ModuleToSave) else modules[path]
        state = target.state_dict()
        name = key[len(path) + 1:]
        if name not in state or state[name].shape != others[key].shape:
            raise ValueError(f"{key} in {WEIGHTS_NAME} does not fit {path} of this model "
                             f"({tuple(others[key].shape)} vs {tuple(state[name].shape) if name in state else None}).")

    if existing:
        if set(existing) != set(weights):
            raise ValueError(
                f"The adapter's modules do not fit this model's adapters: only in the file "
                f"{sorted(set(weights) - set(existing))[:3]}, only in the model {sorted(set(existing) - set(weights))[:3]}."
            )
        for path, layer in existing.items():
            if layer.name != method:
                raise ValueError(f"{folder} is a {method} adapter but the model's {path} is a {layer.name} "
                                 f"layer: load it into a plain model, or remove_adapters(model) first.")
            if (layer.r, layer.alpha, layer.rslora) != (r, alpha, options.rslora):
                raise ValueError(f"{folder} has r={r}, lora_alpha={alpha}, use_rslora={options.rslora} but the "
                                 f"model's {path} has r={layer.r}, alpha={layer.alpha}, rslora={layer.rslora}.")
            if layer.merged:
                raise RuntimeError("The model's adapters are merged; unmerge_adapters(model) before loading.")
        unwrapped = sorted({p for p in placed.values() if not isinstance(modules[p], ModuleToSave)})
        if unwrapped:
            raise ValueError(f"{folder} trains {unwrapped} fully, but this model's adapters were added without them "
                             f"in modules_to_save: load it into a plain model.")
        shapes = {p: (l.in_features, l.out_features) for p, l in existing.items()}
    else:
        shapes = {}
        for path in sorted(weights, key=lambda p: p not in modules):  # a layer we cannot wrap is named before a
            if path not in modules:                                    # path inside it (peft's MHA: its out_proj)
                raise ValueError(f"The adapter targets {path}, which is not a module of {type(model).__name__}: "
                                 f"it was trained for a different model.")
            shapes[path] = features(modules[path])  # a TypeError naming the type for a layer LoRA cannot wrap

    for path, tensors in weights.items():
        expected = cls.parameter_shapes(r, *shapes[path])
        for name, t in tensors.items():
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"{path}.{cls.PEFT_NAMES[name]} has shape {tuple(t.shape)}, but "
                                 f"this model with r={r} needs {expected[name]}.")

    if not existing:
        add_adapters(model, method, r=r, alpha=alpha, targets=list(weights), **dataclasses.asdict(options),
                     modules_to_save=sorted({p for p in placed.values()}))
    layers, wrappers = adapter_layers(model), modules_to_save(model)
    with torch.no_grad():
        for path, tensors in weights.items():
            for name, t in tensors.items():
                getattr(layers[path], name).copy_(t)
        for key, path in placed.items():
            wrappers[path].trained.state_dict()[key[len(path) + 1:]].copy_(others[key])
    if config.get("init_lora_weights") == "mica":  # MiCA trains A only (peft's MiCALinearVariant freezes B)
        for layer in layers.values():
            layer.lora_B.requires_grad_(False)
    return model
