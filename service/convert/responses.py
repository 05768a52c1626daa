"""Engine events and results -> response messages.

Features travel as packed parallel arrays (ids uint32, values float) in `StageCodes`; stage indices are
named from the served stack when there is one. An event of the wrong type is a programming error
(TypeError), not a client's: the engine produces them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t

from service.convert.enums import ACTION_NUMBERS, BRANCHES, FINISH_REASONS, SIGNS
from service.engine.contract.feature_specs import (
    Example,
    FeatureDashboard,
    ListPage,
    Neighbour,
    SearchPage,
    SideLabel,
)
from service.engine.contract.specs import (
    ConditionEvent,
    DecomposeChunk,
    DecomposeHeader,
    FeatureInfo,
    FinishEvent,
    GenerateHeader,
    ScoreResult,
    StageCodes,
    TokenEvent,
)

if TYPE_CHECKING:
    from service.engine.stacks.served import ServedStack


def stage_codes(codes: StageCodes) -> t.StageCodes:
    msg = t.StageCodes(stage=codes.stage, ids=codes.ids, values=codes.values, l0=codes.l0)
    if codes.error_norm is not None:
        msg.error_norm = codes.error_norm
    if codes.predicted_error_norm is not None:
        msg.predicted_error_norm = codes.predicted_error_norm
    return msg


def _stage_refs(stack: ServedStack | None, indices: Sequence[int]) -> list[t.StageRef]:
    if stack is None:
        return []
    stages = stack.loaded.stages
    return [t.StageRef(index=i, name=stages[i].name, hookpoint=stages[i].hookpoint, d_sae=stages[i].sae.cfg.d_sae,
                       signed=bool(stages[i].signed)) for i in indices]


def decompose_response(event: DecomposeHeader | DecomposeChunk, stack: ServedStack) -> pb.DecomposeResponse:
    if isinstance(event, DecomposeHeader):
        return pb.DecomposeResponse(header=pb.DecomposeHeader(
            stack=event.stack, stack_digest=event.stack_digest, stages=_stage_refs(stack, event.stages),
            num_tokens=event.num_tokens, top_k=event.top_k))
    if isinstance(event, DecomposeChunk):
        return pb.DecomposeResponse(chunk=pb.DecomposeChunk(tokens=[
            pb.TokenFeatures(token=t.Token(position=tf.position, id=tf.token_id, text=tf.text, special=tf.special),
                             features=[stage_codes(c) for c in tf.features])
            for tf in event.tokens]))
    raise TypeError(f"not a Decompose event: {type(event).__name__}")


def _condition_event(event: ConditionEvent, stack: ServedStack | None) -> pb.ConditionEvent:
    name = stack.loaded.stages[event.stage].name if stack is not None else str(event.stage)
    return pb.ConditionEvent(branch=BRANCHES[event.branch], condition_id=event.condition_id, stage=name,
                             feature=event.feature, position=event.position, value=event.value,
                             action=ACTION_NUMBERS[event.action])


def generate_response(event: GenerateHeader | TokenEvent | ConditionEvent | FinishEvent,
                      stack: ServedStack | None) -> pb.GenerateResponse:
    if isinstance(event, TokenEvent):
        return pb.GenerateResponse(token=pb.TokenEvent(
            branch=BRANCHES[event.branch], index=event.index, position=event.position, token_id=event.token_id,
            text=event.text, logprob=event.logprob, features=[stage_codes(c) for c in event.features]))
    if isinstance(event, ConditionEvent):
        return pb.GenerateResponse(condition=_condition_event(event, stack))
    if isinstance(event, FinishEvent):
        finish = pb.FinishEvent(branch=BRANCHES[event.branch], reason=FINISH_REASONS[event.reason],
                                stop_string=event.stop_string, prompt_tokens=event.prompt_tokens,
                                generated_tokens=event.generated_tokens, text=event.text)
        if event.trigger is not None:
            finish.trigger.CopyFrom(_condition_event(event.trigger, stack))
        return pb.GenerateResponse(finish=finish)
    if isinstance(event, GenerateHeader):
        return pb.GenerateResponse(header=pb.GenerateHeader(
            stack=event.stack, stack_digest=event.stack_digest, stages=_stage_refs(stack, event.stages),
            prompt=[t.Token(position=p, id=i, text=s) for p, (i, s) in enumerate(event.prompt)],
            prompt_tokens=len(event.prompt), seed=event.seed, max_new_tokens=event.max_new_tokens,
            branches=[BRANCHES[b] for b in event.branches]))
    raise TypeError(f"not a Generate event: {type(event).__name__}")


def score_response(result: ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        num_tokens=len(result.token_ids), scored_tokens=result.scored_tokens, token_ids=result.token_ids,
        clean_ce=result.clean_ce, edited_ce=result.edited_ce, kl=result.kl, edited=result.edited,
        clean_ce_per_token=result.clean_ce_per_token, edited_ce_per_token=result.edited_ce_per_token,
        kl_per_token=result.kl_per_token)


def feature_response(info: FeatureInfo, stack: ServedStack) -> pb.GetFeatureResponse:
    def scores(tokens):
        return [pb.TokenScore(id=s.id, text=s.text, score=s.score) for s in tokens]

    msg = pb.GetFeatureResponse(
        stack=info.stack, stage=stack.loaded.stages[info.stage].name, stage_index=info.stage, feature=info.feature,
        decoder_norm=info.decoder_norm, top_tokens=scores(info.top_tokens), bottom_tokens=scores(info.bottom_tokens),
        top_examples=[pb.FeatureExample(text=x, position=p, value=v) for x, p, v in info.top_examples])
    if info.density is not None:
        msg.density = info.density
    if info.dashboard is not None:
        msg.dashboard.CopyFrom(dashboard(info.dashboard, stack))
    msg.explanation = info.explanation
    if info.meta_latents is not None:
        msg.meta_latents.CopyFrom(pb.MetaLatents(ids=info.meta_latents.ids, values=info.meta_latents.values,
                                                 width=info.meta_latents.width))
    if info.steerability is not None:
        msg.steerability.CopyFrom(steerability(info.steerability))
    if info.explanation_source is not None:
        msg.explanation_source.CopyFrom(explanation_source(info.explanation_source))
    return msg


def _steering_point(p: dict) -> pb.SteeringPoint:
    return pb.SteeringPoint(op=p["op"], unit=p["unit"], value=p["value"], amount=p.get("amount", 0.0),
                            expression=p["expression"], lift=p.get("lift", 0.0),
                            concept_share=p.get("concept_share", 0.0), fluency_cost=p["fluency_cost"],
                            repetition=p.get("repetition", 0.0), examples=list(p.get("examples", ())))


def explanation_source(record: dict) -> pb.ExplanationSource:
    """A scored explanation record (core/stack/explanations.py) as the API's message."""
    scores = [pb.ExplanationScore(name=name, balanced_accuracy=s["balanced_accuracy"], examples=s["examples"],
                                  unparsed=s.get("unparsed", 0))
              for name, s in sorted(record.get("scores", {}).items())]
    return pb.ExplanationSource(explainer=record["explainer"], scorer=record.get("scorer", ""),
                                prompt_version=record["prompt_version"], date=record["date"], scores=scores)


