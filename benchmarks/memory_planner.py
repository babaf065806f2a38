"""The memory planner against measurement: real training steps on the CPU, metered, beside the planner's prediction
and two common rules of thumb (accelerate's `estimate-memory` and LLaMA-Factory's table).

For each point of a grid (model x method x batch x sequence x gradient checkpointing) a randomly initialised model
of that shape runs two training steps (forward, backward, AdamW step) under `nanopeft.lab.memory.LiveTensors`,
which counts every tensor storage alive. A few points are also metered by PyTorch's own
`torch.distributed._tools.mem_tracker.MemTracker`, an independent meter. Only measurements are written: the
planner's predictions are recomputed from them by the tests and by `make facts`, so a change to the planner is
checked against numbers it did not produce.

    python benchmarks/memory_planner.py --out src/nanopeft/course/results/planner_grid.json   (about 15 minutes)
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import time

import torch

from common import hardware
from nanopeft.lab.planner import load_config
from nanopeft.lab.will_it_fit import measure_step, random_model

GRID = [  # (model, methods, (batch, seq) points, checkpointing options)
    ("smollm2-135m", ("full-fp32", "full-mixed", "full-bf16", "lora", "dora", "qlora", "qdora"),
     ((1, 64), (2, 128), (2, 256)), (False, True)),
    ("smollm2-360m", ("full-bf16", "lora", "qlora"), ((1, 64), (2, 128)), (False, True)),
    ("smollm2-1.7b", ("lora", "qlora"), ((1, 64),), (False, True)),
]
MEMTRACKER_POINTS = {("smollm2-135m", "lora", 1, 64, False), ("smollm2-135m", "qlora", 1, 64, True),
                     ("smollm2-135m", "full-fp32", 1, 64, False)}


def dtype_of(method: str) -> str:
    return "bfloat16" if method in ("full-mixed", "full-bf16") else "float32"


def memtracker_peak(model_name, method, batch, seq, checkpointing) -> int:
    """The same two steps metered by torch's MemTracker (frozen parameters need a small patch: MemTracker puts a
    gradient hook on every parameter, which a frozen one refuses)."""
    from torch.distributed._tools import mem_tracker

    class _NoHook:
        def remove(self):
            pass

    class Tracker(mem_tracker.MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for p in module.parameters():
                if not p.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    tracker = Tracker()

    def run(model, opt, ids, autocast, steps):
        tracker.track_external(model, opt)
        with tracker:
            for _ in range(steps):
                with autocast:
                    out = model(input_ids=ids, labels=ids)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del out
                tracker.reset_mod_stats()

    measure_step(random_model(model_name), method, batch=batch, seq=seq, checkpointing=checkpointing,
                 dtype=dtype_of(method), runner=run)
    return int(sum(v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()
                   if str(k).endswith("Total")))


def accelerate_estimate(model_name, dtype) -> int:
    """accelerate's `estimate-memory` "Training using Adam" figure: the model's float32 size from an empty model,
    then the largest of its parts (not their sum), no activations, the same for any method."""
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(model_name))
    total, _ = calculate_maximum_sizes(model)
    return int(max(estimate_training_usage(total, dtype).values()))


def llamafactory_rule(parameters: int, method: str) -> int:
    """LLaMA-Factory's README table, x = billions of parameters: full (AMP) 18x GB, full (16-bit) 8x GB, LoRA 2x GB,
    QLoRA (4-bit) x/2 GB."""
    x = parameters / 1e9
    gb = {"full-fp32": 18 * x, "full-mixed": 18 * x, "full-bf16": 8 * x, "lora": 2 * x, "dora": 2 * x,
          "qlora": x / 2, "qdora": x / 2}[method]
    return int(gb * 1e9)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the measurements as JSON here")
    p.add_argument("--quick", action="store_true", help="the bundled model's shape only")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{hardware()}; torch {torch.__version__}")
    for model_name, methods, shapes, checkpointing in GRID[:1] if args.quick else GRID:
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(load_config(model_name)).parameters())
        for method in methods:
            for batch, seq in shapes:
                for ckpt in checkpointing:
                    start = time.perf_counter()
                    model = random_model(model_name)
                    m = measure_step(model, method, batch=batch, seq=seq, checkpointing=ckpt, dtype=dtype_of(method))
                    del model
                    gc.collect()
                    row = {"model": model_name, "parameters": parameters, "method": method, "batch": batch,
                           "seq": seq, "checkpointing": ckpt, "dtype": dtype_of(method), "optimizer": "adamw",
                           "r": 8, "measured_peak": m["peak_bytes"], "measured_moment": m["moment"],
                           "measured_parts": m["persistent"],
                           "accelerate": accelerate_estimate(model_name, dtype_of(method)),
                           "llamafactory": llamafactory_rule(parameters, method), "memtracker_peak": None}
                    if (model_name, method, batch, seq, ckpt) in MEMTRACKER_POINTS:
                        row["memtracker_peak"] = memtracker_peak(model_name, method, batch, seq, ckpt)
                        gc.collect()
                    rows.append(row)
                    print(f"{model_name:>13} {method:>10} {batch} x {seq:>3} ckpt {'on ' if ckpt else 'off'} "
                          f"peak {m['peak_bytes'] / 2**20:8.1f} MiB ({m['moment']})"
                          + (f", MemTracker {row['memtracker_peak'] / 2**20:8.1f} MiB" if row["memtracker_peak"]
                             else "") + f"  [{time.perf_counter() - start:.0f} s]", flush=True)
    if args.out:
        import peft
        import transformers

        result = {"date": datetime.date.today().isoformat(), "hardware": hardware(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "peft": peft.__version__, "steps": 2, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
