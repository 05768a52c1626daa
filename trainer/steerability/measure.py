"""The steerability of features: steer each over the schedule from neutral openings, re-read what came out.

For every feature of one stage and every strength, rows = openings × draws (greedy, then sampled with fixed
seeds shared by the default and the steered branch of an opening, so both branches see the same random numbers).
All rows of a group of features go through `generate_rows` in batches; every distinct (opening, continuation) is
then re-read once with no edit (identical continuations share one re-read, so a strength that changes no token
has a fluency cost of exactly 0). Pooled over a strength's rows:

- expression: share of generated tokens on which the feature fires (on its side) when re-read; mean activation;
  lift = expression − the default branch's expression;
- concept share: share of generated tokens among the feature's top dashboard tokens (its top examples' tokens);
- fluency cost: mean cross-entropy (nats/token) of the steered continuation under the unedited model minus that
  of the default continuation; repetition: share of generated bigrams already seen earlier in the continuation.

The verdict (schedule.py): per family (op, unit), the smallest strength whose expression exceeds the default
branch's by EXPRESSION_THRESHOLD (the lift; for a mid-density feature the default expression is about its density,
so this is the expression itself, and a feature that already fires on default text cannot pass at strength 0) at a
fluency cost of at most FLUENCY_THRESHOLD and a repetition rate of at most REPETITION_THRESHOLD or the default
branch's, whichever is larger (a loop of one token is cheap under the model, so the cross-entropy alone lets it
through; a model whose own continuations loop is not held to a bound it misses unsteered); the best strength is
the passing point with the lowest fluency cost among the families' smallest (then the highest expression).

The output score needs no generation (after Arad, Mueller & Belinkov, EMNLP 2025): ADD the feature at
`output_strength` times its max in one forward pass over the openings and take the probability mass the next-token
distribution gains on the feature's top logit-lens tokens (W_U · W_dec[f] / s), averaged over the openings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from core.host.host_model import HostModel
from core.stack.runtime import StackRuntime
from trainer.steerability.generation import NO_EDIT, Row, RowEdit, generate_rows, next_token_probs, reread
from trainer.steerability.schedule import EXPRESSION_THRESHOLD, FLUENCY_THRESHOLD, REPETITION_THRESHOLD, Strength


@dataclass(frozen=True)
class SteerSettings:
    strengths: tuple[Strength, ...]
    max_new_tokens: int = 16
    samples: int = 1  # sampled draws per opening, besides the greedy one
    temperature: float = 0.7
    seed: int = 0
    batch_rows: int = 64  # rows per generation batch
    reread_rows: int = 16  # rows per re-read forward pass (its logits are rows × tokens × vocab)
    output_strength: float = 8.0  # ADD, in units of max, for the output score
    lens_k: int = 20  # logit-lens tokens of the output score
    examples: int = 2  # greedy texts kept per point (of the first openings)

    def record(self) -> dict:
        """What a stored record was measured with (a resumed run only reuses records with equal settings)."""
        return {"strengths": [s.label for s in self.strengths], "max_new_tokens": self.max_new_tokens,
                "samples": self.samples, "temperature": self.temperature, "seed": self.seed,
                "output_strength": self.output_strength, "lens_k": self.lens_k,
                "expression_threshold": EXPRESSION_THRESHOLD, "fluency_threshold": FLUENCY_THRESHOLD,
                "repetition_threshold": REPETITION_THRESHOLD}


@dataclass(frozen=True)
class FeatureTarget:
    """One feature to measure, with what its dashboard says about it."""

    index: int
    side: int = 1  # +1, or -1 for the negative side of a signed code
    max_activation: float | None = None  # held-out max |z| on that side (None: no dashboard)
    density: float | None = None
    concept_tokens: tuple[int, ...] = ()


@dataclass
class _Pool:
    """Sums over a set of rows' re-read continuations."""

    tokens: int = 0
    fires: float = 0.0
    activation: float = 0.0
    concept: float = 0.0
    ce: float = 0.0
    bigrams: int = 0
    repeats: int = 0
    examples: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        n = max(self.tokens, 1)
        return {"expression": self.fires / n, "mean_activation": self.activation / n, "concept_share": self.concept / n,
                "ce": self.ce / n, "repetition": self.repeats / max(self.bigrams, 1), "tokens": self.tokens,
                "examples": list(self.examples)}


def residual_norm(host: HostModel, hookpoint: str, openings: Sequence[Sequence[int]]) -> float:
    """Mean ‖h‖ at `hookpoint` over the openings' tokens, BOS excluded (its norm is an outlier in Gemma)."""
    norms = []
    for ids in openings:
        captured = host.forward(torch.tensor([list(ids)]), reads=[hookpoint]).captures[hookpoint][0]  # (T, d)
        start = 1 if len(ids) > 1 and ids[0] == host.tokenizer.bos_token_id else 0
        norms.append(captured[start:].float().norm(dim=-1))
    return float(torch.cat(norms).mean())


