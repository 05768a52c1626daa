"""score on the tiny Gemma: clean CE as computed by hand, nothing asked = nothing edited, a perfect splice
costs no KL, an intervention or a steering vector does, and special positions are never spliced."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from core.sae import SAEConfig, build_sae
from core.stack.identity import HostModelIdentity
from core.stack.runtime import RuntimeStage, StackRuntime
from core.stack.writer import StageSpec, write_stack
from service.engine.contract.specs import InterventionSpec, Op, Positions, Scope, ScoreSpec, SteeringSpec
from service.engine.operations.score import score
from service.engine.stacks.served import ServedStack, load_served_stack

HOOKPOINTS = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs."


@pytest.fixture(scope="module")
def stack(tiny_gemma, tmp_path_factory) -> ServedStack:
    """Two random TopK stages with calibrated input scales."""
    host = tiny_gemma
    acts = host.forward(host.encode(TEXT), reads=list(HOOKPOINTS)).captures
    specs = []
    for i, hp in enumerate(HOOKPOINTS):
        h = acts[hp][0, 1:]  # (n, d)
        torch.manual_seed(30 + i)
        sae = build_sae(SAEConfig("topk", d_in=h.shape[1], d_sae=128, k=8)).eval()
        specs.append(StageSpec(sae, hp, float((h.shape[1] / h.pow(2).sum(-1).mean()).sqrt())))
    root = tmp_path_factory.mktemp("score") / "stack"
    write_stack(root, "score", HostModelIdentity.from_model(host.model, host.name), specs)
    return load_served_stack(root, host, self_check=False)


@pytest.fixture(scope="module")
def token_ids(tiny_gemma) -> tuple[int, ...]:
    return tuple(tiny_gemma.encode(TEXT)[0].tolist())


def perfect_stack(d: int) -> SimpleNamespace:
    """A one-stage stack that reconstructs exactly: z = [relu(x), relu(−x)], x̂ = z⁺ − z⁻."""
    sae = build_sae(SAEConfig(architecture="relu", d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return SimpleNamespace(runtime=StackRuntime([RuntimeStage(0, "perfect", HOOKPOINTS[0], sae.eval(), 0.3)]))


def test_clean_ce_is_the_teacher_forced_cross_entropy(tiny_gemma, stack, token_ids):
    result = score(tiny_gemma, stack, ScoreSpec("score", token_ids))
    with torch.inference_mode():
        logits = tiny_gemma.model(torch.tensor([token_ids])).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(token_ids[1:]), reduction="none")
    assert result.scored_tokens == len(token_ids) - 1 and result.token_ids == token_ids
    assert result.clean_ce_per_token == pytest.approx(expected.tolist(), abs=1e-5)
    assert result.clean_ce == pytest.approx(float(expected.mean()), abs=1e-5)
    assert not result.edited and result.edited_ce_per_token == result.clean_ce_per_token
    assert result.kl == 0 and set(result.kl_per_token) == {0.0}


def test_a_perfect_splice_costs_nothing(tiny_gemma, token_ids):
    result = score(tiny_gemma, perfect_stack(tiny_gemma.hookpoints.d_model),
                   ScoreSpec("", token_ids, splice_stages=(0,)))
    assert result.edited
    assert result.kl < 1e-6 and result.edited_ce == pytest.approx(result.clean_ce, abs=1e-4)


def test_splicing_a_lossy_stage_costs_kl_but_never_at_special_positions(tiny_gemma, stack, token_ids):
    result = score(tiny_gemma, stack, ScoreSpec("score", token_ids, splice_stages=(0, 1)))
    assert result.kl > 1e-3
    assert result.kl_per_token[0] == 0.0  # position 0 is BOS: left as it was
    assert result.edited_ce_per_token[0] == result.clean_ce_per_token[0]


def test_an_intervention_raises_kl_only_from_its_positions_on(tiny_gemma, stack, token_ids):
    edit = InterventionSpec(0, 5, Op.SET, 40.0, positions=Positions(Scope.RANGE, 6, None))
    result = score(tiny_gemma, stack, ScoreSpec("score", token_ids, interventions=(edit,)))
    assert result.edited and result.kl > 1e-2 and result.edited_ce != result.clean_ce
    assert result.kl_per_token[:6] == pytest.approx([0.0] * 6, abs=1e-6)
    assert min(result.kl_per_token[6:]) > 0


def test_a_steering_vector_needs_no_stack(tiny_gemma, token_ids):
    vector = (2.0,) * tiny_gemma.hookpoints.d_model
    result = score(tiny_gemma, None, ScoreSpec("", token_ids, steering=(SteeringSpec(HOOKPOINTS[1], vector, 3.0),)))
    assert result.edited and result.kl > 1e-3
