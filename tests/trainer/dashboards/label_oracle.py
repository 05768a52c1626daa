"""A brute-force oracle for the token labels: from the full code matrix and every token's id, with exact fractions
for F1 (no streaming, no blocks, no files)."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest
import torch


def brute_labels(codes: torch.Tensor, ids: torch.Tensor, signed: bool, label_n: int) -> list[list[dict]]:
    """[side][feature] -> {ids, shares, firings, occurrences, size, precision, recall, f1}; codes (N, H), ids (N,)."""
    occurrences = Counter(ids.tolist())
    out = []
    for side in range(2 if signed else 1):
        magnitude = (codes if side == 0 else -codes).clamp_min(0).double()  # (N, H)
        labels = []
        for f in range(codes.shape[1]):
            rows = (magnitude[:, f] > 0).nonzero(as_tuple=True)[0].tolist()
            count, mass = Counter(), Counter()
            for r in rows:
                count[int(ids[r])] += 1
                mass[int(ids[r])] += float(magnitude[r, f])
            ranked = sorted(count, key=lambda t: (-mass[t], t))[:label_n]
            total = sum(mass.values())
            best, best_f1, hits, seen = 0, Fraction(-1), 0, 0
            for k, token in enumerate(ranked, 1):
                hits, seen = hits + count[token], seen + occurrences[token]
                f1 = Fraction(2 * hits, len(rows) + seen)
                if f1 > best_f1:
                    best, best_f1, best_hits, best_seen = k, f1, hits, seen
            labels.append({
                "ids": ranked, "shares": [mass[t] / total for t in ranked], "firings": [count[t] for t in ranked],
                "occurrences": [occurrences[t] for t in ranked], "size": best,
                "precision": float(Fraction(best_hits, best_seen)) if rows else 0.0,
                "recall": float(Fraction(best_hits, len(rows))) if rows else 0.0,
                "f1": float(best_f1) if rows else 0.0,
            })
        out.append(labels)
    return out


def assert_labels_equal(board: dict[str, torch.Tensor], expected: list[list[dict]], where: str = "") -> None:
    """The stored label tensors of every side and feature against the oracle's."""
    for side, labels in enumerate(expected):
        for f, want in enumerate(labels):
            k = len(want["ids"])
            at = f"{where} side {side} feature {f}"
            assert board["label_ids"][side, f, :k].tolist() == want["ids"], at
            assert (board["label_ids"][side, f, k:] == -1).all(), at
            assert board["label_firings"][side, f, :k].tolist() == want["firings"], at
            assert board["label_occurrences"][side, f, :k].tolist() == want["occurrences"], at
            assert board["label_share"][side, f, :k].tolist() == approx(want["shares"]), at
            assert int(board["label_size"][side, f]) == want["size"], at
            for key in ("precision", "recall", "f1"):
                assert float(board[f"label_{key}"][side, f]) == approx(want[key]), f"{at}: {key}"


def approx(value):
    return pytest.approx(value, rel=1e-5, abs=1e-7)
