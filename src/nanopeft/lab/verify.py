"""The tour's first table: every method against its reference library, on tiny models, in seconds on a CPU.

    for method, reference, compared, max_diff, tolerance, passed in verification_table():
        ...

`python -m nanopeft demo` prints it; the tests hold each row to its tolerance.
"""
from __future__ import annotations

import torch

from ..adapters import METHODS
from ..loraplus import create_loraplus_optimizer
from ..nf4 import dequantize_nf4, quantize_nf4
from .models import tiny_llama
from .twins import compare_with_peft, peft_twin, quantized_bases, train_steps


def verification_table(seed: int = 0) -> list:
    """Every method against its reference, on tiny models (seconds on a CPU): a list of
    (method, reference, what was compared, max |difference|, tolerance, passed)."""
    import bitsandbytes.functional as bf
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    rows = []

    def row(method, ref, what, diff, tol=0.0):
        rows.append((method, ref, what, diff, tol, diff <= tol))

    for method in [n for n, cls in METHODS.items() if cls.reference == "peft"]:  # every method in the table
        d = compare_with_peft(*peft_twin(tiny_llama(), method=method, targets="all-linear", dropout=0.1), ids)
        row(method, "peft 0.21", "logits, grads of " + "/".join(k for k in d if k != "logits"), max(d.values()))

    w = torch.randn(192, 576, generator=torch.Generator().manual_seed(seed))
    q = quantize_nf4(w)
    packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    same = torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    row("nf4", "bitsandbytes 0.50", "packed bytes, absmax (192x576)", 0.0 if same else float("inf"))
    row("nf4", "bitsandbytes 0.50", "dequantized values",
        (dequantize_nf4(q) - bf.dequantize_4bit(packed, state)).abs().max().item())

    for method in ("lora", "dora"):
        ours_base, theirs_base = quantized_bases(tiny_llama(), double_quant=False)
        d = compare_with_peft(*peft_twin(ours_base, method=method, targets="all-linear", dropout=0.1,
                                         peft_base=theirs_base), ids)
        row("q" + method, "peft + bitsandbytes", "logits, grads on an NF4 base", max(d.values()))

    # LoRA+: the same groups, then five AdamW steps from identical starts
    ours, theirs = peft_twin(tiny_llama(), method="dora", targets="all-linear")
    opt_ours = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, ratio=16, weight_decay=0.01)
    opt_theirs = peft_loraplus(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.01)
    losses = [train_steps(ours, opt_ours, ids), train_steps(theirs, opt_theirs, ids)]
    row("lora+", "peft 0.21", "5 AdamW steps (DoRA model): losses", max(abs(a - b) for a, b in zip(*losses)))
    return rows
