"""Grader for an NF4 quantizer written by the learner, against bitsandbytes' bytes.

    check_nf4(my_quantize)   # my_quantize(w: 1-D float32, blocksize) -> (packed uint8 ((n + 1) // 2,), absmax (blocks,))

It runs the function on several sizes (a multiple of the block, a short tail, odd counts, one smaller than a block)
and compares the packed bytes and the absmax with `bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`.
Where the bytes differ it unpacks the learner's and names the mistake: nibble order, padding, tie rounding, the
levels, one absmax for everything.
"""
from __future__ import annotations

import torch

from ...nf4 import nf4_code, unpack
from .report import CRASHED, Report, attempt

SIZES = ((4096, 64), (1000, 64), (333, 64), (7, 64), (640, 128), ("ties", 64))  # (numbers, blocksize)


def _weights(n):
    """Random numbers; or ("ties") a block whose values lie exactly half-way between two levels once scaled."""
    if n != "ties":
        return torch.randn(n, generator=torch.Generator().manual_seed(n))
    code = nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2  # with absmax 1 (the block holds a 1.0), w / absmax is exactly these
    return torch.cat([torch.ones(1), midpoints, torch.zeros(64 - 16)])


def _reference(w, blocksize):
    import bitsandbytes.functional as bf  # optional reference library, imported where it is used

    packed, state = bf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    return packed.view(-1), state.absmax


def check_nf4(fn) -> Report:
    """Grade fn(w: 1-D float32 tensor, blocksize: int) -> (packed uint8 ((n + 1) // 2,), absmax float32 (blocks,))."""
    report = Report("NF4 quantizer")
    problems = {}  # diagnosis -> the sizes it was seen at: each is said once
    ours_codes, ref_codes = [], []
    for size, blocksize in SIZES:
        w = _weights(size)
        n = w.numel()
        got = attempt(report, f"{getattr(fn, '__name__', 'fn')}(w of {n} numbers, blocksize={blocksize})", fn,
                      w.clone(), blocksize)
        if got is CRASHED:
            return report
        if not (isinstance(got, tuple) and len(got) == 2 and all(torch.is_tensor(t) for t in got)):
            report.fail(f"return a tuple (packed, absmax) of two tensors; got {type(got).__name__}")
            return report
        packed, absmax = got[0].reshape(-1), got[1].reshape(-1)
        ref_packed, ref_absmax = _reference(w, blocksize)
        blocks = ref_absmax.numel()
        if absmax.numel() == 1 and blocks > 1:
            problems.setdefault(f"one absmax per block of {blocksize}, not one for the whole tensor (the last block "
                                f"may be shorter)", []).append(n)
        elif absmax.numel() != blocks or not torch.equal(absmax.float(), ref_absmax):
            problems.setdefault(f"absmax must hold, for each block of {blocksize} consecutive numbers (the last "
                                f"may be shorter), the largest |w| in it", []).append(n)
        elif packed.dtype != torch.uint8 or packed.numel() != ref_packed.numel():
            problems.setdefault(f"packed must be (n + 1) // 2 bytes (uint8), two codes per byte; got "
                                f"{packed.numel()} of {packed.dtype} for {ref_packed.numel()}", []).append(n)
        else:
            if not torch.equal(packed, ref_packed):
                problems.setdefault(_diagnose(packed, ref_packed, w, ref_absmax, blocksize, n), []).append(n)
            ours_codes += unpack(packed, n).tolist()
            ref_codes += unpack(ref_packed, n).tolist()
    report.data = {"bitsandbytes' codes": ref_codes, "your codes": ours_codes}
    for text, sizes in problems.items():
        report.fail(f"{text} (seen at n = {', '.join(map(str, sizes))})")
    if not problems:
        report.check(True, "packed bytes and absmax equal bitsandbytes' on every size (odd ones and short tails too)",
                     "")
    return report


def _diagnose(packed, ref_packed, w, absmax, blocksize, n) -> str:
    """Name the mistake that turns bitsandbytes' bytes into the learner's."""
    swapped = ((packed & 0x0F) << 4) | (packed >> 4)
    if torch.equal(swapped, ref_packed) or (n % 2 and torch.equal(swapped[:-1], ref_packed[:-1])):
        return "nibbles in the wrong order: bitsandbytes puts the first value in the high nibble (bits 7-4)"
    if n % 2 and torch.equal(packed[:-1], ref_packed[:-1]):
        return ("the last byte differs: an odd count is padded with code 7 (NF4's zero) in the low nibble of the "
                "last byte")
    ours, ref = unpack(packed, n), unpack(ref_packed, n)
    wrong = (ours != ref).nonzero().flatten()
    code = nf4_code()
    scaled = w / absmax.repeat_interleave(blocksize)[:n]
    midpoints = (code[:-1] + code[1:]) / 2
    on_a_tie = torch.isclose(scaled[wrong].unsqueeze(1), midpoints, rtol=0, atol=1e-6).any(dim=1)
    if wrong.numel() and bool(on_a_tie.all()):
        return "values exactly half-way between two levels must go to the lower level (bitsandbytes' rule)"
    if bool(((ours - ref).abs() <= 1).all()):
        return (f"{wrong.numel()} of {n} codes are one level off: round to the nearest of NF4's 16 levels after "
                f"dividing each number by its block's absmax")
    return (f"{wrong.numel()} of {n} codes differ: the levels must be NF4's 16 (nanopeft.nf4.nf4_code()), and each "
            f"code the index of the level nearest to w / absmax")