def edit_amount(runtime: StackRuntime, stage_index: int, target: FeatureTarget, strength: Strength,
                norm: float) -> float:
    """The signed code value of a strength: value × max, or the ADD whose edit vector has value × norm length."""
    if strength.unit == "max":
        if not target.max_activation:
            raise ValueError(f"feature {target.index} has no held-out max activation; max units are undefined for it")
        return target.side * strength.value * target.max_activation
    stage = runtime.stages[stage_index]
    length = float(stage.sae.W_dec[target.index].norm()) / stage.input_scale
    return target.side * strength.value * norm / max(length, 1e-12)


def logit_lens(host: HostModel, runtime: StackRuntime, stage_index: int, targets: Sequence[FeatureTarget],
               k: int) -> list[list[int]]:
    """Each feature's k most raised tokens by W_U · (side · W_dec[f] / s)."""
    stage = runtime.stages[stage_index]
    unembedding = host.model.get_output_embeddings().weight.detach().float()  # (V, d)
    vocab = min(unembedding.shape[0], len(host.tokenizer))
    features = torch.tensor([t.index for t in targets], dtype=torch.long, device=stage.sae.W_dec.device)
    sides = torch.tensor([float(t.side) for t in targets], device=stage.sae.W_dec.device)
    directions = stage.sae.W_dec[features].float() * sides[:, None] / stage.input_scale  # (F, d)
    scores = directions.to(unembedding.device) @ unembedding[:vocab].T  # (F, V)
    return scores.topk(min(k, vocab), dim=1).indices.tolist()


def output_scores(host: HostModel, runtime: StackRuntime, stage_index: int, targets: Sequence[FeatureTarget],
                  openings: Sequence[Sequence[int]], settings: SteerSettings, norm: float) -> list[float]:
    """Probability mass gained on the top logit-lens tokens by one ADD-intervened forward pass, per feature."""
    stage = runtime.stages[stage_index]
    lens = logit_lens(host, runtime, stage_index, targets, settings.lens_k)
    fallback = Strength("add", "norm", 1.0)
    rows = [Row(tuple(o), NO_EDIT, None) for o in openings]
    for target in targets:
        strength = Strength("add", "max", settings.output_strength) if target.max_activation else fallback
        edit = RowEdit(target.index, "add", edit_amount(runtime, stage_index, target, strength, norm))
        rows += [Row(tuple(o), edit, None) for o in openings]
    probs = torch.cat([next_token_probs(host, runtime, stage, rows[lo:lo + settings.batch_rows])
                       for lo in range(0, len(rows), settings.batch_rows)])  # (R, V)
    o = len(openings)
    base = probs[:o]  # (O, V)
    scores = []
    for i, tokens in enumerate(lens):
        steered = probs[o * (i + 1):o * (i + 2)]  # (O, V)
        ids = torch.tensor(tokens, dtype=torch.long)
        scores.append(float((steered[:, ids].sum(1) - base[:, ids].sum(1)).mean()))
    return scores


def _repetition(tokens: list[int]) -> tuple[int, int]:
    """(bigrams, bigrams already seen earlier in the same continuation)."""
    seen, repeats = set(), 0
    for bigram in zip(tokens, tokens[1:], strict=False):
        repeats += bigram in seen
        seen.add(bigram)
    return max(len(tokens) - 1, 0), repeats


