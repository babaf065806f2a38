"""The memory planner against measurement: real training steps metered on the CPU (here, and the shipped grid of
benchmarks/memory_planner.py, which also ran PyTorch's MemTracker), its verdicts, its command and its errors."""
import json
import subprocess
import sys

import pytest
import torch

from nanopeft.course.results import load_result
from nanopeft.lab.memory import LiveTensors
from nanopeft.lab.planner import GIB, HEADROOM, load_config, plan, presets
from nanopeft.lab.will_it_fit import measure_step, random_model

PEAK_TOLERANCE, PERSISTENT_TOLERANCE = 0.10, 0.02
GRID = load_result("planner_grid")

# Measured here, on the bundled model's shape: each kind of method, three shapes, checkpointing on and off (the
# shipped grid covers the rest).
LIVE = [("lora", 2, 64, False), ("qdora", 1, 64, True), ("full-mixed", 1, 32, False)]


def predicted(model, method, batch, seq, checkpointing, dtype, **kw):
    return plan(model, method, r=8, batch=batch, seq=seq, checkpointing=checkpointing, dtype=dtype,
                optimizer="adamw", **kw)


def check_against(p, peak, parts):
    assert abs(p.peak_bytes / peak - 1) <= PEAK_TOLERANCE, (p.peak_bytes, peak)
    ours = {"frozen weights": p.parts["frozen weights"], "trainable weights": p.parts["trainable weights"],
            "optimizer state": p.parts["optimizer state"], "gradients": p.parts["trainable weights"]}
    for part, value in ours.items():
        # (a few hundred bytes of rotary tables may differ in dtype: a floor of 1 MiB)
        assert abs(value - parts[part]) <= max(PERSISTENT_TOLERANCE * parts[part], 2**20), (part, value, parts[part])


@pytest.mark.parametrize("method,batch,seq,checkpointing", LIVE)
def test_the_prediction_is_within_10_percent_of_a_metered_step(method, batch, seq, checkpointing):
    dtype = "bfloat16" if method in ("full-bf16", "full-mixed") else "float32"
    m = measure_step(random_model("smollm2-135m"), method, batch=batch, seq=seq, checkpointing=checkpointing,
                     dtype=dtype)
    p = predicted("smollm2-135m", method, batch, seq, checkpointing, dtype)
    check_against(p, m["peak_bytes"], m["persistent"])


@pytest.mark.parametrize("row", GRID["rows"], ids=lambda r: f"{r['model']}-{r['method']}-{r['batch']}x{r['seq']}"
                         f"-{'ckpt' if r['checkpointing'] else 'nockpt'}")
def test_the_prediction_is_within_10_percent_on_the_shipped_grid(row):
    p = predicted(row["model"], row["method"], row["batch"], row["seq"], row["checkpointing"], row["dtype"])
    check_against(p, row["measured_peak"], row["measured_parts"])
    # and it never says "fits" on a device just smaller than what the step measured
    below = (row["measured_peak"] - 1) / GIB
    assert predicted(row["model"], row["method"], row["batch"], row["seq"], row["checkpointing"], row["dtype"],
                     device=below).fits is False


def test_the_shipped_grid_covers_three_models_every_method_and_was_checked_by_memtracker():
    rows = GRID["rows"]
    assert {r["model"] for r in rows} == {"smollm2-135m", "smollm2-360m", "smollm2-1.7b"}
    assert {r["method"] for r in rows} >= {"full-fp32", "full-mixed", "full-bf16", "lora", "dora", "qlora", "qdora"}
    assert len({(r["batch"], r["seq"]) for r in rows if r["model"] == "smollm2-135m"}) >= 3
    checked = [r for r in rows if r["memtracker_peak"]]
    assert len(checked) >= 3
    for r in checked:  # the two meters agree
        assert abs(r["memtracker_peak"] / r["measured_peak"] - 1) < 0.01


def test_our_meter_equals_memtrackers_on_a_small_model():
    from transformers import LlamaConfig

    sys.path.insert(0, "benchmarks")
    from memory_planner import memtracker_peak  # noqa: E402

    config = {"model_type": "llama", **{k: v for k, v in presets()["smollm2-135m"]["config"].items()
                                         if k != "model_type"}, "num_hidden_layers": 2}
    ours = measure_step(random_model(config), "lora", batch=1, seq=32)["peak_bytes"]
    assert isinstance(load_config(config), LlamaConfig)
    theirs = memtracker_peak(config, "lora", 1, 32, False)
    assert abs(theirs / ours - 1) < 0.01, (ours, theirs)


