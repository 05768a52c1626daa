from __future__ import annotations

import pytest
import torch
from torch import nn

from core.host.hooks import add_vector, installed_hooks, replace_with
from core.host.host_model import SamplingParams

TEXT = "Interpretability engineers watch features fire while the model writes."


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def layer_calls(tiny_host):
    """Counts how many decoder layers actually run, via hooks outside the code under test."""
    calls: list[int] = []
    handles = [
        layer.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i))
        for i, layer in enumerate(tiny_host.hookpoints.layers)
    ]
    yield calls
    for handle in handles:
        handle.remove()


def test_identity_write_leaves_logits_bit_identical(tiny_host):
    ids = tiny_host.encode(TEXT)
    plain = tiny_host.forward(ids, logits=True).logits
    writes = {name: (lambda x: x) for name in tiny_host.hookpoints.names()}
    hooked = tiny_host.forward(ids, writes=writes, logits=True).logits
    assert torch.equal(plain, hooked)


def test_adding_a_vector_changes_logits_only_downstream(tiny_host):
    ids = tiny_host.encode(TEXT)
    d = tiny_host.hookpoints.d_model
    name = "blocks.1.hook_resid_post"
    plain = tiny_host.forward(ids, reads=["blocks.0.hook_resid_post"], logits=True)
    steered = tiny_host.forward(ids, reads=["blocks.0.hook_resid_post"],
                                writes={name: add_vector(torch.ones(d) * 3.0)}, logits=True)
    assert not torch.allclose(plain.logits, steered.logits)
    assert torch.equal(plain.captures["blocks.0.hook_resid_post"], steered.captures["blocks.0.hook_resid_post"])


def test_reads_see_the_value_after_the_write(tiny_host):
    ids = tiny_host.encode(TEXT)
    name = "blocks.2.hook_mlp_out"
    value = torch.full((tiny_host.hookpoints.d_model,), 0.5)
    captured = tiny_host.forward(ids, reads=[name], writes={name: replace_with(value)}).captures
    assert torch.equal(captured[name], value.expand(1, ids.shape[1], -1))


def test_write_at_resid_pre_replaces_layer_input(tiny_host):
    ids = tiny_host.encode(TEXT)
    zeros = torch.zeros(tiny_host.hookpoints.d_model)
    captured = tiny_host.forward(
        ids, reads=["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"],
        writes={"blocks.1.hook_resid_pre": replace_with(zeros)},
    ).captures
    assert torch.count_nonzero(captured["blocks.1.hook_resid_pre"]) == 0
    assert torch.count_nonzero(captured["blocks.0.hook_resid_post"]) > 0


def test_hooks_are_removed_after_exit_and_after_errors(tiny_host):
    before = _hook_count(tiny_host.model)
    tiny_host.forward(tiny_host.encode(TEXT), reads=tiny_host.hookpoints.names(),
                      writes={"blocks.0.hook_attn_out": lambda x: x})
    assert _hook_count(tiny_host.model) == before

    with pytest.raises(RuntimeError, match="boom"), installed_hooks(
        tiny_host.hookpoints, ["blocks.1.hook_resid_post"], {"blocks.0.hook_resid_pre": lambda x: x}
    ):
        assert _hook_count(tiny_host.model) == before + 2
        raise RuntimeError("boom")
    assert _hook_count(tiny_host.model) == before


def test_edit_with_wrong_shape_fails_cleanly(tiny_host):
    ids = tiny_host.encode(TEXT)
    before = _hook_count(tiny_host.model)
    with pytest.raises(ValueError, match="returned shape"):
        tiny_host.forward(ids, writes={"blocks.0.hook_resid_post": lambda x: x[:, :1]}, logits=True)
    assert _hook_count(tiny_host.model) == before


def test_early_stop_skips_later_layers(tiny_host, layer_calls):
    ids = tiny_host.encode(TEXT)
    result = tiny_host.forward(ids, reads=["blocks.1.hook_resid_post"])
    assert layer_calls == [0, 1]  # layers 2 and 3 never ran
    assert not result.completed and result.logits is None
    assert result.captures["blocks.1.hook_resid_post"].shape == (1, ids.shape[1], tiny_host.hookpoints.d_model)

    layer_calls.clear()
    tiny_host.forward(ids, reads=["blocks.0.hook_resid_post", "blocks.2.hook_resid_pre"])
    assert layer_calls == [0, 1, 2]  # layer 2 is entered (its input is the read) but stops there


def test_early_stop_result_equals_full_pass(tiny_host, layer_calls):
    ids = tiny_host.encode(TEXT)
    name = "blocks.1.hook_attn_out"
    early = tiny_host.forward(ids, reads=[name]).captures[name]
    full = tiny_host.forward(ids, reads=[name], logits=True)
    assert full.completed and full.logits is not None
    assert torch.equal(early, full.captures[name])
    assert layer_calls.count(3) == 1  # only the logits pass ran the last layer


def test_generate_captures_every_processed_position_and_steers(tiny_host):
    ids = tiny_host.encode(TEXT)
    before = _hook_count(tiny_host.model)  # transformers may keep recorder hooks of its own
    sampling = SamplingParams(max_new_tokens=6)
    new, captured = tiny_host.generate(ids, sampling, reads=["blocks.0.hook_resid_post"])
    assert new.shape == (1, 6)
    assert captured["blocks.0.hook_resid_post"].shape[1] == ids.shape[1] + 6 - 1
    again, _ = tiny_host.generate(ids, sampling)
    assert torch.equal(new, again)  # greedy is deterministic
    d = tiny_host.hookpoints.d_model
    steered, _ = tiny_host.generate(ids, sampling, writes={"blocks.0.hook_resid_post": add_vector(torch.randn(d) * 50)})
    assert not torch.equal(new, steered)
    assert _hook_count(tiny_host.model) == before


@pytest.mark.parametrize(("top_k", "outside_top_50"), [(0, True), (5, False)])
def test_sampling_top_k_zero_means_off(tiny_host, top_k, outside_top_50):
    """top_k 0 samples from the whole vocabulary (transformers fills an unset top_k with 50); top_k 5 keeps 5."""
    ids = tiny_host.encode(TEXT)
    logits = tiny_host.forward(ids, logits=True).logits[0, -1]  # (V,)
    ranks = []
    for seed in range(8):
        sampling = SamplingParams(max_new_tokens=1, temperature=100.0, top_k=top_k, seed=seed)
        token = int(tiny_host.generate(ids, sampling)[0][0, 0])
        ranks.append(int((logits > logits[token]).sum()))
    assert max(ranks) < (top_k or logits.shape[0])
    assert (max(ranks) >= 50) is outside_top_50
