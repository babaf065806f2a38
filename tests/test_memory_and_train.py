import pytest
import torch

from nanopeft.lab import memory
from nanopeft.lab.data import Example, load_task
from nanopeft.lab.device import pick_dtype
from nanopeft.lab.memory import MemoryMeter, tensor_breakdown
from nanopeft.lab.models import tiny_llama
from nanopeft.lab.train import IGNORE_INDEX, encode, summarize, train


def test_breakdown_equals_bytes_by_hand_for_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64, bias=False))
    model[0].requires_grad_(False)  # frozen: 64*128 + 128 float32 numbers
    model.register_buffer("scale", torch.ones(10, dtype=torch.float16))  # a buffer counts as frozen
    opt = torch.optim.AdamW([model[2].weight], lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()

    frozen = (64 * 128 + 128) * 4 + 10 * 2
    trainable = 128 * 64 * 4
    # AdamW keeps exp_avg and exp_avg_sq (same shape as the weight) and a 0-d float32 `step` per parameter
    optimizer_state = 2 * 128 * 64 * 4 + 4
    assert tensor_breakdown(model, opt) == {
        "frozen weights": frozen, "trainable weights": trainable, "gradients": trainable,
        "optimizer state": optimizer_state,
    }


def test_tied_weights_count_once():
    model = tiny_llama()  # embeddings and head share one tensor
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = sum(p.numel() * 4 for p in model.parameters())  # parameters() yields a shared tensor once
    every_name = sum(p.numel() * 4 for _, p in model.named_parameters(remove_duplicate=False))
    assert every_name - unique == 256 * 64 * 4
    assert tensor_breakdown(model)["trainable weights"] == unique


def test_meter_sees_a_large_cpu_allocation():
    # In a fresh process: in this one, earlier tests left freed pages that the allocator would reuse unseen.
    import subprocess
    import sys

    code = """
import torch
from nanopeft.lab.memory import MemoryMeter
with MemoryMeter(interval=0.001) as meter:
    block = torch.ones(64, 2**20)  # 256 MiB, written, so it is resident
    block += 1
    del block
r = meter.report()
print(r["process rss peak"] - r["process rss at start"])
"""
    grew = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grew > 200 * 2**20


def test_compute_dtype_on_cpu_is_float32():
    assert pick_dtype("cpu", verbose=False) == torch.float32


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16), ((6, 1), torch.float16)])
def test_compute_dtype_follows_compute_capability_not_is_bf16_supported(monkeypatch, capability, expected):
    # On a T4 (7.5) torch.cuda.is_bf16_supported() says True; we must still pick fp16 there.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype(torch.device("cuda"), verbose=False) == expected


@pytest.mark.gpu
def test_meter_reports_cuda_peaks():
    with MemoryMeter(device="cuda") as meter:
        x = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
        del x
    assert meter.report()["cuda peak allocated"] >= 2**28


# --- the training loop --------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_chat(tokenizer):
    """A tiny random Llama with the real tokenizer's vocabulary, so the real prompt format runs through it."""
    return tiny_llama(vocab_size=len(tokenizer))


@pytest.mark.slow
def test_encode_masks_the_prompt_out_of_the_loss(tokenizer):
    examples = [Example("My parcel is late", "shipping"), Example("Refund please, it broke after two days", "returns")]
    batch = encode(tokenizer, examples)
    for row, ex in enumerate(examples):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX]
        assert tokenizer.decode(kept) == ex.label + tokenizer.eos_token
        # left padding: the answer is the last tokens of the row, equal to the input there, within `keep`
        assert torch.equal(batch["input_ids"][row, -len(kept):], kept)
        assert torch.equal(labels[-len(kept):], kept) and len(kept) < batch["keep"]
        n_pad = int((batch["attention_mask"][row] == 0).sum())
        assert (labels[:-len(kept)] == IGNORE_INDEX).all() and (batch["attention_mask"][row, n_pad:] == 1).all()


@pytest.mark.slow
def test_encode_pads_with_eos_when_the_tokenizer_has_no_pad_token(tokenizer):
    """transformers 5.17 reads the bundled tokenizer without a pad token (seen on a GPU machine); padding is masked
    out, so any id does, and the end-of-text id is the usual choice."""
    import copy

    examples = [Example("My parcel is late", "shipping"), Example("Refund please, it broke after two days", "returns")]
    bare = copy.deepcopy(tokenizer)
    bare.pad_token = None
    assert bare.pad_token_id is None
    batch, reference = encode(bare, examples), encode(tokenizer, examples)
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == bare.eos_token_id).all()
    assert torch.equal(batch["input_ids"][~padding], reference["input_ids"][~padding])


@pytest.mark.slow
def test_loss_on_kept_logits_equals_loss_on_all_logits(tokenizer, tiny_chat):
    from nanopeft.lab.train import answer_loss

    batch = encode(tokenizer, load_task().train[:6])
    full = tiny_chat(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    kept = tiny_chat(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     logits_to_keep=batch["keep"]).logits
    reference = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.size(-1)),
                                                  batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(answer_loss(kept, batch["labels"]), reference)


