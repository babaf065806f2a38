"""One readable training loop for every method in nanoPEFT.

Whatever is trainable (LoRA's A and B, DoRA's magnitude, or whole matrices for full fine-tuning) is whatever has
`requires_grad=True`; the loop does not care which method put it there. Each step:

    1. take the next `batch_size` tickets (shuffled once per pass, seeded),
    2. tokenise prompt + answer; the labels are -100 on the prompt and padding, so the loss is only the answer,
    3. forward, cross-entropy on the answer tokens, backward, optimizer step,
    4. record loss, step time and memory, and hand the record to `callback` (e.g. `LiveDisplay`).

On a float16 base (what a T4 computes in) the loss is scaled before the backward: float16 cannot hold numbers
below about 6e-8, so small gradients flowing back through the half-precision layers would round to zero. A
`GradScaler` multiplies the loss by a large factor (2^16 to start), divides the float32 adapter gradients by it
before the step, and skips a step (halving the factor) whenever a gradient overflowed. bfloat16 has float32's
range and needs none of this.

A skipped step is normal at the start: the scaler begins high on purpose, and finds the largest factor that does not
overflow by halving it once per skipped step (on the bundled model, the first step or two). Such a step changes no
weight, so the learning-rate schedule does not advance either (the record says `skipped: True`): a run of `steps`
batches then takes that many optimizer steps less the skipped ones.
"""
from __future__ import annotations

import contextlib

import random
import time

import torch
from tqdm.auto import tqdm

from .data import answer_text, check_examples, prompt_text
from .device import show_progress
from .memory import MemoryMeter, SavedTensors

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips


