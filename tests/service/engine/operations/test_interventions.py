"""EditPlan: error-preserving edits over scoped positions, conditions and their re-run rule, steering before
a stage at the same hookpoint, and no re-expression of an edit by a residual (ReSAE) stage."""

from __future__ import annotations

import pytest
import torch

from core.errors import InvalidRequest
from core.host.smoke_models import TRAINING_TEXT
from core.sae import SAEConfig, build_sae
from core.stack.affine import AffineMap
from core.stack.identity import HostModelIdentity
from core.stack.runtime import RuntimeStage, StackRuntime
from core.stack.writer import StageSpec, write_stack
from service.engine.contract.specs import (
    Action,
    Comparison,
    ConditionSpec,
    InterventionSpec,
    Op,
    Positions,
    Scope,
    SteeringSpec,
)
from service.engine.operations.interventions import EditPlan, scope_interval
from service.engine.stacks.served import ServedStack, load_served_stack

HOOKPOINTS = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
CALIBRATION = TRAINING_TEXT[:1500]
TEXT = "Interpretability engineers watch features fire while the model writes."
DEAD = 0  # a feature that never fires in the test stacks


def build_stack(host, root) -> ServedStack:
    """Two random TopK stages with calibrated input scales; feature DEAD never fires."""
    acts = host.forward(host.encode(CALIBRATION), reads=list(HOOKPOINTS)).captures
    specs = []
    for i, hp in enumerate(HOOKPOINTS):
        h = acts[hp][0, 1:]  # (n, d) without BOS
        torch.manual_seed(10 + i)
        specs.append(StageSpec(random_sae(h.shape[1]), hp, float((h.shape[1] / h.pow(2).sum(-1).mean()).sqrt())))
    write_stack(root, "plain", HostModelIdentity.from_model(host.model, host.name), specs)
    return load_served_stack(root, host, self_check=False)


def random_sae(d: int):
    sae = build_sae(SAEConfig("topk", d_in=d, d_sae=128, k=8)).eval()
    with torch.no_grad():
        sae.W_enc[:, DEAD] = 0.0
        sae.b_enc[DEAD] = -1e4
    return sae


@pytest.fixture(scope="module")
def stack(tiny_gemma, tmp_path_factory) -> ServedStack:
    return build_stack(tiny_gemma, tmp_path_factory.mktemp("stack") / "plain")


@pytest.fixture(scope="module")
def activations(tiny_gemma):
    ids = tiny_gemma.encode(TEXT)
    return ids, tiny_gemma.forward(ids, reads=list(HOOKPOINTS)).captures


def test_scopes_are_intervals():
    assert scope_interval(Positions(Scope.PROMPT), 5) == (0, 5)
    assert scope_interval(Positions(Scope.GENERATED), 5) == (5, None)
    assert scope_interval(Positions(Scope.RANGE, 2, 4), 5) == (2, 4)
    assert scope_interval(Positions(Scope.ALL), 5) == (0, None)


def test_ablating_an_inactive_feature_returns_the_same_tensor(stack, activations):
    ids, acts = activations
    h = acts[HOOKPOINTS[0]]  # (1, T, d)
    plan = EditPlan(stack.runtime, interventions=[InterventionSpec(0, DEAD, Op.ABLATE)])
    chunk = plan.chunk(0, ids.shape[1], ids.shape[1])
    assert chunk.writes[HOOKPOINTS[0]](h) is h


@pytest.mark.parametrize("op", [Op.SET, Op.ADD, Op.SCALE, Op.CLAMP, Op.ABLATE])
def test_an_edit_moves_only_its_feature_at_positions_in_scope(stack, activations, op):
    ids, acts = activations
    h = acts[HOOKPOINTS[0]]
    runtime, stage = stack.runtime, stack.runtime.stages[0]
    z = runtime.encode(stage, h)  # (T, H)
    feature = int(z[3:6].abs().sum(0).argmax())  # active somewhere in the range
    spec = InterventionSpec(0, feature, op, value=7.0 if op is not Op.SCALE else 3.0, lo=0.0, hi=0.01,
                            positions=Positions(Scope.RANGE, 3, 6))
    out = EditPlan(runtime, interventions=[spec]).chunk(0, ids.shape[1], 10).writes[HOOKPOINTS[0]](h)
    expected = z.clone()
    column = expected[3:6, feature]
    expected[3:6, feature] = {Op.SET: torch.full_like(column, 7.0), Op.ADD: column + 7.0, Op.SCALE: column * 3.0,
                              Op.CLAMP: column.clamp(0.0, 0.01), Op.ABLATE: torch.zeros_like(column)}[op]
    delta = (expected - z) @ stage.sae.W_dec / stage.input_scale  # (T, d)
    torch.testing.assert_close(out[0], h[0] + delta)
    assert torch.equal(out[0, :3], h[0, :3]) and torch.equal(out[0, 6:], h[0, 6:])


def test_prompt_and_generated_scopes_split_at_the_prompt_length(stack, activations):
    ids, acts = activations
    h = acts[HOOKPOINTS[0]]
    T = ids.shape[1]
    outs = {}
    for scope in (Scope.PROMPT, Scope.GENERATED):
        spec = InterventionSpec(0, 5, Op.SET, 9.0, positions=Positions(scope))
        outs[scope] = EditPlan(stack.runtime, interventions=[spec]).chunk(0, T, 4).writes[HOOKPOINTS[0]](h)
    assert torch.equal(outs[Scope.PROMPT][0, 4:], h[0, 4:]) and not torch.equal(outs[Scope.PROMPT][0, :4], h[0, :4])
    assert torch.equal(outs[Scope.GENERATED][0, :4], h[0, :4])
    assert not torch.equal(outs[Scope.GENERATED][0, 4:], h[0, 4:])


