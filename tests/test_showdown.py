"""The showdown's bookkeeping: tables, verdict rules, the guide and the reuse of runs (no training here; the runs
themselves are exercised by notebook 06 and `python -m nanopeft showdown`)."""
import pytest

from nanopeft.showdown import FAILS, HOLDS, UNSURE, DEFAULTS, METHODS, advise, claims, format_table, ratio_sweep, table

MIB = 2 ** 20


def fake_run(method, seed, accuracy, step_time=1.0, frozen=500 * MIB, params=1000, activations=100 * MIB, **kw):
    memory = {"frozen weights": frozen, "trainable weights": 4 * params, "gradients": 4 * params,
              "optimizer state": 8 * params, "activations": activations}
    return {"method": method, "seed": seed, "accuracy": accuracy, "curve": {10: accuracy / 2, 20: accuracy},
            "steps_to_target": 20 if accuracy >= 0.6 else None, "loss": [1.0] * 5, "mean_step_time": step_time,
            "peak_memory": 0, "trainable_parameters": params, "file_bytes": 4 * params, "memory": memory, **kw}


def fake_result(acc, step=None, frozen=None, params=None):
    runs = []
    for method in METHODS:
        for seed, noise in ((0, -0.01), (1, 0.01)):
            runs.append(fake_run(method, seed, acc[method] + noise, (step or {}).get(method, 1.0),
                                 (frozen or {}).get(method, 500 * MIB), (params or {}).get(method, 1000)))
    return {"config": {**DEFAULTS, "methods": list(METHODS), "seeds": [0, 1], "base_accuracy": 0.0}, "runs": runs}


BASE = {"full": 0.8, "lora": 0.5, "dora": 0.5, "qlora": 0.5, "qdora": 0.5, "lora+": 0.7, "qlora+lora+": 0.7,
        "lora-lr4x": 0.7}


def verdict(rows, start):
    return next(r["verdict"] for r in rows if r["claim"].startswith(start))


def test_table_means_and_spreads():
    rows = {r["method"]: r for r in table(fake_result(BASE))}
    assert rows["lora"]["accuracy"] == pytest.approx(0.5)
    assert rows["lora"]["accuracy_sd"] == pytest.approx(0.01414, rel=1e-3)
    assert rows["lora+"]["reached_target"] == "2/2" and rows["lora"]["reached_target"] == "0/2"
    text = format_table(table(fake_result(BASE)))
    assert text.count("\n") == len(METHODS) + 1 and "lora+" in text


def test_dora_verdict_follows_the_numbers():
    assert verdict(claims(fake_result({**BASE, "dora": 0.6})), "On small data DoRA") == HOLDS
    assert verdict(claims(fake_result({**BASE, "dora": 0.4})), "On small data DoRA") == FAILS
    assert verdict(claims(fake_result({**BASE, "dora": 0.505})), "On small data DoRA") == UNSURE


def test_step_time_verdicts():
    slow = claims(fake_result(BASE, step={"dora": 1.4}))
    assert verdict(slow, "DoRA is 1.3-1.5x") == HOLDS and verdict(slow, "DoRA trains at near") == FAILS
    same = claims(fake_result(BASE, step={"dora": 1.05}))
    assert verdict(same, "DoRA is 1.3-1.5x").startswith(FAILS) and verdict(same, "DoRA trains at near") == HOLDS


def test_loraplus_claim_uses_the_sweep():
    result = fake_result(BASE)
    steps = result["config"]["steps"]

    def sweep_of(curves):  # ratio -> accuracy at 10, 20, 30, 40 steps
        runs = []
        for ratio, accs in curves.items():
            for s in (0, 1):
                run = fake_run("lora+", s, accs[-1], ratio=ratio, lr=5e-4)
                run["curve"] = dict(zip((10, 20, 30, 40), accs))
                runs.append(run)
        return {"config": {**DEFAULTS, "ratios": list(curves)}, "runs": runs}

    assert steps == 40
    fast = sweep_of({1: [0.1, 0.2, 0.3, 0.45], 16: [0.2, 0.5, 0.6, 0.7]})  # LoRA+ passes 45% by step 20: 2x
    assert verdict(claims(result, fast), "LoRA+ reaches") == HOLDS
    slow = sweep_of({1: [0.1, 0.2, 0.3, 0.45], 16: [0.1, 0.2, 0.4, 0.5]})  # only by step 40: 1x
    assert verdict(claims(result, slow), "LoRA+ reaches") == FAILS


def test_every_claim_has_a_measurement_and_a_verdict():
    rows = claims(fake_result(BASE))
    assert len(rows) >= 10
    assert all(r["measured"] and r["verdict"] and r["source"] for r in rows)


@pytest.mark.parametrize("constraint, method", [("memory", "QLoRA"), ("quality", "DoRA"), ("speed", "LoRA+"),
                                                ("none", "LoRA")])
def test_guide_names_the_method_and_cites_numbers(constraint, method):
    text = advise(constraint, fake_result(BASE), model_billions=1, gpu_gb=80)
    assert text.startswith(method + ":") and "%" in text


def test_guide_sends_models_that_do_not_fit_to_qlora():
    assert advise("speed", fake_result(BASE), model_billions=13, gpu_gb=15).startswith("QLoRA")
    with pytest.raises(ValueError, match="constraint"):
        advise("cost", fake_result(BASE))


def test_sweep_reuses_matching_showdown_runs_only():
    shown = fake_result(BASE)
    sweep = ratio_sweep(ratios=(1, 16), seeds=(0, 1), base=object(), tokenizer=None, reuse=shown)
    assert [r["ratio"] for r in sweep["runs"]] == [1, 16, 1, 16]
    assert all(r["reused"] for r in sweep["runs"])
    assert [r["method"] for r in sweep["runs"]][:2] == ["lora", "lora+"]
    other = {**shown, "config": {**shown["config"], "lr": 1e-3}}  # different settings: nothing may be reused
    with pytest.raises(AttributeError):  # it tries to train (from the fake base) instead
        ratio_sweep(ratios=(1,), seeds=(0,), base=object(), tokenizer=None, reuse=other)
