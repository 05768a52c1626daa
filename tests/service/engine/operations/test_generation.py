"""generate_events on the tiny Gemma: equivalence with HF greedy decoding, edits and their scopes,
conditions, the DEFAULT branch, sampling, stops, text deltas, per-token features and hook cleanup."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from core.errors import InvalidRequest
from core.host.host_model import SamplingParams
from core.sae import SAEConfig, build_sae
from core.stack.identity import HostModelIdentity
from core.stack.writer import StageSpec, write_stack
from service.engine.contract.specs import (
    Action,
    Branch,
    Comparison,
    ConditionEvent,
    ConditionSpec,
    DecomposeSpec,
    FinishEvent,
    FinishReason,
    GenerateHeader,
    GenerateSpec,
    InterventionSpec,
    Op,
    Positions,
    SamplingSpec,
    Scope,
    SteeringSpec,
    TokenEvent,
)
from service.engine.operations.generation import TextStream, generate_events, sample
from service.engine.stacks.served import ServedStack, load_served_stack

HOOKPOINTS = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
PROMPT = "The quick brown fox"
DEAD = 0  # never fires in the test stack
NEVER = 1e9  # BELOW this, a condition fires at its first position in scope
SAMPLED = SamplingSpec(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def stack(tiny_gemma, tmp_path_factory) -> ServedStack:
    """Two random TopK stages with calibrated input scales; feature DEAD never fires."""
    host = tiny_gemma
    acts = host.forward(host.encode(PROMPT * 8), reads=list(HOOKPOINTS)).captures
    specs = []
    for i, hp in enumerate(HOOKPOINTS):
        h = acts[hp][0, 1:]  # (n, d)
        torch.manual_seed(20 + i)
        sae = build_sae(SAEConfig("topk", d_in=h.shape[1], d_sae=128, k=8)).eval()
        with torch.no_grad():
            sae.W_enc[:, DEAD] = 0.0
            sae.b_enc[DEAD] = -1e4
        specs.append(StageSpec(sae, hp, float((h.shape[1] / h.pow(2).sum(-1).mean()).sqrt())))
    root = tmp_path_factory.mktemp("generation") / "stack"
    write_stack(root, "gen", HostModelIdentity.from_model(host.model, host.name), specs)
    return load_served_stack(root, host, self_check=False)


@pytest.fixture(scope="module")
def prompt(tiny_gemma) -> tuple[int, ...]:
    return tuple(tiny_gemma.encode(PROMPT)[0].tolist())


def run(host, stack, prompt, sampling=None, **kwargs) -> list:
    spec = GenerateSpec("gen", prompt, sampling or SamplingSpec(max_new_tokens=8), **kwargs)
    return list(generate_events(host, stack, spec))


def tokens(events, branch=Branch.STEERED) -> list[TokenEvent]:
    return [e for e in events if isinstance(e, TokenEvent) and e.branch is branch]


def finish(events, branch=Branch.STEERED) -> FinishEvent:
    [event] = [e for e in events if isinstance(e, FinishEvent) and e.branch is branch]
    return event


def ids_and_logprobs(events, branch=Branch.STEERED) -> list[tuple[int, float]]:
    return [(t.token_id, t.logprob) for t in tokens(events, branch)]


def test_greedy_without_edits_matches_hf_generate(tiny_gemma, stack, prompt):
    events = run(tiny_gemma, stack, prompt, SamplingSpec(max_new_tokens=8, ignore_eos=True))
    assert isinstance(events[0], GenerateHeader) and events[0].prompt[0][0] == prompt[0]
    expected, _ = tiny_gemma.generate(torch.tensor([prompt]), SamplingParams(max_new_tokens=8))
    assert [t.token_id for t in tokens(events)] == expected[0].tolist()
    assert [t.position for t in tokens(events)] == list(range(len(prompt), len(prompt) + 8))
    with torch.inference_mode():
        logits = tiny_gemma.model(torch.tensor([prompt + tuple(expected[0, :-1].tolist())])).logits[0]
    reference = logits[len(prompt) - 1:].log_softmax(-1).gather(-1, expected[0, :, None])[:, 0]
    torch.testing.assert_close(torch.tensor([t.logprob for t in tokens(events)]), reference, rtol=0, atol=1e-4)
    done = finish(events)
    assert (done.reason, done.generated_tokens, done.prompt_tokens) == (FinishReason.LENGTH, 8, len(prompt))
    assert done.text == "".join(t.text for t in tokens(events)) == tiny_gemma.decode(expected[0])


def test_greedy_matches_hf_on_every_tiny_architecture(tiny_host):
    prompt = tuple(tiny_host.encode(PROMPT)[0].tolist())
    events = run(tiny_host, None, prompt, SamplingSpec(max_new_tokens=6, ignore_eos=True))
    expected, _ = tiny_host.generate(torch.tensor([prompt]), SamplingParams(max_new_tokens=6))
    assert [t.token_id for t in tokens(events)] == expected[0].tolist()


def test_set_to_a_large_value_changes_the_continuation(tiny_gemma, stack, prompt):
    plain = run(tiny_gemma, stack, prompt)
    steered = run(tiny_gemma, stack, prompt, interventions=(InterventionSpec(1, 5, Op.SET, 60.0),))
    assert [t.token_id for t in tokens(plain)] != [t.token_id for t in tokens(steered)]


def test_ablating_an_inactive_feature_changes_nothing_bit_for_bit(tiny_gemma, stack, prompt):
    plain = run(tiny_gemma, stack, prompt, SAMPLED)
    ablated = run(tiny_gemma, stack, prompt, SAMPLED, interventions=(InterventionSpec(0, DEAD, Op.ABLATE),))
    assert ids_and_logprobs(plain) == ids_and_logprobs(ablated)


def test_generated_scope_leaves_the_first_token_alone_and_prompt_scope_does_not(tiny_gemma, stack, prompt):
    plain = ids_and_logprobs(run(tiny_gemma, stack, prompt, SAMPLED))
    edit = InterventionSpec(0, 5, Op.SET, 40.0)
    generated = ids_and_logprobs(run(tiny_gemma, stack, prompt, SAMPLED, interventions=(
        dataclasses.replace(edit, positions=Positions(Scope.GENERATED)),)))
    prompt_only = ids_and_logprobs(run(tiny_gemma, stack, prompt, SAMPLED, interventions=(
        dataclasses.replace(edit, positions=Positions(Scope.PROMPT)),)))
    assert generated[0] == plain[0] and generated[1:] != plain[1:]
    assert prompt_only[0][1] != plain[0][1]


def test_a_stop_condition_in_the_prompt_finishes_before_any_token(tiny_gemma, stack, prompt):
    cond = ConditionSpec("guard", 1, 3, Comparison.BELOW, NEVER, Action.STOP, Positions(Scope.ALL))
    events = run(tiny_gemma, stack, prompt, conditions=(cond,))
    assert [type(e) for e in events] == [GenerateHeader, ConditionEvent, FinishEvent]
    done = finish(events)
    assert done.reason is FinishReason.FEATURE_CONDITION and done.generated_tokens == 0 and done.text == ""
    assert done.trigger == events[1]
    assert (done.trigger.condition_id, done.trigger.position, done.trigger.stage) == ("guard", 0, 1)


def test_a_stop_condition_on_generated_tokens_reports_the_token_first(tiny_gemma, stack, prompt):
    cond = ConditionSpec("guard", 0, 3, Comparison.BELOW, NEVER, Action.STOP)  # default scope GENERATED
    events = run(tiny_gemma, stack, prompt, conditions=(cond,))
    assert [type(e) for e in events] == [GenerateHeader, TokenEvent, ConditionEvent, FinishEvent]
    assert events[2].position == events[1].position == len(prompt)
    assert finish(events).trigger == events[2] and finish(events).generated_tokens == 1


def test_enable_interventions_switches_an_edit_on_from_the_next_position(tiny_gemma, stack, prompt):
    edit = InterventionSpec(0, 5, Op.SET, 40.0)
    # fires at the first generated position P (in the decode step that feeds it): the edit is on from P + 1
    cond = ConditionSpec("on", 1, 3, Comparison.BELOW, NEVER, Action.ENABLE_INTERVENTIONS)
    gated = run(tiny_gemma, stack, prompt, SAMPLED, conditions=(cond,),
                interventions=(dataclasses.replace(edit, condition_id="on"),))
    direct = run(tiny_gemma, stack, prompt, SAMPLED, interventions=(
        dataclasses.replace(edit, positions=Positions(Scope.RANGE, len(prompt) + 1, None)),))
    assert ids_and_logprobs(gated) == ids_and_logprobs(direct)
    assert ids_and_logprobs(gated) != ids_and_logprobs(run(tiny_gemma, stack, prompt, SAMPLED))
    [event] = [e for e in gated if isinstance(e, ConditionEvent)]
    assert event.position == len(prompt) and event.action is Action.ENABLE_INTERVENTIONS


def test_enabling_inside_the_prompt_reruns_the_prefill(tiny_gemma, stack, prompt):
    edit = InterventionSpec(0, 5, Op.SET, 40.0)  # stage 0 runs before stage 1, where the condition fires
    cond = ConditionSpec("on", 1, 3, Comparison.BELOW, NEVER, Action.ENABLE_INTERVENTIONS, Positions(Scope.ALL))
    gated = run(tiny_gemma, stack, prompt, SAMPLED, conditions=(cond,),
                interventions=(dataclasses.replace(edit, condition_id="on"),))
    direct = run(tiny_gemma, stack, prompt, SAMPLED,
                 interventions=(dataclasses.replace(edit, positions=Positions(Scope.RANGE, 1, None)),))
    assert ids_and_logprobs(gated) == ids_and_logprobs(direct)
    assert [e.position for e in gated if isinstance(e, ConditionEvent)] == [0]


def test_the_default_branch_is_the_unsteered_generation_with_the_same_seed(tiny_gemma, stack, prompt):
    plain = run(tiny_gemma, stack, prompt, SAMPLED)
    events = run(tiny_gemma, stack, prompt, SAMPLED, with_default=True,
                 interventions=(InterventionSpec(1, 5, Op.SET, 60.0),))
    assert events[0].branches == (Branch.STEERED, Branch.DEFAULT) and events[0].seed == SAMPLED.seed
    assert ids_and_logprobs(events, Branch.DEFAULT) == ids_and_logprobs(plain)
    assert ids_and_logprobs(events, Branch.STEERED) != ids_and_logprobs(plain)
    assert finish(events, Branch.DEFAULT).text == finish(plain).text
    steps = [(e.branch, e.index) for e in tokens(events) + tokens(events, Branch.DEFAULT)]
    assert [(e.branch, e.index) for e in events if isinstance(e, TokenEvent)] == sorted(
        steps, key=lambda s: (s[1], s[0] is Branch.DEFAULT))  # STEERED then DEFAULT at every step
    unsteered = run(tiny_gemma, stack, prompt, SAMPLED, with_default=True)
    assert ids_and_logprobs(unsteered, Branch.STEERED) == ids_and_logprobs(unsteered, Branch.DEFAULT)


def test_a_branch_that_finishes_early_lets_the_other_continue(tiny_gemma, stack, prompt):
    cond = ConditionSpec("guard", 0, 3, Comparison.BELOW, NEVER, Action.STOP)
    events = run(tiny_gemma, stack, prompt, with_default=True, conditions=(cond,),
                 interventions=(InterventionSpec(1, 5, Op.SET, 60.0, positions=Positions(Scope.RANGE, 0, 1)),))
    # conditions are evaluated on both branches' own activations: both stop at their first token
    assert finish(events).reason is finish(events, Branch.DEFAULT).reason is FinishReason.FEATURE_CONDITION
    later = ConditionSpec("late", 0, 3, Comparison.BELOW, NEVER, Action.STOP,
                          Positions(Scope.RANGE, len(prompt) + 2, None))
    events = run(tiny_gemma, stack, prompt, SamplingSpec(max_new_tokens=5), with_default=True, conditions=(later,))
    assert finish(events).generated_tokens == finish(events, Branch.DEFAULT).generated_tokens == 3
    assert isinstance(events[-1], FinishEvent) and isinstance(events[-2], FinishEvent | ConditionEvent)


def test_sampling_is_reproducible_with_a_seed(tiny_gemma, stack, prompt):
    first, again = run(tiny_gemma, stack, prompt, SAMPLED), run(tiny_gemma, stack, prompt, SAMPLED)
    other = run(tiny_gemma, stack, prompt, dataclasses.replace(SAMPLED, seed=8))
    assert ids_and_logprobs(first) == ids_and_logprobs(again)
    assert ids_and_logprobs(first) != ids_and_logprobs(other)


def test_a_stop_string_cuts_the_text_before_it(tiny_gemma, stack, prompt):
    sampling = dataclasses.replace(SAMPLED, max_new_tokens=12, ignore_eos=True)
    full = finish(run(tiny_gemma, stack, prompt, sampling)).text
    assert len(full) > 6
    stop = full[3:5]
    events = run(tiny_gemma, stack, prompt, dataclasses.replace(sampling, stop=("\x00never", stop)))
    done = finish(events)
    assert done.reason is FinishReason.STOP_STRING and done.stop_string == stop
    assert done.text == full[: full.index(stop)] == "".join(t.text for t in tokens(events))


def test_eos_finishes_unless_ignored(tiny_gemma, stack, prompt, monkeypatch):
    first = tokens(run(tiny_gemma, stack, prompt))[0].token_id
    monkeypatch.setattr(tiny_gemma.model.generation_config, "eos_token_id", first)
    done = finish(run(tiny_gemma, stack, prompt))
    assert (done.reason, done.generated_tokens) == (FinishReason.EOS, 1)
    ignored = finish(run(tiny_gemma, stack, prompt, SamplingSpec(max_new_tokens=3, ignore_eos=True)))
    assert (ignored.reason, ignored.generated_tokens) == (FinishReason.LENGTH, 3)


def test_per_token_features_are_the_tokens_own_activations(tiny_gemma, stack, prompt):
    decompose = DecomposeSpec("gen", (), (0, 1), top_k=5, feature_filter={1: (DEAD,)})
    events = run(tiny_gemma, stack, prompt, SamplingSpec(max_new_tokens=4), decompose=decompose)
    assert events[0].stages == (0, 1)
    generated = tokens(events)
    assert len(generated) == 4 and all(len(t.features) == 2 for t in generated)
    ids = torch.tensor([prompt + tuple(t.token_id for t in generated)])
    acts = tiny_gemma.forward(ids, reads=list(HOOKPOINTS)).captures
    offline = stack.runtime.decompose({hp: acts[hp][0] for hp in HOOKPOINTS})
    for t in generated:
        for codes in t.features:
            z = offline[codes.stage].codes[t.position]
            values, order = z.abs().topk(5)
            expected = [int(i) for i, v in zip(order, values, strict=True) if v > 0]
            assert list(codes.ids[:len(expected)]) == expected
            assert codes.values[:len(expected)] == pytest.approx(z[expected].tolist(), abs=1e-4)
            assert codes.l0 == int((z != 0).sum())
            assert codes.error_norm == pytest.approx(float(offline[codes.stage].error[t.position].norm()), rel=1e-4)
        assert DEAD in t.features[1].ids  # always reported through the feature filter


def test_steering_without_a_stack(tiny_gemma, prompt):
    vector = tuple([3.0] * tiny_gemma.hookpoints.d_model)
    plain = run(tiny_gemma, None, prompt)
    steered = run(tiny_gemma, None, prompt, steering=(SteeringSpec("blocks.1.hook_resid_post", vector, 4.0),))
    assert plain[0].stack == "" and plain[0].stack_digest == ""
    assert ids_and_logprobs(plain) != ids_and_logprobs(steered)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_closing_the_generator_mid_way_leaves_no_hooks(tiny_gemma, stack, prompt):
    before = _hook_count(tiny_gemma.model)
    spec = GenerateSpec("gen", prompt, SamplingSpec(max_new_tokens=20), with_default=True,
                        interventions=(InterventionSpec(0, 5, Op.SET, 10.0),),
                        steering=(SteeringSpec(HOOKPOINTS[0], (1.0,) * 64),),
                        decompose=DecomposeSpec("gen", (), (0, 1), top_k=3))
    stream = generate_events(tiny_gemma, stack, spec)
    for _ in range(4):
        next(stream)
        assert _hook_count(tiny_gemma.model) == before  # never held across a yield
    stream.close()
    assert _hook_count(tiny_gemma.model) == before
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_text_stream_holds_back_partial_characters_and_stop_prefixes(tiny_gemma):
    tokenizer = tiny_gemma.tokenizer
    snowman = tokenizer("☃", add_special_tokens=False).input_ids  # byte-level: several tokens
    assert len(snowman) > 1
    stream = TextStream(tokenizer, (), ())
    deltas = [(stream.add(t), stream.release(final=False))[1] for t in snowman]
    assert deltas[:-1] == [""] * (len(snowman) - 1) and deltas[-1] == "☃"
    abc = tokenizer("a b c", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, ("b c",), ())
    out = []
    for t in abc:
        stop = stream.add(t)
        out.append(stream.release(final=bool(stop)))
        if stop:
            break
    assert stop == "b c" and "".join(out) == stream.emitted == "a "


@pytest.mark.parametrize("temperature", [1.17549435e-38, 1e-30, 1e-6])
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (50, 0.95)])
def test_a_tiny_temperature_samples_the_greedy_token(temperature, top_k, top_p):
    """logits / 1.2e-38 overflows float32; the shifted scores never do, so sampling stays greedy, not NaN."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 30
    spec = SamplingSpec(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    token, logprob = sample(logits, spec, torch.Generator().manual_seed(1))
    assert token == int(logits.argmax()) and logprob == pytest.approx(float(logits.log_softmax(-1).max()))


def test_a_steering_value_that_overflows_the_model_is_a_client_error(tiny_gemma, prompt):
    vector = (3e38,) * tiny_gemma.summary().d_model
    huge = SteeringSpec("blocks.1.hook_resid_post", vector, 3e38)
    with pytest.raises(InvalidRequest, match="non-finite .* smaller intervention or steering values"):
        run(tiny_gemma, None, prompt, steering=(huge,))
