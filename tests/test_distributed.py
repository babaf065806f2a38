"""Adapters under DDP and FSDP2 (torch.distributed, launched by torchrun) train what one process trains on the whole
batch, to float32's rounding: two processes on the CPU (gloo), a tiny random Llama, LoRA, DoRA, and both on an NF4
base.

Everything runs on the CPU: `launch` hides CUDA from the ranks (gloo), and one process trains with device="cpu".
One torchrun launch trains all eight configurations (2 strategies x 4 methods, gradient checkpointing on, 3 steps)
and writes the adapters and a trace of weights and gradients at every step; one process then trains the same four
methods on the concatenated batches (no checkpointing: recomputing activations must not change a number).

Tolerances come from float32's arithmetic, not from what one machine measured. The two runs add the same terms in
other orders (the all-reduce adds two half-batch gradients where one process adds all rows at once, and a matmul
over 4 rows may block its sums differently from one over 8). Two orders of a sum of n float32 terms differ by at
most about 2 n 2^-24 times the sum of the terms' magnitudes (Higham, "Accuracy and Stability of Numerical
Algorithms", 2002, section 4.2). A weight's gradient sums over the N = 8 x 32 = 256 token positions of the batch;
with the tensor's largest entry standing for the size of its terms, gradients may differ by 2 N 2^-24 of it
(`grad_tolerance`). The trace trains with SGD (momentum 0.9), whose update is linear in the gradient: after T steps
of learning rate at most lr, a weight can differ by at most lr T / (1 - 0.9) times twice the gradient tolerance (the
clipped gradient: its norm carries the same relative error), plus one float32 rounding of the weight per step
(`weight_tolerance`). AdamW gives no such bound: it divides each entry's step by the root of its own running square,
so a near-zero gradient whose last bits differ moves a weight by a share of the learning rate.

Then the quant storage: the same bytes in a bfloat16 parameter, what a cast does to them, and FSDP2's mixed precision
(which gathers every parameter in its param_dtype) with a matching and a mismatched dtype.
"""
import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanopeft import LinearNF4, adapter_layers, add_adapters, load_adapter, prepare_for_kbit_training, quantize_model
from nanopeft.lab.distributed import METHOD_CHOICES, launch, train_single
from nanopeft.lab.models import tiny_llama
from nanopeft.lab.sharding import accelerate_config, cast_damage
from nanopeft.lab.twins import bnb_quantize, copy_bnb_state
from nanopeft.peft_format import read_adapter
from nanopeft.qlora import storage_view

ROOT = Path(__file__).parent.parent
METHODS = tuple(METHOD_CHOICES)  # lora, dora, qlora, qdora
STRATEGIES = ("ddp", "fsdp")
STEPS = 3
TOKENS = 8 * 32  # the global batch: rows x positions (RunConfig.batch, distributed.batches)
LR, MOMENTUM = 0.1, 0.9  # the trace's SGD (distributed.OPTIMIZERS)
ROUNDING = 2 ** -24  # float32: the relative size of one rounding


def grad_tolerance(g: torch.Tensor) -> float:
    """How far two float32 evaluations of this gradient may be apart (see the module docstring)."""
    return 2 * TOKENS * ROUNDING * g.abs().max().item()


def weight_tolerance(w: torch.Tensor, grads: list) -> float:
    """How far two SGD runs' weights may be apart after len(grads) steps, given this weight's gradients."""
    return (LR * len(grads) / (1 - MOMENTUM) * 2 * max(grad_tolerance(g) for g in grads)
            + len(grads) * ROUNDING * w.abs().max().item())


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    stdout, summaries = launch(2, out, "--strategy", ",".join(STRATEGIES), "--method", ",".join(METHODS),
                               "--model", "tiny", "--steps", str(STEPS), "--checkpointing", "--trace",
                               "--optimizer", "sgd", "--lr", str(LR))
    return out, stdout, summaries


@pytest.fixture(scope="module")
def single():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (torchrun gives each of 2 processes one thread)
    try:
        return {m: train_single(method=m, model="tiny", steps=STEPS, trace=True, device="cpu", optimizer="sgd", lr=LR)
                for m in METHODS}
    finally:
        torch.set_num_threads(threads)


