"""The prompts of `featurewire-train explain`, versioned: change a prompt's wording and PROMPT_VERSION changes with
it, so resumed runs never mix explanations made by different prompts.

Examples are rendered as their decoded tokens with the tokens where the feature fires (on the explained side)
wrapped as `<<like this>>`, consecutive firing tokens sharing one pair of marks (as EleutherAI's delphi does).

- Explainer: up to 20 shown examples (top and quantile-sampled), then "Explanation:"; the first non-empty line
  of the answer is the explanation.
- Detection (one request per example): the explanation and one unmarked excerpt; does the feature fire in it?
- Fuzzing (one request per example): the explanation and one marked excerpt, whose marks are either the real
  firing tokens or as many other tokens; are the marked tokens the ones it fires on?
Both scorers expect an answer starting with yes or no; anything else is counted as wrong and reported as
`unparsed`, so a scorer that cannot follow the format shows up as a number instead of a silent 0.5.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

PROMPT_VERSION = "featurewire-explain-v1"
MAX_EXPLANATION_CHARS = 300

EXPLAIN = (
    "We are studying one feature of a language model's internal activations. Below are excerpts of text on which "
    "it is active; in each, the tokens where it fires are marked <<like this>>.\n"
    "Describe in one short line what the feature detects (a word, a concept, or a pattern). Answer with that line "
    "only.\n\n{examples}\n\nExplanation:")
DETECT = (
    "A feature of a language model is described as: \"{explanation}\".\n"
    "Does the feature fire anywhere in the excerpt below? Answer yes or no.\n\n"
    "Excerpt: {excerpt}\n\nAnswer:")
FUZZ = (
    "A feature of a language model is described as: \"{explanation}\".\n"
    "In the excerpt below some tokens are marked <<like this>>. Are the marked tokens the ones where the feature "
    "fires? Answer yes or no.\n\n"
    "Excerpt: {excerpt}\n\nAnswer:")


def render(texts: Sequence[str], marked: Sequence[bool]) -> str:
    """The excerpt's tokens joined, with each run of marked tokens wrapped once in << >>; newlines shown as ⏎
    so an excerpt stays on one line."""
    out, inside = [], False
    for text, mark in zip(texts, marked, strict=True):
        if mark and not inside:
            out.append("<<")
        elif not mark and inside:
            out.append(">>")
        inside = mark
        out.append(text.replace("\n", "⏎"))
    if inside:
        out.append(">>")
    return "".join(out)


def explainer_prompt(excerpts: Sequence[str]) -> str:
    return EXPLAIN.format(examples="\n".join(f"Excerpt {n}: {x}" for n, x in enumerate(excerpts, 1)))


def detection_prompt(explanation: str, excerpt: str) -> str:
    return DETECT.format(explanation=explanation, excerpt=excerpt)


def fuzzing_prompt(explanation: str, excerpt: str) -> str:
    return FUZZ.format(explanation=explanation, excerpt=excerpt)


class RefusedAnswer(ValueError):
    """The explainer's answer holds no explanation (empty, only marks or punctuation)."""


def parse_explanation(answer: str) -> str:
    """The first non-empty line of the answer, without a repeated 'Explanation:' prefix, quotes or marks, cut to
    MAX_EXPLANATION_CHARS; RefusedAnswer when nothing with a letter or digit is left."""
    for line in answer.splitlines():
        line = re.sub(r"^\s*(explanation\s*:)?\s*", "", line, flags=re.IGNORECASE).strip().strip("\"'`")
        line = " ".join(line.replace("<<", "").replace(">>", "").split())
        if re.search(r"\w", line):
            return line[:MAX_EXPLANATION_CHARS]
    raise RefusedAnswer(f"the explainer's answer holds no explanation: {answer[:80]!r}")


def parse_yes_no(answer: str) -> bool | None:
    """True for an answer starting with yes, False for no, None for anything else."""
    match = re.match(r"\W*(yes|no)\b", answer.strip(), flags=re.IGNORECASE)
    return None if match is None else match.group(1).lower() == "yes"


def balanced_accuracy(truth: Sequence[bool], said: Sequence[bool | None]) -> float:
    """(true-positive rate + true-negative rate) / 2; an unparsed answer (None) counts as wrong. Both classes must
    be present."""
    positives = [s is True for t, s in zip(truth, said, strict=True) if t]
    negatives = [s is False for t, s in zip(truth, said, strict=True) if not t]
    if not positives or not negatives:
        raise ValueError("balanced accuracy needs examples of both classes")
    return (sum(positives) / len(positives) + sum(negatives) / len(negatives)) / 2


def score(ask: Callable[[str], str], prompts: Sequence[str], truth: Sequence[bool]) -> dict[str, float | int]:
    """Ask every prompt, parse yes/no, and report balanced accuracy with the number of examples and unparsed
    answers."""
    said = [parse_yes_no(ask(p)) for p in prompts]
    return {"balanced_accuracy": balanced_accuracy(truth, said), "examples": len(prompts),
            "unparsed": sum(s is None for s in said)}
