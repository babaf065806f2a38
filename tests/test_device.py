"""One place chooses device and dtype; the overrides work and bad values are refused; half precision trains with
float32 adapters, through the loop and the meter (issue: the learner's machine)."""
import subprocess
import sys

import pytest
import torch

from nanopeft import adapter_layers, add_adapters
from nanopeft.lab.device import pick_device, pick_dtype, short_runs, show_progress, steps
from nanopeft.lab.memory import memory_summary
from nanopeft.lab.models import tiny_llama
from nanopeft.lab.train import train


def test_the_cpu_default_is_float32(monkeypatch):
    monkeypatch.delenv("NANOPEFT_DEVICE", raising=False)
    monkeypatch.delenv("NANOPEFT_DTYPE", raising=False)
    assert pick_device(verbose=False).type == ("cuda" if torch.cuda.is_available() else pick_device(False).type)
    assert pick_dtype("cpu", verbose=False) == torch.float32


@pytest.mark.parametrize("value, dtype", [("float32", torch.float32), ("float16", torch.float16),
                                          ("bfloat16", torch.bfloat16)])
def test_dtype_override(monkeypatch, value, dtype):
    monkeypatch.setenv("NANOPEFT_DTYPE", value)
    assert pick_dtype("cpu", verbose=False) == dtype


@pytest.mark.parametrize("variable, value, error", [
    ("NANOPEFT_DTYPE", "fp16", "NANOPEFT_DTYPE='fp16' is not a dtype nanoPEFT trains in; use one of"),
    ("NANOPEFT_DTYPE", "int8", "NANOPEFT_DTYPE='int8'"),
    ("NANOPEFT_DEVICE", "gpu", "NANOPEFT_DEVICE='gpu' is not a device"),
    ("NANOPEFT_DEVICE", "meta", "nanoPEFT runs on"),
    pytest.param("NANOPEFT_DEVICE", "cuda:0", "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_bad_overrides_are_refused_by_name(monkeypatch, variable, value, error):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=error):
        pick_dtype(pick_device(verbose=False), verbose=False) if variable == "NANOPEFT_DTYPE" else pick_device(False)


def test_device_override_and_the_choice_is_printed(monkeypatch, capsys):
    monkeypatch.setenv("NANOPEFT_DEVICE", "cpu")
    monkeypatch.setenv("NANOPEFT_DTYPE", "bfloat16")
    device = pick_device()
    dtype = pick_dtype(device)
    out = capsys.readouterr().out
    assert device == torch.device("cpu") and dtype == torch.bfloat16
    assert "device: cpu (from NANOPEFT_DEVICE)" in out and "bfloat16" in out and "adapters train in float32" in out


def test_run_length_knobs(monkeypatch):
    monkeypatch.delenv("NANOPEFT_STEPS", raising=False)
    monkeypatch.setenv("NANOPEFT_QUICK", "1")
    assert short_runs() and steps(40, 6) == 6
    monkeypatch.setenv("NANOPEFT_STEPS", "3")
    assert steps(40, 6) == 3
    monkeypatch.setenv("NANOPEFT_PROGRESS", "0")
    assert not show_progress()
    monkeypatch.setenv("CI", "true")  # CI alone is not the switch
    monkeypatch.delenv("NANOPEFT_PROGRESS")
    assert show_progress()


def test_the_stamp_reports_a_bad_override_in_a_fresh_process():
    code = "from nanopeft.lab.device import stamp; stamp()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"NANOPEFT_DTYPE": "half", "PATH": ""})
    assert done.returncode != 0 and "NANOPEFT_DTYPE='half'" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_trains_float32_adapters_through_the_loop_and_the_meter(tokenizer, monkeypatch, dtype):
    from nanopeft.lab.data import load_task

    monkeypatch.setenv("NANOPEFT_DTYPE", str(dtype).replace("torch.", ""))
    model = tiny_llama(vocab_size=len(tokenizer)).to(pick_dtype("cpu", verbose=False))
    add_adapters(model, "lora", r=4, alpha=8, targets="all-linear")
    layers = adapter_layers(model).values()
    assert all(l.base_layer.weight.dtype == dtype and l.lora_A.dtype == torch.float32 for l in layers)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = train(model, tokenizer, load_task().train[:8], steps=6, optimizer=opt, batch_size=4)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    for n, p in model.named_parameters():  # the half-precision base did not move; the adapters did
        assert torch.equal(p, before[n]) == ("lora_" not in n), n
    mem = history[-1]["memory"]
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert mem["trainable weights"] == mem["gradients"] == 4 * n_adapter  # float32 adapters and gradients
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert mem["frozen weights"] == 2 * frozen + sum(b.numel() * b.element_size() for b in model.buffers())
    assert mem["activations"] > 0
    assert "activations" in memory_summary(history) and "RSS" in memory_summary(history)


@pytest.mark.slow
def test_float16_loss_scaling_keeps_gradients_that_float16_would_lose(tokenizer):
    """A loss scaled down to 1e-8 has float16 gradients that underflow to zero; with the scaler they survive."""
    from nanopeft.lab.data import load_task
    from nanopeft.lab.train import answer_loss, encode

    torch.manual_seed(0)
    model = tiny_llama(vocab_size=len(tokenizer)).half()
    add_adapters(model, "lora", r=4, alpha=8, targets="all-linear")
    for layer in adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    batch = encode(tokenizer, load_task().train[:4])
    loss = answer_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             logits_to_keep=batch["keep"]).logits, batch["labels"]) * 1e-8
    loss.backward(retain_graph=True)
    lost = sum(int((l.lora_A.grad == 0).all()) for l in adapter_layers(model).values())
    model.zero_grad()
    (loss * 2.0 ** 16).backward()  # what GradScaler does (its first scale is 2^16)
    kept = sum(int((l.lora_A.grad == 0).all()) for l in adapter_layers(model).values())
    assert lost > kept  # without scaling, whole layers' gradients underflowed to zero


def test_float16_trainable_weights_are_refused():
    model = tiny_llama().half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from nanopeft.lab.data import load_task

    with pytest.raises(ValueError, match="trainable tensors are float16"):
        train(model, None, load_task().train[:2], 1, opt)
