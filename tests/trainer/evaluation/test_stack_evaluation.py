"""Evaluating a stack on a tiny host model: teacher-forced and online splices, probing on mean-pooled codes."""

from __future__ import annotations

import math

import pytest
import torch

from core.stack.runtime import RuntimeStage, StackRuntime
from tests.core.stack.test_stack_runtime import perfect_sae, random_affine, random_sae
from trainer.evaluation.splice import splice_metrics


def _tiny_windows(host, n_batches: int = 2):
    from trainer.data.corpus import load_corpus
    from trainer.evaluation.evaluate import _batches

    documents = load_corpus("default")[:20]
    return _batches(host, documents, context_length=32, batch_size=2)


def test_teacher_forced_and_online_splices_agree_when_every_stage_is_perfect(tiny_gemma):
    d = tiny_gemma.summary().d_model
    hps = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    affine = random_affine(d, d, seed=3)
    runtime = StackRuntime([
        RuntimeStage(0, "a", hps[0], perfect_sae(d), 1.3),
        RuntimeStage(1, "b", hps[1], perfect_sae(d), affine.residual_scale, 0, affine),
        RuntimeStage(2, "c", hps[2], perfect_sae(d), 0.7),
    ])
    per_stage, stack = splice_metrics(tiny_gemma, runtime, _tiny_windows(tiny_gemma), num_batches=2)
    assert len(per_stage) == 3
    for metrics in per_stage:
        assert abs(metrics["delta_ce"]) < 1e-4 and metrics["kl"] < 1e-5
    assert abs(stack["multi_tf_delta_ce"]) < 1e-4 and abs(stack["multi_online_delta_ce"]) < 1e-4
    assert stack["multi_tf_ce_spliced"] == pytest.approx(stack["multi_online_ce_spliced"], abs=1e-4)
    assert stack["multi_ce_zero_ablation"] > stack["ce_clean"]


def test_online_splices_compound_while_teacher_forced_ones_do_not(tiny_gemma):
    d = tiny_gemma.summary().d_model
    hps = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    runtime = StackRuntime([RuntimeStage(0, "a", hps[0], random_sae(d, 4 * d, seed=5), 1.0),
                            RuntimeStage(1, "b", hps[1], random_sae(d, 4 * d, seed=6), 1.0)])
    per_stage, stack = splice_metrics(tiny_gemma, runtime, _tiny_windows(tiny_gemma), num_batches=2)
    # different paths, both finite; with lossy SAEs the two multi-layer variants differ
    assert math.isfinite(stack["multi_tf_delta_ce"]) and math.isfinite(stack["multi_online_delta_ce"])
    assert stack["multi_tf_ce_spliced"] != stack["multi_online_ce_spliced"]
    assert per_stage[0]["kl"] >= 0


def test_probing_runs_on_mean_pooled_stack_codes(tiny_gemma):
    from trainer.evaluation.evaluate import mean_pooled_codes, probing_metrics
    from trainer.evaluation.probe_tasks import build_probe_tasks

    d = tiny_gemma.summary().d_model
    runtime = StackRuntime([RuntimeStage(0, "a", "blocks.1.hook_resid_post", perfect_sae(d), 1.0)])
    texts = ["def f(x):\n    return x", "The quick brown fox."]
    (pooled,) = mean_pooled_codes(tiny_gemma, runtime, texts, context_length=16, batch_size=2)
    assert pooled.shape == (2, 2 * d)
    ids = tiny_gemma.tokenizer(texts[1:], return_tensors="pt").input_ids
    h = tiny_gemma.forward(ids, reads=["blocks.1.hook_resid_post"]).captures["blocks.1.hook_resid_post"][0]
    real = [i for i, t in enumerate(ids[0].tolist()) if t not in tiny_gemma.tokenizer.all_special_ids]
    expected = runtime.encode(runtime.stages[0], h[real]).mean(dim=0)
    assert torch.allclose(pooled[1], expected, atol=1e-5)
    tasks = build_probe_tasks(per_class_train=8, per_class_test=4)[:1]
    (metrics,) = probing_metrics(tiny_gemma, runtime, context_length=16, batch_size=16, tasks=tasks)
    assert {f"probe_mean_k{k}" for k in (1, 2, 5, 20)} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