def steerability(record: dict) -> pb.Steerability:
    """A stored steerability record (core/stack/steerability.py) as the API's message."""
    verdict, default = record["verdict"], record.get("default") or {}
    msg = pb.Steerability(steers=verdict["steers"], curve=[_steering_point(p) for p in record["curve"]],
                          output_score=record.get("output_score") or 0.0,
                          default_expression=default.get("expression", 0.0),
                          default_examples=list(default.get("examples", ())),
                          expression_threshold=record.get("expression_threshold", 0.0),
                          fluency_threshold=record.get("fluency_threshold", 0.0),
                          repetition_threshold=record.get("repetition_threshold", 0.0))
    best = verdict.get("best")
    if best is not None:
        point = next((p for p in record["curve"] if (p["op"], p["unit"], p["value"]) ==
                      (best["op"], best["unit"], best["value"])), best)
        msg.best.CopyFrom(_steering_point({**point, "fluency_cost": best["fluency_cost"],
                                           "expression": best["expression"]}))
    return msg


def _example(x: Example) -> pb.DashboardExample:
    return pb.DashboardExample(tokens=[pb.ExampleToken(id=tok.id, text=tok.text, value=tok.value) for tok in x.tokens],
                               index=x.index, value=x.value, document=x.document, position=x.position)


