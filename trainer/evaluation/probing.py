"""SAEBench-style sparse probing of stage codes (docs/methods.md §A.4, §E.2) on the tasks of probe_tasks.py.

Protocol (SAEBench): codes are mean-pooled over a snippet's tokens by the caller; every task is binary (a
multi-class task becomes one-vs-rest tasks with balanced negatives, averaged); the top-k latents by
|mean(class 1) − mean(class 0)| on train are kept and an L2 logistic regression is fit on them; we report test
accuracy. Unlike SAEBench's sklearn probe, the k columns are standardised on train statistics and the
regression is solved in torch (L-BFGS, float64).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.evaluation.probe_tasks import ProbeTask


def top_k_mean_diff(train_x: Tensor, train_y: Tensor, k: int) -> Tensor:
    """Indices of the k columns with the largest |mean(class 1) − mean(class 0)| (SAEBench's selection)."""
    train_y = train_y.to(train_x.device)
    pos = train_x[train_y == 1].mean(dim=0, dtype=torch.float64)  # (H,)
    neg = train_x[train_y == 0].mean(dim=0, dtype=torch.float64)  # (H,)
    order = torch.sort((pos - neg).abs(), descending=True, stable=True).indices  # ties: lower index first
    return order[: min(k, train_x.shape[1])]


def _fit_and_score(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, l2: float | None) -> float:
    """Standardise on train, fit an L2 logistic regression by L-BFGS in float64, return test accuracy.

    `l2=None` uses 1/N, which matches sklearn's default C = 1 (C·Σ loss + ½‖w‖² = N·C·(mean loss + ‖w‖²/(2NC))).
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = train_x.detach().to("cpu", torch.float64).clone()  # (N, k); clone: callers may be in inference mode
        xt = test_x.detach().to("cpu", torch.float64).clone()  # (M, k)
        y = train_y.detach().to("cpu", torch.float64).clone()  # (N,)
        mu, sd = x.mean(dim=0), x.std(dim=0)
        sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))  # constant columns: centred, weight decays to 0
        x, xt = (x - mu) / sd, (xt - mu) / sd
        lam = 1.0 / x.shape[0] if l2 is None else l2
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * lam * w.dot(w)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            pred = (xt @ w + b) > 0  # (M,)
            return float((pred == test_y.to("cpu").bool()).double().mean())


def _check_binary(train_y: Tensor, test_y: Tensor) -> None:
    if not all(bool(((y == 0) | (y == 1)).all()) for y in (train_y, test_y)):
        raise ValueError("labels must be 0/1; run multi-class tasks one-vs-rest")
    if not (bool((train_y == 0).any()) and bool((train_y == 1).any())):
        raise ValueError("train split needs both classes")


def sparse_probe_accuracy(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, ks: Sequence[int] = (1, 2, 5, 20),
    l2: float | None = None,
) -> dict[int, float]:
    """k-sparse probe test accuracy for each k: top-k mean-difference latents (N, H) → logistic regression."""
    _check_binary(train_y, test_y)
    order = top_k_mean_diff(train_x, train_y, max(ks))  # prefixes of one ranking
    return {k: _fit_and_score(train_x[:, order[:k]], train_y, test_x[:, order[:k]], test_y, l2) for k in ks}


def dense_probe_accuracy(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, l2: float | None = None
) -> float:
    """Logistic-regression test accuracy on all columns: the baseline for raw activations (N, d)."""
    _check_binary(train_y, test_y)
    return _fit_and_score(train_x, train_y, test_x, test_y, l2)


def one_vs_rest(labels: Sequence[int], positive: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Rows and 0/1 labels for class `positive` against an equal number of negatives spread over the others."""
    pos = [i for i, y in enumerate(labels) if y == positive]
    others = sorted(set(labels) - {positive})
    per = math.ceil(len(pos) / max(len(others), 1))
    neg: list[int] = []
    for o in others:
        rows = [j for j, y in enumerate(labels) if y == o]
        neg += rng.sample(rows, min(per, len(rows)))
    neg = sorted(rng.sample(neg, min(len(pos), len(neg))))
    return pos + neg, [1] * len(pos) + [0] * len(neg)


def run_probing(
    encode: Callable[[list[str]], list[Tensor]], tasks: Sequence[ProbeTask], ks: Sequence[int] = (1, 2, 5, 20),
    *, dense: bool = False, seed: int = 0,
) -> list[dict[str, float]]:
    """Per stage: `probe_<task>_k<k>` and `probe_mean_k<k>` (and `probe_<task>_dense`, `probe_mean_dense`).

    `encode(texts)` returns, per stage, the (len(texts), H_stage) mean-pooled codes. A multi-class task scores
    the mean over its one-vs-rest tasks; their negatives depend only on the task and seed, so every stage is
    probed on the same rows.
    """
    results: list[dict[str, float]] = []
    for task in tasks:
        feats = encode(task.train_texts + task.test_texts)  # per stage (N + M, H)
        if results and len(feats) != len(results):
            raise ValueError("encode returned a different number of stages for another task")
        results = results or [{} for _ in feats]
        n, m = len(task.train_texts), len(task.test_texts)
        views = [(list(range(n)), task.train_labels, list(range(m)), task.test_labels)]
        if len(task.classes) > 2:
            views = [
                (*one_vs_rest(task.train_labels, c, random.Random(f"{seed}:{task.name}:{c}:train")),
                 *one_vs_rest(task.test_labels, c, random.Random(f"{seed}:{task.name}:{c}:test")))
                for c in range(len(task.classes))
            ]
        for stage, codes in enumerate(feats):
            accs: dict[str, list[float]] = {}
            for tr_rows, tr_y, te_rows, te_y in views:
                x_tr, x_te = codes[:n][tr_rows], codes[n:][te_rows]  # (N', H), (M', H)
                y_tr, y_te = torch.tensor(tr_y), torch.tensor(te_y)
                for k, acc in sparse_probe_accuracy(x_tr, y_tr, x_te, y_te, ks).items():
                    accs.setdefault(f"k{k}", []).append(acc)
                if dense:
                    accs.setdefault("dense", []).append(dense_probe_accuracy(x_tr, y_tr, x_te, y_te))
            for suffix, values in accs.items():
                results[stage][f"probe_{task.name}_{suffix}"] = sum(values) / len(values)
    suffixes = [f"k{k}" for k in ks] + (["dense"] if dense else [])
    for stage_result in results:
        for suffix in suffixes:
            values = [stage_result[f"probe_{task.name}_{suffix}"] for task in tasks]
            stage_result[f"probe_mean_{suffix}"] = sum(values) / len(values)
    return results