def measure_features(host: HostModel, runtime: StackRuntime, stage_index: int, targets: Sequence[FeatureTarget],
                     openings: Sequence[Sequence[int]], settings: SteerSettings, norm: float,
                     progress: Callable[[int], None] | None = None) -> list[dict]:
    """The steerability record of every target (see the module docstring); `progress` gets generated tokens."""
    stage = runtime.stages[stage_index]
    draws: list[int | None] = [None] + list(range(settings.samples))
    seeds = [[None if d is None else settings.seed * 100_003 + 1_000 * o + d for d in draws]
             for o in range(len(openings))]
    keys: list[tuple[int, int, Strength | None]] = []  # (target, opening·draws + draw, strength); target -1: default
    rows: list[Row] = []
    for o, opening in enumerate(openings):
        for d, seed in enumerate(seeds[o]):
            keys.append((-1, o * len(draws) + d, None))
            rows.append(Row(tuple(opening), NO_EDIT, seed))
    for t, target in enumerate(targets):
        for strength in settings.strengths:
            if strength.is_identity:
                continue
            edit = RowEdit(target.index, strength.op, edit_amount(runtime, stage_index, target, strength, norm))
            for o, opening in enumerate(openings):
                for d, seed in enumerate(seeds[o]):
                    keys.append((t, o * len(draws) + d, strength))
                    rows.append(Row(tuple(opening), edit, seed))
    tokens, valid = [], []
    for lo in range(0, len(rows), settings.batch_rows):
        out = generate_rows(host, runtime, stage, rows[lo:lo + settings.batch_rows], settings.max_new_tokens,
                            settings.temperature)
        tokens.append(out.tokens)
        valid.append(out.valid)
        if progress is not None:
            progress(out.tokens.numel())
    all_tokens, all_valid = torch.cat(tokens), torch.cat(valid)  # (R, N)
    unique: dict[tuple, int] = {}
    row_unique = []
    for r, row in enumerate(rows):
        key = (row.prompt, tuple(all_tokens[r][all_valid[r]].tolist()))
        row_unique.append(unique.setdefault(key, len(unique)))
    firsts = {u: r for r, u in reversed(list(enumerate(row_unique)))}
    order = [firsts[u] for u in range(len(unique))]
    read = reread(host, runtime, stage, [rows[r].prompt for r in order], all_tokens[order],
                  [t.index for t in targets], settings.reread_rows)
    u_valid = all_valid[order]  # (U, N)
    u_tokens = all_tokens[order]
    sides = torch.tensor([float(t.side) for t in targets])  # (F,)
    act = (read.codes * sides).clamp(min=0) * u_valid[..., None]  # (U, N, F)
    fires = (act > 0).sum(1).float()  # (U, F)
    act_sum = act.sum(1)  # (U, F)
    concept = torch.stack([(torch.isin(u_tokens, torch.tensor(t.concept_tokens, dtype=torch.int64)) & u_valid).sum(1)
                           for t in targets], dim=1).float() if targets else torch.zeros(len(order), 0)  # (U, F)
    ce_sum = (read.ce * u_valid).sum(1)  # (U,)
    counts = u_valid.sum(1)  # (U,)
    repetition = [_repetition(u_tokens[u][u_valid[u]].tolist()) for u in range(len(order))]
    texts = {u: host.decode(u_tokens[u][u_valid[u]]) for u in range(len(order))}

    pools: dict[tuple[int, Strength | None], _Pool] = {}
    defaults: dict[int, _Pool] = {}
    example_draws = {o * len(draws) for o in range(min(settings.examples, len(openings)))}  # greedy, first openings
    for (t, draw, strength), u in zip(keys, row_unique, strict=True):
        targets_here = range(len(targets)) if t < 0 else [t]
        for f in targets_here:
            pool = defaults.setdefault(f, _Pool()) if t < 0 else pools.setdefault((t, strength), _Pool())
            pool.tokens += int(counts[u])
            pool.fires += float(fires[u, f])
            pool.activation += float(act_sum[u, f])
            pool.concept += float(concept[u, f])
            pool.ce += float(ce_sum[u])
            pool.bigrams += repetition[u][0]
            pool.repeats += repetition[u][1]
            if draw in example_draws:
                pool.examples.append(texts[u])
    scores = output_scores(host, runtime, stage_index, targets, openings, settings, norm)
    lens = logit_lens(host, runtime, stage_index, targets, 10)
    return [_record(runtime, stage_index, target, defaults[t].summary(),
                    {s: pools[(t, s)].summary() for s in settings.strengths if not s.is_identity},
                    settings, norm, scores[t], lens[t]) for t, target in enumerate(targets)]


def _record(runtime: StackRuntime, stage_index: int, target: FeatureTarget, default: dict,
            points: dict[Strength, dict], settings: SteerSettings, norm: float, score: float,
            lens: list[int]) -> dict:
    curve = []
    for strength in settings.strengths:
        point = dict(default) if strength.is_identity else points[strength]
        curve.append({"op": strength.op, "unit": strength.unit, "value": strength.value,
                      "amount": 0.0 if strength.is_identity else edit_amount(runtime, stage_index, target, strength,
                                                                              norm),
                      **{k: v for k, v in point.items() if k != "ce"},
                      "lift": point["expression"] - default["expression"],
                      "fluency_cost": point["ce"] - default["ce"]})
    stage = runtime.stages[stage_index]
    return {"feature": target.index, "side": "+" if target.side > 0 else "-", "density": target.density,
            "max_activation": target.max_activation,
            "direction_norm": float(stage.sae.W_dec[target.index].norm()) / stage.input_scale,
            "concept_tokens": list(target.concept_tokens), "logit_lens": lens, "output_score": score,
            "default": default, "curve": curve, "verdict": verdict(curve, default["repetition"])}


def verdict(curve: Sequence[dict], default_repetition: float = 0.0) -> dict:
    """Whether the feature steers, and at which strength (see the module docstring)."""
    repetition = max(REPETITION_THRESHOLD, default_repetition)  # a model that loops anyway is not held to 0.5
    smallest: dict[str, dict] = {}
    for point in sorted(curve, key=lambda p: p["value"]):
        passes = (point["lift"] >= EXPRESSION_THRESHOLD and point["fluency_cost"] <= FLUENCY_THRESHOLD
                  and point["repetition"] <= repetition)
        family = f"{point['op']}:{point['unit']}"
        if passes and family not in smallest:
            smallest[family] = point
    if not smallest:
        best_expression = max(curve, key=lambda p: p["expression"], default=None)
        return {"steers": False, "best": None, "families": {},
                "best_expression": None if best_expression is None else best_expression["expression"]}
    best = min(smallest.values(), key=lambda p: (p["fluency_cost"], -p["expression"]))
    pick = ("op", "unit", "value", "amount", "expression", "fluency_cost")
    return {"steers": True, "best": {k: best[k] for k in pick},
            "families": {family: point["value"] for family, point in sorted(smallest.items())},
            "best_expression": max(p["expression"] for p in curve)}
