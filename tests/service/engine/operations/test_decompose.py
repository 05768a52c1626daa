"""Decompose: the streamed codes equal the trainer's offline decomposition of the same activations, chunks
cover every token once and in order, top-k and filter semantics, signed codes, early stop, residual stages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from core.sae.base import top_k_by_magnitude
from core.stack.reader import read_stack
from core.stack.runtime import StackRuntime
from service.engine.contract.specs import DecomposeChunk, DecomposeHeader, DecomposeSpec
from service.engine.operations.decompose import decompose_events, needed_hookpoints, token_texts
from service.engine.stacks.served import ServedStack, load_served_stack
from tests.service.engine.tiny_stacks import one_thread, write_tiny_stack

TEXT = "The quick brown fox jumps over the lazy dog. A sparse autoencoder reads the residual stream."


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def stack(tiny_gemma, tmp_path_factory) -> ServedStack:
    return load_served_stack(write_tiny_stack(tiny_gemma, tmp_path_factory.mktemp("decompose") / "stack"),
                             tiny_gemma, self_check=False)


@pytest.fixture(scope="module")
def ids(tiny_gemma) -> tuple[int, ...]:
    return tuple(tiny_gemma.encode(TEXT)[0].tolist())


def run(host, stack, ids, stages=(0, 1, 2, 3), top_k=5, chunk_tokens=7, **kw):
    events = list(decompose_events(host, stack, DecomposeSpec("", ids, tuple(stages), top_k,
                                                              chunk_tokens=chunk_tokens, **kw)))
    header, chunks = events[0], events[1:]
    assert isinstance(header, DecomposeHeader) and all(isinstance(c, DecomposeChunk) for c in chunks)
    return header, chunks, [t for c in chunks for t in c.tokens]


def offline(host, stack: ServedStack, ids) -> dict:
    """The trainer's way: a full forward pass, a runtime built from the stack directory, all stages."""
    runtime = StackRuntime.from_loaded(read_stack(stack.path))
    captures = host.forward(torch.tensor([ids]), reads=runtime.hookpoints, logits=True).captures
    return runtime.decompose({hp: captures[hp][0] for hp in runtime.hookpoints})


def test_codes_equal_the_offline_decomposition(tiny_gemma, stack, ids):
    header, chunks, tokens = run(tiny_gemma, stack, ids, include_error=True)
    expected = offline(tiny_gemma, stack, ids)
    assert header.stack == "tiny" and header.stack_digest == stack.digest and header.num_tokens == len(ids)
    assert header.stages == (0, 1, 2, 3) and header.top_k == 5
    for token in tokens:
        assert [f.stage for f in token.features] == [0, 1, 2, 3]
        for codes in token.features:
            z = expected[codes.stage].codes[token.position]  # (d_sae,)
            values, top = top_k_by_magnitude(z[None], 5)
            keep = values[0] != 0
            assert list(codes.ids) == top[0][keep].tolist()
            assert torch.allclose(torch.tensor(codes.values), values[0][keep], atol=1e-5)
            assert codes.l0 == int((z != 0).sum())
            assert codes.error_norm == pytest.approx(float(expected[codes.stage].error_norm()[token.position]),
                                                     rel=1e-5, abs=1e-5)
            assert codes.predicted_error_norm is None  # no predictors in this stack


