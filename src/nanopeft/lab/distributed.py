"""Training adapters on several processes with PyTorch's own engine: DDP and FSDP2, started by torchrun.

    torchrun --nproc_per_node 2 -m nanopeft.lab.distributed --strategy fsdp --method qlora --model tiny

torchrun starts N copies of this program (ranks 0 .. N-1) and gives each its RANK and WORLD_SIZE; the copies join one
process group (gloo on CPUs, NCCL on GPUs, chosen here) and from then on talk only through collectives. This is data
parallelism: every rank builds the same model, runs it on its own rows of each global batch, and the gradients are
averaged over the ranks before the optimizer step, so every rank takes the step one process would take on the whole
batch.

    DDP   (DistributedDataParallel) every rank holds the whole model, the adapters' gradients and their optimizer
          state; after the backward the gradients of what trains (the adapters only) are all-reduced.
    FSDP2 (`fully_shard`) every rank holds 1/N of every parameter (a DTensor shard: rows rank * n/N ... of dim 0), of
          its gradient and of its optimizer state. Before a decoder layer runs, its parameters are all-gathered, and
          freed after; the gradients are reduce-scattered, each rank keeping the 1/N it updates.

nanoPEFT adds only what its own layers need: a loss weighted so that the average over ranks is the mean over the
global batch (`token_loss`), gradient checkpointing of the non-reentrant kind, the NF4 base kept as bfloat16 numbers
so that FSDP shards it (`quantize_model(..., quant_storage=torch.bfloat16)`), and one adapter file gathered from the
shards. `train_single` runs the same training in one process: tests/test_distributed.py checks that both give the
same adapters, and `launch` starts torchrun from Python (a notebook, a test).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..adapters import add_adapters
from ..peft_format import save_adapter
from ..qlora import LinearNF4, prepare_for_kbit_training, quantize_model
from .data import evaluate, load_task
from .device import DTYPES, quiet_upstream_warnings
from .memory import fmt_bytes
from .models import load_base_model, tiny_llama
from .sharding import RankTensors, held_bytes
from .train import IGNORE_INDEX, encode, warmup_linear_decay

# what each --method trains: (the adapter method, whether the frozen base is stored in NF4)
METHOD_CHOICES = {"lora": ("lora", False), "dora": ("dora", False), "qlora": ("lora", True), "qdora": ("dora", True)}
STRATEGIES = ("ddp", "fsdp", "single")  # single: one process, no wrapper (what the other two must equal)
# AdamW divides each entry's step by the root of its own running mean square, so the last bits of a near-zero gradient
# can move a weight by a share of the learning rate; SGD with momentum moves it in proportion to the gradient, which
# lets tests/test_distributed.py bound how far two runs' weights may drift apart from float32 arithmetic alone.
RANK_OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)}


@dataclass
class RunConfig:
    strategy: str = "ddp"  # "ddp", "fsdp", or "single" (one process, no process group needed)
    method: str = "lora"  # a name in METHOD_CHOICES
    model: str = "tiny"  # "tiny": a random 2-layer Llama on random tokens (fast); "bundled": SmolLM2-135M, ticket task
    steps: int = 3  # optimizer steps
    batch: int = 8  # the global batch, in rows: each of N ranks trains on batch / N of them
    checkpointing: bool = False  # recompute each decoder layer's activations in the backward instead of keeping them
    lr: float = 1e-3  # the optimizer's, warmed up and decayed as in nanopeft.lab.train
    optimizer: str = "adamw"  # "adamw"; or "sgd" (momentum 0.9), whose update is linear in the gradient (the tests)
    r: int = 8
    alpha: float = 16
    max_grad_norm: float = 1.0  # clip the global gradient norm (over all ranks' shards) to this
    param_dtype: str | None = None  # FSDP2 only: gather and compute the weights in "bfloat16" or "float16"
    seed: int = 0
    device: str = "auto"  # "auto": one GPU per rank (LOCAL_RANK) where CUDA is present, else the CPU; or "cpu"
    eval_tickets: int = 0  # bundled model: score this many test tickets at the end (every rank scores the same ones)
    out: str | None = None  # a folder: the adapter (rank 0), summary-rank<r>.json from every rank, trace.pt
    trace: bool = False  # write trace.pt: adapter weights and gradients at every step, gathered whole (the tests)


# ------------------------------------------------------------------------------------------------ the model and data
def build_model(c: RunConfig):
    """(model, tokenizer or None). Every rank builds the same model from the same seed: FSDP2 shards the copy each
    rank already holds and does not broadcast rank 0's (DDP does)."""
    model, tokenizer = (tiny_llama(seed=c.seed), None) if c.model == "tiny" else load_base_model()
    method, four_bit = METHOD_CHOICES[c.method]
    if four_bit:
        # FSDP shards parameters, never buffers: stored as bfloat16 numbers in a frozen parameter, the NF4 bytes are
        # sharded like any weight (bitsandbytes' quant_storage); as a uint8 buffer each rank would keep them whole.
        quantize_model(model, quant_storage=torch.bfloat16 if c.strategy == "fsdp" else torch.uint8)
    # Freezes the base, and with checkpointing recomputes each decoder layer in the backward, the non-reentrant kind
    # (use_reentrant=False), which works under DDP and FSDP2 alike. The reentrant kind runs its own backward inside
    # the outer one: under DDP with find_unused_parameters=True it fails ("Expected to mark a variable ready only
    # once"), and it computes no gradient at all unless its inputs require grad, which the output of a frozen
    # embedding table does not (transformers switches that on for it: enable_input_require_grads).
    prepare_for_kbit_training(model, gradient_checkpointing=c.checkpointing)
    torch.manual_seed(c.seed)  # the adapters' random A: the same draws on every rank and in one process
    add_adapters(model, method, r=c.r, alpha=c.alpha, targets="all-linear")
    model.config.use_cache = False
    return model, tokenizer


