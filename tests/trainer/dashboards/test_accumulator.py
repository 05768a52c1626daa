"""The dashboard accumulators against brute force over the full code matrix: counts, sums, maxima, histograms,
top examples with their windows, reservoir choices, quantile intervals, and merging of document slices."""

from __future__ import annotations

import pytest
import torch

from trainer.dashboards.accumulator import BatchTokens, DashboardSettings, token_hash
from trainer.dashboards.stage import StageAccumulator

H, ROWS, WIDTH, BATCHES = 12, 3, 16, 5
SETTINGS = DashboardSettings(top_n=4, context=2, bins=12, bin_min=1e-2, bin_max=1e2, quantiles=3, per_quantile=2,
                             cooccurrence=3, seed=7)


def synthetic(signed: bool, seed: int = 0):
    """BATCHES batches of (ROWS, WIDTH) token grids, a few cells not kept, sparse codes (some signed)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(BATCHES):
        ids = torch.randint(0, 50, (ROWS, WIDTH), generator=g)
        keep = torch.rand(ROWS, WIDTH, generator=g) > 0.1
        keep[:, 0] = False  # like BOS
        cell = keep.reshape(-1).nonzero(as_tuple=True)[0]
        n = cell.numel()
        kept_index = torch.full((ROWS * WIDTH,), -1, dtype=torch.long)
        kept_index[cell] = torch.arange(n)
        doc = b * ROWS + cell // WIDTH  # each row its own document
        pos = cell % WIDTH
        codes = torch.randn(n, H, generator=g).abs() * torch.exp(torch.randn(n, H, generator=g))
        if signed:
            codes = codes * torch.where(torch.rand(n, H, generator=g) < 0.4, -1.0, 1.0)
        codes = codes * (torch.rand(n, H, generator=g) < 0.3)  # sparse
        codes[0, 3] = 0.0
        codes[:, 5] = 0.0  # a dead feature
        batches.append((codes, BatchTokens(ids, cell, doc, pos, kept_index)))
    return batches


def brute(batches, side: int):
    """Every firing of one side as (feature, |z|, doc, pos, window ids, window acts)."""
    out = []
    for codes, tokens in batches:
        magnitude = codes.clamp_min(0) if side == 0 else (-codes).clamp_min(0)
        for r, f in magnitude.nonzero().tolist():
            cell = int(tokens.cell[r])
            row, col = divmod(cell, WIDTH)
            ids, acts = [], []
            for c in range(col - SETTINGS.context, col + SETTINGS.context + 1):
                k = int(tokens.kept_index[row * WIDTH + c]) if 0 <= c < WIDTH else -1
                ids.append(int(tokens.grid_ids[row, c]) if k >= 0 else -1)
                acts.append(float(codes[k, f]) if k >= 0 else 0.0)
            out.append((f, float(magnitude[r, f]), int(tokens.doc[r]), int(tokens.pos[r]), ids, acts))
    return out


def run(batches, signed: bool) -> StageAccumulator:
    acc = StageAccumulator(H, signed, SETTINGS, torch.device("cpu"))
    for codes, tokens in batches:
        acc.update(codes, tokens)
    return acc


@pytest.mark.parametrize("signed", [False, True])
def test_statistics_and_examples_equal_brute_force(signed):
    batches = synthetic(signed)
    out = run(batches, signed).tensors()
    edges = SETTINGS.edges()
    for side in range(2 if signed else 1):
        firings = brute(batches, side)
        for f in range(H):
            mine = [x for x in firings if x[0] == f]
            assert int(out["count"][side, f]) == len(mine)
            assert float(out["sum"][side, f]) == pytest.approx(sum(x[1] for x in mine), rel=1e-9)
            assert float(out["max"][side, f]) == pytest.approx(max([x[1] for x in mine], default=0.0))
            bins = torch.bucketize(torch.tensor([x[1] for x in mine]).log10(), edges[1:-1].log10(), right=True)
            assert out["hist"][side, f].tolist() == torch.bincount(bins, minlength=SETTINGS.bins).tolist()
            best = sorted(mine, key=lambda x: (-x[1], x[2], x[3]))[: SETTINGS.top_n]
            got = [(float(v), int(d), int(p)) for v, d, p in zip(out["top_value"][side, f], out["top_doc"][side, f],
                                                                 out["top_pos"][side, f], strict=True) if d >= 0]
            assert got == [(pytest.approx(x[1]), x[2], x[3]) for x in best]
            for slot, x in enumerate(best):
                assert out["top_tokens"][side, f, slot].tolist() == x[4]
                assert out["top_acts"][side, f, slot].tolist() == pytest.approx(x[5])
    assert out["count"][:, 5].sum() == 0 and (out["top_doc"][:, 5] == -1).all()


def test_quantile_examples_are_the_smallest_hashes_of_their_intervals():
    batches = synthetic(False)
    acc = run(batches, False)
    out = acc.tensors()
    firings = brute(batches, 0)
    bins = acc.sides[0].bin_of(torch.tensor([x[1] for x in firings]))
    for f in range(H):
        share = out["quantile_share"][0, f]
        if out["count"][0, f] == 0:
            assert (share == 0).all()
            continue
        assert float(share.sum()) == pytest.approx(1.0)
        for q in range(SETTINGS.quantiles):
            low, high = float(out["quantile_low"][0, f, q]), float(out["quantile_high"][0, f, q])
            # an interval is whole bins from `low`; `high` is its last bin's upper edge, or the feature's max
            inside = [x for x, b in zip(firings, bins.tolist(), strict=True) if x[0] == f
                      and low <= float(SETTINGS.edges()[b]) < high and float(share[q]) > 0]
            assert len(inside) == pytest.approx(float(share[q]) * int(out["count"][0, f]), abs=0.5)
            expected = sorted(inside, key=lambda x: int(token_hash(torch.tensor(x[2]), torch.tensor(x[3]), 7)))
            expected = {(x[2], x[3]) for x in expected[: SETTINGS.per_quantile]}
            got = {(int(d), int(p)) for d, p in zip(out["quantile_doc"][0, f, q], out["quantile_pos"][0, f, q],
                                                    strict=True) if d >= 0}
            assert got == expected


def test_cooccurrence_is_the_jaccard_index_of_firing_sets():
    batches = synthetic(True)
    out = run(batches, True).tensors()
    fired = torch.cat([codes != 0 for codes, _ in batches]).double()  # (N, H)
    both = fired.T @ fired
    union = fired.sum(0)[:, None] + fired.sum(0)[None, :] - both
    jaccard = torch.where(union > 0, both / union.clamp_min(1), 0.0).fill_diagonal_(-1)
    for f in range(H):
        if fired[:, f].sum() == 0:
            assert (out["cooccur_ids"][f] == -1).all()
            continue
        top = jaccard[f].topk(SETTINGS.cooccurrence).values
        assert out["cooccur_jaccard"][f].tolist() == pytest.approx(top.clamp_min(0).tolist())


@pytest.mark.parametrize("signed", [False, True])
def test_accumulators_of_document_slices_merge_into_the_whole(signed):
    batches = synthetic(signed, seed=3)
    whole = run(batches, signed).tensors()
    left, right = run(batches[::2], signed), run(batches[1::2], signed)
    right.merge(left)  # the order of merging does not matter
    merged = right.tensors()
    for key, value in whole.items():
        if value.is_floating_point():
            torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-6, msg=key)
        else:
            assert torch.equal(merged[key], value), key


def test_memory_does_not_grow_with_the_number_of_tokens():
    acc = run(synthetic(True), True)
    sizes = {k: v.numel() for k, v in acc.state().items()}
    for codes, tokens in synthetic(True, seed=9) * 3:
        acc.update(codes, tokens)
    assert {k: v.numel() for k, v in acc.state().items()} == sizes
