"""Report section 6: measured steerability on the demo stack (`featurewire-train steerability`).

Samples mid-density features (1e-4..1e-2) per stage, measures them with a reduced schedule that fits a 2-core CPU
(the records go into the stack and are reused: a rerun only measures what is missing), and renders the share that
steers per stage, the best strengths and their fluency costs, ADD against SET, plain against residual stages, how
well the generation-free output score predicts the verdict (ROC AUC), and three features that steer and three
that do not, with their dashboards' top tokens beside the steered texts.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.report.markdown import Table, fmt
from trainer.report.runs import ReportSettings

STACK = Path("runs/demo/stack")
SAMPLE = 8  # features per stage
DENSITY = (1e-4, 1e-2)
STRENGTHS = ("add:max:2,4,8,16", "set:max:4,16", "add:norm:0.5,1,2")
OPENINGS, TOKENS, SAMPLES = 8, 12, 1
TITLE = "## 6. Measured steerability (`featurewire-train steerability`)"


def command(stack: Path = STACK) -> str:
    return (f"featurewire-train steerability --stack {stack} --sample {SAMPLE} --density {DENSITY[0]:g}:{DENSITY[1]:g} "
            f"--strengths {' '.join(STRENGTHS)} --openings {OPENINGS} --tokens {TOKENS} --samples {SAMPLES}")


def measure(settings: ReportSettings, stack_dir: Path = STACK) -> None:
    """Run the measure (reusing stored records) on the sample this section reports."""
    from core.config import ModelConfig
    from core.host.loading import load_host_model
    from core.stack.reader import read_stack
    from trainer.steerability.build import read_openings, run_steerability, select
    from trainer.steerability.measure import SteerSettings
    from trainer.steerability.schedule import parse_strengths

    stack = read_stack(stack_dir)
    host = load_host_model(ModelConfig(name=settings.model))
    selections = select(stack, [s.index for s in stack.stages], features=None, sample=SAMPLE, density=DENSITY,
                        seed=settings.seed)
    steer = SteerSettings(tuple(parse_strengths(list(STRENGTHS))), max_new_tokens=TOKENS, samples=SAMPLES,
                          seed=settings.seed)
    run_steerability(stack_dir, host, selections, steer, read_openings()[:OPENINGS], progress=settings.progress)


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """P(score of a steering feature > score of one that does not), ties counted half; None without both kinds."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _family_table(records: Sequence[dict[str, Any]]) -> Table:
    """Per op and unit: the share of features whose family passes, and the median smallest passing strength."""
    table = Table(["op:unit", "features that steer with it", "median smallest passing strength",
                   "median best expression", "median fluency cost at the largest strength"])
    families = sorted({f"{p['op']}:{p['unit']}" for r in records for p in r["curve"]})
    for family in families:
        passing = [r["verdict"]["families"][family] for r in records if family in r["verdict"].get("families", {})]
        points = [[p for p in r["curve"] if f"{p['op']}:{p['unit']}" == family] for r in records]
        best = [max(p["expression"] for p in ps) for ps in points if ps]
        top = [max(ps, key=lambda p: p["value"])["fluency_cost"] for ps in points if ps]
        table.add([family, f"{len(passing)}/{len(records)}", fmt(_median(passing), 2), fmt(_median(best)),
                   fmt(_median(top))])
    return table


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return ", ".join(repr(tokenizer.decode([i])) for i in ids[:6]) or "–"


def _examples(stages: Sequence[Any], tokenizer: Any, steers: bool) -> list[str]:
    """Up to three features with `steers`, best expression first: top tokens beside a steered text."""
    found = [(stage, r) for stage in stages for r in (stage.steerability or {}).get("features", {}).values()
             if r["verdict"]["steers"] == steers]
    found.sort(key=lambda item: -(item[1]["verdict"].get("best_expression") or 0.0))
    lines = []
    for stage, record in found[:3]:
        best = record["verdict"]["best"]
        point = max(record["curve"], key=lambda p: p["expression"]) if best is None else next(
            p for p in record["curve"] if (p["op"], p["unit"], p["value"]) == (best["op"], best["unit"], best["value"]))
        text = (point["examples"] or [""])[0].replace("\n", "↵")
        default = (record["default"]["examples"] or [""])[0].replace("\n", "↵")
        lines.append(f"- `{stage.name}` #{record['feature']} (density {fmt(record['density'], 4)}): top tokens "
                     f"{_decode(tokenizer, record['concept_tokens'])}; logit lens "
                     f"{_decode(tokenizer, record['logit_lens'])}; at {point['op']}:{point['unit']}:{point['value']:g} "
                     f"expression {fmt(point['expression'], 2)}, fluency cost {fmt(point['fluency_cost'], 2)}: "
                     f"“{text}” (default: “{default}”)")
    return lines or ["- none in this sample"]


