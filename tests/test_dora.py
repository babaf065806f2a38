"""DoRA against peft 0.21 (use_dora=True), and the magnitude/direction analysis on matrices with known answers."""
import copy
import json
import math

import pytest
import torch
from peft import PeftModel

from nanopeft import (DoRALinear, LoRALinear, add_adapters, adapter_layers, load_adapter, merge_adapters,
                      save_adapter, unmerge_adapters)
from nanopeft.course.analysis import WeightRecorder, magnitude_direction_change
from nanopeft.lab.models import tiny_llama, tiny_qwen2
from nanopeft.lab.twins import compare_with_peft, replay_peft_init
from twins import assert_matches_peft, peft_params, twin_models


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-biases"])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_outputs_and_gradients_of_A_B_m_match_peft(make, rslora, dropout):
    ours, theirs = twin_models(make(), method="dora", targets="all-linear", rslora=rslora, dropout=dropout)
    assert_matches_peft(ours, theirs, torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0)))


@pytest.mark.slow
@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_and_gradients_match_peft_on_the_bundled_model(smollm, rslora):
    ours, theirs = twin_models(smollm[0], method="dora", r=16, alpha=32, dropout=0.05, rslora=rslora,
                               targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert_matches_peft(ours, theirs, torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_magnitude_starts_at_the_row_norms_of_W0_like_peft(dtype):
    base = tiny_qwen2().to(dtype)
    fresh = add_adapters(copy.deepcopy(base), method="dora", targets=("q_proj", "v_proj"))
    for path, layer in adapter_layers(fresh).items():
        w0 = layer.base_layer.weight
        assert layer.magnitude.shape == (w0.shape[0],)  # one per output neuron (row), not per input column
        assert layer.magnitude.dtype == torch.float32  # trainable parameters stay fp32 on a half-precision base
        torch.testing.assert_close(layer.magnitude, w0.float().norm(dim=1), rtol=1e-2, atol=0)
    fresh = add_adapters(copy.deepcopy(base), method="dora", targets=("q_proj", "v_proj"))
    replay_peft_init(fresh, seed=0)
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                         use_dora=True))
    for path, layer in adapter_layers(fresh).items():
        refs = peft_params(ref, path)
        assert torch.equal(layer.magnitude, refs["magnitude"]) and torch.equal(layer.lora_A, refs["lora_A"])


