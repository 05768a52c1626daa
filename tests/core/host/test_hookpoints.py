from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from core.errors import NotFound, Unsupported
from core.host.hookpoints import SUPPORTED_ARCHITECTURES, HookKind, HookpointRegistry
from core.host.hooks import installed_hooks

TEXT = "The quick brown fox jumps over the lazy dog. def forward(self, x): return x"


def test_names_cover_every_layer_in_forward_order(tiny_host):
    names = tiny_host.hookpoints.names()
    assert len(names) == 4 * tiny_host.hookpoints.num_layers
    assert names[:4] == [f"blocks.0.{k.value}" for k in HookKind]
    orders = [tiny_host.hookpoints.get(n).order for n in names]
    assert orders == sorted(orders)
    assert {p.dim for p in tiny_host.hookpoints} == {tiny_host.model.config.hidden_size}


def test_resid_post_matches_output_hidden_states(tiny_host):
    ids = tiny_host.encode(TEXT)
    reads = [f"blocks.{i}.hook_resid_post" for i in range(tiny_host.hookpoints.num_layers)]
    captured = tiny_host.forward(ids, reads=reads, logits=True).captures
    with torch.inference_mode():
        hidden = tiny_host.model(ids, output_hidden_states=True).hidden_states  # L+1 of (1, T, d)
    last = len(reads) - 1
    for i, name in enumerate(reads[:-1]):
        torch.testing.assert_close(captured[name], hidden[i + 1], rtol=0, atol=0)
    # HF applies the final norm to the last entry of hidden_states; resid_post is before it.
    final_norm = tiny_host.model.base_model.get_submodule("norm" if hasattr(tiny_host.model.base_model, "norm")
                                                          else "final_layer_norm")
    with torch.inference_mode():
        torch.testing.assert_close(final_norm(captured[reads[last]]), hidden[-1])


def test_resid_pre_is_previous_resid_post_and_embedding(tiny_host):
    ids = tiny_host.encode(TEXT)
    reads = tiny_host.hookpoints.names()
    captured = tiny_host.forward(ids, reads=reads).captures
    with torch.inference_mode():
        embeddings = tiny_host.model(ids, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(captured["blocks.0.hook_resid_pre"], embeddings, rtol=0, atol=0)
    for i in range(1, tiny_host.hookpoints.num_layers):
        assert torch.equal(captured[f"blocks.{i}.hook_resid_pre"], captured[f"blocks.{i - 1}.hook_resid_post"])


def _assert_contributions_add_up(host_model, registry: HookpointRegistry, ids: torch.Tensor) -> None:
    """resid_post = resid_pre + attn_out + mlp_out: the out hookpoints are what is added to the stream."""
    with installed_hooks(registry, registry.names()) as captured, torch.inference_mode():
        host_model(input_ids=ids, use_cache=False)
    for i in range(registry.num_layers):
        total = sum(captured[f"blocks.{i}.{k}"] for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out"))
        torch.testing.assert_close(total, captured[f"blocks.{i}.hook_resid_post"], rtol=1e-5, atol=1e-5)


def test_attn_and_mlp_out_are_the_residual_contributions(tiny_host):
    _assert_contributions_add_up(tiny_host.model, tiny_host.hookpoints, tiny_host.encode(TEXT))


SMALL = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, max_position_embeddings=64)
OTHER_FAMILIES = {
    "llama": LlamaConfig(**SMALL, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2),
    "qwen2": Qwen2Config(**SMALL, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2),
    "mistral": MistralConfig(**SMALL, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2),
    "gpt2": GPT2Config(vocab_size=128, n_embd=32, n_head=4, n_layer=2, n_positions=64),
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_supported_families_resolve(family):
    model = AutoModelForCausalLM.from_config(OTHER_FAMILIES[family]).eval()
    registry = HookpointRegistry(model)
    assert family in SUPPORTED_ARCHITECTURES
    assert len(registry) == 8
    _assert_contributions_add_up(model, registry, torch.randint(0, 128, (2, 7)))


def test_unsupported_architecture_names_the_supported_ones():
    config = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       word_embed_proj_dim=16)
    with pytest.raises(Unsupported, match="unsupported architecture 'opt'; supported: .*gemma3_text.*llama"):
        HookpointRegistry(AutoModelForCausalLM.from_config(config))


def test_unknown_hookpoint_lists_valid_names(tiny_gemma):
    with pytest.raises(NotFound, match=r"unknown hookpoint 'blocks\.0\.resid'; valid names are blocks\.\{0\.\.3\}"):
        tiny_gemma.hookpoints.get("blocks.0.resid")
    with pytest.raises(NotFound, match="layer 9 > 3"):
        tiny_gemma.forward(tiny_gemma.encode("hi"), reads=["blocks.9.hook_resid_post"])
