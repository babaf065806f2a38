"""Every method in the table (nanopeft.METHODS) against its reference, by reading the table: outputs and gradients,
the start, merge and unmerge, files both ways, refused bad input. A new entry gets all of it by being in the table.

Tolerances: the methods compute what peft computes in the same order, so outputs, gradients and merged weights are
equal bit for bit (0.0). A file written by one library and read by the other gives the same logits bit for bit,
except PiSSA's: its file is converted to a LoRA adapter of rank 2r on the original weights, W0 + s (B A - B0 A0)
instead of W_res + s B A, which agree to float32 rounding of W0's size (rtol 1e-5 on logits of size ~1).
"""
import copy
import dataclasses
import json

import pytest
import torch
from peft import PeftModel

from nanopeft import (METHODS, add_adapters, adapter_layers, load_adapter, merge_adapters, remove_adapters, save_adapter,
                      unmerge_adapters)
from nanopeft.lab.models import tiny_llama
from nanopeft.lab.twins import compare_with_peft, peft_params, peft_twin
from nanopeft.lora import LoRALinear

from twins import assert_unchanged, snapshot

from test_merged import check_against_loralib  # noqa: E402

# Methods whose reference is not peft: name -> a test function (model -> None) that compares the method with its
# own reference. LoRA on output slices: loralib's MergedLinear (peft dropped it).
OWN_REFERENCES = {"merged": check_against_loralib}


def reference_of(cls):
    """How a registered class is checked: "peft", or its entry in OWN_REFERENCES; else what to add, said plainly."""
    if cls.reference == "peft":
        return "peft"
    if cls.name in OWN_REFERENCES:
        return OWN_REFERENCES[cls.name]
    raise AssertionError(
        f"Method {cls.name!r} says its reference is {cls.reference!r}, and tests/test_methods.py has no comparison "
        f"for it. Add a function to OWN_REFERENCES that checks it against {cls.reference!r} (outputs, gradients, "
        f"merge), or, if peft has the method, set reference = 'peft' and peft_config to the LoraConfig fields that "
        f"select it.")


PEFT_METHODS = sorted(n for n, c in METHODS.items() if c.reference == "peft")
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_in_the_table_has_a_reference(name):
    check = reference_of(METHODS[name])
    if check != "peft":
        check(tiny_llama())


def test_an_entry_without_a_reference_fails_with_a_message_that_says_what_to_add():
    class Orphan(LoRALinear):
        name, reference = "orphan", "its paper's code"

    with pytest.raises(AssertionError, match="Add a function to OWN_REFERENCES"):
        reference_of(Orphan)


@pytest.mark.parametrize("name", PEFT_METHODS)
@pytest.mark.parametrize("rslora, dropout", [(False, 0.0), (True, 0.1)])
def test_outputs_and_gradients_equal_peft(name, rslora, dropout):
    ours, theirs = peft_twin(tiny_llama(), method=name, targets="all-linear", rslora=rslora, dropout=dropout)
    diffs = compare_with_peft(ours, theirs, IDS)
    assert set(diffs) == {"logits"} | set(METHODS[name].PEFT_NAMES), diffs
    assert all(d == 0.0 for d in diffs.values()), diffs


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_the_start_equals_peft_and_computes_the_base_model(name):
    base = tiny_llama()
    ours, theirs = peft_twin(base, method=name, targets="all-linear", perturb=False)
    for path, layer in adapter_layers(ours).items():
        ref = theirs.get_submodule("base_model.model." + path)
        assert torch.equal(layer.base_layer.weight, ref.base_layer.weight), path  # PiSSA: the same residual
        for ours_name, t in peft_params(theirs, path).items():
            assert torch.equal(getattr(layer, ours_name), t), (path, ours_name)
    # at step 0 every method computes the base model (PiSSA: W_res + s B A = W0 up to float rounding)
    torch.testing.assert_close(logits(ours), logits(base), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_merge_and_unmerge_equal_peft(name):
    ours, theirs = peft_twin(tiny_llama(), method=name, targets="all-linear")
    before, unloaded = logits(ours), logits(remove_adapters(copy.deepcopy(ours), merge=True))
    merged = logits(merge_adapters(ours))
    assert torch.equal(merged, logits(copy.deepcopy(theirs).merge_and_unload()))
    assert torch.equal(unloaded, merged)  # remove_adapters(merge=True) is peft's merge_and_unload
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)  # merging changes rounding only
    torch.testing.assert_close(logits(unmerge_adapters(ours)), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PEFT_METHODS)
@pytest.mark.parametrize("rslora", [False, True])
def test_files_both_ways_on_the_untouched_base(name, rslora, tmp_path):
    """Ours read by peft, peft's read by us, each loaded onto a fresh copy of the original model (for PiSSA the
    converted adapter, as peft writes it with path_initial_model_for_weight_conversion: rank 2r, alpha doubled,
    times sqrt 2 with rsLoRA)."""
    base = tiny_llama()
    ours, theirs = peft_twin(base, method=name, targets="all-linear", perturb=False, rslora=rslora)
    if not METHODS[name].random_init:  # peft converts against the start it saved, with init_lora_weights=True
        theirs.peft_config["default"].init_lora_weights = True
        theirs.save_pretrained(tmp_path / "start")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained: B moved off its start, the same in both
        for path, layer in adapter_layers(ours).items():
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            peft_params(theirs, path)["lora_B"].copy_(layer.lora_B)
    expected = logits(ours)
    tol = dict(rtol=0, atol=0) if METHODS[name].random_init else dict(rtol=1e-5, atol=1e-5)
    save_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")), expected,
                               **tol)
    convert = {} if METHODS[name].random_init else {"path_initial_model_for_weight_conversion": str(tmp_path / "start")}
    theirs.save_pretrained(tmp_path / "peft", **convert)
    torch.testing.assert_close(logits(load_adapter(copy.deepcopy(base), tmp_path / "peft")), expected, **tol)
    written = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft")]
    assert {k: written[0][k] for k in ("r", "lora_alpha", "use_rslora")} == \
           {k: written[1][k] for k in ("r", "lora_alpha", "use_rslora")}  # the same config as peft's


REQUIRED = {"merged": {"enable_lora": [True, False]}}  # options a method cannot do without
BAD = [(dict(r=0), "r must be a positive integer"), (dict(alpha=-1.0), "alpha must be a positive number"),
       (dict(dropout=1.5), "dropout must be a number in"), (dict(rslora="yes"), "rslora must be True or False"),
       (dict(bogus=1), "unknown keyword.*bogus"), (dict(targets=("qproj",)), r"\['qproj'\] match no module")]


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("kwargs, error", BAD, ids=[e for _, e in BAD])
def test_bad_input_is_refused_and_leaves_the_model_as_it_was(name, kwargs, error):
    model = tiny_llama()
    snap = snapshot(model)
    own = {f.name for f in dataclasses.fields(METHODS[name].Options)}
    if set(kwargs) - own - {"r", "alpha", "targets", "bogus"}:  # an option this method does not have
        error = "unknown keyword"
    with pytest.raises((ValueError, TypeError), match=error):
        add_adapters(model, name, **{"targets": "all-linear", **REQUIRED.get(name, {}), **kwargs})
    assert_unchanged(model, snap)
