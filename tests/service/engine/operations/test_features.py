"""GetFeature's engine side: decoder norm in activation units, logit lens through the unembedding, and the
density and top examples a stack may record."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from core.errors import NotFound
from service.engine.operations.decompose import token_texts
from service.engine.operations.features import feature_info
from service.engine.stacks.served import ServedStack, load_served_stack
from tests.service.engine.tiny_stacks import one_thread, write_tiny_stack

DENSITY = [0.5 * i / 256 for i in range(256)]
EXAMPLES = {"7": [["the quick fox", 2, 3.5], ["bad entry"], ["a lazy dog", 1, -1.25]]}


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def stack(tiny_gemma, tmp_path_factory) -> ServedStack:
    path = write_tiny_stack(tiny_gemma, tmp_path_factory.mktemp("features") / "stack",
                            extras={0: {"density": DENSITY, "top_examples": EXAMPLES}},
                            extra_tensors={2: {"density": torch.linspace(0, 1, 256)}})
    return load_served_stack(path, tiny_gemma, self_check=False)


@pytest.mark.parametrize(("stage", "feature"), [(0, 7), (1, 3), (3, 100)])
def test_logit_lens_scores_are_the_unembedding_of_the_decoder_direction(tiny_gemma, stack, stage, feature):
    info = feature_info(tiny_gemma, stack, stage, feature, top_n=6)
    runtime_stage = stack.runtime.stages[stage]
    direction = runtime_stage.sae.W_dec[feature] / runtime_stage.input_scale  # (d,)
    with torch.no_grad():
        scores = tiny_gemma.model.get_output_embeddings().weight @ direction  # (V,)
    assert info.stack == "tiny" and info.stage == stage and info.feature == feature
    assert info.decoder_norm == pytest.approx(float(direction.norm()), rel=1e-5)
    assert info.decoder_norm == pytest.approx(1 / runtime_stage.input_scale, rel=1e-4)  # unit-norm rows
    top, bottom = info.top_tokens, info.bottom_tokens
    assert len(top) == len(bottom) == 6
    assert [t.id for t in top] == torch.topk(scores, 6).indices.tolist()
    assert [t.id for t in bottom] == torch.topk(-scores, 6).indices.tolist()
    for token in (*top, *bottom):
        assert token.score == pytest.approx(float(scores[token.id]), rel=1e-4, abs=1e-5)
    assert [t.score for t in top] == sorted((t.score for t in top), reverse=True)
    assert [t.score for t in bottom] == sorted(t.score for t in bottom)
    assert top[-1].score >= float(scores.median()) >= bottom[-1].score
    assert [t.text for t in top] == token_texts(tiny_gemma.tokenizer, [t.id for t in top])


def test_density_and_examples_come_from_the_stack_when_recorded(tiny_gemma, stack):
    info = feature_info(tiny_gemma, stack, 0, 7, top_n=3)
    assert info.density == pytest.approx(DENSITY[7])
    assert info.top_examples == (("the quick fox", 2, 3.5), ("a lazy dog", 1, -1.25))
    assert feature_info(tiny_gemma, stack, 0, 8, top_n=3).top_examples == ()
    assert feature_info(tiny_gemma, stack, 2, 255, top_n=3).density == pytest.approx(1.0)
    bare = feature_info(tiny_gemma, stack, 1, 0, top_n=3)
    assert bare.density is None and bare.top_examples == ()


def test_top_n_zero_and_out_of_range_do_not_crash(tiny_gemma, stack):
    info = feature_info(tiny_gemma, stack, 0, 0, top_n=0)
    assert info.top_tokens == () and info.bottom_tokens == ()
    with pytest.raises(NotFound, match="feature 256 is out of range"):
        feature_info(tiny_gemma, stack, 0, 256, top_n=3)
    with pytest.raises(NotFound, match="no stage 9"):
        feature_info(tiny_gemma, stack, 9, 0, top_n=3)
