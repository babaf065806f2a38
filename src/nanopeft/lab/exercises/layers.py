"""Graders for a LoRA layer and a DoRA layer written by the learner, against peft's layers on the same weights.

    check_lora(MyLoRA)   # MyLoRA(base: nn.Linear, r: int, alpha: float) with lora_A (r, in) and lora_B (out, r)
    check_dora(MyDoRA)   # the same, plus magnitude (out,)

Each check builds the learner's layer and peft's on copies of one nn.Linear, gives them the same A and B (and m),
and compares outputs and gradients. Where they differ, it tries the usual mistakes on our own layer and names the
one that reproduces the learner's numbers.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ...dora import DoRALinear
from .report import CRASHED, Report, attempt

IN, OUT, R, ALPHA = 64, 48, 4, 12.0  # scaling alpha / r = 3: each scaling mistake gives its own factor


class _Holder(nn.Module):
    """One Linear inside a module, so that peft's get_peft_model can adapt it."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def peft_layer(base: nn.Linear, r: int, alpha: float, dora: bool):
    """peft's LoRA (or DoRA) layer around a copy of `base`."""
    from peft import LoraConfig, get_peft_model  # optional reference library, imported where it is used

    model = get_peft_model(_Holder(copy.deepcopy(base)), LoraConfig(r=r, lora_alpha=alpha, target_modules=["layer"],
                                                                    use_dora=dora))
    return model.base_model.model.layer


def _parameter(report, layer, name, shape, hint, wrong=None):
    """A parameter `name` of `shape`; `wrong`: {a wrong shape: the mistake it reveals}."""
    t = getattr(layer, name, None)
    if not isinstance(t, nn.Parameter):
        return report.fail(f"the layer has no nn.Parameter named {name} {shape}: {hint}")
    if wrong and tuple(t.shape) in wrong:
        return report.fail(wrong[tuple(t.shape)])
    if tuple(t.shape) != shape:
        flipped = tuple(t.shape) == shape[::-1]
        return report.fail(f"{name} has shape {tuple(t.shape)}, it should be {shape}"
                           + (" (flipped: store it as peft does, rows first)" if flipped else "") + f": {hint}")
    report.check(True, f"{name} is a parameter of shape {shape}", "")
    return True


