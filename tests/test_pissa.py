"""PiSSA beyond the table's checks (test_methods.py): what the start is, GPT-2's layout, the 4-bit refusal, giving
the original weights back, and the converted file on the bundled model read by peft."""
import copy

import pytest
import torch
from peft import PeftModel

from nanopeft import adapter_layers, add_adapters, quantize_model, remove_adapters, save_adapter
from nanopeft.lab.models import tiny_llama, tiny_model
from nanopeft.lab.twins import compare_with_peft, peft_twin

from twins import assert_unchanged, snapshot


def test_the_adapter_starts_as_the_top_r_singular_part_and_the_base_holds_the_rest():
    base = tiny_llama()
    w0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith("q_proj")}
    model = add_adapters(base, "pissa", r=4, alpha=8, targets=["q_proj"])
    for path, layer in adapter_layers(model).items():
        U, S, Vh = torch.linalg.svd(w0[path], full_matrices=False)
        top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]  # the best rank-4 approximation of W0
        torch.testing.assert_close(layer.delta_weight(), top, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight(), w0[path], rtol=1e-5, atol=1e-6)
        # the residual holds no more of the top directions: its largest singular value is W0's (r+1)-th
        assert torch.linalg.svdvals(layer.base_layer.weight)[0] == pytest.approx(S[4].item(), rel=1e-4)


def test_gpt2_conv1d_layout_equals_peft():
    ours, theirs = peft_twin(tiny_model("gpt2"), method="pissa", targets="all-linear", dropout=0.1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    assert all(d == 0.0 for d in compare_with_peft(ours, theirs, ids).values())


def test_a_4bit_base_is_refused_with_what_to_do_and_the_model_is_unchanged():
    model = tiny_llama()
    quantize_model(model)
    snap, buffers = snapshot(model), [b.clone() for b in model.buffers()]
    with pytest.raises(ValueError, match="4-bit base cannot hold it.*Use method='lora' on a 4-bit base"):
        add_adapters(model, "pissa", targets="all-linear")
    assert_unchanged(model, snap)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))  # the packed bytes too


def test_a_rank_above_the_layer_is_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="r=200 is more than this layer has"):
        add_adapters(model, "pissa", r=200, targets=["q_proj"])
    assert not adapter_layers(model)


def test_remove_adapters_gives_back_the_original_weights():
    base = tiny_llama()
    original = copy.deepcopy(base)
    model = add_adapters(base, "pissa", targets="all-linear")
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.mul_(1.5)  # trained: the restore must use the start, not the current B
    restored = remove_adapters(model)
    for (n, p), q in zip(restored.named_parameters(), original.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.slow
def test_the_saved_adapter_is_lora_on_the_untouched_bundled_model(smollm, tmp_path):
    model, tok = smollm
    ours = add_adapters(copy.deepcopy(model), "pissa", r=8, alpha=16, targets="all-linear")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand in for training: A and B off their start
        for layer in adapter_layers(ours).values():
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g) * 0.01)
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    save_adapter(ours, tmp_path)
    ids = tok(["My parcel is late and I want a refund"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)  # the original weights, untouched
        got = peft_model(input_ids=ids).logits
    assert peft_model.peft_config["default"].r == 16  # rank 2r, as peft converts it
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    with torch.no_grad():
        assert (got - model(input_ids=ids).logits).abs().max() > 1e-2  # and the update is really there
