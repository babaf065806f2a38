"""The showdown's bookkeeping: tables, claims and their verdicts, the guide (no training here: fake runs with
known numbers; the runs themselves are tested in test_experiments.py and exercised by `python -m nanopeft`)."""
import numpy as np
import pytest

from nanopeft.course.claims import advise, claims, format_claims, loraplus_speedup
from nanopeft.course.experiments import SHOWDOWN, Budget
from nanopeft.course.report import format_table, table
from nanopeft.course.stats import FAILS, HOLDS, UNSETTLED

MIB = 2 ** 20
SEEDS = range(5)
TICKETS = 300


def fake_run(method, seed, accuracy, step_time=1.0, frozen=500 * MIB, params=1000, curve=None, activations=100 * MIB):
    rng = np.random.default_rng(sum(map(ord, method)) * 100 + seed)  # stable across processes
    correct = (rng.random(TICKETS) < accuracy).astype(int).tolist()
    memory = {"frozen weights": frozen, "trainable weights": 4 * params, "gradients": 4 * params,
              "optimizer state": 8 * params, "activations": activations}
    curve = curve or {10: accuracy / 2, 20: accuracy * 0.8, 30: accuracy * 0.9, 40: accuracy}
    return {"method": method, "seed": seed, "lr": 1e-3, "ratio": 16 if method == "lora+" else None, "curve": curve,
            "validation_accuracy": curve[40], "test_correct": correct, "accuracy": sum(correct) / TICKETS,
            "loss": [1.0] * 40, "step_times": list(step_time * (1 + 0.01 * rng.standard_normal(40))),
            "mean_step_time": step_time, "memory": memory, "peak_memory": 0, "peak_memory_kind": "cpu rss",
            "trainable_parameters": params, "file_bytes": 4 * params}


def fake_result(acc, step=None, frozen=None, params=None, curves=None):
    runs = [fake_run(m, s, acc[m], (step or {}).get(m, 1.0), (frozen or {}).get(m, 500 * MIB),
                     (params or {}).get(m, 1000), (curves or {}).get(m)) for s in SEEDS for m in SHOWDOWN]
    config = {**Budget().__dict__, "methods": list(SHOWDOWN), "seeds": list(SEEDS), "lrs": {}, "base_accuracy": 0.0,
              "test_tickets": TICKETS, "validation_tickets": 120, "hardware": {"cpu_count": 2}}
    return {"config": config, "runs": runs}


BASE = {"full": 0.8, "lora": 0.5, "dora": 0.5, "qlora": 0.5, "qdora": 0.5, "lora+": 0.7}


def verdict(rows, start):
    return next(r["verdict"] for r in rows if r["claim"].startswith(start))


def test_table_gives_each_method_an_interval_over_seeds_and_tickets():
    rows = {r["method"]: r for r in table(fake_result(BASE))}
    lora = rows["lora"]
    assert lora["seeds"] == 5 and abs(lora["accuracy"] - 0.5) < 0.03
    assert lora["interval"].low < lora["accuracy"] < lora["interval"].high
    assert 0.02 < lora["interval"].high - lora["interval"].low < 0.12  # 1500 answers: a few points either way
    text = format_table(table(fake_result(BASE)))
    assert text.count("\n") == len(SHOWDOWN) + 1 and "lora+" in text


def test_dora_verdict_follows_the_interval():
    assert verdict(claims(fake_result({**BASE, "dora": 0.6})), "On small data DoRA") == HOLDS
    assert verdict(claims(fake_result({**BASE, "dora": 0.4})), "On small data DoRA") == FAILS
    assert verdict(claims(fake_result(BASE)), "On small data DoRA") == UNSETTLED  # same accuracy: no decision


def test_step_time_verdicts():
    slow = claims(fake_result(BASE, step={"dora": 1.4}))
    assert verdict(slow, "DoRA is 1.3-1.5x") == HOLDS and verdict(slow, "DoRA trains at near") == FAILS
    same = claims(fake_result(BASE, step={"dora": 1.03}))
    assert verdict(same, "DoRA is 1.3-1.5x") == FAILS and verdict(same, "DoRA trains at near") == HOLDS


def test_loraplus_speed_up_is_first_crossing_against_first_crossing():
    lora = {10: 0.30, 20: 0.45, 30: 0.45, 40: 0.45}  # LoRA itself reaches its final accuracy at step 20
    fast = {10: 0.50, 20: 0.60, 30: 0.65, 40: 0.70}  # LoRA+ at step 10: 2x, not 40 / 10 = 4x
    s = loraplus_speedup(fake_result(BASE, curves={"lora": lora, "lora+": fast}))
    assert s["lora"] == [20] * 5 and s["lora+"] == [10] * 5 and s["interval"].estimate == pytest.approx(2.0)
    assert verdict(claims(fake_result(BASE, curves={"lora": lora, "lora+": fast})), "LoRA+ reaches") == HOLDS
    same = {10: 0.30, 20: 0.45, 30: 0.5, 40: 0.6}  # both cross at step 20: 1x
    assert verdict(claims(fake_result(BASE, curves={"lora": lora, "lora+": same})), "LoRA+ reaches") == FAILS


