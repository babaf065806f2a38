"""Adapter files from anywhere (nanopeft.peft_format, nanopeft.peft_config): every start peft 0.21 accepts
(`init_lora_weights`), and peft's own test cases saved the way peft's tests save them (init_lora_weights=False, so
that B is not zero), load with peft's logits, or are refused naming what is missing, with the model left as it was.

Once trained, an adapter is its weights and the base they were trained on: the start matters only where it rewrote
the base (see nanopeft.peft_config).
"""
import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from nanopeft import adapter_layers, load_adapter
from nanopeft.lab.models import tiny_llama
from nanopeft.lab.twins import output_of
from nanopeft.peft_config import BASE_KEPT, BASE_REWRITTEN

from test_any_model import MODELS, PEFT_CASES, REFUSED_CASES, mlp_inputs
from twins import assert_unchanged, snapshot

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
# every value of init_lora_weights peft 0.21 accepts (LoraConfig's field and LoraLayer.update_layer)
STARTS = [True, False, "gaussian", "eva", "orthogonal", "mica", "pissa", "pissa_niter_4", "olora", "corda",
          "lora_ga", "loftq"]
# peft cannot make these here: CorDA and LoRA-GA need a calibration pass first, and LoftQ quantizes on a GPU only.
# Their files are peft's plain file with the config's value changed, which is all a loader sees of them.
NEEDS_MORE_THAN_A_CPU = {"corda", "lora_ga", "loftq"}


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def saved_by_peft(base, folder, init, **config):
    """peft's adapter started with `init`, moved off its start (B, and A where it starts at zero, random), saved:
    (the peft model, its folder)."""
    torch.manual_seed(0)
    made = True if init in NEEDS_MORE_THAN_A_CPU else init
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=made, **config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(getattr(m, "lora_B", None), nn.ModuleDict):
                for w in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                    w.add_(0.1 * torch.randn(w.shape, generator=g))
    theirs.save_pretrained(folder)
    if made != init:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": init}))
    return theirs, folder


@pytest.mark.parametrize("init", STARTS, ids=[str(s) for s in STARTS])
def test_every_start_peft_accepts_loads_or_is_refused_naming_what_it_needs(init, tmp_path):
    base = tiny_llama()
    theirs, folder = saved_by_peft(base, tmp_path, init)
    assert json.loads((folder / "adapter_config.json").read_text())["init_lora_weights"] == init
    if init in BASE_KEPT or init == "pissa":  # the untouched base (PiSSA's rewrite redone on loading, as in peft)
        expected = logits(PeftModel.from_pretrained(copy.deepcopy(base), folder))
        if init not in NEEDS_MORE_THAN_A_CPU:
            assert torch.equal(expected, logits(theirs))  # peft loads what it saved
        ours = load_adapter(copy.deepcopy(base), folder)
        assert torch.equal(logits(ours), expected)
        layer = next(iter(adapter_layers(ours).values()))
        assert layer.lora_A.requires_grad and layer.lora_B.requires_grad == (init != "mica")  # MiCA trains A only
        return
    assert any(init.startswith(k) for k in BASE_REWRITTEN)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}'.*rewrote the base.*rewritten_base=True"):
        load_adapter(model, folder)
    assert_unchanged(model, snap)
    # on the base the start wrote, the file's weights are the whole story
    rewritten = copy.deepcopy(theirs).unload() if init not in NEEDS_MORE_THAN_A_CPU else copy.deepcopy(base)
    expected = logits(theirs) if init not in NEEDS_MORE_THAN_A_CPU else logits(PeftModel.from_pretrained(
        copy.deepcopy(base), saved_by_peft(base, tmp_path / "plain", True)[1]))
    assert torch.equal(logits(load_adapter(rewritten, folder, rewritten_base=True)), expected)


def test_an_unknown_start_is_refused(tmp_path):
    _, folder = saved_by_peft(tiny_llama(), tmp_path, True)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "bogus"}))
    with pytest.raises(ValueError, match="init_lora_weights='bogus' is not a start peft 0.21 knows"):
        load_adapter(tiny_llama(), folder)


class ModelConv2D(nn.Module):  # peft's tests/test_custom_models.py
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, X):
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(X.float().reshape(-1, 5, 3, 3))).flatten(1)), -1)


MODELS = {**MODELS, "Conv2d": ModelConv2D}

# what loading refuses among peft's cases, and the words that name the feature
LOAD_REFUSED = {
    "Embedding + transformers Conv1D 2 LoRA": "embedding table",
    "Embedding + transformers Conv1D 3 DoRA": "embedding table",
    "MHA 1 LoRA": "MultiheadAttention",
    "Vanilla MLP 1 LoRA with lora_b bias": "lora_bias=True",
    "MLP 2 using nn.Parameter LoRA": "target_parameters=",
    "rank pattern": "rank_pattern",
    "bias": "bias='all'",
}
CASES = PEFT_CASES + [c[:3] for c in REFUSED_CASES] + [
    ("bias lora_only", "MLP", {"target_modules": ["lin0"], "bias": "lora_only"}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("a regex target with DoRA", "MLP", {"target_modules": "lin[01]", "use_dora": True}),
    ("modules_to_save with rsLoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"],
                                            "use_rslora": True}),
]
LOAD_REFUSED.update({"bias lora_only": "bias='lora_only'", "Conv2d 1 LoRA": "Conv2d"})


@pytest.mark.parametrize("name, model_id, kwargs", CASES, ids=[c[0] for c in CASES])
def test_peft_s_own_cases_saved_as_its_tests_save_them(name, model_id, kwargs, tmp_path):
    torch.manual_seed(0)
    base = MODELS[model_id]()
    torch.manual_seed(1)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(**{"init_lora_weights": False, **kwargs}))
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    if name in LOAD_REFUSED:
        snap = snapshot(model)
        with pytest.raises((ValueError, TypeError), match=LOAD_REFUSED[name]):
            load_adapter(model, tmp_path)
        assert_unchanged(model, snap)
        return
    x = mlp_inputs(model_id)
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(load_adapter(model, tmp_path).eval()(*x)), output_of(theirs(*x)),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("config", [
    {"target_modules": r".*\.(q_proj|v_proj)", "use_dora": True},  # a regex target with DoRA
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "use_rslora": True},
    {"target_modules": ["q_proj", "v_proj"]},  # the plain case
], ids=["regex-dora", "layers_to_transform-rslora", "plain"])
def test_peft_s_loading_cases_on_a_llama(config, tmp_path):
    base = tiny_llama()
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **config))
    theirs.save_pretrained(tmp_path)
    assert torch.equal(logits(load_adapter(copy.deepcopy(base), tmp_path)), logits(theirs))
