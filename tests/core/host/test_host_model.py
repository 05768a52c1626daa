from __future__ import annotations

import pytest
import torch

from core.errors import InvalidRequest
from core.host.host_model import SamplingParams


def test_summary_describes_the_model(tiny_gemma):
    summary = tiny_gemma.summary()
    assert (summary.model_type, summary.num_layers, summary.d_model) == ("gemma3_text", 4, 64)
    assert summary.num_hookpoints == 16 and summary.dtype == "float32" and summary.device == "cpu"
    assert summary.num_parameters == sum(p.numel() for p in tiny_gemma.model.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be >= 0"),
    ],
)
def test_sampling_params_are_validated(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kwargs)


def test_bad_token_ids_are_rejected(tiny_gemma):
    with pytest.raises(InvalidRequest, match=r"token ids must lie in \[0, 512\)"):
        tiny_gemma.forward(torch.tensor([[1, 512]]))
    with pytest.raises(InvalidRequest, match="tokens > 0"):
        tiny_gemma.forward(torch.zeros((1, 0), dtype=torch.long))


def test_seeded_sampling_is_reproducible(tiny_host):
    ids = tiny_host.encode("The five boxing wizards")
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first, _ = tiny_host.generate(ids, sampling)
    second, _ = tiny_host.generate(ids, sampling)
    assert torch.equal(first, second)


def test_batched_forward_with_padding_mask(tiny_gemma):
    a = tiny_gemma.encode("short text")
    b = tiny_gemma.encode("a longer piece of text here")
    pad = tiny_gemma.tokenizer.pad_token_id
    width = b.shape[1]
    batch = torch.cat([torch.cat([a, torch.full((1, width - a.shape[1]), pad)], dim=1), b])  # right-padded
    mask = (torch.arange(width) < torch.tensor([[a.shape[1]], [width]])).long()
    name = "blocks.3.hook_resid_post"
    batched = tiny_gemma.forward(batch, reads=[name], attention_mask=mask).captures[name]
    alone = tiny_gemma.forward(a, reads=[name]).captures[name]
    torch.testing.assert_close(batched[:1, : a.shape[1]], alone, rtol=1e-4, atol=1e-4)
