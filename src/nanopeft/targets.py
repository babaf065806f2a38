"""Which layers to adapt, which modules train fully beside them, and how many numbers train.

Which layers: peft's rules for `target_modules`, with clear errors where peft stays silent.

    find_targets(model, ["q_proj", "v_proj"])     names: a module whose path is the name or ends in "." + name
    find_targets(model, r".*\.(q|v)_proj")         a string: a regular expression matching the whole path
    find_targets(model, "all-linear")             every linear layer (nn.Linear, transformers' Conv1D, LinearNF4)
                                                  but the output head (and a sequence classifier's head)

plus peft's `layers_to_transform` (only the layers with these indices). Unlike peft, a name or pattern that matches
nothing is an error even when others match, and a target LoRA cannot wrap gets an error naming its type.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from torch import nn

from .lora import LoRALinear, is_4bit, is_conv1d


# peft's heads of sequence classifiers (peft.utils.constants.SEQ_CLS_HEAD_NAMES): newly initialised, so under its
# task_type "SEQ_CLS" peft trains them fully (modules_to_save) and leaves them out of "all-linear".
CLASSIFIER_HEADS = ("score", "classifier")


def path_matches(name: str, target: str) -> bool:
    """peft's rule for a target name: a module path matches if it is the name or ends in "." + name."""
    return name == target or name.endswith("." + target)


def saved_paths(model: nn.Module, names) -> list:
    """The modules `modules_to_save` names, by peft's rule for it: every module whose path ends with a name, even
    mid-word ("classifier" also names DistilBERT's "pre_classifier", which is newly initialised too). A module
    inside another one that is saved is left to its parent."""
    found = [n for n, _ in model.named_modules() if n and any(n.endswith(name) for name in names)]
    return [n for n in found if not any(n.startswith(outer + ".") for outer in found)]


def adaptable(module: nn.Module) -> bool:
    """What LoRA can wrap: nn.Linear, transformers' Conv1D (GPT-2) and 4-bit LinearNF4 layers (qlora.py)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_4bit(module)


def layer_index(path: str, layers_pattern: str | None):
    """The index of the layer a module sits in, by peft's rule: the first number after the list's name
    ("model.layers.3.mlp.up_proj" -> 3); None if there is none."""
    if layers_pattern is None:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = re.match(rf"(?:^|.*?\.){re.escape(layers_pattern)}\.(?P<idx>\d+)\.", path)
    return int(match["idx"]) if match else None


def head_paths(model: nn.Module) -> set:
    """The output head a language model's "all-linear" leaves out, and a sequence classifier's head."""
    modules = dict(model.named_modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    paths = {n for n, m in modules.items() if head is not None and m is head}
    if type(model).__name__.endswith("ForSequenceClassification"):
        paths |= {n for n in CLASSIFIER_HEADS if n in modules}
    return paths


def find_targets(model: nn.Module, targets, layers_to_transform=None, layers_pattern=None, skip=()) -> list:
    """The module paths `targets` names (see the module docstring), in `named_modules()` order (the order peft
    creates its layers in), checked: each name or pattern must match, and each match must be adaptable.
    `skip`: paths left out (modules trained fully); a target inside one of them is an error."""
    modules = dict(model.named_modules())
    if isinstance(targets, str) and targets.lower() == "all-linear":
        excluded = head_paths(model)
        found = [n for n, m in modules.items() if adaptable(m) and n not in excluded
                 and not any(path_matches(n, s) or n.startswith(s + ".") for s in skip)
                 and not _inside_attention(model, n)]
        if not found:
            kinds = sorted({type(m).__name__ for m in modules.values() if not list(m.children())})
            raise ValueError(f"'all-linear' found no nn.Linear or Conv1D layers in {type(model).__name__}; its "
                             f"leaf modules are {kinds}.")
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(f"targets={targets!r} is a string, so it is a regular expression (peft's rule), and "
                             f"it does not compile: {err}.") from err
        found = [n for n in modules if n and pattern.fullmatch(n)]
        if not found:
            raise ValueError(
                f"The regular expression {targets!r} matches no full module path of {type(model).__name__} (a "
                f"string target is a regex on the whole path, as in peft, e.g. r'.*\\.(q_proj|v_proj)'). To name "
                f"layers, pass a list: [{targets!r}].")
    else:
        targets = tuple(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"targets must name the layers to adapt, e.g. ['q_proj', 'v_proj'], a regex string or "
                             f"'all-linear'; got {targets!r}.")
        if any(t.lower() == "all-linear" for t in targets):
            raise ValueError("'all-linear' stands alone: pass targets='all-linear', not inside a list.")
        unmatched = [t for t in targets if not any(path_matches(n, t) for n in modules)]
        if unmatched:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if adaptable(m)})
            raise ValueError(f"Target name(s) {unmatched} match no module in {type(model).__name__}. Layers it has "
                             f"that can be adapted: {leaves}.")
        found = [n for n in modules if any(path_matches(n, t) for t in targets)]
    if layers_to_transform is not None:
        found = [n for n in found if layer_index(n, layers_pattern) in layers_to_transform]
        if not found:
            raise ValueError(f"No target lies in layers {list(layers_to_transform)} (layers_pattern="
                             f"{layers_pattern!r}): check the indices and the name of the list of layers.")
    for name in found:
        _check_adaptable(model, name, modules[name], skip)
    return found


def _inside_attention(model: nn.Module, path: str) -> bool:
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    return isinstance(parent, nn.MultiheadAttention)


def _check_adaptable(model, name, module, skip) -> None:
    """A clear error, naming the module's type and a fix that applies, for a target LoRA cannot wrap here."""
    if isinstance(module, LoRALinear):
        raise ValueError(f"{name} already has an adapter: call remove_adapters(model) before adding new ones.")
    if any(path_matches(name, s) or name.startswith(s + ".") for s in skip):
        raise ValueError(f"{name} is inside a module trained fully (modules_to_save): adapt it or train it fully, "
                         f"not both.")
    if _inside_attention(model, name):
        raise TypeError(f"{name} is the out_proj of an nn.MultiheadAttention, which computes with out_proj.weight "
                        f"directly and never calls out_proj's forward, so an adapter there would be ignored. "
                        f"nanopeft does not adapt nn.MultiheadAttention; adapt the feed-forward layers instead.")
    if adaptable(module):
        return
    kind = type(module).__name__
    if isinstance(module, nn.Embedding):
        hint = (f"it is an embedding table (peft has a separate LoRA embedding layer, which nanopeft does not "
                f"implement). Train it fully with modules_to_save=[{name.rsplit('.', 1)[-1]!r}], or leave it out.")
    elif isinstance(module, nn.modules.conv._ConvNd):
        hint = "it is a convolution; nanopeft adapts linear layers only (nn.Linear, transformers' Conv1D)."
    elif isinstance(module, nn.MultiheadAttention):
        hint = ("nn.MultiheadAttention computes with its in_proj_weight directly; nanopeft does not adapt it. "
                "Adapt the feed-forward Linear layers instead.")
    else:
        inner = [n for n, m in module.named_modules() if n and adaptable(m)]
        hint = (f"it contains linear layers: name those instead, e.g. {inner[:4]}." if inner else
                "nanopeft adapts nn.Linear, transformers' Conv1D (GPT-2) and LinearNF4 layers only.")
    raise TypeError(f"Target {name} is a {kind}, which LoRA cannot wrap here: {hint}")


# --------------------------------------------------------------------------------- modules trained fully, counts
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


def modules_to_save(model: nn.Module) -> dict:
    """{module path: ModuleToSave} for every module trained fully beside the adapters."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ModuleToSave)}


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