def trace_of(launched, strategy, method):
    return torch.load(launched[0] / f"{strategy}-{method}" / "trace.pt")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_train_what_one_process_trains(launched, single, strategy, method):
    theirs, ours = trace_of(launched, strategy, method), single[method]["trace"]
    for step in range(STEPS):
        assert set(theirs["grads"][step]) == set(ours["grads"][step]) and ours["grads"][step]
        for name, g in ours["grads"][step].items():
            torch.testing.assert_close(theirs["grads"][step][name], g, rtol=0, atol=grad_tolerance(g), msg=name)
        for name, w in ours["weights"][step].items():
            grads = [ours["grads"][s][name] for s in range(step + 1)]
            torch.testing.assert_close(theirs["weights"][step][name], w, rtol=0, atol=weight_tolerance(w, grads),
                                       msg=name)
    assert any(g.abs().max() > 1e-3 for g in ours["grads"][STEPS - 1].values())  # gradients that prove something
    moved = [(w - ours["weights"][0][n]).abs().max() for n, w in ours["weights"][STEPS - 1].items()]
    assert max(moved) > 1e-3  # weights that moved far more than the tolerance
    runs = launched[2][f"{strategy}-{method}"]
    assert sorted(s["rank"] for s in runs) == [0, 1] and all(s["world"] == 2 for s in runs)
    for s in runs:  # the mean loss over the whole batch, on every rank: a sum of TOKENS positive terms, reordered
        torch.testing.assert_close(torch.tensor(s["losses"]), torch.tensor(single[method]["losses"]),
                                   rtol=2 * TOKENS * ROUNDING, atol=0)