def encode(tokenizer, examples, device=None) -> dict:
    """Left-padded `input_ids`, `attention_mask` and `labels` for a batch; labels mask out the prompt.

    prompt:  <|im_start|>system ... <|im_start|>user {ticket}<|im_end|> <|im_start|>assistant\n
    answer:  {label}<|im_end|>            <- the only tokens the loss sees

    Padding goes on the left, so every row's answer ends at the last position and the loss needs the logits of the
    last `answer_span + 1` positions only (`keep`): the head (576 x 49152 on SmolLM2) then runs on a handful of
    positions instead of all of them. Rotary position embeddings depend only on relative positions, so the padding
    does not change what the real tokens compute.
    """
    rows = []
    for ex in examples:
        prompt = tokenizer(prompt_text(tokenizer, ex.text), add_special_tokens=False)["input_ids"]
        answer = tokenizer(answer_text(tokenizer, ex.label), add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, len(answer)))
    width = max(len(ids) for ids, _, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # masked anyway
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _, _ in rows])  # (B, T)
    labels = torch.tensor([[IGNORE_INDEX] * (width - len(lab)) + lab for _, lab, _ in rows])  # (B, T)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in rows])  # (B, T)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    batch["keep"] = max(n for _, _, n in rows) + 1  # the last prompt position predicts the first answer token
    return batch


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens: the logit at position t predicts the token at t + 1.

    logits: (B, k, V) for the last k positions; labels: (B, T), of which the last k are used.
    """
    labels = labels[:, -logits.size(1):]  # (B, k)
    logits = logits[:, :-1].float()  # (B, k-1, V)
    targets = labels[:, 1:]  # (B, k-1)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def warmup_linear_decay(optimizer, steps: int, warmup: int | None = None):
    """The usual fine-tuning schedule: the learning rate rises linearly over `warmup` steps (default 10% of
    `steps`), then falls linearly to zero at the last step. Ending at a small rate keeps the last steps from
    undoing what the earlier ones learned."""
    warmup = max(1, steps // 10) if warmup is None else warmup

    def factor(step):  # step counts optimizer steps already taken: 0, 1, ...
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(model, tokenizer, examples, steps: int, optimizer, batch_size: int = 8, seed: int = 0,
          callback=None, progress: bool | None = None, max_grad_norm: float | None = 1.0,
          schedule: bool = True, desc: str = "training") -> list:
    """Train whatever in `model` requires grad for `steps` optimizer steps; return one record per step.

    schedule: warm up and then decay the optimizer's learning rates (`warmup_linear_decay`); False keeps them fixed.

    Each record: `step`, `loss`, `step_time` (seconds, forward + backward + optimizer step), `lr`, `skipped` (True
    when the float16 loss scaler found an overflow and skipped the optimizer step, see the module docstring), `scale`
    (the loss scale, 1.0 without float16) and `memory` (bytes per counted part, the activations saved for the step,
    and the device's peaks: `MemoryMeter.step`).
    """
    examples = check_examples(examples)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "The model has no trainable parameters: every parameter has requires_grad=False. Add adapters first "
            "(nanopeft.add_adapters(model, ...)) or unfreeze the weights you want to train."
        )
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in in_optimizer for p in trainable):
        raise ValueError("The optimizer holds none of the model's trainable parameters: build it after adding "
                         "adapters, from the model's trainable parameters.")
    half = [p for p in trainable if p.dtype == torch.float16]
    if half:
        raise ValueError(f"{len(half)} trainable tensors are float16: updates smaller than their rounding would be "
                         f"lost, and the loss scaler refuses them. Keep trainable weights in float32 (adapters are); "
                         f"for full fine-tuning, load the model in float32 or bfloat16.")

    device = next(model.parameters()).device
    # loss scaling only where the frozen base computes in float16 (see the module docstring)
    fp16 = any(p.dtype == torch.float16 for p in model.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    rng = random.Random(seed)
    order, cursor = [], 0
    history = []
    model.train()
    scheduler = warmup_linear_decay(optimizer, steps) if schedule else None
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not show_progress() if progress is None else not progress)
    with MemoryMeter(model, optimizer, device) as meter:
        for step in bar:
            # 1. next batch, reshuffling at the start of every pass over the data
            batch_examples = []
            while len(batch_examples) < batch_size:
                if cursor == len(order):
                    order, cursor = list(range(len(examples))), 0
                    rng.shuffle(order)
                batch_examples.append(examples[order[cursor]])
                cursor += 1
            batch = encode(tokenizer, batch_examples, device)

            # 2-3. forward on the answer tokens only, backward, step
            scale = scaler.get_scale()  # 1.0 when the scaler is off
            loss, saved, step_time = training_step(model, batch, optimizer, scaler, trainable, max_grad_norm)
            skipped = scaler.get_scale() < scale  # the scaler halves its factor exactly when it skipped the step
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used (or would have)
            if scheduler is not None and not skipped:  # a skipped step moved nothing: the schedule waits for it
                scheduler.step()

            # 4. record, with the gradients still alive (that is when memory peaks)
            record = {"step": step, "loss": loss, "step_time": step_time, "lr": lr, "skipped": skipped,
                      "scale": scale, "memory": meter.step(saved), "last": step == steps}
            optimizer.zero_grad(set_to_none=True)
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if callback is not None:
                callback(record)
    model.eval()
    return history


def training_step(model, batch: dict, optimizer, scaler, trainable: list, max_grad_norm: float | None = 1.0):
    """One step: forward on the answer positions (counting the bytes autograd saves), backward (with the loss
    scaled where the scaler is on), clip, optimizer step. Returns (loss, saved bytes, seconds); the gradients are
    left in place (the caller records memory, then zeroes them)."""
    device = batch["input_ids"].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with SavedTensors(model) as saved:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=batch["keep"]).logits  # (B, keep, V)
        loss = answer_loss(logits, batch["labels"])
    scaler.scale(loss).backward()
    if max_grad_norm is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    scaler.step(optimizer)  # skipped if a gradient overflowed (float16 only)
    scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss.item(), saved.nbytes, time.perf_counter() - start


def summarize(history: list) -> dict:
    """Mean step time (skipping the first, warm-up step when there are more), first and last loss, peak memory."""
    times = [r["step_time"] for r in history]
    steady = times[1:] if len(times) > 1 else times
    return {
        "steps": len(history),
        "first loss": history[0]["loss"],
        "last loss": history[-1]["loss"],
        "mean step time": sum(steady) / len(steady),
        "peak memory": max(r["memory"]["peak"] for r in history),
        "peak memory kind": history[-1]["memory"]["kind"],
        "activations": max(r["memory"]["activations"] for r in history),
    }


def forward_backward(model, batch: dict, count_saved: bool = True):
    """One forward pass on the answer positions and one backward, as in `train`; returns (loss, the bytes autograd
    saved for the backward: the activations, counted exactly by `memory.SavedTensors`). count_saved=False skips the
    counting (a Python call per saved tensor, which timed steps should not pay) and returns None for the bytes."""
    with SavedTensors(model) if count_saved else contextlib.nullcontext() as saved:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=batch["keep"]).logits
        loss = answer_loss(logits, batch["labels"])
    loss.backward()
    return loss.detach(), saved.nbytes if count_saved else None