def test_live_tensors_counts_what_is_alive():
    with LiveTensors() as live:
        a = torch.zeros(1000)  # 4,000 bytes
        b = torch.ones(500)  # 2,000
        del a
        c = b * 2  # 2,000
    assert live.peak == 6000 and live.live == 4000
    del b, c


def test_a_config_file_and_its_preset_give_the_same_plan(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(presets()["smollm2-135m"]["config"]))
    a = plan(tmp_path / "config.json", "qlora", batch=2, seq=64)
    b = plan("smollm2-135m", "qlora", batch=2, seq=64)
    assert a.peak_bytes == b.peak_bytes and a.parts == b.parts
    assert plan(str(tmp_path), "qlora", batch=2, seq=64).peak_bytes == b.peak_bytes  # the folder works too


def test_every_preset_has_a_source_and_each_architecture_builds():
    assert all(entry["source"] for entry in presets().values())
    by_type = {}
    for name, entry in presets().items():  # one preset per architecture: llama, mistral, qwen2, gpt_neox
        by_type.setdefault(entry["config"]["model_type"], name)
    for name in by_type.values():
        assert plan(name, "qlora", batch=1, seq=16, advise=False).peak_bytes > 0


def test_the_json_output_has_its_keys():
    out = subprocess.run([sys.executable, "-m", "nanopeft", "plan", "--model", "llama-2-7b", "--method", "qlora",
                          "--r", "16", "--batch", "4", "--seq", "512", "--checkpointing", "--device", "t4", "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert isinstance(result["peak_bytes"], int) and isinstance(result["fits"], bool)
    assert sum(result["parts"].values()) == result["peak_bytes"]
    assert result["fits"] is True
    out = subprocess.run([sys.executable, "-m", "nanopeft", "plan", "--json"], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout)["fits"] is None  # no device, no verdict


def test_a_configuration_that_does_not_fit_gets_advice():
    p = plan("llama-2-7b", "lora", batch=8, seq=1024, device="t4")
    assert p.fits is False
    assert p.advice[0].startswith(("largest batch that fits", "no batch fits"))
    assert any("gradient checkpointing" in a for a in p.advice) and any("QLoRA" in a for a in p.advice)
    fits = plan("llama-2-7b", "qlora", r=16, batch=1, seq=512, checkpointing=True, device="t4")
    assert fits.fits and fits.peak_bytes * (1 + HEADROOM) <= fits.capacity


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="prefix-tuning"), "Unknown method 'prefix-tuning'"),
    (dict(batch=-1), "batch must be a positive whole number"),
    (dict(model={"model_type": "t5"}), "not a causal language model"),
    (dict(model="no-such-model"), "neither a preset"),
    (dict(device="v100"), "Unknown device 'v100'"),
    (dict(method="full-mixed", dtype="float32"), "full-mixed computes in a 16-bit dtype"),
])
def test_bad_input_is_refused_with_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(**{"model": "smollm2-135m", **kwargs})


def test_the_command_reports_bad_input_in_one_line():
    out = subprocess.run([sys.executable, "-m", "nanopeft", "plan", "--method", "nope"], capture_output=True,
                         text=True)
    assert out.returncode != 0 and "nanopeft plan: Unknown method 'nope'" in out.stderr
    assert "Traceback" not in out.stderr


def test_fsdp_ranks_divide_what_each_rank_holds_and_add_what_is_gathered():
    one = plan("smollm2-135m", "lora", batch=4, seq=64, dtype="float32")
    two = plan("smollm2-135m", "lora", batch=4, seq=64, dtype="float32", ranks=2)
    # the two-process FSDP2 run of lesson 08 measured 256.6 MiB of frozen weights per rank against 513.1 MiB
    assert two.parts["frozen weights"] == -(-one.parts["frozen weights"] // 2)
    assert two.parts["gathered weights (FSDP)"] > 0 and one.parts["gathered weights (FSDP)"] == 0
    assert two.parts["activations"] == one.parts["activations"]  # each rank's own batch
    with pytest.raises(ValueError, match="ranks must be a positive whole number"):
        plan("smollm2-135m", ranks=0)