def test_every_rank_reports_its_time_and_memory(launched):
    stdout, summaries = launched[1], launched[2]
    assert "backend gloo" in stdout and stdout.count("final loss") == 2 * len(STRATEGIES) * len(METHODS)
    for method in METHODS:
        ddp, fsdp = summaries[f"ddp-{method}"][0]["held"], summaries[f"fsdp-{method}"][0]["held"]
        for part in ("trainable weights", "gradients"):  # sharded: each rank holds half
            assert fsdp[part] * 2 == ddp[part] > 0, (method, part)
        # SGD's momentum: one buffer per parameter, sharded like the parameter
        assert fsdp["optimizer state"] * 2 == ddp["optimizer state"] > 0, method
        # half, plus what is not sharded: the buffers (rotary frequencies, NF4's absmax)
        assert ddp["frozen weights"] / 2 < fsdp["frozen weights"] < 0.55 * ddp["frozen weights"], method
    assert all(s["peak"] > 0 and s["mean_step_time"] > 0 for runs in summaries.values() for s in runs)


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_the_nf4_storage_is_sharded_and_gathers_to_the_same_bytes(launched, single, method):
    theirs, ours = trace_of(launched, "fsdp", method), single[method]["trace"]
    assert len(ours["packed"]) == 14  # 2 layers x 7 Linear layers
    for name, packed in ours["packed"].items():
        assert theirs["packed"][name].dtype == torch.uint8 and torch.equal(theirs["packed"][name], packed), name
        assert torch.equal(theirs["dequantized"][name], ours["dequantized"][name]), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_saved_adapter_is_one_process_s_and_peft_loads_it(launched, single, strategy, method):
    from peft import PeftModel

    folder = launched[0] / f"{strategy}-{method}"
    _, weights, _ = read_adapter(folder)  # rank 0 wrote whole tensors, gathered from the shards under FSDP2
    layers, trace = adapter_layers(single[method]["model"]), single[method]["trace"]
    assert set(weights) == set(layers) and len(layers) == 14
    for path, tensors in weights.items():
        for name, t in tensors.items():
            grads = [g[f"{path}.{name}"] for g in trace["grads"]]
            w = getattr(layers[path], name).detach()
            torch.testing.assert_close(t, w, rtol=0, atol=weight_tolerance(w, grads))

    four_bit = METHOD_CHOICES[method][1]
    base = tiny_llama(seed=0)
    # QLoRA: bitsandbytes' NF4, pinned to its exact CPU path (the comparison below runs in eval mode without gradients,
    # where an AVX512-BF16 CPU would otherwise compute in bfloat16: nanopeft.lab.bnb_cpu)
    peft_base = bnb_quantize(copy.deepcopy(base)) if four_bit else copy.deepcopy(base)
    if four_bit:
        quantize_model(base)
    in_peft = PeftModel.from_pretrained(peft_base, folder).eval()
    ours = load_adapter(base, folder).eval()
    if four_bit:  # bitsandbytes' CPU kernel picks a neighbouring 8-bit absmax code for a few blocks: take its bytes
        assert copy_bnb_state(ours, in_peft, prefix="base_model.model.") == 14
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(in_peft(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ quant storage
def test_a_float_quant_storage_holds_the_same_bytes_and_refuses_a_cast():
    model, bytes_model = tiny_llama(seed=0), tiny_llama(seed=0)
    quantize_model(model, quant_storage=torch.bfloat16)
    quantize_model(bytes_model)
    prepare_for_kbit_training(model, gradient_checkpointing=False)  # casts 16-bit parameters to float32, not the codes
    layer, plain = model.model.layers[0].mlp.up_proj, bytes_model.model.layers[0].mlp.up_proj
    assert isinstance(layer.weight, torch.nn.Parameter) and not layer.weight.requires_grad
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.shape == (plain.weight.numel() // 2, 1)
    assert "weight" in dict(plain.named_buffers()) and plain.weight.dtype == torch.uint8  # the default is unchanged
    assert torch.equal(storage_view(layer.weight, torch.uint8), plain.weight)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, bytes_model(input_ids=ids).logits)
    add_adapters(model, "dora", targets="all-linear")  # the adapters wrap it as any LinearNF4
    model.half()  # a numeric cast of every float parameter: the codes are lost, and the layer says so
    with pytest.raises(TypeError, match="quant_storage"):
        model(input_ids=ids)


def test_a_cast_of_the_quant_storage_destroys_the_codes():
    torch.manual_seed(0)
    layer = LinearNF4.from_linear(torch.nn.Linear(256, 256), quant_storage=torch.bfloat16)
    half, full = cast_damage(layer, torch.float16), cast_damage(layer, torch.float32)
    # read as bytes, a float16 or float32 copy is another byte string: nearly every byte differs
    assert half["bytes changed, read as bytes"] > 0.9 and full["bytes changed, read as bytes"] > 0.9
    assert half["weight error, read as bytes"] > 0.5 and full["weight error, read as bytes"] > 0.5
    # through float16 and back, most codes are lost (float16 has 3 fewer exponent bits); float32 holds every
    # bfloat16 number exactly, yet every NaN comes back as one NaN pattern: a few bytes still change
    assert half["bytes changed, round trip"] > 0.5
    assert 0 < full["bytes changed, round trip"] < 0.02
    with pytest.raises(ValueError, match="uint8"):
        cast_damage(LinearNF4.from_linear(torch.nn.Linear(64, 64)), torch.float16)


def test_the_example_accelerate_config_is_the_one_the_lesson_shows():
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "examples" / "accelerate_fsdp.yaml"
    assert path.read_text() == accelerate_config(), "rewrite it from nanopeft.lab.sharding.accelerate_config()"
    config = load_config_from_file(str(path))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    assert config.mixed_precision == "bf16" and config.num_processes == 2


def test_fsdp2_mixed_precision_needs_the_quant_storage_dtype(tmp_path):
    """FSDP2 all-gathers every parameter of a group in the policy's param_dtype, the NF4 codes' storage included."""
    _, runs = launch(2, tmp_path / "bf16", "--strategy", "fsdp", "--method", "qlora", "--steps", "2",
                     "--param-dtype", "bfloat16")  # the storage's own dtype: a no-op cast, the codes survive
    assert all(abs(s["losses"][0] - 5.55) < 0.05 for s in runs["fsdp-qlora"])  # float32 starts at 5.5510
    saved = load_file(tmp_path / "bf16" / "fsdp-qlora" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())  # gathered from the float32 shards
    with pytest.raises(RuntimeError, match="arrived as torch.float16"):  # a real cast: LinearNF4 refuses
        launch(2, tmp_path / "fp16", "--strategy", "fsdp", "--method", "qlora", "--steps", "1",
               "--param-dtype", "float16")
