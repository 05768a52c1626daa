"""Terminal rendering for the CLI: per-token feature tables, side-by-side continuations, server summaries.

Pure functions from results to lines of text, so the CLI stays argument handling and the layout can be
tested without a server. JSON output is `to_json` of the same dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

from featurewire.events import DecomposeHeader, Finished, StageCodes, TokenFeatures
from featurewire.feature_results import (
    DashboardExample,
    FeatureDashboard,
    FeatureList,
    FeatureSummary,
    SearchResult,
    Steerability,
)
from featurewire.results import Feature, ScoreResult, ServerInfo, StackInfo, Tokens

EXAMPLES_SHOWN = 5  # top examples per side in `featurewire feature`


def to_json(value: Any, **extra: Any) -> str:
    """One line of JSON for a result dataclass (plus `extra` keys first, e.g. {"type": "token"})."""
    body = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    if isinstance(body, dict):
        body = {**extra, **body}
    return json.dumps(body, ensure_ascii=False, default=str)


def token_text(text: str, width: int = 12) -> str:
    """A token as a short quoted literal (whitespace and control characters visible)."""
    shown = repr(text)
    return shown if len(shown) <= width else shown[: width - 2] + "…" + shown[-1]


def _norm(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def codes_line(codes: StageCodes, top: int) -> str:
    features = "  ".join(f"{i}:{v:+.2f}" for i, v in codes.top(top))
    return (f"{codes.name:<12.12} {codes.l0:>4}  {_norm(codes.error_norm):>6}  "
            f"{_norm(codes.predicted_error_norm):>9}  | {features}")


def decompose_header(header: DecomposeHeader) -> list[str]:
    stages = ", ".join(f"{s.name} ({s.hookpoint}, d_sae {s.d_sae}{', signed' if s.signed else ''})"
                       for s in header.stages)
    return [f"stack {header.stack} ({header.stack_digest[:12]}), {header.num_tokens} tokens, top {header.top_k}",
            f"stages: {stages}",
            f"{'pos':>4} {'token':<14} {'stage':<12} {'L0':>4}  {'error':>6}  {'predicted':>9}  | "
            "feature:value, largest |value| first"]


def token_rows(token: TokenFeatures, top: int) -> list[str]:
    """One line per stage; the first carries the position and the token."""
    lines = []
    for n, codes in enumerate(token.features):
        lead = f"{token.position:>4} {token_text(token.text, 14):<14}" if n == 0 else " " * 19
        lines.append(f"{lead} {codes_line(codes, top)}")
    if not token.features:
        lines.append(f"{token.position:>4} {token_text(token.text, 14)}")
    return lines


def side_by_side(left: str, right: str, titles: tuple[str, str] = ("steered", "default"),
                 width: int | None = None) -> list[str]:
    """Two texts in wrapped columns, for comparing a steered continuation with the default one."""
    total = width or shutil.get_terminal_size((100, 24)).columns
    column = max(20, (total - 3) // 2)

    def wrap(text: str) -> list[str]:
        lines: list[str] = []
        for paragraph in text.split("\n"):
            lines += textwrap.wrap(paragraph, column, replace_whitespace=False, drop_whitespace=False) or [""]
        return lines

    a, b = wrap(left), wrap(right)
    rows = [f"{titles[0]:<{column}} | {titles[1]}", f"{'-' * column}-+-{'-' * column}"]
    rows += [f"{x:<{column}} | {y}" for x, y in zip(a + [""] * (len(b) - len(a)), b + [""] * (len(a) - len(b)),
                                                       strict=True)]
    return rows


def finish_line(finished: Finished) -> str:
    detail = {"STOP_STRING": f" {finished.stop_string!r}",
              "FEATURE_CONDITION": f" {finished.trigger.condition_id} at position {finished.trigger.position} "
                                   f"(value {finished.trigger.value:+.3g})" if finished.trigger else ""}
    return (f"[{finished.branch.lower()}: {finished.reason}{detail.get(finished.reason, '')}, "
            f"{finished.generated_tokens} tokens]")


def _metric(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key)
    return "—" if value is None or not math.isfinite(value) else f"{value:.3g}"


def stacks_lines(stacks: Iterable[StackInfo]) -> list[str]:
    lines = []
    for n, stack in enumerate(stacks):
        default = " (default)" if n == 0 else ""
        lines.append(f"stack {stack.name}{default}: {stack.digest[:12]}, {len(stack.stages)} stages, "
                     f"host {stack.host_model}")
        for s in stack.stages:
            source = f"residual of {s.residual_of}" if s.residual_of is not None else ""
            flags = ", ".join(x for x in ("signed" if s.signed else "", source,
                                          "error predictor" if s.has_error_predictor else "") if x)
            lines.append(f"  {s.index} {s.name:<24} {s.hookpoint:<26} {s.architecture:<9} d_sae {s.d_sae:<6} "
                         f"FVE {_metric(s.metrics, 'fve'):<6} L0 {_metric(s.metrics, 'l0'):<6} {flags}".rstrip())
    return lines


def info_lines(info: ServerInfo) -> list[str]:
    c, lim, v = info.capabilities, info.limits, info.versions
    lines = [f"server {v.server} (api {v.api}) on {info.instance}, mode {c.mode}"
             + (", auth required" if c.auth_required else "")]
    if info.model is not None:
        m = info.model
        lines.append(f"model {m.name}: {m.architecture}, {m.num_layers} layers, d_model {m.d_model}, "
                     f"vocab {m.vocab_size}, {m.dtype} on {m.device}; {len(info.hookpoints)} hookpoints")
    lines += stacks_lines(info.stacks) or ["no stacks loaded"]
    lines.append(f"rpcs: {', '.join(c.rpcs)}")
    lines.append(f"limits: prompt {lim.max_prompt_tokens} tokens, new tokens {lim.default_max_new_tokens} "
                 f"(max {lim.max_new_tokens}), top_k {lim.default_top_k} (max {lim.max_top_k}), "
                 f"queue {lim.queue_size}")
    return lines


def feature_lines(f: Feature) -> list[str]:
    def scores(items: Sequence[Any]) -> str:
        return ", ".join(f"{token_text(s.text)} {s.score:+.3g}" for s in items) or "—"

    density = "—" if f.density is None else f"{f.density:.4g}"
    lines = [f"feature {f.feature} of stage {f.stage} (index {f.stage_index}) in stack {f.stack}"]
    if f.explanation:
        lines.append(f"explanation: {f.explanation}")
    if f.explanation_source is not None:
        lines.append(f"  {f.explanation_source.describe()}")
    lines += [f"decoder norm {f.decoder_norm:.4g}, density {density}",
              f"promotes:   {scores(f.top_tokens)}", f"suppresses: {scores(f.bottom_tokens)}"]
    if f.meta_latents is not None:
        latents = ", ".join(f"{i}:{v:+.3g}" for i, v in zip(f.meta_latents.ids, f.meta_latents.values, strict=True))
        lines.append(f"meta-latents (of {f.meta_latents.width}): {latents or '—'}")
    if f.steerability is not None:
        lines += steerability_lines(f.steerability)
    if f.dashboard is not None:
        return lines + dashboard_lines(f.dashboard)
    lines += [f"example ({x.value:+.3g} at token {x.position}): {x.text!r}" for x in f.top_examples]
    return lines


def example_line(x: DashboardExample) -> str:
    """The example's window with the firing token marked [[like this]], and where it comes from."""
    return f"{x.value:+8.3g}  {x.marked()!r}  (document {x.document}, token {x.position})"


