"""What each process holds when training is spread over several: measured, drawn, and what can go wrong.

    held_bytes(model, optimizer)     bytes this rank holds of weights, gradients and optimizer state (shards only)
    RankTensors(model, optimizer)    LiveTensors for one rank: the peak of the tensors alive during a step
    cast_damage(layer, dtype)        what a cast does to NF4 codes kept in a float quant storage
    draw_who_holds_what(summaries)   DDP against FSDP2, rank by rank, from the summaries of a run
    accelerate_config()              the accelerate config file for FSDP2 on one machine with N GPUs

Under FSDP2 every parameter is a DTensor: one tensor to the program, of which each rank stores a shard (rows
rank * n/N ... of dim 0, `to_local()`); `numel()` gives the whole tensor's size, so the bytes a rank really holds are
counted from the local shards.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch.distributed.tensor import DTensor

from ..nf4 import dequantize_nf4
from ..qlora import LinearNF4, storage_view
from .memory import COUNTED, LiveTensors, tensor_breakdown

STRATEGY_TITLES = {"single": "one process", "ddp": "DDP", "fsdp": "FSDP2"}


def local(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of t: a DTensor's own shard, else t."""
    return t.to_local() if isinstance(t, DTensor) else t


def held_bytes(model, optimizer) -> dict:
    """Bytes this rank holds in each part of memory.COUNTED: a DTensor counts as its local shard."""
    return tensor_breakdown(model, optimizer, view=local)


class RankTensors(LiveTensors):
    """`nanopeft.lab.memory.LiveTensors` for one rank: a DTensor counts as its local shard, and a storage counts at its
    current size. FSDP2 frees a layer's all-gathered weights by resizing their storage to 0 bytes, and grows the same
    storage again for the next all-gather, so counting each storage at the size it was created with would count every
    layer's gathered weights at once. Counted sizes can only be too large, never too small: whenever the count reaches
    a new peak, every live storage's size is read again before the peak is recorded."""

    def __init__(self, *objects):
        self._sizes = {}  # storage key -> the bytes it is counted at
        super().__init__(*objects)

    def _count(self, t):
        storage = local(t).untyped_storage()
        key = storage._cdata
        with self._lock:
            if key not in self._refs:
                self._refs[key] = weakref.ref(storage, functools.partial(self._freed, key))
                self._sizes[key] = 0
            self._resize(key, storage.nbytes())
            if self.live > self.peak:  # a candidate peak: read every size again, then record it if it stands
                for k, ref in list(self._refs.items()):
                    alive = ref()
                    if alive is not None:
                        self._resize(k, alive.nbytes())
                if self.live > self.peak:
                    self.peak, self.peak_phase = self.live, self.phase
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.live)

    def _resize(self, key, size):
        self.live += size - self._sizes[key]
        self._sizes[key] = size

    def _freed(self, key, ref):
        with self._lock:
            if self._refs.get(key) is ref:
                del self._refs[key]
                self.live -= self._sizes.pop(key)


# ------------------------------------------------------------------------------------------- the quant-storage pitfall
@torch.no_grad()
def cast_damage(layer: LinearNF4, dtype: torch.dtype) -> dict:
    """What casting a LinearNF4's float quant storage to `dtype` does to its 4-bit codes, two ways:

        read as bytes: the cast numbers' bytes decoded as codes: what a layer would compute from if an FSDP
                       MixedPrecisionPolicy all-gathered it in `dtype` and nothing checked (LinearNF4 refuses);
        round trip:    cast to `dtype` and back to the storage dtype, as model.to(dtype) and back would.

    For each: the share of the packed bytes that changed, and ||W' - W|| / ||W|| of the dequantized weight.
    """
    if layer.quant_storage == torch.uint8:
        raise ValueError("This LinearNF4 keeps its codes in a uint8 buffer, which no float cast touches: quantize with "
                         "quant_storage=torch.bfloat16 to see what a cast does to a float quant storage.")
    stored = layer.weight.detach()  # (bytes / itemsize, 1): the codes, seen as numbers
    packed = storage_view(stored, torch.uint8)  # (bytes, 1) uint8
    reference = layer.dequantize(torch.float32)  # (out, in)
    cast = stored.to(dtype)  # a numeric cast: each number rounded to its nearest in `dtype`
    ways = {"read as bytes": cast.view(torch.uint8).reshape(-1)[: packed.numel()].view(-1, 1),  # float32: 2x bytes
            "round trip": storage_view(cast.to(stored.dtype), torch.uint8)}
    out = {}
    for way, damaged in ways.items():
        q = layer.quantized
        q.packed = damaged
        w = dequantize_nf4(q, torch.float32)
        out[f"bytes changed, {way}"] = (damaged != packed).float().mean().item()
        out[f"weight error, {way}"] = ((w - reference).norm() / reference.norm()).item()
    return out


