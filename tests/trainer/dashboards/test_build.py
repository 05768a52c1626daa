"""The dashboard pass on the tiny Gemma with a stack of three kinds of stage (a planted ReLU feature on the
embeddings, a ReSAE residual TopK stage, a signed SA-GSAE stage), against a brute-force pass that keeps the full
code matrix; then the stored files through read_stack, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.sae import SAEConfig, build_sae
from core.stack.affine import AffineMap
from core.stack.identity import HostModelIdentity
from core.stack.reader import read_stack
from core.stack.runtime import StackRuntime
from core.stack.writer import StageSpec, write_stack
from tests.trainer.dashboards.label_oracle import assert_labels_equal, brute_labels
from trainer.dashboards.accumulator import DashboardSettings
from trainer.dashboards.build import build_dashboards, select_documents
from trainer.data.corpus import load_corpus
from trainer.evaluation.evaluate import _batches

ROOT = Path(__file__).resolve().parents[3]
EMBED, RESID, SIGNED = "blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"
SETTINGS = DashboardSettings(top_n=5, context=3, quantiles=3, per_quantile=2, logit_n=4, neighbours=3, cooccurrence=3)
CONTEXT, BATCH, TOKENS = 48, 4, 1500


@pytest.fixture(scope="module")
def documents():
    return load_corpus("default")[:6]


@pytest.fixture(scope="module")
def planted(tiny_gemma, documents):
    """The token the planted feature (stage 0, feature 0) fires on: a frequent one in the selected text."""
    selected = select_documents(tiny_gemma, documents, TOKENS)
    ids = torch.cat([batch.input_ids[keep] for batch, keep in _batches(tiny_gemma, selected, CONTEXT, BATCH)])
    return int(torch.mode(ids).values)


@pytest.fixture
def stack(tmp_path, tiny_gemma, planted) -> Path:
    torch.manual_seed(0)
    d = tiny_gemma.summary().d_model
    embedding = tiny_gemma.model.get_input_embeddings().weight.detach()  # (V, d)
    scale = float(tiny_gemma.model.model.embed_tokens.embed_scale) if hasattr(
        tiny_gemma.model.model.embed_tokens, "embed_scale") else 1.0
    direction = embedding[planted] * scale  # resid_pre of block 0 for that token, whatever the context
    scores = embedding * scale @ direction  # (V,)
    others = torch.cat([scores[:planted], scores[planted + 1:]])
    threshold = float((scores[planted] + others.max()) / 2)
    relu = build_sae(SAEConfig("relu", d_in=d, d_sae=32)).eval()
    with torch.no_grad():
        relu.b_dec.zero_()
        relu.W_enc[:, 0] = direction
        relu.b_enc[0] = -threshold
    affine = AffineMap(torch.randn(d, d) * 0.1, torch.randn(d) * 0.1, 0.1, 0.5, 0.9)
    resid = build_sae(SAEConfig("topk", d_in=d, d_sae=48, k=6)).eval()
    signed = build_sae(SAEConfig("sa_gsae", d_in=d, d_sae=40)).eval()
    specs = [StageSpec(relu, EMBED, 1.0, name="embed"),
             StageSpec(resid, RESID, 0.9, name="resid", residual_of=0, affine=affine),
             StageSpec(signed, SIGNED, 0.3, name="signed")]
    return write_stack(tmp_path / "stack", "dash", HostModelIdentity.from_model(tiny_gemma.model, tiny_gemma.name),
                       specs)


def brute_force(host, stack_dir: Path, documents):
    """Every stage's full (N, H) code matrix with each token's document, position and id."""
    runtime = StackRuntime.from_loaded(read_stack(stack_dir))
    codes, meta = [[] for _ in runtime.stages], []
    for batch, keep in _batches(host, documents, CONTEXT, BATCH):
        captures = host.forward(batch.input_ids, reads=runtime.hookpoints, attention_mask=batch.attention_mask).captures
        flowed = {hp: captures[hp][keep] for hp in runtime.hookpoints}
        for i, result in runtime.decompose(flowed).items():
            codes[i].append(result.codes)
        meta.append(torch.stack([batch.doc_index[keep].long(), batch.doc_position[keep].long(),
                                 batch.input_ids[keep]], 1))
    return [torch.cat(c) for c in codes], torch.cat(meta)


def test_the_pass_equals_brute_force_over_the_full_code_matrix(tiny_gemma, stack, documents, planted):
    summary = build_dashboards(stack, tiny_gemma, documents, corpus="default", settings=SETTINGS,
                               context_length=CONTEXT, batch_size=BATCH, max_tokens=TOKENS, progress=False)
    selected = select_documents(tiny_gemma, documents, TOKENS)
    codes, meta = brute_force(tiny_gemma, stack, selected)
    loaded = read_stack(stack)
    assert summary["tokens"] == meta.shape[0] and summary["documents"] == len(selected)
    for stage, z in zip(loaded.stages, codes, strict=True):
        board = stage.dashboard
        assert board is not None and stage.dashboard_record["tokens"] == meta.shape[0]
        sides = [z.clamp_min(0), (-z).clamp_min(0)] if stage.signed else [z.clamp_min(0)]
        assert board["count"].shape[0] == len(sides)
        for s, magnitude in enumerate(sides):
            assert board["count"][s].tolist() == (magnitude > 0).sum(0).tolist()
            torch.testing.assert_close(board["max"][s], magnitude.max(0).values)
            assert board["hist"][s].sum(1).tolist() == (magnitude > 0).sum(0).tolist()
            for f in range(z.shape[1]):
                rows = (magnitude[:, f] > 0).nonzero(as_tuple=True)[0].tolist()
                best = sorted(rows, key=lambda r: (-float(magnitude[r, f]), int(meta[r, 0]), int(meta[r, 1])))
                best = best[: SETTINGS.top_n]
                got = [(int(d), int(p)) for d, p in zip(board["top_doc"][s, f], board["top_pos"][s, f], strict=True)
                       if d >= 0]
                assert got == [(int(meta[r, 0]), int(meta[r, 1])) for r in best], (stage.name, s, f)
        assert_labels_equal(board, brute_labels(z, meta[:, 2], stage.signed, SETTINGS.label_n), stage.name)
    planted_board = loaded.stages[0].dashboard
    occurrences = int((meta[:, 2] == planted).sum())
    assert occurrences >= SETTINGS.top_n and int(planted_board["count"][0, 0]) == occurrences
    centre = SETTINGS.context
    assert (planted_board["top_tokens"][0, 0, :, centre] == planted).all()  # every top example is that token
    assert (planted_board["top_acts"][0, 0, :, centre] > 0).all()
    # its label: that one token, fired on at every occurrence and nowhere else
    assert int(planted_board["label_ids"][0, 0, 0]) == planted and int(planted_board["label_size"][0, 0]) == 1
    assert float(planted_board["label_f1"][0, 0]) == 1.0 and float(planted_board["label_share"][0, 0, 0]) == 1.0
    assert loaded.stages[1].dashboard["cross_stage"].ge(0).any()  # the residual stage sees stage 0 through A


def test_the_cli_stores_dashboards_and_explanations_that_the_reader_verifies(tmp_path, stack):
    run = [sys.executable, "-m", "trainer"]
    done = subprocess.run([*run, "dashboards", "--stack", str(stack), "--tokens", "400", "--top-n", "3",
                           "--context", "2", "--quiet", "--model", "tiny-random", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "tokens/s" in done.stdout and "embed:" in done.stdout
    lines = tmp_path / "explanations.jsonl"
    lines.write_text(json.dumps({"stage": "embed", "feature": 0, "explanation": "the planted token"}) + "\n"
                     + json.dumps({"stage": "signed", "feature": 3, "explanation": "something signed"}) + "\n")
    done = subprocess.run([*run, "explanations", "--stack", str(stack), "--from", str(lines)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = read_stack(stack)
    assert loaded.explanations == {"embed": {0: "the planted token"}, "signed": {3: "something signed"}}
    assert loaded.stages[0].dashboard["top_tokens"].shape[-2:] == (3, 5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"stage": "nope", "feature": 0, "explanation": "x"}) + "\n")
    done = subprocess.run([*run, "explanations", "--stack", str(stack), "--from", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a stage of this stack" in done.stderr


def test_two_gloo_ranks_give_the_single_process_dashboards(tmp_path, stack):
    """torchrun with 2 processes: each rank reads every other document, rank 0 merges and writes the stack."""
    import shutil
    from pydoc_data.topics import topics

    single, double = tmp_path / "single", tmp_path / "double"
    shutil.copytree(stack, single)
    shutil.copytree(stack, double)
    corpus = tmp_path / "corpus.jsonl"  # many short documents, so the eval split has several
    corpus.write_text("".join(json.dumps({"id": name, "text": text[:600]}) + "\n" for name, text in topics.items()))
    args = ["dashboards", "--corpus", str(corpus), "--tokens", "1500", "--top-n", "4", "--context", "2", "--quiet",
            "--model", "tiny-random", "--device", "cpu", "--batch-size", "4"]
    done = subprocess.run([sys.executable, "-m", "trainer", *args, "--stack", str(single)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "trainer", *args, "--stack", str(double)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = read_stack(single), read_stack(double)
    for a, b in zip(one.stages, two.stages, strict=True):
        assert a.dashboard_record["tokens"] == b.dashboard_record["tokens"] > 0
        assert a.dashboard_record["documents"] == b.dashboard_record["documents"] >= 2
        for key, value in a.dashboard.items():
            if value.is_floating_point():
                torch.testing.assert_close(b.dashboard[key], value, rtol=1e-6, atol=1e-6, msg=f"{a.name}: {key}")
            else:
                assert torch.equal(b.dashboard[key], value), f"{a.name}: {key}"


def test_a_dashboards_section_makes_them_the_last_step_of_train(tmp_path):
    from trainer.training.config import config_from_dict, load_config
    from trainer.training.loop import run_training

    base = load_config(ROOT / "trainer" / "configs" / "smoke.toml")
    data = base.to_dict() | {"dashboards": {"tokens": 300, "top_n": 3, "context": 2}}
    cfg = config_from_dict(data)
    assert cfg.fingerprint() == base.fingerprint()  # dashboards change nothing that is trained
    result = run_training(cfg, tmp_path / "run", progress=False)
    loaded = read_stack(result.stack_dir)
    assert all(s.dashboard is not None and s.dashboard_record["top_n"] == 3 for s in loaded.stages)
    assert result.report["dashboards"]["tokens"] >= 300
    with pytest.raises(ValueError, match="dashboards.top_n must be in"):
        config_from_dict(base.to_dict() | {"dashboards": {"top_n": 10_000}})
