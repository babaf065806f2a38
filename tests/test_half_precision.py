"""The T4 rehearsed on the CPU: every check a notebook prints (True/False, or a difference against a reference) that
depends on the dtype the device computes in, run again here in float16 (a T4) and bfloat16 (an A100, an L4), at
small sizes. The CPU stands in for the GPU's arithmetic, not its speed.

A notebook computes in `stamp()`'s dtype: float32 on a CPU, float16 on a T4, bfloat16 on newer GPUs, or whatever
NANOPEFT_DTYPE says. `CHECKS` below lists every printed check of every notebook (solutions included) with the test
that rehearses it in both half precisions, or the reason it computes in float32 whatever the device (a tiny model it
builds itself, integer bytes, a saved result); `test_every_notebook_check_is_rehearsed_or_float32_by_construction`
fails on a printed check that is in neither list.

The whole notebooks in float16 are too slow for `make test` on a CPU (float16 matmuls are emulated there):
`python benchmarks/notebooks.py --dtype float16` runs them top to bottom and reports every False, error and warning.
"""
import copy
import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from nanopeft import (add_adapters, adapter_layers, load_adapter, merge_adapters, prepare_for_kbit_training,
                      quantize_model, remove_adapters, save_adapter, unmerge_adapters)
from nanopeft.lab.data import load_task
from nanopeft.lab.memory import SavedTensors
from nanopeft.lab.models import tiny_llama
from nanopeft.lab.train import answer_loss, encode, train
from nanopeft.lab.twins import compare_with_peft, copy_bnb_state, peft_params, peft_twin, replay_peft_init
from nanopeft.qlora import LinearNF4

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
HALF = [torch.float16, torch.bfloat16]
VOCAB = 49152  # the bundled tokenizer's, for the checks that train on tickets
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# the notebooks' tolerance for "equal up to rounding" in half precision, as a share of the largest logit: bfloat16
# keeps 8 significant bits (a rounding moves a number by up to 2^-9 of it), and the roundings of every layer add up
HALF_TOLERANCE = 5e-2


# ------------------------------------------------------------------------------------------- 00 start here
@pytest.mark.parametrize("dtype", HALF)
def test_00_the_memory_prediction_is_the_measurement(dtype, tokenizer):
    model = tiny_llama(vocab_size=VOCAB).to(dtype)
    if dtype == torch.float16:  # as the notebook: float16 weights cannot be trained directly
        model.float()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("down_proj.weight"))
    trained = [p for p in model.parameters() if p.requires_grad]
    size, n = trained[0].element_size(), sum(p.numel() for p in trained)
    predicted = {"frozen weights": sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
                 + sum(b.numel() * b.element_size() for b in model.buffers()),
                 "trainable weights": size * n, "gradients": size * n,
                 "optimizer state": 2 * size * n + 4 * len(trained)}
    history = train(model, tokenizer, load_task().train, 1, torch.optim.AdamW(trained, lr=1e-5), batch_size=2,
                    progress=False)
    assert {k: history[-1]["memory"][k] for k in predicted} == predicted