def _build(report, cls, extra=()):
    """(base, the learner's layer) built on a fresh nn.Linear, with the structural checks; None on a failure."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    original = copy.deepcopy(base)
    layer = attempt(report, f"{cls.__name__}(base, r={R}, alpha={ALPHA})", cls, base, R, ALPHA)
    if layer is CRASHED:
        return None
    ok = _parameter(report, layer, "lora_A", (R, IN), "A maps the input to r numbers")
    ok = _parameter(report, layer, "lora_B", (OUT, R), "B maps r numbers to the output") and ok
    for name, shape, hint, wrong in extra:
        ok = _parameter(report, layer, name, shape, hint, wrong) and ok
    if not ok:
        return None
    frozen = not any(p.requires_grad for p in base.parameters())
    report.check(frozen, "the base layer is frozen", "the base layer's weight still requires grad: freeze it "
                 "(base.requires_grad_(False)); only the adapter trains")
    report.check(torch.equal(base.weight, original.weight), "the base weight is left as it was",
                 "the base weight changed when the layer was built: wrap it, do not modify it")
    return original, layer


def _init_checks(report, layer, original, x, atol=0.0):
    B, A = layer.lora_B.detach(), layer.lora_A.detach()
    report.check(bool((B == 0).all()), "B starts at zero",
                 "B must start at zero so that the adapted model starts as the pretrained one (B A = 0)")
    report.check(bool((A != 0).any()), "A starts random", "A must start random (Kaiming-uniform, as nn.Linear does): "
                 "with A = 0 as well, both gradients are zero and nothing ever trains")
    bound = 1 / math.sqrt(IN)  # kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(in), 1/sqrt(in))
    report.check(bool(A.abs().max() <= bound * (1 + 1e-6)) and A.std() > bound / 4,
                 "A has nn.Linear's Kaiming-uniform scale",
                 f"A's values reach {A.abs().max():.3g}: nn.Linear's init (and peft's) draws from U(-{bound:.3g}, "
                 f"{bound:.3g}): nn.init.kaiming_uniform_(A, a=math.sqrt(5))")
    out = attempt(report, "the forward pass", layer, x)
    if out is not CRASHED:
        same = out.shape == (x.shape[0], OUT) and torch.allclose(out, original(x), rtol=0, atol=atol)
        report.check(same, "at initialisation the output equals the base layer's",
                     "at initialisation (B = 0) the output must equal the base layer's"
                     + (" exactly" if atol == 0 else ""))
    return out


def _set_weights(layer, ref, seed=1, magnitude=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(OUT, R, generator=g) * 0.1)
        ref.lora_A["default"].weight.copy_(layer.lora_A)
        ref.lora_B["default"].weight.copy_(layer.lora_B)
        if magnitude:
            layer.magnitude.mul_(1 + 0.1 * torch.randn(OUT, generator=g))
            ref.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)


def _gradients(report, layer, ref, x, names):
    upstream = torch.randn(x.shape[0], OUT, generator=torch.Generator().manual_seed(2))
    for m in (layer, ref):
        m.zero_grad(set_to_none=True)
    if attempt(report, "the backward pass", lambda: (layer(x) * upstream).sum().backward()) is CRASHED:
        return {}
    (ref(x) * upstream).sum().backward()
    grads = {}
    for ours, theirs in names:
        mine = getattr(layer, ours).grad
        ref_param = getattr(ref, theirs)["default"].weight
        if mine is None:
            report.fail(f"{ours} got no gradient: use it in the forward pass, as an nn.Parameter")
            continue
        grads[ours] = mine
        report.check(torch.allclose(mine, ref_param.grad, rtol=1e-4, atol=1e-6), f"the gradient of {ours} equals peft's",
                     f"the gradient of {ours} differs from peft's (max |diff| {(mine - ref_param.grad).abs().max():.2e})")
    return grads


def _scale_diagnosis(ratio: float, r: int, alpha: float) -> str:
    """Name the scaling mistake that makes an update `ratio` times peft's."""
    s = alpha / r
    known = {alpha / s: "your output is r times too large: the update is scaled by alpha, not alpha / r",
             1 / s: "the update is not scaled: multiply B A x by alpha / r",
             (alpha / math.sqrt(r)) / s: "the update is scaled by alpha / sqrt(r) (that is rsLoRA); LoRA uses alpha / r",
             (r / alpha) / s: "the update is scaled by r / alpha: it is alpha / r",
             -1.0: "the update has the wrong sign: h = W0 x + (alpha / r) B A x"}
    for factor, text in known.items():
        if abs(ratio - factor) <= 0.01 * abs(factor):
            return text
    return f"the update is {ratio:.3g} times peft's: check the scaling alpha / r"


def check_lora(cls) -> Report:
    """Grade a LoRA layer class: cls(base: nn.Linear, r, alpha) with lora_A (r, in) and lora_B (out, r)."""
    report = Report("LoRA layer")
    built = _build(report, cls)
    if built is None:
        return report
    original, layer = built
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(0))
    if _init_checks(report, layer, original, x) is CRASHED:
        return report
    ref = peft_layer(original, R, ALPHA, dora=False)
    _set_weights(layer, ref)
    out = attempt(report, "the forward pass with B non-zero", layer, x)
    if out is CRASHED:
        return report
    with torch.no_grad():
        expected, base_out = ref(x), original(x)
    report.data = {"peft's output": expected.flatten().tolist(), "your output": out.detach().flatten().tolist()}
    if report.check(torch.allclose(out, expected, rtol=1e-5, atol=1e-6), "with B non-zero the output equals peft's",
                    "with B non-zero the output differs from peft's"):
        _gradients(report, layer, ref, x, [("lora_A", "lora_A"), ("lora_B", "lora_B")])
        return report
    mine, theirs = (out.detach() - base_out).flatten(), (expected - base_out).flatten()
    cosine = torch.nn.functional.cosine_similarity(mine, theirs, dim=0).item()
    if abs(cosine) > 0.999:
        report.fail(_scale_diagnosis((mine @ theirs / (theirs @ theirs)).item(), R, ALPHA))
    elif torch.allclose(out.detach() - base_out, base_out, atol=1e-5):
        report.fail("the base output is added twice: h = W0 x + b + (alpha / r) B A x")
    else:
        report.fail("the update is not B A x: apply A first (x @ A.T), then B (@ B.T), and add it to the base output")
    return report


