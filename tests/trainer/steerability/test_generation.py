"""Batched steered generation on the tiny Gemma: the batched KV cache against HF generate, rows that do not see
each other, and the write hook's error-preserving edit against the stack runtime's."""

from __future__ import annotations

import pytest
import torch

from core.sae import SAEConfig, build_sae
from core.stack.affine import AffineMap
from core.stack.runtime import RuntimeStage, StackRuntime
from trainer.steerability.generation import NO_EDIT, Row, RowEdit, StageEditor, generate_rows, left_pad, reread

PLAIN, RESID = "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def runtime(tiny_gemma) -> StackRuntime:
    torch.manual_seed(0)
    d = tiny_gemma.summary().d_model
    plain = build_sae(SAEConfig("topk", d_in=d, d_sae=32, k=4)).eval()
    resid = build_sae(SAEConfig("relu", d_in=d, d_sae=40)).eval()
    affine = AffineMap(torch.randn(d, d) * 0.1, torch.randn(d) * 0.1, 0.1, 0.5, 0.8)
    return StackRuntime([RuntimeStage(0, "plain", PLAIN, plain, 0.7),
                         RuntimeStage(1, "resid", RESID, resid, 0.8, residual_of=0, affine=affine)])


def _prompts(host) -> list[tuple[int, ...]]:
    return [tuple(host.tokenizer(text).input_ids) for text in ("The quick brown", "A sparse autoencoder reads", "How")]


def test_unedited_greedy_rows_match_hf_generate(tiny_gemma, runtime):
    prompts = _prompts(tiny_gemma)
    out = generate_rows(tiny_gemma, runtime, runtime.stages[0], [Row(p, NO_EDIT, None) for p in prompts], 6, 1.0)
    ids, mask = left_pad(prompts, tiny_gemma.tokenizer.pad_token_id)
    expected = tiny_gemma.model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                         do_sample=False, pad_token_id=tiny_gemma.tokenizer.pad_token_id)
    assert torch.equal(out.tokens, expected[:, ids.shape[1]:])


def test_rows_do_not_depend_on_their_batch(tiny_gemma, runtime):
    """A zero ADD gives the default text; a sampled row gives the same text alone as among steered rows."""
    p = _prompts(tiny_gemma)
    stage = runtime.stages[1]
    rows = [Row(p[0], NO_EDIT, 5), Row(p[0], RowEdit(3, "add", 0.0), 5), Row(p[1], RowEdit(3, "add", 40.0), 5),
            Row(p[2], RowEdit(7, "set", 9.0), None), Row(p[0], NO_EDIT, None), Row(p[0], RowEdit(3, "add", 0.0), None)]
    batch = generate_rows(tiny_gemma, runtime, stage, rows, 8, 0.9)
    assert torch.equal(batch.tokens[0], batch.tokens[1]) and torch.equal(batch.tokens[4], batch.tokens[5])
    for i in (0, 2, 3):
        alone = generate_rows(tiny_gemma, runtime, stage, [rows[i]], 8, 0.9)
        assert torch.equal(alone.tokens[0], batch.tokens[i])
    assert not torch.equal(batch.tokens[0], batch.tokens[4])  # sampling is on


@pytest.mark.parametrize("stage_index", [0, 1])
def test_edit_is_the_runtimes_error_preserving_edit(tiny_gemma, runtime, stage_index):
    stage = runtime.stages[stage_index]
    d = tiny_gemma.summary().d_model
    h, prev = torch.randn(3, 5, d), torch.randn(3, 5, d)
    edits = [RowEdit(2, "add", 1.5), NO_EDIT, RowEdit(5, "set", 3.0)]
    editor = StageEditor(runtime, stage, edits)
    writes = editor.writes()
    if stage.is_residual:
        writes[runtime.stages[0].hookpoint](prev)
    out = writes[stage.hookpoint](h)
    assert torch.equal(out[1], h[1])
    for row, edit in ((0, edits[0]), (2, edits[2])):
        def change(z, edit=edit):
            z = z.clone()
            if edit.op == "add":
                z[:, edit.feature] += edit.amount
            else:
                z[:, edit.feature] = edit.amount
            return z
        expected, _, _ = runtime.apply_edit(stage, h[row:row + 1], prev[row:row + 1] if stage.is_residual else None,
                                            change)
        torch.testing.assert_close(out[row:row + 1], expected, rtol=1e-5, atol=1e-5)


def test_reread_gives_cross_entropy_and_codes_of_the_continuation(tiny_gemma, runtime):
    prompts = _prompts(tiny_gemma)[:2]
    gen = generate_rows(tiny_gemma, runtime, runtime.stages[1], [Row(p, NO_EDIT, None) for p in prompts], 4, 1.0)
    read = reread(tiny_gemma, runtime, runtime.stages[1], prompts, gen.tokens, [0, 3], batch_rows=1)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([list(prompt) + gen.tokens[i].tolist()])
        result = tiny_gemma.forward(ids, reads=[PLAIN, RESID], logits=True)
        logp = torch.log_softmax(result.logits[0, len(prompt) - 1:-1], -1)  # (4, V)
        torch.testing.assert_close(read.ce[i], -logp.gather(1, gen.tokens[i][:, None])[:, 0], rtol=1e-4, atol=1e-4)
        z = runtime.encode(runtime.stages[1], result.captures[RESID][0, -4:], result.captures[PLAIN][0, -4:])
        torch.testing.assert_close(read.codes[i], z[:, [0, 3]], rtol=1e-4, atol=1e-4)
