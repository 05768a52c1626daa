from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import OPTConfig, OPTForCausalLM

from core.config import ModelConfig
from core.errors import FailedPrecondition, InvalidRequest, NotFound, Unsupported
from core.host import gguf_cache
from core.host.host_model import SamplingParams
from core.host.loading import load_host_model
from core.host.smoke_models import build_smoke_model


@pytest.mark.parametrize("name", ["tiny-random", "tiny-random-neox"])
def test_smoke_models_are_identical_on_every_build(name):
    (model_a, tok_a), (model_b, tok_b) = build_smoke_model(name), build_smoke_model(name)
    assert tok_a.get_vocab() == tok_b.get_vocab() and len(tok_a) == 512
    state_b = model_b.state_dict()
    assert all(torch.equal(v, state_b[k]) for k, v in model_a.state_dict().items())
    rng_before = torch.random.get_rng_state()
    build_smoke_model(name)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # the global RNG is left alone


def test_smoke_tokenizer_round_trips_any_text(tiny_gemma):
    text = "Ünïcode ✓ and code: def f(x): return x ** 2"
    ids = tiny_gemma.encode(text)
    assert int(ids[0, 0]) == tiny_gemma.tokenizer.bos_token_id
    assert tiny_gemma.decode(ids[0]) == text


def test_local_directory_loads_the_same_model(tmp_path, tiny_host):
    tiny_host.model.save_pretrained(tmp_path)
    tiny_host.tokenizer.save_pretrained(tmp_path)
    loaded = load_host_model(ModelConfig(name=str(tmp_path), device="cpu"))
    ids = tiny_host.encode("a sparse autoencoder")
    torch.testing.assert_close(loaded.forward(ids, logits=True).logits, tiny_host.forward(ids, logits=True).logits)
    assert loaded.hookpoints.names() == tiny_host.hookpoints.names()


def test_dtype_override(tiny_gemma):
    host = load_host_model(ModelConfig(name="tiny-random", device="cpu", dtype="bfloat16"))
    assert host.summary().dtype == "bfloat16"
    new, _ = host.generate(host.encode("hello"), SamplingParams(max_new_tokens=3))
    assert new.shape == (1, 3)


def test_unknown_model_lists_the_choices(tmp_path):
    with pytest.raises(NotFound, match="unknown model 'no-such-model'.*'default'.*'tiny-random'.*\\.gguf"):
        load_host_model(ModelConfig(name="no-such-model"))
    with pytest.raises(NotFound, match="has no config.json"):
        load_host_model(ModelConfig(name=str(tmp_path)))


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(FailedPrecondition, match="pytorch_model.bin: pickled weights are never loaded"):
        load_host_model(ModelConfig(name=str(tmp_path)))


def test_unsupported_architecture_is_refused_before_loading_weights(tmp_path):
    config = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       word_embed_proj_dim=16)
    OPTForCausalLM(config).save_pretrained(tmp_path)
    save_file({"garbage": torch.zeros(1)}, tmp_path / "model.safetensors")  # would fail to load if read
    with pytest.raises(Unsupported, match="unsupported architecture 'opt'; supported: .*gpt_neox"):
        load_host_model(ModelConfig(name=str(tmp_path)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_device_and_dtype_errors():
    with pytest.raises(FailedPrecondition, match="no CUDA device"):
        load_host_model(ModelConfig(name="tiny-random", device="cuda"))
    with pytest.raises(InvalidRequest, match="unknown dtype 'float8'"):
        load_host_model(ModelConfig(name="tiny-random", dtype="float8"))
    with pytest.raises(InvalidRequest, match="unsupported device 'meta'"):
        load_host_model(ModelConfig(name="tiny-random", device="meta"))


def test_gguf_cache_converts_once_per_content(tmp_path, monkeypatch):
    conversions: list[Path] = []

    def fake_convert(gguf_path: Path, target: Path) -> Path:
        conversions.append(gguf_path)
        target.mkdir(parents=True)
        (target / gguf_cache.MARKER).write_text("{}")
        return target

    monkeypatch.setattr(gguf_cache, "convert_gguf", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF one")
    first = gguf_cache.cached_gguf_dir(gguf, tmp_path / "cache")
    assert gguf_cache.cached_gguf_dir(gguf, tmp_path / "cache") == first and len(conversions) == 1
    gguf.write_bytes(b"GGUF two")  # new content, new cache entry
    assert gguf_cache.cached_gguf_dir(gguf, tmp_path / "cache") != first and len(conversions) == 2
