"""Model configs for the memory planner: presets of published models (stored offline, each with its source), a
config.json from disk, a dict or a transformers config object, checked to be a causal language model's."""
from __future__ import annotations

import json
from pathlib import Path

PRESETS_FILE = Path(__file__).with_name("model_presets.json")


def presets() -> dict:
    """{name: {"source": where the numbers come from, "config": the transformers config fields}}."""
    return json.loads(PRESETS_FILE.read_text())


def load_config(model):
    """A causal LM's transformers config from a preset name, a config.json path (or its folder), a dict or a config."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if isinstance(model, PretrainedConfig):
        config = model
    elif isinstance(model, dict):
        fields = dict(model)
        config = AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
    elif isinstance(model, (str, Path)):
        table = presets()
        path = Path(model)
        if str(model).lower() in table:
            return load_config(table[str(model).lower()]["config"])
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{model!r} is neither a preset ({', '.join(table)}) nor a config.json file. Pass a "
                             f"preset name, the path of a model's config.json, or a transformers config.")
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); pass a model's config.json.") from None
        if "model_type" not in fields:
            raise ValueError(f"{path} has no 'model_type': it is not a transformers config.json.")
        return load_config(fields)
    else:
        raise TypeError(f"model must be a preset name, a config.json path, a dict or a transformers config, "
                        f"got {type(model).__name__}.")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"A {config.model_type!r} config is not a causal language model's (transformers has no "
                         f"AutoModelForCausalLM for it): the planner predicts next-token training steps.")
    return config