def test_every_claim_has_a_measurement_an_interval_and_a_verdict():
    rows = claims(fake_result(BASE))
    assert len(rows) >= 14
    assert all(r["measured"] and r["interval"] and r["source"] and r["rule"] for r in rows)
    assert all(r["verdict"] in (HOLDS, FAILS, UNSETTLED) for r in rows)
    assert "verdict: " in format_claims(rows)


def test_computed_memory_claims():
    rows = claims(fake_result(BASE))
    assert verdict(rows, "7B full fine-tuning in fp16 needs ~28 GB") == FAILS  # 16 bytes per parameter: 108 GB
    assert verdict(rows, "7B LoRA in fp16") == HOLDS
    # with activations counted (the memory planner, batch 1 x 512, checkpointing): the 4-bit claims hold at r=8
    assert verdict(rows, "QLoRA fine-tunes a 7B model in ~6 GB") == HOLDS
    assert verdict(rows, "A 65B model fine-tunes on one 48 GB GPU with QLoRA (adapters r=8)") == HOLDS
    assert verdict(rows, "QLoRA makes a 20B+ model feasible on a free Colab T4") == HOLDS


@pytest.mark.parametrize("constraint, method", [("memory", "QLoRA"), ("quality", "DoRA"), ("speed", "LoRA+"),
                                                ("none", "LoRA")])
def test_guide_names_the_method_and_cites_numbers(constraint, method):
    text = advise(constraint, fake_result(BASE), model_billions=1, gpu_gb=80)
    assert text.startswith(method + ":") and "%" in text


def test_guide_sends_models_that_do_not_fit_to_qlora():
    assert advise("speed", fake_result(BASE), model_billions=13, gpu_gb=15).startswith("QLoRA")
    assert advise("speed", fake_result(BASE), model_billions=7, gpu_gb=40).startswith("LoRA+")
    with pytest.raises(ValueError, match="constraint"):
        advise("cost", fake_result(BASE))


def test_step_time_claims_use_interleaved_timings_when_given():
    timings = {"times": {m: [1.0 + 0.01 * (i % 3) for i in range(30)] for m in SHOWDOWN}}
    timings["times"]["dora"] = [1.4 + 0.01 * (i % 3) for i in range(30)]
    rows = claims(fake_result(BASE), timings=timings)  # the showdown's own times say 1.0x; the timings 1.4x
    assert verdict(rows, "DoRA is 1.3-1.5x") == HOLDS
    assert "interleaved" in next(r["measured"] for r in rows if r["claim"].startswith("DoRA is 1.3"))


def test_guide_takes_step_times_from_the_interleaved_timings_when_given():
    result = fake_result(BASE, step={"dora": 2.0})  # the showdown's own runs: DoRA 2x LoRA
    assert "2.00x the step time" in advise("quality", result, model_billions=1, gpu_gb=80)
    timings = {"times": {m: [9.0] + [1.3 if m == "dora" else 1.0] * 11 for m in SHOWDOWN}}  # interleaved: 1.3x
    assert "1.30x the step time" in advise("quality", result, model_billions=1, gpu_gb=80, timings=timings)


def test_every_claim_is_data_that_names_its_sources_by_title():
    from nanopeft.course.claims import Quantities, load_claims

    data = load_claims()
    for entry in data["claims"]:
        assert entry["sources"] and all(k in data["sources"] for k in entry["sources"]), entry["claim"]
        assert hasattr(Quantities, entry["quantity"]), f"{entry['claim']}: no quantity {entry['quantity']!r}"
    assert all('"' in citation for citation in data["sources"].values() if "untitled" not in citation)


def test_match_claims_use_the_stated_margin():
    """"Match" means within CLOSE (5 points) of the other method: an interval wholly more than 5 points below
    fails, one wholly within holds, one that straddles -5 points is not settled."""
    from nanopeft.course.claims import CLOSE, load_claims

    matches = [c for c in load_claims()["claims"] if "match" in c["claim"].lower() or "close" in c["claim"].lower()]
    assert matches and all("-CLOSE" in (c["rule"].get("low"), c["rule"].get("high")) for c in matches)
    assert CLOSE == 0.05
    start = "QDoRA can match"
    assert verdict(claims(fake_result({**BASE, "qdora": 0.86})), start) == HOLDS  # wholly above -5 points
    assert verdict(claims(fake_result({**BASE, "qdora": 0.60})), start) == FAILS  # 20 points behind
    assert verdict(claims(fake_result({**BASE, "qdora": 0.75})), start) == UNSETTLED  # the interval straddles -5


def test_make_results_reruns_what_ships():
    """The Makefile's long runs have the seeds and ratios of the shipped results."""
    import re
    from pathlib import Path

    from nanopeft.course.results import load_result

    make = (Path(__file__).parent.parent / "Makefile").read_text().replace("\\\n", " ")
    sweep, study = load_result("loraplus_sweep")["config"], load_result("dora_study")["config"]
    line = re.search(r"loraplus-sweep --seeds (\d+) --ratios ([\d ]+?) --", make)
    assert int(line[1]) == len(sweep["seeds"]) and [int(r) for r in line[2].split()] == sweep["ratios"]
    assert int(re.search(r"dora-study --seeds (\d+)", make)[1]) == len(study["seeds"])