# ---------------------------------------------------------------------------------------------------- 01 LoRA
@pytest.mark.parametrize("dtype", HALF)
def test_01_lora_checks(dtype, tmp_path):
    base = tiny_llama().to(dtype)
    with torch.no_grad():  # adapters at their start change no logit
        assert torch.equal(add_adapters(copy.deepcopy(base), r=8, alpha=16, targets="all-linear")(input_ids=IDS).logits,
                           base(input_ids=IDS).logits)
    for rslora in (False, True):  # against peft: the notebook prints "match" for differences <= 1e-6
        diffs = compare_with_peft(*peft_twin(base, r=16, alpha=32, targets=TARGETS, dropout=0.05, rslora=rslora), IDS)
        assert max(diffs.values()) <= 1e-6, (rslora, diffs)
    model, _ = peft_twin(base, targets="all-linear")  # B off zero
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits.float()
        merged = merge_adapters(model)(input_ids=IDS).logits.float()
        assert (merged - unmerged).abs().max() <= HALF_TOLERANCE * unmerged.abs().max()
        unmerge_adapters(model)
        expected = model(input_ids=IDS).logits.float()
    save_adapter(model, tmp_path / "ours")
    in_peft = PeftModel.from_pretrained(remove_adapters(model), tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(in_peft(input_ids=IDS).logits.float(), expected)
    in_peft.save_pretrained(tmp_path / "peft")
    back = load_adapter(in_peft.unload(), tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(back(input_ids=IDS).logits.float(), expected)


# ---------------------------------------------------------------------------------------------------- 02 DoRA
def dora_run(base, batch, **options):
    """The notebook's detach experiment: (logits, grad of A, grad of m, bytes saved for the backward)."""
    torch.manual_seed(0)
    m = add_adapters(copy.deepcopy(base), method="dora", r=8, alpha=16, targets=["q_proj", "v_proj"], **options)
    with torch.no_grad():
        for layer in adapter_layers(m).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    with SavedTensors(m) as saved:
        logits = m(input_ids=batch).logits
    logits[:, -3:].float().pow(2).mean().backward()
    q = adapter_layers(m)["model.layers.1.self_attn.q_proj"]
    return logits.detach(), q.lora_A.grad.clone(), q.magnitude.grad.clone(), saved.nbytes


@pytest.mark.parametrize("dtype", HALF)
def test_02_dora_checks(dtype):
    base = tiny_llama().to(dtype)
    adapted = add_adapters(copy.deepcopy(base), method="dora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    q0 = adapter_layers(adapted)["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(q0.magnitude, q0.base_layer.weight.float().norm(dim=1), rtol=1e-2)
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=IDS).logits, base(input_ids=IDS).logits, rtol=0, atol=5e-2)
    for rslora in (False, True):
        ours, theirs = peft_twin(base, method="dora", r=16, alpha=32, targets=TARGETS, dropout=0.05, rslora=rslora)
        diffs = compare_with_peft(ours, theirs, IDS)
        assert max(diffs.values()) <= 1e-6, (rslora, diffs)
    merged_peft = theirs.merge_and_unload()
    merge_adapters(ours)
    assert max((layer.base_layer.weight.float() - merged_peft.get_submodule(path).weight.float()).abs().max().item()
               for path, layer in adapter_layers(ours).items()) <= 1e-5
    detached, through = dora_run(base, IDS), dora_run(base, IDS, detach_norm=False)
    assert torch.equal(detached[0], through[0])  # the same forward
    assert not torch.allclose(detached[1], through[1], rtol=1e-3, atol=0)  # A's gradient changes (the lesson)
    assert torch.allclose(detached[2], through[2])  # m's does not
    assert detached[3] < through[3]  # and detaching saves memory
    dora = add_adapters(copy.deepcopy(base), method="dora", r=8, alpha=16, targets="all-linear")
    worst = 0.0
    with torch.no_grad():
        for layer in adapter_layers(dora).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
            layer.norm = "exact"
            exact = layer.weight_norm()
            layer.norm = "factored"
            worst = max(worst, ((layer.weight_norm() - exact).abs() / exact).max().item())
    assert worst <= 1e-5


# --------------------------------------------------------------------------------------------------- 04 QLoRA
@pytest.mark.parametrize("dtype", HALF)
def test_04_qlora_checks(dtype, tokenizer):
    # every matrix a multiple of 64 x 256 weights, so the double quantization's blocks come out even, as at 135M
    base = tiny_llama(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024).to(dtype)
    for dq, bits in ((False, 4 + 32 / 64), (True, 4 + 8 / 64 + 32 / (64 * 256))):
        m = copy.deepcopy(base)
        assert round(quantize_model(m, double_quant=dq, compute_dtype=dtype).bits_per_parameter, 3) == round(bits, 3)
    nf4 = m
    model = copy.deepcopy(nf4)
    prepare_for_kbit_training(model, gradient_checkpointing=False)
    add_adapters(model, "lora", r=8, alpha=16, targets="all-linear")
    train(model, tokenizer, load_task().train, 2, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                                    lr=2e-3), batch_size=2, progress=False)
    assert all(torch.equal(model.get_submodule(p).base_layer.weight, nf4.get_submodule(p).weight)
               for p in adapter_layers(model))  # the 4-bit base bytes did not move