def batches(c: RunConfig, tokenizer):
    """The global batches, the same on every rank (each then takes its own rows): dicts of input_ids, attention_mask,
    labels (B, T) and `keep`, the positions whose logits the loss needs."""
    if c.model == "tiny":
        for step in range(c.steps):
            g = torch.Generator().manual_seed(c.seed * 1000 + step)
            ids = torch.randint(0, 256, (c.batch, 32), generator=g)  # (B, T) random tokens
            labels = ids.clone()
            # a "prompt" of random length in each row is left out of the loss, so rows (and ranks) hold different
            # numbers of counted tokens, as the tickets' answers do
            prompt = torch.randint(0, 24, (c.batch, 1), generator=g)  # (B, 1)
            labels[torch.arange(32) < prompt] = IGNORE_INDEX
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "keep": 32}
    else:  # the ticket task, shuffled once per pass as nanopeft.lab.train does
        examples, rng, order = load_task().train, random.Random(c.seed), []
        for _ in range(c.steps):
            rows = []
            while len(rows) < c.batch:
                if not order:
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                rows.append(examples[order.pop()])
            yield encode(tokenizer, rows)  # padded to the longest row of the global batch: the same on every rank


def token_loss(model, batch: dict):
    """(the sum of the cross-entropy over this rank's counted tokens, how many there are). Position t predicts t+1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=batch["keep"]).logits  # (b, keep, V)
    targets = batch["labels"][:, -logits.size(1):][:, 1:]  # (b, keep - 1)
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


# ---------------------------------------------------------------------------------------------------- one run
def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor: a DTensor's shards all-gathered (a collective: every rank must call it), else t itself."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone().cpu()


def train_rank(c: RunConfig) -> dict:
    """Train one configuration; every rank of the group calls it. Returns this rank's summary (losses, step times,
    bytes held, peak), with `trace` also "trace" and "model" (the model itself, unwrapped)."""
    if c.strategy not in STRATEGIES or c.method not in METHOD_CHOICES or c.model not in ("tiny", "bundled"):
        raise ValueError(f"strategy {c.strategy!r}, method {c.method!r}, model {c.model!r}: choose from "
                         f"{STRATEGIES}, {tuple(METHOD_CHOICES)} and ('tiny', 'bundled').")
    if c.optimizer not in RANK_OPTIMIZERS:
        raise ValueError(f"optimizer {c.optimizer!r}: choose from {tuple(RANK_OPTIMIZERS)}.")
    if c.param_dtype and (c.strategy != "fsdp" or c.param_dtype not in ("bfloat16", "float16")):
        raise ValueError(f"--param-dtype {c.param_dtype} is FSDP2's mixed precision: bfloat16 or float16 with "
                         f"--strategy fsdp only.")
    distributed = c.strategy != "single"
    if distributed and not dist.is_initialized():
        raise RuntimeError(f"--strategy {c.strategy} needs a process group: start it with torchrun --nproc_per_node N "
                           f"-m nanopeft.lab.distributed ..., or use --strategy single.")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if c.batch % world:
        raise ValueError(f"--batch {c.batch} does not split into {world} equal parts: use a multiple of {world}.")
    cuda = torch.cuda.is_available() and c.device == "auto"
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    model, tokenizer = build_model(c)
    model.to(device).train()
    if c.strategy == "ddp":  # broadcasts rank 0's weights, then all-reduces the gradients of what trains
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif c.strategy == "fsdp":  # one group per decoder layer, then the rest (embeddings, norm, head) at the root
        # mixed precision: every parameter of a group, the NF4 codes' bfloat16 storage included, is all-gathered in
        # param_dtype (a cast); gradients are reduced in float32 and the shards the optimizer updates stay float32
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[c.param_dtype] if c.param_dtype else None,
                                      reduce_dtype=torch.float32 if c.param_dtype else None)
        for layer in model.model.layers:  # (accelerate's TRANSFORMER_BASED_WRAP does the same)
            fully_shard(layer, mp_policy=policy)
        wrapped = fully_shard(model, mp_policy=policy)
    else:
        wrapped = model
    trainable = [p for p in model.parameters() if p.requires_grad]  # under FSDP2: DTensor shards, made after sharding
    optimizer = RANK_OPTIMIZERS[c.optimizer](trainable, lr=c.lr)
    scheduler = warmup_linear_decay(optimizer, c.steps)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    b = c.batch // world
    losses, times, trace = [], [], {"grads": [], "weights": []}
    meter = RankTensors(model, optimizer)
    for step, batch in enumerate(batches(c, tokenizer), start=1):
        shard = {k: v[rank * b:(rank + 1) * b].to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        # the first step only under the meter: it sees every operation, which slows a step (the others are timed)
        with meter if step == 1 else contextlib.nullcontext():
            start = time.perf_counter()
            meter.phase = "forward"
            loss_sum, count = token_loss(wrapped, shard)
            stats = torch.stack([loss_sum.detach(), count.to(loss_sum.dtype)])  # (2,) this rank's sum and count
            if distributed:
                dist.all_reduce(stats)  # summed over the ranks: the whole batch's
            # DDP and FSDP average the gradients over the N ranks: (1/N) sum_r grad(loss_r). With loss_r = N * (sum of
            # rank r's token losses) / (counted tokens in the whole batch), that average is the gradient of the mean
            # over the whole batch, what one process computes on the concatenated rows, even where ranks hold
            # different numbers of counted tokens (each rank's own mean would weight its tokens by 1 / its count).
            meter.phase = "backward"
            (loss_sum * world / stats[1]).backward()
            if c.trace:
                trace["grads"].append({n: whole(p.grad) for n, p in zip(names, trainable)})
            meter.phase = "optimizer step"
            torch.nn.utils.clip_grad_norm_(trainable, c.max_grad_norm)  # the norm over all shards (DTensor: FSDP2)
            optimizer.step()
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        if step == 1:
            held = held_bytes(model, optimizer)  # after the step: gradients and optimizer state alive
        optimizer.zero_grad(set_to_none=True)
        losses.append((stats[0] / stats[1]).item())  # the mean over the global batch, the same on every rank
        if c.trace:
            trace["weights"].append({n: whole(p) for n, p in zip(names, trainable)})
        if rank == 0:
            print(f"[{c.strategy} {c.method}] step {step}/{c.steps}  loss {losses[-1]:.4f}  {times[-1]:.3f} s",
                  flush=True)

    summary = {"rank": rank, "world": world, "device": str(device), **dataclasses.asdict(c), "losses": losses,
               "step_times": times, "mean_step_time": sum(times[1:] or times) / len(times[1:] or times),
               "held": held, "peak": meter.peak, "peak_phase": meter.peak_phase}
    if c.eval_tickets and c.model == "bundled":  # every rank the same tickets: under FSDP each forward is a collective
        summary["accuracy"] = evaluate(model, tokenizer, load_task().test[:c.eval_tickets])
    print(f"rank {rank}/{world} [{c.strategy} {c.method}] final loss {losses[-1]:.4f} | "
          f"{summary['mean_step_time']:.3f} s/step | holds " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in held.items())
          + f" | peak of live tensors (step 1) {fmt_bytes(meter.peak)} in the {meter.peak_phase}"
          + (f" | accuracy {summary['accuracy']:.3f}" if "accuracy" in summary else ""), flush=True)
    finish(c, model, rank, summary, trace)
    return summary


def finish(c: RunConfig, model, rank: int, summary: dict, trace: dict) -> None:
    """Write the adapter (rank 0), each rank's summary and, with `trace`, trace.pt. Under FSDP2 the adapters are
    gathered whole first (`full_tensor()`, in float32 whatever the mixed precision: a collective every rank takes part
    in) and loaded into an unsharded copy of the model, which rank 0 saves in peft's format."""
    trained = {n: whole(p) for n, p in model.named_parameters() if p.requires_grad}
    if c.trace:  # the NF4 bytes as a forward sees them: every group unsharded (all-gathered), then sharded again
        groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for g in groups:
            g.unshard()
        nf4 = {n: m for n, m in model.named_modules() if isinstance(m, LinearNF4)}
        trace["packed"] = {n: m.quantized.packed.detach().clone().cpu() for n, m in nf4.items()}  # viewed as uint8
        trace["dequantized"] = {n: m.dequantize(torch.float32).detach().cpu() for n, m in nf4.items()}
        for g in groups:
            g.reshard()
        summary["trace"], summary["model"] = trace, model
    if c.out:
        folder = Path(c.out) / f"{c.strategy}-{c.method}"
        folder.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            plain = model
            if c.strategy == "fsdp":  # the same model built again, unsharded, given the trained adapters
                plain, _ = build_model(c)
                missing, unexpected = plain.load_state_dict(trained, strict=False)
                assert not unexpected and not set(trained) & set(missing), (unexpected, missing)
            save_adapter(plain, folder)
            if c.trace:
                torch.save(trace, folder / "trace.pt")
        (folder / f"summary-rank{rank}.json").write_text(json.dumps(
            {k: v for k, v in summary.items() if k not in ("trace", "model")}, indent=1) + "\n")


