"""The token labels in a stack's dashboard record: an old dashboard without labels still loads (and has none),
labels round-trip into `feature_labels` per sign, and records that disagree with their file are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.sae import SAEConfig, build_sae
from core.stack.dashboards import LABEL_LIMIT, DashboardShape, feature_labels, stage_labels
from core.stack.identity import HostModelIdentity
from core.stack.manifest import StackError
from core.stack.reader import read_stack
from core.stack.writer import StageSpec, attach_dashboards, write_stack

D_IN, D_SAE = 8, 12
DTYPES = {"I64": torch.int64, "I32": torch.int32, "F32": torch.float32, "F64": torch.float64}


def signed_stack(tmp_path: Path) -> Path:
    sae = build_sae(SAEConfig("sa_gsae", d_in=D_IN, d_sae=D_SAE, k=4)).eval()
    identity = HostModelIdentity("tiny", "gpt_neox", 4, D_IN, 512, "f" * 64, "e" * 64)
    return write_stack(tmp_path / "stack", "labels", identity, [StageSpec(sae, "blocks.1.hook_resid_post")])


def board(labels: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Zero tensors of a 2-sign dashboard as its record declares (labels = 0: the format before labels)."""
    shape = DashboardShape(d_sae=D_SAE, signs=2, top_n=2, context=1, bins=4, quantiles=2, per_quantile=1,
                           logit_n=2, neighbours=2, cooccurrence=0, labels=labels)
    tensors = {k: torch.zeros(s, dtype=DTYPES[d]) for k, (d, s) in shape.header().items()}
    return tensors, {**shape.record(), "tokens": 100, "documents": 2, "corpus": "test"}


def test_an_old_dashboard_without_labels_loads_as_before(tmp_path):
    stack = signed_stack(tmp_path)
    tensors, record = board(0)
    assert "labels" not in record and not any(k.startswith("label_") for k in tensors)
    attach_dashboards(stack, {0: (tensors, record)})
    stage = read_stack(stack).stages[0]
    assert stage.dashboard is not None and set(stage.dashboard) == set(tensors)
    assert feature_labels(stage.dashboard, 3) == [] and feature_labels(None, 3) == []
    assert stage_labels(stage.dashboard) == {} and stage_labels(None) == {}


def test_labels_round_trip_per_sign(tmp_path):
    stack = signed_stack(tmp_path)
    tensors, record = board(3)
    tensors["label_ids"][:, :] = -1
    tensors["label_ids"][0, 5, :2] = torch.tensor([7, 2])
    tensors["label_share"][0, 5, :2] = torch.tensor([0.75, 0.25])
    tensors["label_firings"][0, 5, :2] = torch.tensor([30, 10])
    tensors["label_occurrences"][0, 5, :2] = torch.tensor([30, 40])
    tensors["label_size"][0, 5] = 1
    tensors["label_ids"][1, 5, 0], tensors["label_share"][1, 5, 0], tensors["label_size"][1, 5] = 9, 1.0, 1
    for key, values in (("precision", (1.0, 0.5)), ("recall", (0.75, 1.0)), ("f1", (6 / 7, 2 / 3))):
        tensors[f"label_{key}"][:, 5] = torch.tensor(values)
    attach_dashboards(stack, {0: (tensors, record)})
    loaded = read_stack(stack)
    assert json.loads((stack / "stack.json").read_text())["stages"][0]["dashboard"]["labels"] == 3
    positive, negative = feature_labels(loaded.stages[0].dashboard, 5)
    assert (positive.sign, positive.token_ids, positive.rule_ids, positive.size) == (1, (7, 2), (7,), 1)
    assert positive.shares == pytest.approx((0.75, 0.25)) and positive.firings == (30, 10)
    assert positive.occurrences == (30, 40) and positive.f1 == pytest.approx(6 / 7)
    assert (negative.sign, negative.token_ids, negative.precision) == (-1, (9,), 0.5)
    assert positive.describe(lambda t: f"t{t}") == "+ 't7' 75% (token F1 0.86: precision 1.00, recall 0.75)"
    assert feature_labels(loaded.stages[0].dashboard, 4) == []  # never fired: no label on either side
    assert stage_labels(loaded.stages[0].dashboard) == {5: [positive, negative]}


def test_records_that_disagree_with_their_labels_are_refused(tmp_path):
    stack = signed_stack(tmp_path)
    tensors, record = board(0)
    with pytest.raises(StackError, match="do not match their record"):
        attach_dashboards(stack, {0: (tensors, {**record, "labels": 3})})
    for bad in (LABEL_LIMIT + 1, -1, True, "8"):
        with pytest.raises(StackError, match="labels must be an integer"):
            attach_dashboards(stack, {0: (tensors, {**record, "labels": bad})})
    attach_dashboards(stack, {0: (tensors, record)})
    manifest = json.loads((stack / "stack.json").read_text())
    manifest["stages"][0]["dashboard"]["labels"] = 3  # a record that promises labels its file lacks
    (stack / "stack.json").write_text(json.dumps(manifest))
    with pytest.raises(StackError, match="missing label_ids"):
        read_stack(stack)