def test_chunks_cover_every_token_once_in_order(tiny_gemma, stack, ids):
    _, chunks, tokens = run(tiny_gemma, stack, ids, chunk_tokens=7)
    assert [t.position for t in tokens] == list(range(len(ids)))
    assert [t.token_id for t in tokens] == list(ids)
    assert [len(c.tokens) for c in chunks] == [7] * (len(ids) // 7) + ([len(ids) % 7] if len(ids) % 7 else [])
    _, one, _ = run(tiny_gemma, stack, ids, chunk_tokens=1000)
    assert len(one) == 1 and len(one[0].tokens) == len(ids)


def test_token_texts_read_like_the_text(tiny_gemma, stack, ids):
    _, _, tokens = run(tiny_gemma, stack, ids, stages=(0,))
    assert tokens[0].text == "<bos>"
    assert "".join(t.text for t in tokens[1:]) == TEXT
    assert token_texts(tiny_gemma.tokenizer, ids) == [t.text for t in tokens]


def test_top_k_ranks_by_magnitude_and_drops_zeros(tiny_gemma, stack, ids):
    _, _, tokens = run(tiny_gemma, stack, ids, top_k=3)
    for token in tokens:
        for codes in token.features:
            assert len(codes.ids) <= 3 and len(codes.ids) == min(3, codes.l0)
            assert all(v != 0 for v in codes.values)
            magnitudes = [abs(v) for v in codes.values]
            assert magnitudes == sorted(magnitudes, reverse=True)


def test_signed_codes_are_reported_with_their_sign(tiny_gemma, stack, ids):
    _, _, tokens = run(tiny_gemma, stack, ids, stages=(1,), top_k=10)
    values = [v for t in tokens for v in t.features[0].values]
    assert any(v < 0 for v in values) and any(v > 0 for v in values)
    for token in tokens:
        magnitudes = [abs(v) for v in token.features[0].values]
        assert magnitudes == sorted(magnitudes, reverse=True)


def test_the_filter_reports_its_features_whatever_their_value(tiny_gemma, stack, ids):
    expected = offline(tiny_gemma, stack, ids)[2].codes  # (T, d_sae)
    never = int((expected != 0).sum(0).argmin())  # a feature silent on most tokens
    always = int((expected != 0).sum(0).argmax())
    _, _, tokens = run(tiny_gemma, stack, ids, stages=(0, 2), top_k=1, feature_filter={2: (never, always)})
    for token in tokens:
        stage0, stage2 = token.features
        assert len(stage0.ids) == 1  # the filter is per stage
        assert stage2.ids[0] == int(expected[token.position].abs().argmax())
        assert {never, always} <= set(stage2.ids) and len(stage2.ids) <= 3
        by_id = dict(zip(stage2.ids, stage2.values, strict=True))
        for feature in (never, always):
            assert by_id[feature] == pytest.approx(float(expected[token.position, feature]), abs=1e-5)
    assert any(dict(zip(t.features[1].ids, t.features[1].values, strict=True))[never] == 0 for t in tokens)


def test_without_errors_no_error_norms_are_reported(tiny_gemma, stack, ids):
    _, _, tokens = run(tiny_gemma, stack, ids, include_error=False)
    assert all(c.error_norm is None and c.predicted_error_norm is None for t in tokens for c in t.features)


class LayerCounter:
    """Counts how often each decoder layer of the host model is entered while installed."""

    def __init__(self, host) -> None:
        self.calls = [0] * len(host.hookpoints.layers)
        layers = host.hookpoints.layers
        self.handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i: int):
        def hook(*_):
            self.calls[i] += 1
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize(("stages", "layers_run"), [((0,), 2), ((1, 2), 3), ((3,), 4)])
def test_only_the_layers_up_to_the_last_needed_hookpoint_run(tiny_gemma, stack, ids, stages, layers_run):
    counter = LayerCounter(tiny_gemma)
    try:
        run(tiny_gemma, stack, ids, stages=stages)
    finally:
        counter.remove()
    assert counter.calls == [1] * layers_run + [0] * (4 - layers_run)


def test_a_residual_stage_reads_its_source_and_decomposes_with_the_chain_formula(tiny_gemma, stack, ids):
    assert needed_hookpoints(stack, (3,)) == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    _, _, tokens = run(tiny_gemma, stack, ids, stages=(3,), top_k=8, include_error=True)
    captures = tiny_gemma.forward(torch.tensor([ids]), reads=["blocks.1.hook_resid_post",
                                                              "blocks.3.hook_resid_post"]).captures
    h1, h3 = captures["blocks.1.hook_resid_post"][0], captures["blocks.3.hook_resid_post"][0]  # (T, d)
    stage = stack.runtime.stages[3]
    a = stage.affine
    r = a.residual_scale * (h3 - h1 @ a.A.T - a.c)  # (T, d)
    z = stage.sae.encode(r)
    error = (h3 - (h1 @ a.A.T + a.c + stage.sae.decode(z) / a.residual_scale)).norm(dim=-1)  # (T,)
    for token in tokens:
        (codes,) = token.features
        values, top = top_k_by_magnitude(z[token.position][None], 8)
        assert list(codes.ids) == top[0][values[0] != 0].tolist()
        assert torch.allclose(torch.tensor(codes.values), values[0][values[0] != 0], atol=1e-4)
        assert codes.error_norm == pytest.approx(float(error[token.position]), rel=1e-4, abs=1e-4)


def test_the_stream_can_be_abandoned_after_the_header(tiny_gemma, stack, ids):
    events = decompose_events(tiny_gemma, stack, DecomposeSpec("", ids, (0,), 2))
    assert isinstance(next(events), DecomposeHeader)
    events.close()


def test_both_tiny_architectures_decompose_like_the_offline_runtime(tiny_host, tmp_path):
    stack = load_served_stack(write_tiny_stack(tiny_host, tmp_path / "stack"), tiny_host)  # self-check passes
    ids = tuple(tiny_host.encode(TEXT)[0].tolist())
    expected = offline(tiny_host, stack, ids)
    _, _, tokens = run(tiny_host, stack, ids, top_k=4, chunk_tokens=16)
    for token in tokens:
        for codes in token.features:
            values, top = top_k_by_magnitude(expected[codes.stage].codes[token.position][None], 4)
            assert list(codes.ids) == top[0][values[0] != 0].tolist()
