"""Rules that drop degenerate generated samples: too short, looping, or stuck on a few tokens.

Small models sampled at temperature 1 now and then fall into a loop ("the the the", a line repeated) or stop
at once; such text would teach the SAE features of failure modes rather than of language. The rules read token
ids only, so they cost nothing next to sampling, and they are the repetition heuristics of Holtzman et al.
(2020) and of the Gopher data filters (Rae et al. 2021, duplicate n-gram share), on tokens instead of words.
"""

from __future__ import annotations

from collections.abc import Sequence

REPEAT_NGRAM = 4

TOO_SHORT = "too_short"
REPETITIVE = "repetitive"
LOW_VARIETY = "low_variety"
REASONS = (TOO_SHORT, REPETITIVE, LOW_VARIETY)


def repeated_ngram_share(ids: Sequence[int], n: int = REPEAT_NGRAM) -> float:
    """Share of the n-grams of `ids` that already occurred earlier in `ids` (0 when there are none)."""
    total = len(ids) - n + 1
    if total < 1:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for i in range(total):
        gram = tuple(ids[i : i + n])
        repeats += gram in seen
        seen.add(gram)
    return repeats / total


def distinct_share(ids: Sequence[int]) -> float:
    """Distinct tokens over tokens (1 for an empty sample)."""
    return len(set(ids)) / len(ids) if ids else 1.0


def rejection(ids: Sequence[int], text: str, *, min_tokens: int, max_repeat_share: float,
              min_distinct_share: float) -> str | None:
    """Why a sample (its generated token ids and decoded text) is dropped, or None to keep it."""
    if len(ids) < min_tokens or not text.strip():
        return TOO_SHORT
    if repeated_ngram_share(ids) > max_repeat_share:
        return REPETITIVE
    if distinct_share(ids) < min_distinct_share:
        return LOW_VARIETY
    return None
