from __future__ import annotations

import pytest
import torch

from trainer.evaluation.metrics import NextTokenScorer, ReconstructionAccumulator, ce_loss_recovered


def test_reconstruction_metrics_on_known_cases():
    x = torch.randn(200, 8)
    z = torch.zeros(200, 5)
    z[:, 0] = 1.0
    z[:100, 1] = -2.0  # signed codes count as active
    perfect = ReconstructionAccumulator(5)
    perfect.update(x[:120], x[:120], z[:120])
    perfect.update(x[120:], x[120:], z[120:])  # batches accumulate
    result = perfect.result()
    assert result["fve"] == pytest.approx(1.0) and result["fve_per_token"] == pytest.approx(1.0)
    assert result["mse"] == 0 and result["cosine"] == pytest.approx(1.0) and result["shrinkage"] == pytest.approx(1.0)
    assert result["l0"] == pytest.approx(1.5)
    assert result["dead_fraction"] == pytest.approx(3 / 5)
    assert result["dense_fraction_10pct"] == pytest.approx(2 / 5)

    mean_only = ReconstructionAccumulator(5)
    mean_only.update(x, x.mean(dim=0).expand_as(x), z)
    assert mean_only.result()["fve"] == pytest.approx(0.0, abs=1e-9)
    half = ReconstructionAccumulator(5)
    half.update(x, 0.5 * x, z)
    assert half.result()["shrinkage"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no tokens"):
        ReconstructionAccumulator(5).result()


def test_next_token_scorer_matches_cross_entropy_and_kl():
    logits = torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padding: targets at positions 4 and 5 of row 1 are not scored
    scorer = NextTokenScorer(logits, ids, mask)
    assert scorer.positions == 5 + 3
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    assert float(scorer.clean_ce()[:5].sum()) == pytest.approx(float(expected), rel=1e-5)
    ce, kl = scorer.score(logits)
    assert torch.allclose(ce, scorer.clean_ce()) and torch.allclose(kl, torch.zeros_like(kl), atol=1e-6)
    _, kl_other = scorer.score(torch.randn(2, 6, 11))
    assert bool((kl_other > 0).all())


def test_ce_loss_recovered():
    assert ce_loss_recovered(2.0, 2.0, 6.0) == 1.0
    assert ce_loss_recovered(2.0, 6.0, 6.0) == 0.0
    assert ce_loss_recovered(2.0, 3.0, 6.0) == pytest.approx(0.75)