# ------------------------------------------------------------------------------------------------------- pictures
def draw_who_holds_what(summaries: dict):
    """One panel per method, one row per rank of each strategy; along a row the four parts of memory.COUNTED, each
    box as wide as the whole part (what one process holds), coloured where this rank holds it: DDP colours every box
    on every rank, FSDP2 rank r's 1/N of it (a little more: buffers such as NF4's absmax are not sharded). From
    `launch`'s summaries ({"ddp-lora": [rank 0, rank 1], ...}); returns the figure."""
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(runs[0]["method"] for runs in summaries.values()))
    rows = {m: [s for runs in summaries.values() for s in sorted(runs, key=lambda s: s["rank"]) if s["method"] == m]
            for m in methods}
    fig, axes = plt.subplots(len(methods), 1, figsize=(10, 0.45 * sum(map(len, rows.values())) + 1.4 * len(methods)),
                             squeeze=False)
    colours = dict(zip(COUNTED, ("#9aa5b1", "#2f80ed", "#f2994a", "#27ae60")))
    for ax, method in zip(axes[:, 0], methods):
        whole = {part: max(s["held"][part] for s in rows[method]) for part in COUNTED}  # what one rank of DDP holds
        for y, s in enumerate(rows[method]):
            left = 0
            for part in COUNTED:
                held, size = s["held"][part], whole[part]
                start = left + s["rank"] * (size - held) / max(1, s["world"] - 1)  # rank 0 from the left, N-1 right
                ax.barh(y, size, left=left, color="none", edgecolor="#555", linewidth=0.8)
                ax.barh(y, held, left=start, color=colours[part], label=part if y == 0 else None)
                left += size
        ax.set_yticks(range(len(rows[method])),
                      [f"{STRATEGY_TITLES[s['strategy']]}, rank {s['rank']}" for s in rows[method]])
        ax.invert_yaxis()
        ticks = [sum(whole[p] for p in COUNTED[:i]) for i in range(len(COUNTED) + 1)]
        ax.set_xticks(ticks, [f"{t / 2 ** 10:.0f}" for t in ticks])
        ax.set_title(f"{method}: what each rank holds after a training step (measured, KiB)", fontsize=10)
    axes[0, 0].legend(loc="lower center", bbox_to_anchor=(0.5, 1.15), ncol=4, frameon=False)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ accelerate's config
def accelerate_config(num_processes: int = 2, layer: str = "LlamaDecoderLayer", mixed_precision: str = "bf16") -> str:
    """The text of an accelerate config file for FSDP2 on one machine with `num_processes` GPUs, commented; what
    `accelerate launch --config_file FILE train.py` reads (examples/accelerate_fsdp.yaml is this text)."""
    return f"""\
# FSDP2 on one machine with {num_processes} GPUs: accelerate launch --config_file accelerate_fsdp.yaml train.py
# (written by nanopeft.lab.sharding.accelerate_config; lesson 08 explains each field)
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: {mixed_precision}  # FSDP2's param_dtype: every parameter gathered in it, 4-bit quant_storage too
num_machines: 1
machine_rank: 0
num_processes: {num_processes}  # one process per GPU
main_training_function: main
rdzv_backend: static
same_network: true
use_cpu: false
fsdp_config:
  fsdp_version: 2  # fully_shard: each parameter sharded on its own, frozen and trainable side by side
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: {layer}  # one group per decoder layer, gathered while it runs
  fsdp_reshard_after_forward: true  # free a layer's gathered weights after its forward (gather again for backward)
  fsdp_offload_params: false
  fsdp_state_dict_type: FULL_STATE_DICT  # whole tensors on rank 0 when saving: an adapter peft loads
  fsdp_cpu_ram_efficient_loading: true  # rank 0 reads the weights, the others receive them (not for bnb 4-bit)
  fsdp_activation_checkpointing: true  # recompute each decoder layer in the backward (non-reentrant)
"""
