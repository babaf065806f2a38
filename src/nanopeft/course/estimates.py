"""Memory, computed: the bytes each way of fine-tuning holds per parameter, and what that makes at 7B and 65B.

The articles learners read quote "~28 GB for 7B full fine-tuning in fp16" and "~14 GB for 7B LoRA". Those are
weights (and gradients) only. What training holds, per parameter, before activations:

    full fine-tuning, float32 + AdamW         4 weight + 4 gradient + 8 (two moments)             = 16 bytes
    full fine-tuning, mixed precision + AdamW 2 half weight + 2 half gradient + 4 float32 master
                                              copy + 8 (two float32 moments)                       = 16 bytes
    ... with 8-bit AdamW (bitsandbytes)       2 + 2 + 4 + 2 (two 8-bit moments)                    = 10 bytes
    LoRA on a 16-bit base                     2 per frozen weight, + 16 per adapter parameter (float32
                                              weight, gradient and two moments)
    QLoRA                                     4.127 bits per quantized weight (NF4 + double quantization),
                                              2 bytes per weight kept in 16 bits (embeddings, norms), + 16 per
                                              adapter parameter

A paged optimizer (bitsandbytes' paged AdamW, QLoRA's third idea) does not make the optimizer state smaller: its
pages move to CPU memory when the GPU runs out, which turns the memory spike of a long batch into a slowdown
instead of an out-of-memory error. Activations are left out of all of these: they grow with batch size and sequence
length (notebook 00 measures them), and gradient checkpointing trades most of them for recomputation.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..lab.planner import plan

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + a float32 scale per 256 blocks: 4.127
ADAM_FP32 = 8  # two float32 moments per trained parameter
ADAM_8BIT = 2  # two 8-bit moments (block-wise quantized, bitsandbytes)


@dataclass(frozen=True)
class Architecture:
    """A Llama-style decoder: enough to count its parameters and its LoRA parameters."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_hidden: int | None = None  # grouped-query attention: the k/v projection width (None: = hidden)
    tied: bool = False  # the head shares the embedding table

    def linear_shapes(self) -> list:
        """(in, out) of every linear layer of one decoder layer: q, k, v, o, gate, up, down."""
        kv = self.kv_hidden or self.hidden
        h, m = self.hidden, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes())

    @property
    def other_params(self) -> int:
        """Embeddings, the head (if not tied) and the norms: what QLoRA leaves in 16 bits."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int) -> int:
        """A and B of rank r on every linear layer of every decoder layer ("all-linear")."""
        return self.layers * sum(r * (i + o) for i, o in self.linear_shapes())


LLAMA_7B = Architecture("Llama-2 7B", hidden=4096, intermediate=11008, layers=32, vocab=32000)
LLAMA_65B = Architecture("LLaMA 65B", hidden=8192, intermediate=22016, layers=80, vocab=32000)
SMOLLM2_135M = Architecture("SmolLM2-135M", hidden=576, intermediate=1536, layers=30, vocab=49152, kv_hidden=192,
                            tied=True)


def training_memory(arch: Architecture, method: str, r: int = 8) -> dict:
    """Bytes held for training `arch` by `method` (before activations), by part, and their total.

    method: "full-fp32", "full-mixed", "full-mixed-8bit-adam", "lora-16bit", "qlora"."""
    n = arch.params
    if method.startswith("full"):
        weights, grads = (4 * n, 4 * n) if method == "full-fp32" else (2 * n, 2 * n)
        master = 0 if method == "full-fp32" else 4 * n
        optimizer = (ADAM_8BIT if method.endswith("8bit-adam") else ADAM_FP32) * n
        parts = {"weights": weights, "float32 master copy": master, "gradients": grads, "optimizer state": optimizer}
    elif method in ("lora-16bit", "qlora"):
        a = arch.lora_params(r)
        frozen = 2 * n if method == "lora-16bit" else arch.linear_params * NF4_BITS / 8 + 2 * arch.other_params
        parts = {"weights": frozen, "adapters (float32)": 4 * a, "gradients": 4 * a, "optimizer state": ADAM_FP32 * a}
    else:
        raise ValueError(f"Unknown method {method!r}.")
    return {**parts, "total": sum(parts.values())}


def gb(n_bytes: float) -> float:
    return n_bytes / 1e9


# The seed article "Unlocking Efficient LLM Fine-Tuning: LoRA, QLoRA, and DoRA Compared": its memory table (GB), the
# QLoRA paper's Figure 6 totals for the same models (MB: QLoRA, batch 1, with its paged optimizer), and the
# planner's presets for them.
SEED_MODELS = {"7B": "llama-2-7b", "13B": "llama-2-13b", "33B": "llama-33b", "65B": "llama-65b"}
SEED_TABLE = {"full-mixed": {"7B": 28, "13B": 52, "33B": 130, "65B": 260},
              "lora": {"7B": 14, "13B": 26, "33B": 65, "65B": 130},
              "qlora": {"7B": 5, "13B": 8, "33B": 20, "65B": 48},
              "dora": {"7B": 14, "13B": 26, "33B": 65, "65B": 130}}
SEED_WORDS = {"full-mixed": "Full fine-tuning (fp16)", "lora": "LoRA (fp16)", "qlora": "QLoRA (NF4)",
              "dora": "DoRA (fp16)"}
QLORA_FIGURE_6_MB = {"7B": 5046, "13B": 8476, "33B": 19302, "65B": 37074}
LLAMAFACTORY = {"full-mixed": 18, "lora": 2, "dora": 2, "qlora": 0.5}  # GB per billion parameters
SEED_SETUP = dict(r=8, batch=1, seq=512, checkpointing=True, dtype="bfloat16", optimizer="adamw", device="a100-80")


def seed_memory_rows() -> list:
    """The seed article's memory table beside the planner (SEED_SETUP, on a GPU), the QLoRA paper's Figure 6 and
    LLaMA-Factory's rule: one dict per (method, model)."""
    rows = []
    for method, sizes in SEED_TABLE.items():
        for size, article in sizes.items():
            p = plan(SEED_MODELS[size], method, advise=False, **SEED_SETUP)
            billions = int(size.rstrip("B"))
            rows.append({"method": method, "model": size, "article_gb": article, "planned_gb": p.peak_bytes / 1e9,
                         "moment": p.moment, "parts": p.parts,
                         "figure_6_gb": QLORA_FIGURE_6_MB[size] / 1e3 if method == "qlora" else None,
                         "llamafactory_gb": LLAMAFACTORY[method] * billions})
    return rows
