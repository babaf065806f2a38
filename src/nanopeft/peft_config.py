"""What an adapter file's `adapter_config.json` asks of nanopeft: which method computes its model, and which of
peft's LoraConfig fields it sets that nanopeft does not implement (each refused by name).

Once trained, an adapter is its weights and the base they were trained on. So a file is loaded by what changes the
forward pass (`use_dora`), not by how its weights were started (`init_lora_weights`), except where that start
rewrote the base itself.
"""
from __future__ import annotations

from .adapters import method_from_peft

# keys of a peft file that belong to a feature nanopeft does not implement, and the feature's name
KEYS_OF_FEATURES = {"lora_embedding_A": "LoRA on an embedding table (nanopeft adapts linear layers; train the table "
                                        "fully with modules_to_save)", "lora_embedding_B": "LoRA on an embedding table",
                    "lora_B.bias": "a trainable bias on lora_B (peft's lora_bias=True)"}

# The starts of peft 0.21 (init_lora_weights). One that left the base as it was is history: the file loads on the
# untouched base as LoRA (or DoRA). One that rewrote the base needs that rewritten base, or a file converted for the
# original one (peft's save_pretrained(path_initial_model_for_weight_conversion=...), which nanopeft's PiSSA writes
# itself). Exact PiSSA is the one rewrite redone here bit for bit on loading, as peft redoes it.
BASE_KEPT = (True, False, "gaussian", "eva", "orthogonal", "mica")  # mica trains A only: loaded with B frozen, as in peft
BASE_REWRITTEN = {  # value, or the start of it: what the start wrote into the base
    "pissa_niter_": "W0 minus its top-r singular part from a randomized SVD (torch.svd_lowrank), which no loader "
                    "can redo exactly",
    "olora": "W0 minus s Q_r R_r, from its QR decomposition",
    "corda": "W0 minus a principal part computed with your calibration data",
    "lora_ga": "W0 minus s B0 A0, computed from the gradients of your calibration batches",
    "loftq": "an NF4 residual chosen together with A and B",
}
# LoraConfig fields a file may carry that change nothing once the weights are trained: bookkeeping, which modules were
# targeted (the file's keys say that), and the settings of the start (read through init_lora_weights)
IGNORED_ON_LOAD = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                   "inference_mode", "fan_in_fan_out", "runtime_config", "target_modules", "exclude_modules",
                   "layers_to_transform", "layers_pattern", "loftq_config", "eva_config", "corda_config",
                   "lora_ga_config", "megatron_core", "qalora_group_size", "r", "lora_alpha", "init_lora_weights",
                   "modules_to_save", "use_dora", "use_rslora", "lora_dropout", "bias", "rank_pattern", "alpha_pattern"}


def method_of_file(config: dict, rewritten_base: bool = False) -> str:
    """The method that computes what an adapter file's model computes: chosen by what changes the forward pass
    (use_dora), not by how the weights were started (init_lora_weights), except for exact PiSSA, whose rewrite of the
    base is redone on loading. rewritten_base=True: the model is the base a rewriting start wrote (see BASE_REWRITTEN)."""
    init = config.get("init_lora_weights", True)
    plain = {**config, "init_lora_weights": True}  # LoRA, or DoRA with use_dora
    if init == "pissa":
        return method_from_peft(config)
    if isinstance(init, bool) or init in BASE_KEPT:
        return method_from_peft(plain)
    what = next((w for key, w in BASE_REWRITTEN.items() if isinstance(init, str) and init.startswith(key)), None)
    if what is None:
        raise ValueError(f"init_lora_weights={init!r} is not a start peft 0.21 knows; nanopeft reads "
                         f"{list(BASE_KEPT) + ['pissa'] + list(BASE_REWRITTEN)}.")
    if not rewritten_base:
        raise ValueError(f"This adapter was started with init_lora_weights={init!r}, which rewrote the base weights "
                         f"before training ({what}): its A and B reproduce the trained model only on that rewritten "
                         f"base. Load it onto the base that start wrote, with load_adapter(model, folder, "
                         f"rewritten_base=True); or convert it for the original base with peft "
                         f"(save_pretrained(..., path_initial_model_for_weight_conversion=...), an adapter of rank 2r"
                         f"{'; peft cannot convert LoftQ' if init == 'loftq' else ''}).")
    return method_from_peft(plain)


def refuse_unknown_fields(config: dict) -> None:
    """A ValueError naming every LoraConfig field of the file that changes the model and that nanopeft does not
    implement (a trainable bias, per-layer ranks, ...); fields at peft's default pass."""
    if config.get("bias", "none") != "none":
        raise ValueError(f"This adapter sets bias={config['bias']!r}: peft also trained the base layers' biases "
                         f"('all') or the adapted layers' ('lora_only'), which nanopeft does not implement (bias='none').")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("Adapters with per-layer rank_pattern/alpha_pattern are not supported by nanopeft.")
    other = {k: v for k, v in config.items() if k not in IGNORED_ON_LOAD and v not in (None, False, {}, [], "")}
    if other:
        said = ", ".join(f"{k}={v!r}" for k, v in sorted(other.items()))
        raise ValueError(f"This adapter sets {said}, which nanopeft does not implement; it reads "
                         f"r, lora_alpha, use_dora, use_rslora, lora_dropout, init_lora_weights and modules_to_save.")
