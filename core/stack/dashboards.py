"""Feature dashboards stored in a stack: what each feature of a stage means, as arrays over its features.

A stage may carry a `dashboard` record (written by `featurewire-train dashboards`) naming one safetensors file
`stage_NN_<hookpoint>.dashboard.<hash>.safetensors`. Every tensor's shape follows from the record's integers, so
the reader checks the file's header against them before anything is allocated (core/stack/tensors.py), and each
integer is bounded here before a shape is even formed. S is 2 for a signed (SA-GSAE) stage, 1 otherwise; index 0
is the positive side, 1 the negative side, and values on either side are magnitudes |z| except `*_acts`, which
hold the signed value of the feature at every token of an example's window. H = d_sae.

    count       (S, H)          int64    tokens on which the feature fired on that side
    sum         (S, H)          float64  Σ |z| over those tokens (mean = sum / count)
    max         (S, H)          float32  largest |z| (0 when it never fired)
    bin_edges   (B + 1,)        float32  log-spaced edges over |z| shared by every feature (clamped at both ends)
    hist        (S, H, B)       int64    firing counts per bin
    top_value   (S, H, n)       float32  the n largest |z|, descending (0 marks an empty slot)
    top_doc     (S, H, n)       int64    the example's document index in the pass (-1: empty slot)
    top_pos     (S, H, n)       int64    the firing token's position in that document's token ids
    top_tokens  (S, H, n, W)    int32    token ids of the window of W = 2·context + 1 tokens around it (-1: none)
    top_acts    (S, H, n, W)    float32  the feature's signed value at each window token
    quantile_low, quantile_high (S, H, Q)  float32  bounds over |z| of Q intervals of about equal firing mass,
                                         made of whole `hist` bins (an interval no bin falls into is empty)
    quantile_share (S, H, Q)    float32  share of the side's firings inside each interval (0: empty)
    quantile_value / _doc / _pos / _tokens / _acts  (S, H, Q, m[, W])  m examples per interval, as the top ones
    logit_top_ids / logit_bottom_ids (H, L) int64, logit_top_values / logit_bottom_values (H, L) float32
                                         the logit lens W_U · W_dec[f] / s: most raised and most lowered tokens
    neighbour_ids (H, K) int64, neighbour_cos (H, K) float32       nearest features of the same stage by
                                         decoder cosine (itself excluded)
    cross_stage, cross_ids (H, K) int64, cross_cos (H, K) float32  nearest features of the other stages, compared
                                         in one space through the residual stages' affine maps (-1: none)
    cooccur_ids (H, C) int64, cooccur_jaccard (H, C) float32       features of the same stage that fire on the
                                         same tokens most (Jaccard index of the firing sets); C may be 0

With `labels` = L > 0 in the record (absent or 0 in stacks written before labels: then none of these exist), the
LLM-free token label of every feature and side (trainer/dashboards/labels.py):

    label_ids         (S, H, L)     int64    the tokens the feature fires on, by firing mass descending (-1: none)
    label_share       (S, H, L)     float32  each token's share of the side's firing mass Σ|z|
    label_firings     (S, H, L)     int64    firings on that token
    label_occurrences (S, H, L)     int64    occurrences of that token among the pass's tokens
    label_size        (S, H)        int64    k: the first k tokens form the rule "fires exactly on these tokens"
                                             (the shortest prefix that maximises F1; 0 when it never fired)
    label_precision, label_recall, label_f1 (S, H) float32  the rule's exact scores over the pass's tokens

Torch-free on purpose: the activation-only server lists what a stack has without importing torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.stack.manifest import StackError, attach_records, load_manifest

LIMITS = {"top_n": 256, "context": 64, "bins": 256, "quantiles": 16, "per_quantile": 64, "logit_n": 256,
          "neighbours": 256, "cooccurrence": 256}
"""Largest value of each record integer a stack may declare; larger ones are refused before any shape exists."""
LABEL_LIMIT = 64
"""Largest `labels` (tokens per feature label) a record may declare."""
EXPLANATIONS = "explanations.json"
MAX_EXPLANATION_CHARS = 2000
MAX_EXPLANATIONS_BYTES = 64 << 20


@dataclass(frozen=True)
class DashboardShape:
    """The integers of a stage's dashboard record; every tensor shape follows from them."""

    d_sae: int
    signs: int
    top_n: int
    context: int
    bins: int
    quantiles: int
    per_quantile: int
    logit_n: int
    neighbours: int
    cooccurrence: int
    labels: int = 0  # tokens per feature label; 0 for dashboards written without labels

    @property
    def window(self) -> int:
        return 2 * self.context + 1

    def header(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """tensor name -> (safetensors dtype, shape): what the dashboard file must hold, exactly."""
        s, h, n, w = self.signs, self.d_sae, self.top_n, self.window
        q, m = self.quantiles, self.per_quantile
        want = {
            "count": ("I64", (s, h)), "sum": ("F64", (s, h)), "max": ("F32", (s, h)),
            "bin_edges": ("F32", (self.bins + 1,)), "hist": ("I64", (s, h, self.bins)),
            "quantile_low": ("F32", (s, h, q)), "quantile_high": ("F32", (s, h, q)),
            "quantile_share": ("F32", (s, h, q)),
        }
        for group, shape in (("top", (s, h, n)), ("quantile", (s, h, q, m))):
            want |= {f"{group}_value": ("F32", shape), f"{group}_doc": ("I64", shape), f"{group}_pos": ("I64", shape),
                     f"{group}_tokens": ("I32", (*shape, w)), f"{group}_acts": ("F32", (*shape, w))}
        lens = (h, self.logit_n)
        for side in ("top", "bottom"):
            want |= {f"logit_{side}_ids": ("I64", lens), f"logit_{side}_values": ("F32", lens)}
        k, c = self.neighbours, self.cooccurrence
        want |= {"neighbour_ids": ("I64", (h, k)), "neighbour_cos": ("F32", (h, k)), "cross_stage": ("I64", (h, k)),
                 "cross_ids": ("I64", (h, k)), "cross_cos": ("F32", (h, k)),
                 "cooccur_ids": ("I64", (h, c)), "cooccur_jaccard": ("F32", (h, c))}
        if self.labels:
            tokens = (s, h, self.labels)
            want |= {"label_ids": ("I64", tokens), "label_share": ("F32", tokens), "label_firings": ("I64", tokens),
                     "label_occurrences": ("I64", tokens), "label_size": ("I64", (s, h))}
            want |= {f"label_{k}": ("F32", (s, h)) for k in ("precision", "recall", "f1")}
        return want

    def record(self) -> dict[str, int]:
        """The integers as stored in the stage's `dashboard` record (d_sae is the stage's own)."""
        out = {"signs": self.signs, "top_n": self.top_n, "context": self.context, "bins": self.bins,
               "quantiles": self.quantiles, "per_quantile": self.per_quantile, "logit_n": self.logit_n,
               "neighbours": self.neighbours, "cooccurrence": self.cooccurrence}
        return out | ({"labels": self.labels} if self.labels else {})


def check_dashboard_entry(index: int, entry: Mapping[str, Any], files: Mapping[str, Any]) -> DashboardShape | None:
    """The stage's dashboard shape after checking its record (types, bounds, a listed file); None without one."""
    record = entry.get("dashboard")
    if record is None:
        return None
    where = f"stack.json: stages[{index}].dashboard"
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise StackError(f"{where} must be an object with a file")
    if record["file"] not in files:
        raise StackError(f"stage {index}: file {record['file']!r} is not listed in stack.json files")
    values: dict[str, int] = {}
    for key, limit in LIMITS.items():
        value = record.get(key)
        low = 1 if key in ("top_n", "bins", "quantiles", "per_quantile") else 0
        if type(value) is not int or not low <= value <= limit:
            raise StackError(f"{where}.{key} must be an integer in [{low}, {limit}], got {value!r}")
        values[key] = value
    signs = record.get("signs")
    if signs not in (1, 2) or type(signs) is not int:
        raise StackError(f"{where}.signs must be 1 or 2, got {signs!r}")
    if signs != (2 if entry.get("signed") else 1):
        raise StackError(f"{where}.signs is {signs}, but the stage is {'signed' if entry.get('signed') else 'not'}")
    for key in ("tokens", "documents"):
        if type(record.get(key)) is not int or record[key] < 0:
            raise StackError(f"{where}.{key} must be a non-negative integer")
    labels = record.get("labels", 0)  # absent in dashboards written before labels
    if type(labels) is not int or not 0 <= labels <= LABEL_LIMIT:
        raise StackError(f"{where}.labels must be an integer in [0, {LABEL_LIMIT}] (or absent), got {labels!r}")
    return DashboardShape(d_sae=int(entry["d_sae"]), signs=signs, **values, labels=labels)


@dataclass(frozen=True)
class TokenLabel:
    """One side of a feature's LLM-free label: the tokens it fires on by firing mass (at most `labels` of them),
    and the exact scores over the dashboard pass's tokens of the rule "fires exactly where the token is one of the
    first `size` tokens" (chosen as the shortest prefix that maximises F1; trainer/dashboards/labels.py)."""

    sign: int  # +1: the positive side (every unsigned stage), -1: the negative side of a signed stage
    token_ids: tuple[int, ...]  # by firing mass, descending
    shares: tuple[float, ...]  # each token's share of the side's firing mass Σ|z|
    firings: tuple[int, ...]  # firings on each token
    occurrences: tuple[int, ...]  # occurrences of each token among the pass's tokens
    size: int
    precision: float
    recall: float
    f1: float

    @property
    def rule_ids(self) -> tuple[int, ...]:
        """The tokens of the scored rule."""
        return self.token_ids[: self.size]

    def describe(self, token_text: Callable[[int], str]) -> str:
        """One line, e.g. `+ 'the' 62%, ' a' 21% (token F1 0.71: precision 0.80, recall 0.64)`, with the rule's
        tokens decoded by `token_text`."""
        shares = self.shares[: self.size]
        tokens = ", ".join(f"{token_text(t)!r} {share:.0%}" for t, share in zip(self.rule_ids, shares, strict=True))
        return (f"{'+' if self.sign > 0 else '-'} {tokens} (token F1 {self.f1:.2f}: precision {self.precision:.2f}, "
                f"recall {self.recall:.2f})")


LABEL_TENSORS = ("label_ids", "label_share", "label_firings", "label_occurrences", "label_size", "label_precision",
                 "label_recall", "label_f1")


def feature_labels(dashboard: Mapping[str, Any] | None, feature: int) -> list[TokenLabel]:
    """A feature's labels from a stage's loaded dashboard tensors, one per side it fired on (positive first); empty
    when the dashboard was written without labels or the feature never fired. Works on torch tensors or anything
    indexable whose rows have `.tolist()` (this module imports no torch)."""
    if dashboard is None or "label_ids" not in dashboard:
        return []
    rows = {k: [dashboard[k][side][feature].tolist() for side in range(len(dashboard[k]))] for k in LABEL_TENSORS}
    return _labels(rows, lambda side, k: rows[k][side])


def stage_labels(dashboard: Mapping[str, Any] | None) -> dict[int, list[TokenLabel]]:
    """Every labelled feature of a stage: {feature: its labels as `feature_labels` gives them}, converting each
    tensor once (for a search over all labels); empty without labels."""
    if dashboard is None or "label_ids" not in dashboard:
        return {}
    table = {k: dashboard[k].tolist() for k in LABEL_TENSORS}  # [side][feature][...]
    out = {}
    for feature in range(len(table["label_size"][0])):
        labels = _labels(table, lambda side, k, f=feature: table[k][side][f])
        if labels:
            out[feature] = labels
    return out


def _labels(table: Mapping[str, list], row: Callable[[int, str], Any]) -> list[TokenLabel]:
    out = []
    for side in range(len(table["label_size"])):
        size = int(row(side, "label_size"))
        if size == 0:
            continue
        ids = [t for t in row(side, "label_ids") if t >= 0]
        n = len(ids)
        out.append(TokenLabel(
            sign=1 if side == 0 else -1, token_ids=tuple(ids), shares=tuple(row(side, "label_share")[:n]),
            firings=tuple(row(side, "label_firings")[:n]), occurrences=tuple(row(side, "label_occurrences")[:n]),
            size=size, **{k: float(row(side, f"label_{k}")) for k in ("precision", "recall", "f1")}))
    return out


def parse_explanations(data: bytes, stages: Mapping[str, int]) -> dict[str, dict[int, str]]:
    """{stage name: {feature: one-line description}} from an explanations file, every entry checked against the
    stack's stages and widths (`stages`: name -> d_sae). An entry is the text itself (imported files) or an object
    with its `text` and where it came from (core/stack/explanations.py: LLM explanations with their scores)."""
    if len(data) > MAX_EXPLANATIONS_BYTES:
        raise StackError(f"{EXPLANATIONS} is larger than {MAX_EXPLANATIONS_BYTES >> 20} MiB")
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise StackError(f"{EXPLANATIONS} is not valid JSON: {exc!s:.200}") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("stages"), dict):
        raise StackError(f"{EXPLANATIONS} must be an object with a 'stages' object")
    out: dict[str, dict[int, str]] = {}
    for stage, table in parsed["stages"].items():
        if stage not in stages or not isinstance(table, dict):
            raise StackError(f"{EXPLANATIONS}: {stage!r} is not a stage of this stack (stages: {sorted(stages)})")
        out[stage] = {}
        for key, entry in table.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) < stages[stage]):
                raise StackError(f"{EXPLANATIONS}: stage {stage!r} has no feature {key!r} (0..{stages[stage] - 1})")
            text = entry.get("text") if isinstance(entry, dict) else entry  # a scored record (explanations.py)
            if not isinstance(text, str) or not 0 < len(text) <= MAX_EXPLANATION_CHARS:
                raise StackError(f"{EXPLANATIONS}: stage {stage!r} feature {key}: the explanation must be a string "
                                 f"of 1..{MAX_EXPLANATION_CHARS} characters")
            out[stage][int(key)] = text
    return out


def dump_explanations(explanations: Mapping[str, Mapping[int, str]]) -> bytes:
    """The file `parse_explanations` reads back, with features in order."""
    stages = {stage: {str(f): text for f, text in sorted(table.items())} for stage, table in explanations.items()}
    return (json.dumps({"stages": stages}, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def attach_explanations(stack_dir: str | Path, explanations: Mapping[str, Mapping[int, str]]) -> str:
    """Store one-line feature descriptions in a stack (replacing any it had), checked against its stages first."""
    manifest, _ = load_manifest(Path(stack_dir))
    data = dump_explanations(explanations)
    stages = {s["name"]: s["d_sae"] for s in manifest["stages"]}
    count = sum(len(table) for table in parse_explanations(data, stages).values())
    (name,) = attach_records(stack_dir, "explanations", ".json", {None: (data, {"count": count})})
    return name
