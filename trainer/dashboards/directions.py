"""What a feature's decoder direction says without running text: the logit lens, the nearest features of its own
stage, and the nearest features of the other stages, compared in one space through the ReSAE affine maps.

A feature's direction is W_dec[f] / s, the activation change per unit of the feature at its hookpoint (for a
residual stage too: its reconstruction A h_prev + c + r̂ / s moves by W_dec[f] / s). A feature of an earlier stage
p that a residual stage m reads moves stage m's hookpoint by about A_m · d_p (the affine map predicts h_m from
h_p), so that is what stage m's directions are compared with; other pairs are compared as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.stack.runtime import StackRuntime

_BLOCK = 256


def stage_directions(runtime: StackRuntime, index: int) -> Tensor:
    stage = runtime.stages[index]
    return stage.sae.W_dec.detach().float() / stage.input_scale  # (H, d)


@torch.no_grad()
def logit_lens(directions: Tensor, unembedding: Tensor, vocab: int, n: int) -> dict[str, Tensor]:
    """The n tokens each direction raises most and lowers most: logit_{top,bottom}_{ids,values} (H, n), computed in
    blocks of features so the (H, V) score matrix never exists whole."""
    weight = unembedding[:vocab]  # (V, d)
    tops, bottoms = [], []
    for block in directions.split(_BLOCK):
        scores = (block.to(weight.device, weight.dtype) @ weight.T).float()  # (b, V)
        tops.append(scores.topk(n, dim=1))
        bottoms.append((-scores).topk(n, dim=1))
    return {"logit_top_ids": torch.cat([t.indices for t in tops]).cpu(),
            "logit_top_values": torch.cat([t.values for t in tops]).cpu(),
            "logit_bottom_ids": torch.cat([b.indices for b in bottoms]).cpu(),
            "logit_bottom_values": -torch.cat([b.values for b in bottoms]).cpu()}


def _nearest(queries: Tensor, keys: Tensor, k: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """Top-k cosine of each query row (H, d) against key rows (G, d): (values, indices) (H, k)."""
    q, keys = F.normalize(queries.float(), dim=1), F.normalize(keys.float(), dim=1)
    values, indices = [], []
    for start in range(0, q.shape[0], _BLOCK):
        sims = q[start : start + _BLOCK] @ keys.T  # (b, G)
        if exclude_self:
            rows = torch.arange(sims.shape[0], device=sims.device)
            sims[rows, rows + start] = -2.0
        top = sims.topk(min(k, sims.shape[1]), dim=1)
        values.append(top.values)
        indices.append(top.indices)
    return torch.cat(values), torch.cat(indices)


def _pad(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if values.shape[1] >= k:
        return values, indices
    missing = k - values.shape[1]
    return (torch.cat([values, torch.full((values.shape[0], missing), -2.0)], 1),
            torch.cat([indices, torch.full((indices.shape[0], missing), -1, dtype=torch.long)], 1))


@torch.no_grad()
def neighbours(runtime: StackRuntime, index: int, k: int) -> dict[str, Tensor]:
    """neighbour_ids/cos (H, k) within the stage; cross_stage/cross_ids/cross_cos (H, k) over every other stage."""
    mine = stage_directions(runtime, index).cpu()  # (H, d)
    values, ids = _pad(*_nearest(mine, mine, k, exclude_self=True), k) if k else (torch.zeros(len(mine), 0),) * 2
    out = {"neighbour_ids": torch.where(values > -2, ids.long(), -1), "neighbour_cos": values.clamp_min(-1).float()}
    candidates_v, candidates_s, candidates_i = [], [], []
    for other in range(len(runtime.stages)):
        pair = _comparable(runtime, index, other)
        if other == index or pair is None or k == 0:
            continue
        queries, keys = pair
        v, i = _nearest(queries, keys, k, exclude_self=False)
        candidates_v.append(v)
        candidates_i.append(i)
        candidates_s.append(torch.full_like(i, other))
    if candidates_v:
        v, s, i = torch.cat(candidates_v, 1), torch.cat(candidates_s, 1), torch.cat(candidates_i, 1)
        best = v.topk(min(k, v.shape[1]), dim=1)
        v, s, i = best.values, s.gather(1, best.indices), i.gather(1, best.indices)
        v, i = _pad(v, i, k)
        _, s = _pad(torch.zeros_like(s, dtype=torch.float), s, k)
    else:
        v = torch.full((mine.shape[0], k), -2.0)
        s = i = torch.full((mine.shape[0], k), -1, dtype=torch.long)
    empty = v <= -2
    out |= {"cross_stage": torch.where(empty, -1, s).long(), "cross_ids": torch.where(empty, -1, i).long(),
            "cross_cos": v.clamp_min(-1).float()}
    return out


def _comparable(runtime: StackRuntime, index: int, other: int) -> tuple[Tensor, Tensor] | None:
    """(this stage's directions, the other stage's) in one space, or None when no map relates two widths."""
    mine, theirs = stage_directions(runtime, index).cpu(), stage_directions(runtime, other).cpu()
    here, there = runtime.stages[index], runtime.stages[other]
    if here.residual_of == other and here.affine is not None:
        return mine, theirs @ here.affine.A.detach().float().cpu().T  # A_m d_p: (G, d_m)
    if there.residual_of == index and there.affine is not None:
        return mine @ there.affine.A.detach().float().cpu().T, theirs  # A_p d_m: (H, d_p)
    if mine.shape[1] == theirs.shape[1]:
        return mine, theirs
    return None