def render(stages: Sequence[Any], tokenizer: Any, sample_note: str) -> str:
    """The section's markdown from stages that carry steerability records (LoadedStage objects)."""
    table = Table(["stage", "kind", "measured", "steer", "share", "median best strength (of those)",
                   "median fluency cost at best", "median output score", "output-score AUC"])
    everything, kinds = [], {"plain": [], "residual": []}
    best_strengths: Counter[str] = Counter()
    for stage in stages:
        records = list((stage.steerability or {}).get("features", {}).values())
        if not records:
            continue
        kind = "residual" if stage.residual_of is not None else "plain"
        steer = [r for r in records if r["verdict"]["steers"]]
        for r in steer:
            best = r["verdict"]["best"]
            best_strengths[f"{best['op']}:{best['unit']}:{best['value']:g}"] += 1
        scores = [r["output_score"] for r in records]
        auc = roc_auc(scores, [r["verdict"]["steers"] for r in records])
        table.add([stage.name, kind, len(records), len(steer), fmt(len(steer) / len(records), 2),
                   ", ".join(sorted({f"{r['verdict']['best']['op']}:{r['verdict']['best']['unit']}:"
                                     f"{r['verdict']['best']['value']:g}" for r in steer})) or "–",
                   fmt(_median([r["verdict"]["best"]["fluency_cost"] for r in steer]), 2),
                   fmt(_median(scores)), fmt(auc, 2)])
        everything += records
        kinds[kind] += records
    if not everything:
        return f"{TITLE}\n\nNo steerability records on the demo stack yet: run `{command()}`.\n"
    labels = [r["verdict"]["steers"] for r in everything]
    auc = roc_auc([r["output_score"] for r in everything], labels)
    by_kind = "; ".join(f"{kind}: {sum(r['verdict']['steers'] for r in rs)}/{len(rs)}" for kind, rs in kinds.items()
                        if rs)
    return "\n".join([
        TITLE, "", "```sh", command(), "```", "", sample_note, "",
        table.render(), "",
        f"Steering features by kind of stage: {by_kind}. Best strengths over all stages: "
        + (", ".join(f"{k} ×{v}" for k, v in best_strengths.most_common()) or "none") + ".", "",
        "ADD against SET (a family passes when its smallest passing strength exists):", "",
        _family_table(everything).render(), "",
        f"The output score (one intervened forward pass, no generation) against the verdict over all "
        f"{len(everything)} measured features: ROC AUC {fmt(auc, 2)} (0.5 = no better than chance; – when the "
        "sample has only one kind).", "",
        "Three features that steer (best expression first):", "", *_examples(stages, tokenizer, True), "",
        "Three that do not (closest to steering first):", "", *_examples(stages, tokenizer, False), "",
    ])


def section(settings: ReportSettings, stack_dir: Path = STACK) -> str:
    if not (stack_dir / "stack.json").is_file():
        return (f"{TITLE}\n\nThe demo stack `{stack_dir}` is not built yet (`make demo-stack`), so nothing was "
                "measured.\n")
    from core.config import ModelConfig
    from core.host.loading import load_host_model
    from core.stack.reader import read_stack

    if settings.train_missing:
        measure(settings, stack_dir)
    stack = read_stack(stack_dir)
    tokenizer = load_host_model(ModelConfig(name=settings.model)).tokenizer
    note = (f"Sample: up to {SAMPLE} features per stage with dashboard density in [{DENSITY[0]:g}, {DENSITY[1]:g}] "
            f"(seed {settings.seed}); {OPENINGS} shipped openings, greedy plus {SAMPLES} sampled continuation(s) "
            f"of {TOKENS} tokens each, strengths {' '.join(STRENGTHS)}. A feature steers when its expression lift "
            "reaches 0.25 at a fluency cost of at most 1 nat/token (docs/stack-format.md, Steerability).")
    return render(stack.stages, tokenizer, note)
