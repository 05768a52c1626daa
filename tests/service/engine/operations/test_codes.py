"""Per-token StageCodes from a block of codes: ranking by |value|, zeros dropped, always-reported ids."""

from __future__ import annotations

import torch

from service.engine.operations.codes import stage_codes


def test_codes_are_ranked_by_magnitude_and_zeros_are_not_reported():
    z = torch.tensor([[0.0, -3.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.5]])
    rows = stage_codes(1, z, top_k=3, error_norm=torch.tensor([0.25, 1.5]))
    assert rows[0].ids == (1, 4, 2) and rows[0].values == (-3.0, 2.0, 1.0) and rows[0].l0 == 3
    assert rows[1].ids == (4,) and rows[1].values == (0.5,) and rows[1].l0 == 1
    assert rows[0].stage == 1 and rows[1].error_norm == 1.5 and rows[0].predicted_error_norm is None


def test_always_reported_features_come_after_the_top_k_once():
    z = torch.tensor([[0.0, -3.0, 1.0, 0.0, 2.0]])
    (row,) = stage_codes(0, z, top_k=1, always=(0, 1, 2))
    assert row.ids == (1, 0, 2) and row.values == (-3.0, 0.0, 1.0)