@pytest.mark.parametrize("dtype", HALF)
def test_04_side_by_side_with_transformers_bitsandbytes_and_peft(dtype, tokenizer, tmp_path):
    """Notebook 04's section 5 at a small size: the same weights loaded by transformers in 4 bits (BitsAndBytesConfig,
    compute dtype = the device's), peft's prepare_model_for_kbit_training and get_peft_model, against ours: the same
    initial A, and with bitsandbytes' bytes the same loss curve. In float16 the old replay_peft_init started from
    another A (peft rounds a new adapter through the 4-bit layer's compute dtype)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from nanopeft.lab.bnb_cpu import pin_exact_path

    tiny_llama(vocab_size=VOCAB).save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, dtype=dtype,
                                                  device_map="cpu")
    pin_exact_path(theirs)
    theirs = prepare_model_for_kbit_training(theirs, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    theirs = get_peft_model(theirs, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)
    quantize_model(ours, compute_dtype=dtype)
    prepare_for_kbit_training(ours, gradient_checkpointing=False)
    add_adapters(ours, "lora", r=8, alpha=16, targets="all-linear")
    replay_peft_init(ours, seed=0)
    assert all(torch.equal(layer.lora_A, peft_params(theirs, path)["lora_A"])
               for path, layer in adapter_layers(ours).items())  # the notebook's "same initial A": True
    copy_bnb_state(ours, theirs, prefix="base_model.model.")
    curves = [[h["loss"] for h in train(m, tokenizer, load_task().train, 3, torch.optim.AdamW(
        [p for p in m.parameters() if p.requires_grad], lr=2e-3), batch_size=2, progress=False)] for m in (ours, theirs)]
    assert curves[0] == curves[1]  # "with bitsandbytes' bytes, our loss curve equals theirs exactly": True


# -------------------------------------------------------------------------------------------------- 05 LoRA+
@pytest.mark.parametrize("dtype", HALF)
def test_05_at_step_zero_only_b_has_a_gradient(dtype, tokenizer):
    model = tiny_llama(vocab_size=VOCAB).to(dtype)
    add_adapters(model, "lora", r=8, alpha=16, targets="all-linear")
    batch = encode(tokenizer, load_task().train[:4])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=batch["keep"]).logits
    answer_loss(logits, batch["labels"]).backward()
    layers = adapter_layers(model).values()
    assert all(layer.lora_A.grad.abs().max() == 0 for layer in layers)
    assert sum(layer.lora_B.grad.norm() ** 2 for layer in layers) > 0


# ------------------------------------------------------------------------------------------- the inventory
# (notebook, words of the printed check) -> the test above that rehearses it in float16 and bfloat16
REHEARSED = {
    ("00_start_here", "equal: "): test_00_the_memory_prediction_is_the_measurement,
    ("01_lora", "logits equal to the base model's"): test_01_lora_checks,
    ("01_lora", "logits match peft"): test_01_lora_checks,
    ("01_lora", "max |logits diff|"): test_01_lora_checks,
    ("01_lora", "merged outputs equal unmerged"): test_01_lora_checks,
    ("01_lora", "peft, loading our adapter"): test_01_lora_checks,
    ("01_lora", "nanopeft, loading peft's adapter"): test_01_lora_checks,
    ("02_dora", "m equals the row norms"): test_02_dora_checks,
    ("02_dora", "at init, DoRA's logits"): test_02_dora_checks,
    ("02_dora", "matches peft"): test_02_dora_checks,
    ("02_dora", "max |logits diff|"): test_02_dora_checks,
    ("02_dora", "max |merged weight diff|"): test_02_dora_checks,
    ("02_dora", "largest relative difference"): test_02_dora_checks,
    ("02_dora", "merged weights match peft's"): test_02_dora_checks,
    ("02_dora", "same forward output"): test_02_dora_checks,
    ("02_dora", "same gradient of"): test_02_dora_checks,
    ("02_dora", "detaching saves memory"): test_02_dora_checks,
    ("02_dora", "factored norm within"): test_02_dora_checks,
    ("04_qlora", "vs peft's 4-bit layer"): "tests/test_nf4.py::test_qlora_with_a_16_bit_compute_dtype_matches_peft",
    ("04_qlora", "4-bit base bytes unchanged"): test_04_qlora_checks,
    ("04_qlora", "bits/parameter"): test_04_qlora_checks,
    ("04_qlora", "same initial A"): test_04_side_by_side_with_transformers_bitsandbytes_and_peft,
    ("04_qlora", "our loss curve"): test_04_side_by_side_with_transformers_bitsandbytes_and_peft,
    ("04_qlora", "curves differ by less than 1%"): "float16 rounds the two quantizations alike: the rehearsal script",
    ("05_loraplus", "|grad B| > 0"): test_05_at_step_zero_only_b_has_a_gradient,
}
# (notebook, words) -> why the check computes the same in every dtype
FLOAT32_BY_CONSTRUCTION = {
    ("01_lora", "matches peft (outputs and every gradient)"): "tiny float32 models of other architectures",
    ("01_lora", "PiSSA matches peft"): "a tiny float32 Llama",
    ("01_lora", "W_res + s B A equals W0"): "a tiny float32 Llama",
    ("01_lora", "loralib"): "a float32 GPT-2-sized layer",
    ("01_lora", "the key slice"): "a float32 GPT-2-sized layer",
    ("01_lora", "merged weights equal loralib's"): "a float32 GPT-2-sized layer",
    ("01_lora", "adapters applied in eval mode"): "a float32 TransformerEncoderLayer",
    ("01_lora", "is_trainable=True"): "a count of trainable parameters of a tiny float32 Llama",
    ("02_dora", "gives the saved logits"): "a tiny float32 Llama",
    ("03_nf4", "bitsandbytes' table"): "NF4's levels, float32 by definition",
    ("03_nf4", "dynamic levels"): "the 8-bit levels, float32 by definition",
    ("03_nf4", "lowest error"): "the float32 weights quantized",
    ("03_nf4", "matches bitsandbytes"): "float32 weights and compute dtype float32 (bytes are integers)",
    ("03_nf4", "weights changed by it"): "the float32 weights quantized",
    ("03_nf4", "bits/parameter"): "the float32 weights quantized (bytes of integers and float32 scales)",
    ("05_loraplus", "same groups, lr and decay"): "a tiny float32 Llama",
    ("07_will_it_fit", "within 10% of the measurement"): "a metered float32 step on the CPU",
    ("07_will_it_fit", "persistent parts agree"): "a metered float32 step on the CPU",
    ("08_beyond_one_gpu", "adapters equal one process"): "two CPU processes in float32 (torchrun, gloo)",
    ("08_beyond_one_gpu", "the same bytes"): "the NF4 bytes, integers",
    ("08_beyond_one_gpu", "the same weight"): "the NF4 bytes, integers",
    ("08_beyond_one_gpu", "requires_grad=False"): "the NF4 storage's dtype and shape",
}


def printed_checks():
    """(notebook, line) for every check a notebook's committed outputs print: a line with True or False in a checked
    cell (NBVAL_CHECK_OUTPUT), or a measured difference ("max |... diff|", "relative difference") in any cell."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")) + sorted((NOTEBOOKS / "solutions").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            checked = "NBVAL_CHECK_OUTPUT" in "".join(cell["source"])
            for out in cell.get("outputs", []):
                for line in "".join(out.get("text", "")).splitlines():
                    if (checked and re.search(r"\b(True|False)\b", line)) or re.search(r"diff\||relative diff", line):
                        yield path.stem, line


def test_every_notebook_check_is_rehearsed_or_float32_by_construction():
    known = {**REHEARSED, **FLOAT32_BY_CONSTRUCTION}
    checks = list(printed_checks())
    assert len(checks) > 40
    missing = [(nb, line) for nb, line in checks if not any(nb == k[0] and k[1] in line for k in known)]
    assert not missing, "a printed check with no float16/bfloat16 rehearsal (add one above): " + repr(missing[:5])
    unused = [k for k in known if not any(nb == k[0] and k[1] in line for nb, line in checks)]
    assert not unused, f"entries that match no printed check (renamed?): {unused}"