def train_single(**fields) -> dict:
    """The same training in one process on the whole batch, no process group: the reference the tests compare with."""
    return train_rank(RunConfig(**{**fields, "strategy": "single"}))


# ---------------------------------------------------------------------------------------------- launching
def launch(nproc: int, out, *args: str, timeout: float = 600) -> tuple:
    """Run `torchrun --standalone --nproc_per_node nproc -m nanopeft.lab.distributed --out out *args` on this
    machine's CPUs (CUDA hidden) and return (what it printed, the summaries it wrote: a list per configuration)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "nanopeft.lab.distributed", "--out", str(out), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if done.returncode:
        raise RuntimeError(f"torchrun exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summaries = {}
    for path in sorted(Path(out).glob("*/summary-rank*.json")):
        summaries.setdefault(path.parent.name, []).append(json.loads(path.read_text()))
    return done.stdout, summaries


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m nanopeft.lab.distributed",
                                description="Train adapters under DDP or FSDP2 (see the module's docstring).")
    p.add_argument("--strategy", default="ddp", help="ddp, fsdp or single; several, comma-separated, run in turn")
    p.add_argument("--method", default="lora", help="lora, dora, qlora or qdora; several, comma-separated, run in turn")
    p.add_argument("--model", default="tiny", choices=("tiny", "bundled"))
    p.add_argument("--steps", type=int, default=RunConfig.steps)
    p.add_argument("--batch", type=int, default=RunConfig.batch, help="the global batch (rows over all ranks)")
    p.add_argument("--lr", type=float, default=RunConfig.lr)
    p.add_argument("--optimizer", default=RunConfig.optimizer, choices=tuple(RANK_OPTIMIZERS))
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    p.add_argument("--param-dtype", default=None, help="FSDP2 mixed precision: bfloat16 or float16")
    p.add_argument("--eval-tickets", type=int, default=0, help="bundled model: test tickets to score at the end")
    p.add_argument("--out", default=None, help="folder for the adapters, summaries (and traces)")
    p.add_argument("--trace", action="store_true", help="write trace.pt: weights and gradients at every step")
    args = p.parse_args(argv)
    quiet_upstream_warnings()
    strategies, methods = args.strategy.split(","), args.method.split(",")
    group = "RANK" in os.environ  # started by torchrun
    if group:
        backend = "nccl" if torch.cuda.is_available() else "gloo"  # NCCL talks GPU to GPU; gloo runs on CPUs
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)  # RANK, WORLD_SIZE, MASTER_ADDR/PORT come from torchrun's environment
        if dist.get_rank() == 0:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            print(f"{dist.get_world_size()} processes, backend {backend}, device {device}, "
                  f"{torch.get_num_threads()} threads each", flush=True)
    try:
        for strategy in strategies:
            for method in methods:
                fields = {k: v for k, v in vars(args).items() if k not in ("strategy", "method")}
                train_rank(RunConfig(strategy=strategy, method=method, **fields))
    finally:
        if group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