def _neighbours(items: Sequence[Neighbour], stack: ServedStack) -> list[pb.FeatureNeighbour]:
    names = stack.stage_names
    return [pb.FeatureNeighbour(stage=names[n.stage], stage_index=n.stage, feature=n.feature, cosine=n.cosine)
            for n in items if 0 <= n.stage < len(names)]


def _label(label: SideLabel | None) -> pb.TokenLabel | None:
    if label is None:
        return None
    tokens = [pb.LabelToken(id=t.id, text=t.text, share=t.share, firings=t.firings, occurrences=t.occurrences)
              for t in label.tokens]
    return pb.TokenLabel(tokens=tokens, rule_size=label.rule_size, precision=label.precision, recall=label.recall,
                         f1=label.f1)


def dashboard(d: FeatureDashboard, stack: ServedStack) -> pb.FeatureDashboard:
    sides = [pb.DashboardSide(sign=SIGNS[side.sign], count=side.count, density=side.density, mean=side.mean,
                              max=side.max, histogram=pb.Histogram(edges=side.edges, counts=side.counts),
                              top_examples=[_example(x) for x in side.top_examples],
                              quantiles=[pb.QuantileGroup(low=q.low, high=q.high, share=q.share,
                                                          examples=[_example(x) for x in q.examples])
                                         for q in side.quantiles], label=_label(side.label))
             for side in d.sides]
    return pb.FeatureDashboard(
        tokens=d.tokens, documents=d.documents, corpus=d.corpus, context=d.context, sides=sides,
        neighbours=_neighbours(d.neighbours, stack), cross_stage_neighbours=_neighbours(d.cross_stage, stack),
        cooccurring=[pb.CoOccurringFeature(feature=c.feature, jaccard=c.jaccard) for c in d.cooccurring])


def search_response(result: SearchPage, stack: ServedStack, next_page_token: str) -> pb.SearchFeaturesResponse:
    """`next_page_token`: signed by the servicer for result.next_offset ("" on the last page)."""
    names = stack.stage_names
    matches = []
    for m in result.matches:
        match = pb.FeatureMatch(stage=names[m.stage], stage_index=m.stage, feature=m.feature, score=m.score,
                                sign=SIGNS[m.sign] if m.sign is not None else pb.SIGN_UNSPECIFIED,
                                position=m.position, explanation=m.explanation, label=m.label)
        if m.density is not None:
            match.density = m.density
        if m.label_f1 is not None:
            match.label_f1 = m.label_f1
        matches.append(match)
    tokens = [t.Token(position=p, id=i, text=s) for p, (i, s) in enumerate(result.tokens)]
    return pb.SearchFeaturesResponse(stack=result.stack, features=matches, next_page_token=next_page_token,
                                     total=result.total, tokens=tokens)


def list_response(result: ListPage, stack: ServedStack, next_page_token: str) -> pb.ListFeaturesResponse:
    features = [pb.FeatureSummary(feature=f.feature, density=f.density, max=f.max, mean=f.mean,
                                  explanation=f.explanation, label_f1=f.label_f1, steers=f.steers,
                                  output_score=f.output_score, best_strength=f.best_strength)
                for f in result.features]
    return pb.ListFeaturesResponse(stack=result.stack, stage=stack.stage_names[result.stage],
                                   stage_index=result.stage, features=features,
                                   next_page_token=next_page_token, total=result.total, tokens=result.tokens)


def encode_response(sequence: int, rows: Sequence[StageCodes]) -> pb.EncodeActivationsResponse:
    return pb.EncodeActivationsResponse(sequence=sequence, rows=[stage_codes(c) for c in rows])


def tokenize_response(ids: Sequence[int], tokens: Sequence[str]) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(ids=ids, tokens=tokens)