def test_at_init_dora_gives_exactly_the_base_output():
    base = tiny_qwen2()
    ids = torch.randint(0, 256, (2, 16))
    adapted = add_adapters(copy.deepcopy(base), method="dora", targets="all-linear")
    assert torch.equal(adapted(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-biases"])
def test_merged_weights_match_peft_and_unmerge_restores(make):
    ours, theirs = twin_models(make(), method="dora", targets="all-linear")
    originals = {p: l.base_layer.weight.clone() for p, l in adapter_layers(ours).items()}
    ids = torch.randint(0, 256, (2, 16))
    before = ours(input_ids=ids).logits
    merge_adapters(ours)
    torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    merged_peft = theirs.merge_and_unload()
    for path, layer in adapter_layers(ours).items():
        torch.testing.assert_close(layer.base_layer.weight, merged_peft.get_submodule(path).weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.effective_weight(), layer.base_layer.weight, rtol=0, atol=1e-6)
    unmerge_adapters(ours)
    for path, layer in adapter_layers(ours).items():
        torch.testing.assert_close(layer.base_layer.weight, originals[path], rtol=0, atol=1e-5)


def test_effective_weight_is_m_times_the_unit_direction():
    layer = adapter_layers(twin_models(tiny_llama(), method="dora")[0])["model.layers.0.self_attn.q_proj"]
    W = layer.effective_weight()  # (out, in)
    torch.testing.assert_close(W.norm(dim=1), layer.magnitude.detach(), rtol=1e-6, atol=0)  # row norms are m
    x = torch.randn(5, 64)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ W.T, rtol=0, atol=1e-5)  # the forward applies exactly W'


def test_detached_norm_changes_gradients_not_outputs():
    base = tiny_llama()
    torch.manual_seed(0)
    detached = add_adapters(copy.deepcopy(base), method="dora", targets=("q_proj", "v_proj"))
    torch.manual_seed(0)
    through = add_adapters(copy.deepcopy(base), method="dora", targets=("q_proj", "v_proj"), detach_norm=False)
    with torch.no_grad():
        for (_, a), (_, b) in zip(adapter_layers(detached).items(), adapter_layers(through).items()):
            a.lora_B.normal_(0, 0.1)
            b.lora_B.copy_(a.lora_B)
    ids = torch.randint(0, 256, (2, 16))
    out_a, out_b = detached(input_ids=ids).logits, through(input_ids=ids).logits
    assert torch.equal(out_a, out_b)  # the forward pass is the same computation
    out_a.pow(2).mean().backward()
    out_b.pow(2).mean().backward()
    layer_a = adapter_layers(detached)["model.layers.0.self_attn.q_proj"]
    layer_b = adapter_layers(through)["model.layers.0.self_attn.q_proj"]
    assert not torch.allclose(layer_a.lora_A.grad, layer_b.lora_A.grad, rtol=1e-3, atol=0)
    assert not torch.allclose(layer_a.lora_B.grad, layer_b.lora_B.grad, rtol=1e-3, atol=0)
    # the norm does not depend on m, so m's gradient is the same either way
    torch.testing.assert_close(layer_a.magnitude.grad, layer_b.magnitude.grad)


# --- files ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-biases"])
def test_dora_adapter_round_trips_both_ways(tmp_path, make):
    base = make()
    ours, theirs = twin_models(base, method="dora", targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    ids = torch.randint(0, 256, (2, 16))
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    in_peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(in_peft(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=0)
    theirs.save_pretrained(tmp_path / "peft")
    back = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert all(isinstance(layer, DoRALinear) for layer in adapter_layers(back).values())
    torch.testing.assert_close(back(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)


def test_dora_adapter_into_lora_model_and_the_reverse_are_errors(tmp_path):
    base = tiny_llama()
    save_adapter(twin_models(base, method="dora")[0], tmp_path / "dora")
    save_adapter(twin_models(base, method="lora")[0], tmp_path / "lora")
    lora_model = add_adapters(copy.deepcopy(base), method="lora")
    with pytest.raises(ValueError, match="is a dora adapter but the model's .* is a lora layer"):
        load_adapter(lora_model, tmp_path / "dora")
    dora_model = add_adapters(copy.deepcopy(base), method="dora")
    with pytest.raises(ValueError, match="is a lora adapter but the model's .* is a dora layer"):
        load_adapter(dora_model, tmp_path / "lora")
    assert all(type(l) is LoRALinear for l in adapter_layers(lora_model).values())


def test_magnitudes_with_use_dora_false_are_an_error(tmp_path):
    save_adapter(twin_models(tiny_llama(), method="dora")[0], tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_llama()
    with pytest.raises(ValueError, match="a weight of method 'dora', but adapter_config.json selects 'lora'"):
        load_adapter(model, tmp_path)
    assert not adapter_layers(model)


@pytest.mark.parametrize("kwargs, error", [(dict(r=0), "r must be"), (dict(alpha=0), "alpha must be"),
                                           (dict(targets=("nope",)), "match no module")])
def test_bad_dora_arguments_leave_the_model_unchanged(kwargs, error):
    model = tiny_llama()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=error):
        add_adapters(model, method="dora", **{"targets": ("q_proj",), **kwargs})
    assert [n for n, _ in model.named_modules()] == names and all(p.requires_grad for p in model.parameters())


# --- magnitude and direction --------------------------------------------------------------------------------------

def test_pure_scaling_changes_magnitude_only():
    W0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # row norms 1 and 2
    W = torch.diag(torch.tensor([2.0, 3.0])) @ W0  # rows scaled by 2 and 3: norms 2 and 6
    dM, dD = magnitude_direction_change(W0, W)
    assert dM == pytest.approx((1 + 4) / 2) and dD == pytest.approx(0.0, abs=1e-7)


def test_pure_rotation_changes_direction_only():
    theta = 0.3
    R = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    W0 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    W = W0 @ R.T  # every row rotated by theta
    dM, dD = magnitude_direction_change(W0, W)
    assert dM == pytest.approx(0.0, abs=1e-6) and dD == pytest.approx(1 - math.cos(theta), rel=1e-5)


def test_magnitude_direction_change_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        magnitude_direction_change(torch.zeros(3, 4), torch.zeros(4, 3))


def test_weight_recorder_snapshots_the_chosen_steps():
    model = add_adapters(tiny_llama(), method="dora", targets=("q_proj",))
    recorder = WeightRecorder(model, steps=[2, 3])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(0, 256, (2, 16))
    for step in range(1, 4):
        model(input_ids=ids).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        recorder({"step": step})
    assert sorted(recorder.snapshots) == [0, 2, 3]
    changes = recorder.changes()
    assert set(changes) == {(name, s) for name in adapter_layers(model) for s in (2, 3)}
    assert all(dM > 1e-4 and dD > 1e-6 for dM, dD in changes.values())
    with pytest.raises(ValueError, match="no module named"):
        WeightRecorder(model, layers=["model.layers.9.q_proj"])


def test_train_only_trains_exactly_the_target_weights():
    from nanopeft.course.experiments import train_only

    model = train_only(tiny_qwen2(), ("q_proj", "v_proj"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{k}_proj.weight" for i in range(2) for k in "qv"}
    with pytest.raises(ValueError, match="match no module"):
        train_only(tiny_qwen2(), ("qq_proj",))


def test_slope_sign_and_value():
    from nanopeft.course.analysis import slope

    assert slope([0.0, 1.0, 2.0], [1.0, 3.0, 5.0]) == pytest.approx(2.0)
    assert slope([0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.5, 0.0]) < 0


@pytest.mark.slow
def test_dora_study_records_every_target_layer_for_each_method():
    from nanopeft.course.experiments import dora_study

    result = dora_study(steps=2, seeds=[0], checkpoints=[1, 2], neuron_layers=(0,), progress=False)
    assert [r["method"] for r in result["runs"]] == ["full", "lora", "dora"]
    for run in result["runs"]:
        assert len(run["changes"]) == 60 and all(set(v) == {1, 2} for v in run["changes"].values())
        assert set(run["neurons"]) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
        dm, dd = run["neurons"]["model.layers.0.self_attn.q_proj"][2]
        assert len(dm) == len(dd) == 576 and max(dm) > 0
        assert len(run["loss"]) == 2


def test_demo_verification_table_passes():
    from nanopeft.lab.verify import verification_table

    rows = verification_table()
    assert [r[0] for r in rows] == ["lora", "dora", "pissa", "nf4", "nf4", "qlora", "qdora", "lora+"]
    assert all(r[-1] for r in rows), rows


@pytest.mark.slow
def test_round_trips_and_merge_on_the_bundled_model(smollm, tmp_path):
    model, tok = smollm
    ours, theirs = twin_models(model, method="dora", targets=("q_proj", "v_proj"))
    ids = tok(["My parcel is late and I want a refund for the delivery charge"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        save_adapter(ours, tmp_path / "ours")
        assert torch.equal(PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")(input_ids=ids).logits,
                           expected)
        theirs.save_pretrained(tmp_path / "peft")
        assert torch.equal(load_adapter(copy.deepcopy(model), tmp_path / "peft")(input_ids=ids).logits, expected)
        merge_adapters(ours)
        merged = theirs.merge_and_unload()
        for path, layer in adapter_layers(ours).items():
            torch.testing.assert_close(layer.base_layer.weight, merged.get_submodule(path).weight, rtol=0, atol=1e-5)


# --- the factored norm: ||W0 + s B A|| from (out, r) and (r, r) products ------------------------------------------
def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def dora_pair(base, first: dict, second: dict, targets="all-linear", seed=0):
    """The same DoRA model twice (options `first`, `second`), with B and m moved off their start identically."""
    a_model = add_adapters(copy.deepcopy(base), method="dora", targets=targets, **first)
    b_model = add_adapters(copy.deepcopy(base), method="dora", targets=targets, **second)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in zip(adapter_layers(a_model).values(), adapter_layers(b_model).values()):
            b.lora_A.copy_(a.lora_A)
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.1)
            b.lora_B.copy_(a.lora_B)
            a.magnitude.mul_(1 + 0.1 * torch.randn(a.magnitude.shape, generator=g))
            b.magnitude.copy_(a.magnitude)
    return a_model, b_model


def factored_pair(base, targets="all-linear", seed=0):
    """Exact and factored norm."""
    return dora_pair(base, {}, {"norm": "factored"}, targets, seed)


def logits_after_backward(models, ids):
    """Each model's logits in training mode, after a backward of their mean square (the gradients stay in place)."""
    outs = []
    for model in models:
        model.train()
        out = model(input_ids=ids).logits
        out.pow(2).mean().backward()
        outs.append(out.detach())
    return outs


def assert_adapter_grads_close(model_a, model_b, tol):
    for a, b in zip(adapter_layers(model_a).values(), adapter_layers(model_b).values()):
        for name in ("lora_A", "lora_B", "magnitude"):
            assert relative(getattr(b, name).grad, getattr(a, name).grad) <= tol, name


def assert_factored_matches(exact, factored, ids, tol=1e-5):
    for a, b in zip(adapter_layers(exact).values(), adapter_layers(factored).values()):
        with torch.no_grad():
            assert relative(b.weight_norm(), a.weight_norm()) <= tol
    outs = logits_after_backward((exact, factored), ids)
    assert relative(outs[1], outs[0]) <= tol
    assert_adapter_grads_close(exact, factored, tol)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-biases"])
def test_factored_norm_equals_the_exact_one_within_float_rounding(make):
    exact, factored = factored_pair(make())
    assert_factored_matches(exact, factored, torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)))


def test_factored_norm_follows_the_update_and_survives_merging():
    exact, factored = factored_pair(tiny_llama(), targets=("q_proj",))
    layer = adapter_layers(factored)["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        before = layer.weight_norm()
        layer.lora_B.mul_(3)  # a bigger update: the cached ||W0||^2 stays right, the norm moves
        assert not torch.allclose(layer.weight_norm(), before)
        exact_layer = adapter_layers(exact)["model.layers.0.self_attn.q_proj"]
        exact_layer.lora_B.mul_(3)
        assert relative(layer.weight_norm(), exact_layer.weight_norm()) <= 1e-5
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = factored(input_ids=ids).logits
        merge_adapters(factored)
        unmerge_adapters(factored)  # W0 changes and comes back: the cache is rebuilt, not reused
        assert relative(factored(input_ids=ids).logits, expected) <= 1e-5


@pytest.mark.slow
def test_factored_norm_on_the_bundled_model(smollm):
    """Layer by layer on the real weights: the same input and the same gradient from above, so each layer's own
    rounding is what is compared (through 30 layers, 3e-7 differences in the norms grow to about 3e-5 in the
    gradients of the first layers, as any change of summation order would)."""
    exact, factored = factored_pair(smollm[0], targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    g = torch.Generator().manual_seed(0)
    for a, b in zip(adapter_layers(exact).values(), adapter_layers(factored).values()):
        x = torch.randn(4, 7, a.in_features, generator=g)
        upstream = torch.randn(4, 7, a.out_features, generator=g)
        with torch.no_grad():
            assert relative(b.weight_norm(), a.weight_norm()) <= 1e-6
        outs = [layer.train()(x) for layer in (a, b)]
        for out in outs:
            out.backward(upstream)
        assert relative(outs[1], outs[0]) <= 1e-5
        for name in ("lora_A", "lora_B", "magnitude"):
            ga, gb = getattr(a, name).grad, getattr(b, name).grad
            assert ((gb - ga).norm() / ga.norm()).item() <= 1e-5, name


def test_factored_norm_against_peft_within_float_rounding():
    ours, theirs = twin_models(tiny_llama(), method="dora", targets="all-linear", norm="factored")
    diffs = compare_with_peft(ours, theirs, torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert 0 < max(diffs.values()) <= 1e-5, diffs  # not bit for bit (another order of sums), but within rounding


# --- fused=True: the backward keeps only the output (dh/dm = (h - b) / m) -------------------------------------------
def fused_pair(base, norm="exact", dropout=0.0):
    """Without and with the fused backward."""
    options = {"norm": norm, "dropout": dropout}
    return dora_pair(base, options, {**options, "fused": True})


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-biases"])
def test_fused_backward_gives_the_same_outputs_and_gradients_within_rounding(make):
    plain, fused = fused_pair(make())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    outs = logits_after_backward((plain, fused), ids)
    assert torch.equal(outs[0], outs[1])  # the forward is peft's, operation for operation
    assert_adapter_grads_close(plain, fused, 1e-5)


def test_fused_backward_equals_autograd_in_float64():
    """The hand-written backward against autograd of peft's formula, in float64 where rounding cannot hide a wrong
    term: gradients for x, A, B and m, with a bias. (torch.autograd.gradcheck does not apply: finite differences
    would move the norm, which DoRA treats as a constant.)"""
    torch.manual_seed(0)
    layers = [DoRALinear(torch.nn.Linear(6, 5), r=2, alpha=4, fused=f).double() for f in (False, True)]
    with torch.no_grad():
        layers[0].lora_B.normal_(0, 0.3)
        layers[0].magnitude.mul_(1.2)
        layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    upstream = torch.randn(3, 4, 5, dtype=torch.float64)
    grads = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        layer(xi).backward(upstream)
        grads.append([xi.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["exact", "factored"])
def test_fused_backward_against_peft_within_float_rounding(norm):
    ours, theirs = twin_models(tiny_llama(), method="dora", targets="all-linear", norm=norm, fused=True)
    diffs = compare_with_peft(ours, theirs, torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert max(diffs.values()) <= 1e-5, diffs
    if norm == "exact":  # the forward is peft's, operation for operation; only the gradients are summed otherwise
        assert diffs["logits"] == 0.0 and max(diffs.values()) > 0, diffs


def test_fused_backward_keeps_one_tensor_less_per_layer():
    from nanopeft.lab.memory import SavedTensors

    plain, fused = fused_pair(tiny_llama())
    ids = torch.randint(0, 256, (2, 16))
    saved = []
    for model in (plain, fused):
        model.train()
        with SavedTensors(model) as s:
            model(input_ids=ids).logits.sum().backward()
        saved.append(s.nbytes)
    outputs = sum(2 * 16 * layer.out_features * 4 for layer in adapter_layers(fused).values())  # one (2, 16, out)
    assert saved[0] - saved[1] >= outputs  # float32 tensor less per layer (or more: the output is often kept anyway)


def test_fused_backward_with_dropout_falls_back_to_the_plain_path():
    plain, fused = fused_pair(tiny_llama(), dropout=0.1)
    ids = torch.randint(0, 256, (2, 16))
    outs = []
    for model in (plain, fused):
        model.train()
        torch.manual_seed(1)
        out = model(input_ids=ids).logits
        out.sum().backward()
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(adapter_layers(plain).values(), adapter_layers(fused).values()):
        assert torch.equal(a.magnitude.grad, b.magnitude.grad)


def test_fused_needs_a_detached_norm_and_dora():
    with pytest.raises(ValueError, match="detach_norm=True"):
        add_adapters(tiny_llama(), method="dora", fused=True, detach_norm=False)
    with pytest.raises(TypeError, match="fused .an option of method 'dora'."):
        add_adapters(tiny_llama(), method="lora", fused=True)


def test_fused_backward_gives_a_trainable_bias_its_whole_gradient():
    plain, fused = fused_pair(tiny_qwen2())  # q/k/v have biases
    for model in (plain, fused):
        for layer in adapter_layers(model).values():
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
    ids = torch.randint(0, 256, (2, 16))
    for model in (plain, fused):
        model.train()
        model(input_ids=ids).logits.pow(2).mean().backward()
    biased = [(a, b) for a, b in zip(adapter_layers(plain).values(), adapter_layers(fused).values())
              if a.base_layer.bias is not None]
    assert biased
    for a, b in biased:
        assert relative(b.base_layer.bias.grad, a.base_layer.bias.grad) <= 1e-5