def dashboard_lines(d: FeatureDashboard) -> list[str]:
    lines = [f"dashboard: {d.tokens:,} tokens of {d.documents} documents ({d.corpus or '?'})"]
    for side in d.sides:
        lines.append(f"  {side.sign}: density {side.density:.4g} ({side.count:,} tokens), mean {side.mean:.3g}, "
                     f"max {side.max:.3g}")
        if side.label is not None:
            lines.append(f"    label: {side.label.describe()}")
        lines += [f"    {example_line(x)}" for x in side.top_examples[:EXAMPLES_SHOWN]]
        for q in side.quantiles:
            sample = f": {q.examples[0].marked()!r}" if q.examples else ""
            lines.append(f"    [{q.low:.3g}, {q.high:.3g}) {q.share:.0%}{sample}")

    def refs(items: Sequence[Any], cross: bool = False) -> str:
        return ", ".join((f"{n.stage}:{n.feature}" if cross else f"{n.feature}") + f" ({n.cosine:.2f})"
                         for n in items) or "—"

    lines.append(f"neighbours: {refs(d.neighbours)}")
    lines.append(f"other stages: {refs(d.cross_stage_neighbours, cross=True)}")
    lines.append("co-occurs with: " + (", ".join(f"{c.feature} ({c.jaccard:.2f})" for c in d.cooccurring) or "—"))
    return lines


