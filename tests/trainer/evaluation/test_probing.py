from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from trainer.evaluation.probe_tasks import ProbeTask, _assign_groups, build_probe_tasks, windows
from trainer.evaluation.probing import (
    dense_probe_accuracy,
    one_vs_rest,
    run_probing,
    sparse_probe_accuracy,
    top_k_mean_diff,
)


@pytest.fixture(scope="module")
def small_suite() -> list[ProbeTask]:
    return build_probe_tasks(per_class_train=20, per_class_test=10, seed=0, max_chars=120)


def test_suite_is_deterministic_balanced_and_disjoint(small_suite: list[ProbeTask]):
    assert build_probe_tasks(per_class_train=20, per_class_test=10, seed=0, max_chars=120) == small_suite
    names = [task.name for task in small_suite]
    assert {"source_kind", "comment_vs_code"} <= set(names)
    for task in small_suite:
        assert len(task.train_texts) == len(task.train_labels) and len(task.test_texts) == len(task.test_labels)
        for labels in (task.train_labels, task.test_labels):
            counts = Counter(labels)
            assert sorted(counts) == list(range(len(task.classes)))  # every class present
            assert len(set(counts.values())) == 1  # balanced
        assert not set(task.train_texts) & set(task.test_texts)
        assert all(task.train_texts) and all(task.test_texts)
    source = small_suite[names.index("source_kind")]
    assert source.classes == ["python", "prose", "licence", "structured"]
    assert {len(t) for t in source.train_texts + source.test_texts} == {120}  # fixed length: no length cue
    lines = small_suite[names.index("comment_vs_code")]
    for text, label in zip(lines.train_texts, lines.train_labels, strict=True):
        assert text.startswith("#") == (label == 0) and "\n" not in text
    other_seed = build_probe_tasks(per_class_train=20, per_class_test=10, seed=1, max_chars=120)
    assert other_seed[0].train_texts != small_suite[0].train_texts


def test_files_are_never_shared_between_train_and_test():
    groups = [(f"f{i}", {0: [f"f{i}:a{j}" for j in range(i % 5 + 1)], 1: [f"f{i}:b{j}" for j in range(3)]})
              for i in range(40)]
    train, test = _assign_groups(groups, 2, (10, 5), 2, set(), random.Random(0))
    files = [{text.split(":")[0] for lists in split for texts in lists for text in texts} for split in (train, test)]
    assert files[0] and files[1] and not files[0] & files[1]
    assert all(sum(min(len(t), 2) for t in lists) >= need for split, need in ((train, 10), (test, 5))
               for lists in split)


def test_windows_have_fixed_length_and_start_at_lines():
    text = "\n".join(f"line {i} " + "x" * (i % 7) for i in range(50)) + "\n\n   \n"
    out = windows(text, 30)
    assert out and all(len(w) == 30 for w in out)
    assert all(w.startswith("line ") for w in out)
    assert windows("short", 30) == []


def _planted(n: int, h: int, column: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.rand(n, h, generator=g)
    x[:, column] += 2.0 * y  # the one informative latent
    return x, y


def test_probe_finds_planted_column_and_is_chance_on_noise():
    train_x, train_y = _planted(200, 64, column=37, seed=1)
    test_x, test_y = _planted(100, 64, column=37, seed=2)
    assert top_k_mean_diff(train_x, train_y, 1).tolist() == [37]
    accs = sparse_probe_accuracy(train_x, train_y, test_x, test_y, ks=(1, 2, 5))
    assert set(accs) == {1, 2, 5} and all(acc > 0.97 for acc in accs.values())
    noise_train, noise_test = torch.randn(200, 64), torch.randn(200, 64)
    noise = sparse_probe_accuracy(noise_train, train_y, noise_test, torch.arange(200) % 2, ks=(1, 5))
    assert all(abs(acc - 0.5) < 0.15 for acc in noise.values())
    assert dense_probe_accuracy(train_x, train_y, test_x, test_y) > 0.95
    with torch.inference_mode():  # callers evaluate under inference mode
        assert sparse_probe_accuracy(train_x.clone(), train_y, test_x, test_y, ks=(1,))[1] > 0.97
    with pytest.raises(ValueError, match="0/1"):
        sparse_probe_accuracy(train_x, train_y + 1, test_x, test_y)


def test_one_vs_rest_is_balanced_over_the_other_classes():
    labels = [c for c in range(4) for _ in range(30)]
    rows, y = one_vs_rest(labels, 2, random.Random(0))
    assert Counter(y) == {1: 30, 0: 30}
    negatives = Counter(labels[r] for r, t in zip(rows, y, strict=True) if t == 0)
    assert 2 not in negatives and all(8 <= v <= 11 for v in negatives.values())


def test_run_probing_keys_and_stage_order():
    def task(name: str, classes: list[str], n_train: int, n_test: int) -> ProbeTask:
        k = len(classes)
        return ProbeTask(name, [f"{name} tr {i}" for i in range(n_train * k)], [i % k for i in range(n_train * k)],
                         [f"{name} te {i}" for i in range(n_test * k)], [i % k for i in range(n_test * k)], classes)

    tasks = [task("four", ["a", "b", "c", "d"], 30, 15), task("two", ["x", "y"], 40, 20)]
    label = {t: y for tk in tasks for t, y in zip(tk.train_texts + tk.test_texts, tk.train_labels + tk.test_labels,
                                                  strict=True)}
    calls = []

    def encode(texts: list[str]) -> list[torch.Tensor]:
        calls.append(len(texts))
        y = torch.tensor([label[t] for t in texts])
        informative = torch.rand(len(texts), 16)
        informative[:, :4] += 3.0 * torch.nn.functional.one_hot(y, 4)  # latent c fires for class c
        return [informative, torch.rand(len(texts), 8)]  # stage 0 informative, stage 1 noise

    results = run_probing(encode, tasks, ks=(1, 2), dense=True)
    assert calls == [180, 120]
    expected = {f"probe_{name}_{s}" for name in ("four", "two", "mean") for s in ("k1", "k2", "dense")}
    assert [set(r) for r in results] == [expected, expected]
    assert results[0]["probe_mean_k1"] > 0.95
    assert abs(results[1]["probe_mean_k1"] - 0.5) < 0.2
    assert results[0]["probe_mean_k1"] == pytest.approx((results[0]["probe_four_k1"] + results[0]["probe_two_k1"]) / 2)
