"""Score: teacher-forced cross-entropy of a text under the clean model and under an edited one, and the
KL divergence between the two next-token distributions, per predicted token.

The edited model is the clean one with the request's interventions and steering vectors hooked in (at
the positions in scope; every position counts as "prompt"), and/or with `splice_stages` replaced by their
reconstruction at every non-special position. A splice is a stage handler that returns the
reconstruction, so on a residual (ReSAE) stack a later stage reads its predictor input from the spliced
activation that actually flowed. Entry i of each per-token array is about predicting token i + 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.host.host_model import HostModel
from service.engine.contract.specs import ScoreResult, ScoreSpec
from service.engine.operations.decompose import special_ids
from service.engine.operations.interventions import EditPlan
from service.engine.stacks.served import ServedStack


def special_mask(host: HostModel, ids: Tensor) -> Tensor:
    """True at positions holding a special token (BOS, EOS, pad, ...), which splices leave as they are: (T,)."""
    special = special_ids(host.tokenizer)
    return torch.isin(ids, torch.tensor(sorted(special), dtype=ids.dtype, device=ids.device))


BLOCK = 256
"""Positions per block when turning logits into CE and KL, so only raw logits are ever vocabulary-wide."""


def _logits(host: HostModel, ids: Tensor, writes=None) -> Tensor:
    """Next-token logits at every position but the last: (T − 1, V)."""
    logits = host.forward(ids, writes=writes, logits=True).logits
    assert logits is not None
    return logits[0, :-1]


def _ce_kl(clean: Tensor, edited: Tensor | None, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per position: clean CE, edited CE and KL(clean ‖ edited), in blocks of positions: 3 × (T − 1,)."""
    out: list[list[Tensor]] = [[], [], []]
    for start in range(0, clean.shape[0], BLOCK):
        rows = slice(start, start + BLOCK)
        target = targets[rows, None]  # (n, 1)
        p = clean[rows].float().log_softmax(-1)  # (n, V)
        out[0].append(-p.gather(-1, target)[:, 0])
        if edited is None:
            out[1].append(out[0][-1])
            out[2].append(torch.zeros_like(out[0][-1]))
            continue
        q = edited[rows].float().log_softmax(-1)  # (n, V)
        out[1].append(-q.gather(-1, target)[:, 0])
        out[2].append((p.exp() * (p - q)).sum(-1).clamp_min(0.0))
    clean_ce, edited_ce, kl = (torch.cat(parts) for parts in out)
    return clean_ce, edited_ce, kl


def score(host: HostModel, stack: ServedStack | None, spec: ScoreSpec) -> ScoreResult:
    """Clean and edited CE per predicted token, and KL(clean ‖ edited); edited == clean when nothing is asked."""
    ids = torch.tensor([spec.token_ids], dtype=torch.int64, device=host.device)  # (1, T)
    clean = _logits(host, ids)  # (T − 1, V)
    edited = None
    if spec.interventions or spec.steering or spec.splice_stages:
        plan = EditPlan(stack.runtime if stack is not None else None, interventions=spec.interventions,
                        steering=spec.steering, splice=spec.splice_stages, device=host.device)
        length = ids.shape[1]
        chunk = plan.chunk(0, length, length, splice_keep=~special_mask(host, ids[0]))
        edited = _logits(host, ids, chunk.writes)
    per_token = torch.stack(_ce_kl(clean, edited, ids[0, 1:])).double().cpu()  # (3, T − 1), one copy
    clean_h, edited_h, kl_h = per_token.tolist()
    means = per_token.mean(dim=1).tolist()
    return ScoreResult(
        token_ids=tuple(spec.token_ids), scored_tokens=len(clean_h), clean_ce=means[0], edited_ce=means[1],
        kl=means[2], edited=edited is not None, clean_ce_per_token=tuple(clean_h),
        edited_ce_per_token=tuple(edited_h), kl_per_token=tuple(kl_h),
    )