def _density(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _f1(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def search_lines(r: SearchResult) -> list[str]:
    texts = {t.position: t.text for t in r.tokens}
    lines = [f"{r.total} matches in stack {r.stack}" + (f" (more: --page-token {r.next_page_token})"
                                                       if r.next_page_token else "")]
    for m in r.features:
        where = f" at {m.position} {token_text(texts.get(m.position, ''))}" if r.tokens else ""
        sign = f" {m.sign.lower()}" if m.sign else ""
        ref = f"{m.stage}:{m.feature}"
        f1 = "" if m.label_f1 is None else f"  label F1 {m.label_f1:.2f}"
        lines.append(f"{ref:<20} score {m.score:+.4g}{sign}{where}  density {_density(m.density)}{f1}"
                     + (f"  {m.explanation}" if m.explanation else "") + (f"  [{m.label}]" if m.label else ""))
    return lines


def steerability_lines(s: Steerability) -> list[str]:
    """The measured steering curve: one line per strength, then the verdict."""
    best = s.best
    verdict = (f"steers at {best.op}:{best.unit}:{best.value:g} (expression {best.expression:.0%}, fluency cost "
               f"{best.fluency_cost:+.2f} nats/token)" if s.steers and best is not None else "does not steer")
    lines = [f"steerability: {verdict}; output score {s.output_score:+.3f}; default expression "
             f"{s.default_expression:.0%} (thresholds: lift >= {s.expression_threshold:.0%}, fluency cost <= "
             f"{s.fluency_threshold:g}, repetition <= {s.repetition_threshold:.0%})",
             f"  {'strength':<14} {'expression':>10} {'lift':>7} {'concept':>8} {'fluency':>8} {'repeat':>7}  example"]
    for p in s.curve:
        example = p.examples[0] if p.examples else ""
        lines.append(f"  {p.op + ':' + p.unit + ':' + format(p.value, 'g'):<14} {p.expression:>10.0%} {p.lift:>+7.0%} "
                     f"{p.concept_share:>8.0%} {p.fluency_cost:>+8.2f} {p.repetition:>7.0%}  {example!r}")
    return lines


def _steers(f: FeatureSummary) -> str:
    if f.steers is None:
        return "—"
    return f.best_strength if f.steers else "no"


def feature_list_lines(r: FeatureList) -> list[str]:
    lines = [f"{r.total} features of stage {r.stage} in stack {r.stack} ({r.tokens:,} tokens)"
             + (f" (more: --page-token {r.next_page_token})" if r.next_page_token else ""),
             f"{'feature':>7}  {'density':>9}  {'max':>8}  {'mean':>8}  {'label F1':>8}  {'steers':>12}  "
             f"{'output':>7}  explanation"]
    lines += [f"{f.feature:>7}  {f.density:>9.4g}  {f.max:>8.3g}  {f.mean:>8.3g}  {_f1(f.label_f1):>8}  "
              f"{_steers(f):>12}  {'—' if f.output_score is None else format(f.output_score, '+.3f'):>7}  "
              f"{f.explanation}".rstrip() for f in r.features]
    return lines


def score_lines(s: ScoreResult) -> list[str]:
    lines = [f"tokens {s.num_tokens} ({s.scored_tokens} scored)", f"clean CE   {s.clean_ce:.4f} nats/token"]
    if s.edited:
        lines += [f"edited CE  {s.edited_ce:.4f} nats/token ({s.delta_ce:+.4f})", f"KL         {s.kl:.4f} nats/token"]
    return lines


def tokens_lines(tokens: Tokens) -> list[str]:
    return [f"{n:>4} {i:>7}  {token_text(s, 40)}" for n, (i, s) in enumerate(zip(tokens.ids, tokens.tokens,
                                                                                   strict=True))]
