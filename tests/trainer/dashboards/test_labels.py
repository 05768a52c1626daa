"""The token labels against a brute-force oracle over the full code matrix, on random codes and on planted features
whose labels are known by construction (one token: F1 = 1; two tokens with their mass shares; half the occurrences:
precision 1/2; a signed feature's two sides apart); the blocked, chunked aggregation; the stored record."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.dashboards.label_oracle import assert_labels_equal, brute_labels
from trainer.dashboards.accumulator import BatchTokens, DashboardSettings
from trainer.dashboards.labels import compute_labels, slot_blocks
from trainer.dashboards.stage import StageAccumulator

H, ROWS, WIDTH, BATCHES, VOCAB = 10, 3, 16, 6, 20
SETTINGS = DashboardSettings(top_n=3, context=1, bins=8, bin_min=1e-2, bin_max=1e2, quantiles=2, per_quantile=2,
                             cooccurrence=0, label_n=4)


def batches_with_planted_features(signed: bool, seed: int = 0):
    """Random sparse codes over random token grids, with features 0-3 planted (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    out, half = [], 0
    for b in range(BATCHES):
        ids = torch.randint(0, VOCAB, (ROWS, WIDTH), generator=g)
        keep = torch.rand(ROWS, WIDTH, generator=g) > 0.1
        keep[:, 0] = False
        cell = keep.reshape(-1).nonzero(as_tuple=True)[0]
        kept_index = torch.full((ROWS * WIDTH,), -1, dtype=torch.long)
        kept_index[cell] = torch.arange(cell.numel())
        tokens = BatchTokens(ids, cell, b * ROWS + cell // WIDTH, cell % WIDTH, kept_index)
        token = tokens.ids
        codes = torch.rand(cell.numel(), H, generator=g) * (torch.rand(cell.numel(), H, generator=g) < 0.25)
        if signed:
            codes = codes * torch.where(torch.rand(cell.numel(), H, generator=g) < 0.5, -1.0, 1.0)
        codes[:, :4] = 0.0
        codes[:, 0] = torch.where(token == 7, 0.5 + torch.rand(cell.numel(), generator=g), 0.0)
        codes[:, 1] = torch.where(token == 3, 2.0, 0.0) + torch.where(token == 9, 1.0, 0.0)
        for r in (token == 4).nonzero(as_tuple=True)[0].tolist():  # every other occurrence of token 4
            codes[r, 2], half = (1.0 if half % 2 == 0 else 0.0), half + 1
        codes[:, 3] = torch.where(token == 5, 1.0, 0.0) - torch.where(token == 6, 1.5, 0.0) * signed
        out.append((codes, tokens))
    return out


def accumulate(batches, signed: bool, settings: DashboardSettings = SETTINGS) -> StageAccumulator:
    acc = StageAccumulator(H, signed, settings, torch.device("cpu"))
    for codes, tokens in batches:
        acc.update(codes, tokens)
    return acc


def everything(batches):
    return torch.cat([c for c, _ in batches]), torch.cat([t.ids for _, t in batches])


@pytest.mark.parametrize("signed", [False, True])
def test_labels_equal_brute_force_on_random_and_planted_codes(signed):
    batches = batches_with_planted_features(signed)
    board = accumulate(batches, signed).tensors()
    codes, ids = everything(batches)
    assert board["label_ids"].shape == (2 if signed else 1, H, SETTINGS.label_n)
    assert_labels_equal(board, brute_labels(codes, ids, signed, SETTINGS.label_n))
    assert (board["label_size"][:, 4:] > 0).all()  # the random features fired and got labels


@pytest.mark.parametrize("signed", [False, True])
def test_planted_features_get_their_known_labels(signed):
    batches = batches_with_planted_features(signed, seed=1)
    board = accumulate(batches, signed).tensors()
    _, ids = everything(batches)
    n = {t: int((ids == t).sum()) for t in (3, 4, 5, 6, 7, 9)}
    assert min(n.values()) >= 2
    # Fires exactly on token 7: a one-token rule with precision = recall = F1 = 1 and the whole mass.
    assert int(board["label_size"][0, 0]) == 1 and int(board["label_ids"][0, 0, 0]) == 7
    assert board["label_ids"][0, 0, 1:].eq(-1).all()
    assert float(board["label_f1"][0, 0]) == float(board["label_precision"][0, 0]) == 1.0
    assert float(board["label_share"][0, 0, 0]) == pytest.approx(1.0)
    assert int(board["label_firings"][0, 0, 0]) == int(board["label_occurrences"][0, 0, 0]) == n[7]
    # Fires on tokens 3 (|z| 2) and 9 (|z| 1): both, ranked and shared by mass, F1 = 1 only with both.
    mass = {3: 2.0 * n[3], 9: 1.0 * n[9]}
    ranked = sorted(mass, key=lambda t: (-mass[t], t))
    assert board["label_ids"][0, 1, :2].tolist() == ranked and int(board["label_size"][0, 1]) == 2
    assert board["label_share"][0, 1, :2].tolist() == pytest.approx([mass[t] / sum(mass.values()) for t in ranked])
    assert float(board["label_f1"][0, 1]) == pytest.approx(1.0)
    # Fires on every other occurrence of token 4: recall 1, precision about 1/2.
    fired = int(board["count"][0, 2])
    assert int(board["label_ids"][0, 2, 0]) == 4 and int(board["label_size"][0, 2]) == 1
    assert fired == (n[4] + 1) // 2  # the first, third, ... occurrences of the pass
    assert float(board["label_recall"][0, 2]) == 1.0
    assert float(board["label_precision"][0, 2]) == pytest.approx(fired / n[4])
    # Feature 3: token 5 on the positive side; on a signed stage token 6 on the negative side, each alone.
    assert board["label_ids"][0, 3, :1].tolist() == [5] and float(board["label_f1"][0, 3]) == 1.0
    if signed:
        assert board["label_ids"][1, 3, :1].tolist() == [6] and float(board["label_f1"][1, 3]) == 1.0
        assert int(board["label_size"][1, 0]) == 0 and float(board["label_f1"][1, 0]) == 0.0  # never negative
        assert board["label_ids"][1, 0].eq(-1).all()


def test_blocks_and_chunks_do_not_change_the_labels():
    batches = batches_with_planted_features(True, seed=2)
    acc = accumulate(batches, True)
    firings = torch.cat([side.count for side in acc.sides])  # (2H,)
    assert len(slot_blocks(firings, 7)) > 5
    small = compute_labels(acc.spill, acc.token_counts, firings, SETTINGS.label_n, block_firings=7, chunk=5)
    whole = compute_labels(acc.spill, acc.token_counts, firings, SETTINGS.label_n)
    assert small is not None and whole is not None
    for key, value in whole.items():
        assert torch.equal(small[key], value), key


def test_the_firings_file_is_removed_once_the_labels_exist():
    acc = accumulate(batches_with_planted_features(False), False)
    path = acc.spill.path
    acc.spill.flush()
    assert path.stat().st_size == 12 * acc.spill.records == 12 * int(acc.sides[0].count.sum())
    acc.finish_labels()
    assert not path.exists() and acc.labels is not None


def test_no_labels_when_switched_off():
    acc = accumulate(batches_with_planted_features(False), False, DashboardSettings(top_n=3, label_n=0))
    assert acc.spill.records == 0
    assert not any(k.startswith("label_") for k in acc.tensors())
    assert "labels" not in acc.shape.record()


def test_slices_merge_before_their_labels_and_a_pass_without_tokens_has_empty_labels():
    batches = batches_with_planted_features(True, seed=4)
    left, right = accumulate(batches[:3], True), accumulate(batches[3:], True)
    left.finish_labels()
    with pytest.raises(RuntimeError, match="before their labels are computed"):
        left.merge(right)
    empty = StageAccumulator(H, True, SETTINGS, torch.device("cpu")).tensors()
    assert empty["label_ids"].eq(-1).all() and empty["label_size"].eq(0).all() and empty["label_f1"].eq(0).all()