def check_dora(cls) -> Report:
    """Grade a DoRA layer class: like check_lora, plus magnitude (out,), the row norms of W0 at the start."""
    report = Report("DoRA layer")
    wrong_axis = {(IN,): f"your norm is taken over the wrong axis: DoRA normalises each output row (dim=1 of the "
                         f"(out, in) weight), so m has one entry per output: ({OUT},), not ({IN},)"}
    built = _build(report, cls, extra=[("magnitude", (OUT,), "one length per output row of the (out, in) weight",
                                        wrong_axis)])
    if built is None:
        return report
    original, layer = built
    rows, columns = original.weight.norm(dim=1), original.weight.norm(dim=0)
    m = layer.magnitude.detach()
    if m.shape == columns.shape and torch.allclose(m, columns):
        report.fail("your norm is taken over the wrong axis: DoRA normalises each output row (dim=1 of W0)")
    report.check(torch.allclose(m, rows, rtol=1e-5), "m starts at the row norms of W0",
                 "m must start at ||W0|| of each output row (torch.linalg.norm(W0, dim=1)), so that W' = W0 at first")
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # m / ||W0|| is 1 up to rounding, so "equal" here means within float32 rounding
        if _init_checks(report, layer, original, x, atol=1e-6) is CRASHED:
            return report
    ref = peft_layer(original, R, ALPHA, dora=True)
    _set_weights(layer, ref, magnitude=True)
    out = attempt(report, "the forward pass with B and m moved", layer, x)
    if out is CRASHED:
        return report
    with torch.no_grad():
        expected = ref(x)
    report.data = {"peft's output": expected.flatten().tolist(), "your output": out.detach().flatten().tolist()}
    if not report.check(torch.allclose(out, expected, rtol=1e-4, atol=1e-5), "with B and m moved the output equals peft's",
                        "with B and m moved the output differs from peft's"):
        report.fail(_dora_diagnosis(layer, original, x, out.detach()))
        return report
    names = [("lora_A", "lora_A"), ("lora_B", "lora_B"), ("magnitude", "lora_magnitude_vector")]
    grads = _gradients(report, layer, ref, x, names)
    if "lora_A" in grads and not torch.allclose(grads["lora_A"], ref.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6):
        through = _candidate(layer, original, detach_norm=False)
        upstream = torch.randn(x.shape[0], OUT, generator=torch.Generator().manual_seed(2))
        (through(x) * upstream).sum().backward()
        if torch.allclose(grads["lora_A"], through.lora_A.grad, rtol=1e-4, atol=1e-6):
            report.fail("the norm is not detached: A's gradient differs (paper section 4.3): compute ||W0 + s B A|| "
                        "under torch.no_grad() or .detach() it")
    return report


def _candidate(layer, base, detach_norm=True, alpha=ALPHA) -> DoRALinear:
    """Our DoRALinear with the learner's A, B and m: the right answer, or a known mistake of it."""
    cand = DoRALinear(copy.deepcopy(base), R, alpha, detach_norm=detach_norm)
    with torch.no_grad():
        cand.lora_A.copy_(layer.lora_A)
        cand.lora_B.copy_(layer.lora_B)
        cand.magnitude.copy_(layer.magnitude)
    return cand


def _dora_diagnosis(layer, base, x, out) -> str:
    with torch.no_grad():
        for alpha, text in ((ALPHA * R, "the update is scaled by alpha, not alpha / r"),
                            (R, "the update is not scaled: W0 + (alpha / r) B A")):
            if torch.allclose(_candidate(layer, base, alpha=alpha)(x), out, rtol=1e-4, atol=1e-5):
                return text
        cand = _candidate(layer, base)
        directional = base.weight + cand.scaling * cand.lora_B @ cand.lora_A  # W0 + s B A   (out, in)
        wrong_axis = cand.magnitude.view(-1, 1) * directional / directional.norm(dim=0, keepdim=True)
        if torch.allclose(x @ wrong_axis.T + base.bias, out, rtol=1e-4, atol=1e-5):
            return "your norm is taken over the wrong axis: DoRA normalises each output row (dim=1 of W0 + s B A)"
        unnormalised = cand.magnitude.view(-1, 1) * directional
        if torch.allclose(x @ unnormalised.T + base.bias, out, rtol=1e-4, atol=1e-5):
            return "the direction is not normalised: divide W0 + s B A by its row norms before multiplying by m"
    return "compare your forward with W' = m (W0 + s B A) / ||W0 + s B A|| (row norms), then h = W' x + b"
