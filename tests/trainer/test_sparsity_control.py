"""The L0 controller moves λ the right way, settles on a target for a monotone L0(λ), and refuses
architectures whose L0 is fixed by k."""

from __future__ import annotations

import math

import pytest

from trainer.sparsity_control import L0Controller, make_controller


def test_too_dense_raises_the_penalty_and_too_sparse_lowers_it():
    dense, sparse = L0Controller(32.0), L0Controller(32.0)
    for _ in range(10):
        dense.update(100.0)
        sparse.update(5.0)
    assert dense.multiplier > 1.0 > sparse.multiplier


def test_settles_on_the_target_of_a_monotone_response():
    controller = L0Controller(40.0, gain=0.05)
    for _ in range(2000):
        l0 = 300.0 / controller.multiplier  # a stage whose L0 falls as 1/λ: needs m = 7.5
        controller.update(l0)
    assert controller.l0_ema == pytest.approx(40.0, rel=0.02)
    assert controller.multiplier == pytest.approx(7.5, rel=0.02)


def test_multiplier_is_bounded_and_state_round_trips():
    controller = L0Controller(1.0, gain=10.0)
    for _ in range(100):
        controller.update(1e9)
    assert controller.log_multiplier == pytest.approx(math.log(1e3))
    copy = L0Controller(1.0)
    copy.load_state_dict(controller.state_dict())
    assert copy.multiplier == controller.multiplier and copy.l0_ema == controller.l0_ema


def test_make_controller_only_for_penalised_architectures():
    assert make_controller("topk", 0.0) is None
    assert make_controller("sa_gsae", 32.0) is not None
    with pytest.raises(ValueError, match="sets its L0 with k"):
        make_controller("topk", 32.0)
    with pytest.raises(ValueError, match="must be > 0"):
        L0Controller(0.0)
