"""LoRA against peft 0.21: same weights in, same outputs, gradients, merged weights and files out."""
import copy
import json

import pytest
import torch
from peft import PeftModel
from torch import nn

from nanopeft import (add_adapters, adapter_layers, load_adapter, merge_adapters, remove_adapters,
                      save_adapter, trainable_parameters, unmerge_adapters)
from nanopeft.lab.models import tiny_llama, tiny_qwen2

from twins import TARGETS, assert_matches_peft, assert_unchanged, peft_layer, snapshot, twin_models


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_outputs_and_gradients_match_peft_on_tiny_llama(rslora, dropout):
    ours, theirs = twin_models(tiny_llama(), rslora=rslora, dropout=dropout)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    assert_matches_peft(ours, theirs, ids)


def test_dropout_really_changes_the_output_so_the_dropout_test_can_fail():
    ours, _ = twin_models(tiny_llama(), dropout=0.5)
    ids = torch.randint(0, 256, (2, 12))
    ours.train()
    torch.manual_seed(1)
    a = ours(input_ids=ids).logits
    torch.manual_seed(2)
    b = ours(input_ids=ids).logits
    assert not torch.allclose(a, b)


def test_all_linear_matches_peft_and_skips_the_head():
    ours, theirs = twin_models(tiny_llama(tie_word_embeddings=False), targets="all-linear")
    assert len(adapter_layers(ours)) == 14 and "lm_head" not in adapter_layers(ours)
    assert_matches_peft(ours, theirs, torch.randint(0, 256, (2, 16)))


def test_outputs_and_gradients_match_peft_with_biases_on_tiny_qwen2():
    ours, theirs = twin_models(tiny_qwen2(), targets=("q_proj", "k_proj", "v_proj"))
    assert_matches_peft(ours, theirs, torch.randint(0, 256, (2, 16)))