def test_a_condition_fires_once_at_its_first_crossing(stack, activations):
    ids, acts = activations
    T = ids.shape[1]
    z = stack.runtime.encode(stack.runtime.stages[1], acts[HOOKPOINTS[1]])
    feature = int((z != 0).sum(0).argmax())
    first = int((z[2:, feature] > 0).nonzero()[0]) + 2
    cond = ConditionSpec("c", 1, feature, Comparison.ABOVE, 0.0, Action.STOP, Positions(Scope.RANGE, 2, None))
    plan = EditPlan(stack.runtime, conditions=[cond])
    hp = HOOKPOINTS[1]
    plan.chunk(0, T, T).writes[hp](acts[hp])
    [event] = plan.take_events()
    assert (event.position, event.feature, event.action) == (first, feature, Action.STOP)
    assert event.value == pytest.approx(float(z[first, feature]))
    assert plan.stop == event
    assert hp not in plan.chunk(0, T, T).writes  # fired once: nothing left to test at that stage


def test_an_enabling_condition_after_the_edit_stage_asks_for_a_rerun(tiny_gemma, stack, activations):
    ids, _ = activations
    T = ids.shape[1]
    cond = ConditionSpec("c", 1, 7, Comparison.BELOW, 1e9, Action.ENABLE_INTERVENTIONS, Positions(Scope.RANGE, 2, None))
    gated = InterventionSpec(0, 5, Op.SET, 20.0, condition_id="c")
    plan = EditPlan(stack.runtime, interventions=[gated], conditions=[cond])
    first = plan.chunk(0, T, T)
    tiny_gemma.forward(ids, writes=first.writes, logits=True)
    assert first.rerun_from() == 2  # stage 0 ran before stage 1's condition fired at position 2
    plan.forget_after(2)
    second = plan.chunk(0, T, T)
    rerun = tiny_gemma.forward(ids, writes=second.writes, logits=True).logits
    assert second.rerun_from() is None
    direct = EditPlan(stack.runtime, interventions=[InterventionSpec(0, 5, Op.SET, 20.0,
                                                                     positions=Positions(Scope.RANGE, 3, None))])
    expected = tiny_gemma.forward(ids, writes=direct.chunk(0, T, T).writes, logits=True).logits
    assert torch.equal(rerun, expected)
    assert [e.position for e in plan.take_events()] == [2]


def test_steering_is_added_before_the_stage_at_the_same_hookpoint(stack, activations):
    ids, acts = activations
    T = ids.shape[1]
    h = acts[HOOKPOINTS[0]]
    vector = torch.randn(h.shape[-1])
    steer = SteeringSpec(HOOKPOINTS[0], tuple(vector.tolist()), 2.0, Positions(Scope.RANGE, 1, 3))
    plan = EditPlan(stack.runtime, steering=[steer], decompose=[0])
    chunk = plan.chunk(0, T, 0)
    out = chunk.writes[HOOKPOINTS[0]](h)
    steered = h.clone()
    steered[0, 1:3] += 2.0 * vector
    torch.testing.assert_close(out, steered)
    torch.testing.assert_close(chunk.codes[0].codes, stack.runtime.encode(stack.runtime.stages[0], steered))


def test_steering_without_a_stack_and_edits_needing_one():
    steer = SteeringSpec(HOOKPOINTS[0], (1.0,) * 64)
    plan = EditPlan(None, steering=[steer])
    h = torch.zeros(1, 3, 64)
    assert torch.equal(plan.chunk(0, 3, 3).writes[HOOKPOINTS[0]](h), torch.ones(1, 3, 64))
    with pytest.raises(InvalidRequest):
        EditPlan(None, interventions=[InterventionSpec(0, 1, Op.ABLATE)])


@torch.no_grad()
def _stage1_shift(residual: bool) -> float:
    """Relative change of stage 1's codes when stage 0's strongest feature is pinned, with a linear "model"
    between the two hookpoints (h1 = A h0 + c + noise), so the affine map predicts exactly what flows."""
    torch.manual_seed(3)
    d = 64
    A, c = torch.randn(d, d) * 0.2, torch.randn(d)
    h0 = torch.randn(1, 12, d) * 4  # (1, T, d)
    noise = torch.randn(1, 12, d)
    affine = AffineMap(A, c, 0.0, 0.9, 1.0) if residual else None
    runtime = StackRuntime([RuntimeStage(0, "a", HOOKPOINTS[0], random_sae(d), 0.5),
                            RuntimeStage(1, "b", HOOKPOINTS[1], random_sae(d), 1.0 if residual else 0.3,
                                         0 if residual else None, affine)])
    feature = int(runtime.encode(runtime.stages[0], h0).sum(0).argmax())
    codes = []
    for edits in ((), (InterventionSpec(0, feature, Op.SET, 30.0),)):
        chunk = EditPlan(runtime, interventions=edits, decompose=[1]).chunk(0, 12, 0)
        flowed = chunk.writes.get(HOOKPOINTS[0], lambda h: h)(h0)  # no hook there when nothing is edited
        chunk.writes[HOOKPOINTS[1]](flowed @ A.T + c + noise)
        codes.append(chunk.codes[1].codes)  # (T, H)
    clean, edited = codes
    return float((edited - clean).norm() / clean.norm())


def test_a_residual_stage_does_not_re_express_an_earlier_edit():
    plain, residual = _stage1_shift(residual=False), _stage1_shift(residual=True)
    assert plain > 0.3
    assert residual < 1e-4
