"""The experiments really run: a tiny showdown through the command line, the recipes, the reuse of runs."""
import json
import subprocess
import sys

import pytest
import torch

from nanopeft import adapter_layers
from nanopeft.course.experiments import RECIPES, SHOWDOWN, Budget, build, ratio_sweep
from nanopeft.lab.models import tiny_llama
from nanopeft.course.report import table


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_builds_a_model_and_an_optimizer_over_what_trains(name):
    base = tiny_llama()
    model, optimizer = build(name, base, lr=1e-3, budget=Budget(r=4))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(p.requires_grad for p in base.parameters())  # the base itself was not touched
    r = RECIPES[name]
    assert bool(adapter_layers(model)) == (r.adapter is not None)
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    assert lrs == ([1e-3, 1e-3 * r.loraplus_ratio] if r.loraplus_ratio else [1e-3])


@pytest.mark.slow
def test_a_tiny_showdown_through_the_command_line(tmp_path):
    """One seed, then a second through --resume (the seeds are not among the settings a partial file must match): the
    same checks as two full calls, for half the training."""
    lrs = tmp_path / "lrs.json"
    lrs.write_text(json.dumps({"chosen": {"lora": 2e-3, "qlora": 2e-3}}))
    out = tmp_path / "showdown.json"
    env = {**__import__("os").environ, "NANOPEFT_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "nanopeft.course", "showdown", "--methods", "lora", "qlora", "--steps", "2",
           "--tickets", "6", "--lrs", str(lrs), "--out", str(out)]
    done = subprocess.run(cmd + ["--seeds", "1"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    first = json.loads(out.read_text())
    assert [(r["method"], r["seed"]) for r in first["runs"]] == [("lora", 0), ("qlora", 0)]
    assert first["config"]["lrs"] == {"lora": 2e-3, "qlora": 2e-3} and "processor" in first["config"]["hardware"]
    assert "test accuracy [95% interval]" in done.stdout
    assert not (tmp_path / "showdown.json.partial").exists()  # removed once the result is written

    # An interrupted call of two seeds: seed 0 saved, seed 1 missing. --resume keeps seed 0's runs, trains seed 1.
    settings = {"budget": {**Budget().__dict__, "steps": 2}, "lrs": {"lora": 2e-3, "qlora": 2e-3}, "tickets": 6}
    partial = tmp_path / "showdown.json.partial"
    partial.write_text(json.dumps({"settings": settings, "runs": first["runs"]}))
    again = subprocess.run(cmd + ["--seeds", "2", "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming: 2 runs kept" in again.stdout
    result = json.loads(out.read_text())
    assert result["runs"][:2] == first["runs"]  # kept as saved, wall times included
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [("lora", 0), ("qlora", 0), ("lora", 1), ("qlora", 1)]
    for run in result["runs"]:
        assert len(run["test_correct"]) == 6 and set(run["test_correct"]) <= {0, 1}
        assert len(run["loss"]) == len(run["step_times"]) == 2 and set(run["curve"]) == {"2"}
    rows = table(result)
    assert [r["method"] for r in rows] == ["lora", "qlora"] and all(r["seeds"] == 2 for r in rows)
    assert rows[1]["memory"]["frozen weights"] < rows[0]["memory"]["frozen weights"] / 2  # the 4-bit base


def test_a_saved_partial_with_other_settings_is_refused(tmp_path):
    from types import SimpleNamespace

    from nanopeft.course.__main__ import _checkpoint

    args = SimpleNamespace(out=str(tmp_path / "sweep.json"), resume=False)
    done, save = _checkpoint(args, {"lr": 5e-4})
    assert done == []
    run = {**fake_run("lora+", 0, 16), "validation_accuracy": 0.5, "accuracy": 0.5, "mean_step_time": 1.0}
    save(run)
    args.resume = True
    kept, _ = _checkpoint(args, {"lr": 5e-4})
    assert kept == [run]
    sweep = ratio_sweep(ratios=(16,), seeds=(0,), lr=5e-4, base=object(), tokenizer=None, done=kept)
    assert sweep["runs"] == [run]  # nothing trained: the fake base would fail
    with pytest.raises(SystemExit, match="other settings"):
        _checkpoint(args, {"lr": 1e-3})


def fake_run(method, seed, ratio):
    return {"method": method, "seed": seed, "lr": 5e-4, "ratio": ratio}


def test_sweep_reuses_matching_showdown_runs_only():
    shown = {"config": {**Budget().__dict__}, "runs": [fake_run("lora+", s, 16) for s in (0, 1)]}
    sweep = ratio_sweep(ratios=(16,), seeds=(0, 1), lr=5e-4, base=object(), tokenizer=None, reuse=shown)
    assert [r["ratio"] for r in sweep["runs"]] == [16, 16] and all(r["reused"] for r in sweep["runs"])
    with pytest.raises(AttributeError):  # another lr: nothing may be reused, so it tries to train the fake base
        ratio_sweep(ratios=(16,), seeds=(0,), lr=1e-3, base=object(), tokenizer=None, reuse=shown)


def test_showdown_asks_for_every_learning_rate():
    from nanopeft.course.experiments import showdown

    with pytest.raises(ValueError, match="No learning rate for"):
        showdown(SHOWDOWN, lrs={"lora": 1e-3}, base=object())


@pytest.mark.slow
def test_step_times_are_measured_interleaved_for_every_method(tokenizer):
    from nanopeft.course.experiments import step_times

    base = tiny_llama(vocab_size=len(tokenizer))  # a tiny model that reads the real prompts
    result = step_times(("lora", "qlora", "lora+"), lrs={"lora": 1e-3, "qlora": 1e-3, "lora+": 1e-3}, steps=3,
                        budget=Budget(r=4), base=base, tokenizer=tokenizer)
    assert set(result["times"]) == {"lora", "qlora", "lora+"}
    assert all(len(t) == 3 and all(s > 0 for s in t) for t in result["times"].values())