@pytest.mark.slow
@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_and_gradients_match_peft_on_the_bundled_model(smollm, rslora):
    ours, theirs = twin_models(smollm[0], rslora=rslora, dropout=0.05, r=16, alpha=32,
                               targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    assert_matches_peft(ours, theirs, ids)


@pytest.mark.slow
def test_merge_on_the_bundled_model_equals_peft_merge(smollm):
    model, tok = smollm
    ours, theirs = twin_models(model, targets="all-linear")
    ids = tok(["My parcel is late and I want a refund for the delivery charge"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        unmerged = ours(input_ids=ids).logits
        merged = merge_adapters(ours)(input_ids=ids).logits
        reference = theirs.merge_and_unload()(input_ids=ids).logits
    assert torch.equal(merged, reference)  # the same roundings as peft
    # and within float32 rounding of the unmerged model: 30 layers, logits of size ~30
    assert (merged - unmerged).abs().max() <= 1e-4 * unmerged.abs().max()


def test_seeded_init_replays_peft_bit_for_bit():
    ours, theirs = twin_models(tiny_llama(), targets="all-linear")
    for path, layer in adapter_layers(ours).items():
        assert torch.equal(layer.lora_A, peft_layer(theirs, path).lora_A["default"].weight), path
    # the plain draw uses the same distribution but not peft's numbers: replaying the order is what matters
    torch.manual_seed(0)
    plain = add_adapters(tiny_llama(), targets=TARGETS)
    first = next(iter(adapter_layers(plain)))
    assert not torch.equal(adapter_layers(plain)[first].lora_A, peft_layer(theirs, first).lora_A["default"].weight)


def test_b_zero_gives_exactly_the_base_output():
    base = tiny_llama()
    ids = torch.randint(0, 256, (2, 16))
    adapted = add_adapters(copy.deepcopy(base), targets="all-linear")
    assert torch.equal(adapted(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("targets", [TARGETS, "all-linear"])
def test_trainable_counts_equal_peft(targets):
    ours, theirs = twin_models(tiny_llama(), targets=targets)
    counts = trainable_parameters(ours)
    trainable, total = theirs.get_nb_trainable_parameters()
    assert (counts.trainable, counts.total) == (trainable, total)
    assert all(name in ("lora_A", "lora_B") for _, name, _, _ in counts.table)


@pytest.mark.slow
def test_trainable_counts_equal_peft_on_the_bundled_model(smollm):
    ours, theirs = twin_models(smollm[0], r=8, targets=TARGETS)
    assert (trainable_parameters(ours).trainable, trainable_parameters(ours).total) == theirs.get_nb_trainable_parameters()
    # 30 layers x (q: 8*(576+576) + v: 8*(576+192))
    assert trainable_parameters(ours).trainable == 30 * (8 * (576 + 576) + 8 * (576 + 192))


def test_merged_equals_unmerged_and_matches_peft_merge():
    ours, theirs = twin_models(tiny_llama())
    ids = torch.randint(0, 256, (2, 16))
    before = ours(input_ids=ids).logits
    merge_adapters(ours)
    torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    merged_peft = theirs.merge_and_unload()
    for path in adapter_layers(ours):
        torch.testing.assert_close(adapter_layers(ours)[path].base_layer.weight,
                                   merged_peft.get_submodule(path).weight, rtol=0, atol=1e-6)
    unmerge_adapters(ours)
    torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=0, atol=1e-5)


def test_eval_never_merges():
    ours, _ = twin_models(tiny_llama())
    ours.eval()
    assert not any(layer.merged for layer in adapter_layers(ours).values())


def test_remove_adapters_gives_back_the_plain_model():
    base = tiny_llama()
    ids = torch.randint(0, 256, (2, 16))
    ours, theirs = twin_models(base)
    adapted_logits = ours(input_ids=ids).logits
    plain = remove_adapters(copy.deepcopy(ours))
    assert not adapter_layers(plain) and isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
    assert torch.equal(plain(input_ids=ids).logits, base(input_ids=ids).logits)
    assert all(p.requires_grad for p in plain.parameters())  # flags restored
    folded = remove_adapters(ours, merge=True)
    torch.testing.assert_close(folded(input_ids=ids).logits, adapted_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(folded(input_ids=ids).logits, theirs.merge_and_unload()(input_ids=ids).logits,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_fp32_adapters_like_peft(dtype):
    base = tiny_llama().to(dtype)
    ours, theirs = twin_models(base)
    for layer in adapter_layers(ours).values():
        assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == dtype
    ids = torch.randint(0, 256, (2, 8))
    a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert a.dtype == b.dtype == dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # merged and unmerged half-precision weights: the same roundings as peft's
    merge_adapters(ours)
    theirs.merge_adapter()
    for path, layer in adapter_layers(ours).items():
        assert torch.equal(layer.base_layer.weight, peft_layer(theirs, path).base_layer.weight), path
    unmerge_adapters(ours)
    theirs.unmerge_adapter()
    for path, layer in adapter_layers(ours).items():
        assert torch.equal(layer.base_layer.weight, peft_layer(theirs, path).base_layer.weight), path


# --- the PEFT file format -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_our_adapter_loads_in_peft_with_equal_logits(tmp_path, make):
    base = make()
    ours, _ = twin_models(base, targets=("q_proj", "k_proj", "v_proj", "o_proj"), rslora=True)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is False and config["use_rslora"] is True
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_peft_adapter_loads_in_nanopeft_with_equal_logits(tmp_path, make):
    base = make()
    _, theirs = twin_models(base, targets=("q_proj", "v_proj", "down_proj"))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    peft_paths = {n[len("base_model.model."):] for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert set(adapter_layers(ours)) == peft_paths and len(peft_paths) == 6
    ids = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)
    assert all(p.requires_grad for p in (l.lora_A for l in adapter_layers(ours).values()))


def test_load_into_a_model_that_already_has_matching_adapters(tmp_path):
    base = tiny_llama()
    ours, _ = twin_models(base)
    save_adapter(ours, tmp_path)
    fresh = add_adapters(copy.deepcopy(base), r=8, alpha=16, targets=TARGETS)
    load_adapter(fresh, tmp_path)
    ids = torch.randint(0, 256, (2, 16))
    assert torch.equal(fresh(input_ids=ids).logits, ours(input_ids=ids).logits)


# --- bad input: a clear error, and the model unchanged -------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=2.0), "r must be a positive integer"),
    (dict(alpha=0), "alpha must be a positive number"),
    (dict(alpha=-1.0), "alpha must be a positive number"),
    (dict(dropout=1.0), "dropout must be a number in"),
    (dict(targets=("q_proj", "qproj")), r"\['qproj'\] match no module"),
    (dict(targets=("mlp",)), "is a LlamaMLP, which LoRA cannot wrap here: it contains linear layers"),
    (dict(targets=()), "targets must name the layers"),
    (dict(targets="q_proj"), "regular expression .* matches no full module path"),
    (dict(method="ia3"), "Unknown method"),
    (dict(target_modules=["q_proj"]), "target_modules .peft's name; nanopeft calls it targets"),
    (dict(lora_alpha=16), "lora_alpha .peft's name"),
    (dict(use_dora=True), "use_dora .peft's name"),
    (dict(bias="all"), "unknown keyword.*bias"),
    (dict(modules_to_save=["nonexistent"]), "modules_to_save names 'nonexistent'"),
    (dict(detach_norm=False), "an option of method 'dora'"),
    (dict(layers_to_transform=[7]), r"No target lies in layers \[7\]"),
    (dict(layers_to_transform=["0"]), "layers_to_transform must be a list of layer indices"),
])
def test_bad_add_adapters_arguments_leave_the_model_unchanged(kwargs, error):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=error):
        add_adapters(model, **{"targets": TARGETS, **kwargs})
    assert_unchanged(model, snap)


def test_adding_twice_and_merging_twice_are_errors():
    model = add_adapters(tiny_llama(), targets=TARGETS)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(model, targets=("k_proj",))
    assert_unchanged(model, snap)
    merge_adapters(model)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_adapters(model)
    assert_unchanged(model, snap)
    unmerge_adapters(model)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_adapters(model)
    with pytest.raises(ValueError, match="no adapters"):
        merge_adapters(tiny_llama())


@pytest.fixture
def saved(tmp_path):
    ours, _ = twin_models(tiny_llama())
    save_adapter(ours, tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("breakage, error", [
    (lambda f: _edit_config(f, r=4), "has shape .* needs|has r=4"),
    (lambda f: _edit_config(f, peft_type="IA3"), "'IA3' adapter"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"not a safetensors file"), "corrupt"),
    (lambda f: (f / "adapter_config.json").write_text("{ nope"), "not valid JSON"),
    (lambda f: (f / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
    (lambda f: (f / "adapter_config.json").unlink(), "has no adapter_config.json"),
])
def test_bad_adapter_files_get_clear_errors_and_leave_the_model_unchanged(saved, breakage, error):
    breakage(saved)
    for model in (tiny_llama(), add_adapters(tiny_llama(), targets=TARGETS)):
        snap = snapshot(model)
        with pytest.raises((ValueError, FileNotFoundError), match=error):
            load_adapter(model, saved)
        assert_unchanged(model, snap)


def test_adapter_for_other_target_names_or_another_model_is_an_error(saved):
    model = add_adapters(tiny_llama(), targets=("q_proj", "k_proj"))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="do not fit this model's adapters"):
        load_adapter(model, saved)
    assert_unchanged(model, snap)
    other = tiny_llama(num_hidden_layers=1)  # the file names layer 1, which this model lacks
    snap = snapshot(other)
    with pytest.raises(ValueError, match="not a module of"):
        load_adapter(other, saved)
    assert_unchanged(other, snap)
    wide = tiny_llama(hidden_size=128)  # same names, other shapes
    snap = snapshot(wide)
    with pytest.raises(ValueError, match="has shape"):
        load_adapter(wide, saved)
    assert_unchanged(wide, snap)


def test_keys_without_peft_prefix_are_an_error_not_a_silent_zero(saved):
    from safetensors.torch import load_file, save_file

    path = saved / "adapter_model.safetensors"
    save_file({k.replace("base_model.model.", ""): v for k, v in load_file(path).items()}, path)
    with pytest.raises(ValueError, match="does not start with 'base_model.model.'"):
        load_adapter(tiny_llama(), saved)


def test_pickle_adapters_are_refused(saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_adapter(tiny_llama(), saved)