@pytest.mark.slow
def test_train_lowers_the_loss_and_changes_only_trainable_weights(tokenizer, tiny_chat):
    model = tiny_chat
    for name, p in model.named_parameters():
        p.requires_grad_("layers.1.mlp" in name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = []
    history = train(model, tokenizer, load_task().train[:16], steps=12, optimizer=opt, batch_size=16,
                    callback=seen.append)
    assert len(history) == 12 and seen == history
    assert history[-1]["loss"] < history[0]["loss"] - 0.5  # a random tiny model: about 1 nat in 12 steps
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != ("layers.1.mlp" in n), n
    mem = history[-1]["memory"]
    assert mem["gradients"] == mem["trainable weights"] > 0
    assert summarize(history)["steps"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("kwargs, error", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=2.5), "steps must be a positive integer"),
    (dict(examples=[]), "empty"),
    (dict(examples=[("text", "billing")]), "not nanopeft.lab.data.Example"),
])
def test_train_rejects_bad_input(tokenizer, tiny_chat, kwargs, error):
    opt = torch.optim.SGD(tiny_chat.parameters(), lr=0.1)
    args = dict(model=tiny_chat, tokenizer=tokenizer, examples=load_task().train[:4], steps=1, optimizer=opt)
    with pytest.raises((ValueError, TypeError), match=error):
        train(**{**args, **kwargs})


@pytest.mark.slow
def test_train_rejects_a_model_with_nothing_trainable(tokenizer, tiny_chat):
    tiny_chat.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(tiny_chat, tokenizer, load_task().train[:4], 1, torch.optim.SGD(tiny_chat.parameters(), lr=0.1))


def test_live_display_prints_text_outside_a_notebook(capsys):
    from nanopeft.lab.live import LiveDisplay

    display = LiveDisplay("t", widgets=False)
    display({"step": 1, "loss": 1.5, "step_time": 0.1, "last": True,
             "memory": {"peak": 2**20, "kind": "cpu rss", **dict.fromkeys(memory.COUNTED + ("activations",), 1024)}})
    assert "step    1  loss 1.5000" in capsys.readouterr().out


def test_saved_tensors_counts_activations_not_parameters():
    from nanopeft.lab.memory import SavedTensors

    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    with SavedTensors(layer) as saved:
        torch.relu(layer(x)).sum()  # linear saves x (and its weight: excluded), relu saves its output
    assert saved.nbytes == 8 * 64 * 4 + 8 * 32 * 4


def test_saved_tensors_counts_the_peak_of_what_is_alive_once_each():
    from nanopeft.lab.memory import SavedTensors

    x = torch.randn(256, requires_grad=True)
    with SavedTensors() as saved:
        kept = x.exp()  # exp saves its output: 1 KiB, alive to the end
        dropped = x.exp()  # another 1 KiB, freed with its graph on the next line
        del dropped
        later = x[:128].exp()  # 512 bytes, perhaps at the freed address: alive with `kept` only
        again = kept.view(16, 16).exp()  # saves its output, a new 1 KiB storage
        del later
    # alive together: kept and dropped (2 KiB), then kept, later and again (2.5 KiB); never all four
    assert saved.nbytes == 1024 + 512 + 1024
    assert again.requires_grad and kept.requires_grad


@pytest.mark.parametrize("module, name, env, expected", [
    ("google.colab._shell", "Shell", {}, "colab"),
    ("ipykernel.zmqshell", "ZMQInteractiveShell", {}, "jupyter"),
    ("ipykernel.zmqshell", "ZMQInteractiveShell", {"VSCODE_PID": "1"}, "vscode"),
    ("IPython.terminal.interactiveshell", "TerminalInteractiveShell", {}, "ipython"),
])
def test_the_live_display_knows_where_it_runs(monkeypatch, module, name, env, expected):
    """Stand-in shells of each front end (the class and module names IPython reports there)."""
    import IPython

    from nanopeft.lab import live

    shell_class = type(name, (), {"__module__": module})
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell_class())
    monkeypatch.delenv("VSCODE_PID", raising=False)
    monkeypatch.delenv("VSCODE_CWD", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert live.frontend() == expected
    display = live.LiveDisplay("test")
    assert display.widgets is (expected in ("colab", "jupyter", "vscode"))  # widgets on Colab too; text in a terminal


def test_the_live_display_prints_text_lines_in_a_script(monkeypatch, capsys):
    import IPython

    from nanopeft.lab import live

    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    display = live.LiveDisplay("test", every=1)
    assert live.frontend() == "script" and not display.widgets
    display({"step": 1, "loss": 1.0, "step_time": 0.1, "memory": {"trainable weights": 0, "gradients": 0,
             "optimizer state": 0, "activations": 0, "peak": 0}})
    assert "[test] step    1  loss 1.0000" in capsys.readouterr().out
