"""The steerability measure end to end on the tiny Gemma, with a planted feature whose decoder writes one token's
unembedding (and whose encoder fires on that token's embedding): steering it raises the token's share and the
re-read expression; strength 0 is the default branch exactly; records land in the stack, resume, and bad input
gets an error naming what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.sae import SAEConfig, build_sae
from core.stack.identity import HostModelIdentity
from core.stack.reader import read_stack
from core.stack.writer import StageSpec, write_stack
from trainer.cli import main
from trainer.dashboards.accumulator import DashboardSettings
from trainer.dashboards.build import build_dashboards
from trainer.data.corpus import load_corpus
from trainer.steerability.build import Selection, read_openings, run_steerability, text_candidates
from trainer.steerability.measure import SteerSettings
from trainer.steerability.schedule import parse_strengths

EMBED, LATE = "blocks.0.hook_resid_pre", "blocks.3.hook_resid_post"
PLANTED, TEXT = 0, " feature"
STRENGTHS = ("add:max:0,4,16", "set:max:16", "add:norm:2")


def planted_stack(host, path: Path, dashboards: bool) -> tuple[Path, int]:
    torch.manual_seed(0)
    d = host.summary().d_model
    token = host.tokenizer(TEXT, add_special_tokens=False).input_ids[0]
    embedding = host.model.get_input_embeddings().weight.detach()  # (V, d), tied with the unembedding
    scale = float(host.model.model.embed_tokens.embed_scale)
    direction = embedding[token] * scale  # what resid_pre of block 0 holds at that token
    scores = embedding * scale @ direction
    threshold = float((scores[token] + torch.cat([scores[:token], scores[token + 1:]]).max()) / 2)
    sae = build_sae(SAEConfig("relu", d_in=d, d_sae=32)).eval()
    late = build_sae(SAEConfig("topk", d_in=d, d_sae=32, k=4)).eval()
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc[:, PLANTED] = direction
        sae.b_enc[PLANTED] = -threshold
        sae.W_dec[PLANTED] = embedding[token] / embedding[token].norm()  # writes the token's unembedding
    stack = write_stack(path, "steer", HostModelIdentity.from_model(host.model, host.name),
                        [StageSpec(sae, EMBED, 1.0, name="embed"), StageSpec(late, LATE, 0.5, name="late")])
    if dashboards:
        settings = DashboardSettings(top_n=5, context=3, quantiles=3, per_quantile=2, logit_n=4, neighbours=3,
                                     cooccurrence=3)
        build_dashboards(stack, host, load_corpus("default")[:6], corpus="default", settings=settings,
                         context_length=48, batch_size=4, max_tokens=1500, progress=False)
    return stack, token


@pytest.fixture(scope="module")
def measured(tiny_gemma, tmp_path_factory):
    stack, token = planted_stack(tiny_gemma, tmp_path_factory.mktemp("steer") / "stack", dashboards=True)
    settings = SteerSettings(tuple(parse_strengths(list(STRENGTHS))), max_new_tokens=8, samples=1)
    summary = run_steerability(stack, tiny_gemma, [Selection(0, (PLANTED, 5))], settings, read_openings()[:6],
                               progress=False)
    return stack, token, settings, summary


def test_steering_the_planted_feature_expresses_it(measured):
    stack, token, _, summary = measured
    assert summary["features"] == 2
    record = read_stack(stack).stages[0].steerability["features"][PLANTED]
    assert record["concept_tokens"] == [token]
    curve = {(p["op"], p["unit"], p["value"]): p for p in record["curve"]}
    default = record["default"]
    steered = curve[("add", "max", 16.0)]
    assert steered["concept_share"] > default["concept_share"] + 0.5  # the token's share of generated tokens
    assert steered["expression"] > default["expression"] + 0.5 and steered["lift"] > 0.5
    bound = max(0.5, default["repetition"])  # the tiny random model loops: " feature feature ..." may not pass
    passing = [p for p in record["curve"]
               if p["lift"] >= 0.25 and p["fluency_cost"] <= 1.0 and p["repetition"] <= bound]
    assert record["verdict"]["steers"] == bool(passing)
    assert TEXT.strip() in steered["examples"][0]


def test_strength_zero_is_the_default_branch(measured):
    stack, _, _, _ = measured
    for record in read_stack(stack).stages[0].steerability["features"].values():
        zero = next(p for p in record["curve"] if p["op"] == "add" and p["value"] == 0)
        assert zero["fluency_cost"] == 0.0 and zero["lift"] == 0.0
        assert zero["examples"] == record["default"]["examples"]


def test_output_score_ranks_the_planted_feature_first(measured):
    stack, _, _, _ = measured
    records = read_stack(stack).stages[0].steerability["features"]
    assert records[PLANTED]["output_score"] > records[5]["output_score"]
    assert records[PLANTED]["output_score"] > 0.1


def test_a_second_run_resumes_and_the_late_stage_is_untouched(measured, tiny_gemma):
    stack, _, settings, _ = measured
    before = read_stack(stack).stages[0].steerability
    again = run_steerability(stack, tiny_gemma, [Selection(0, (PLANTED, 5))], settings, read_openings()[:6],
                             progress=False)
    assert again["features"] == 0 and again["skipped"] == 2
    loaded = read_stack(stack)
    assert loaded.stages[0].steerability == before and loaded.stages[1].steerability is None


def test_cli_measures_and_reports(measured, capsys):
    stack, _, _, _ = measured
    code = main(["steerability", "--stack", str(stack), "--stage", "late", "--features", "1", "--model", "tiny-random",
                 "--device", "cpu", "--strengths", "add:max:4", "add:norm:1", "--openings", "2", "--tokens", "4",
                 "--samples", "0", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "1 features measured" in out and "late: " in out
    assert 1 in read_stack(stack).stages[1].steerability["features"]


def test_text_candidates_rank_the_texts_features_without_bos(measured, tiny_gemma):
    """--text picks what SearchFeatures' REDUCTION_MAX picks: the planted feature fires on " feature" only."""
    stack, _, _, _ = measured
    loaded = read_stack(stack)
    picked = text_candidates(tiny_gemma, loaded, 0, "a feature of the text", top=1)
    assert picked == Selection(0, (PLANTED,))
    assert text_candidates(tiny_gemma, loaded, 0, "nothing here", top=3).features == tuple(
        sorted(text_candidates(tiny_gemma, loaded, 0, "nothing here", top=3).features))
    assert PLANTED not in text_candidates(tiny_gemma, loaded, 0, "nothing here", top=32).features
    with pytest.raises(ValueError, match="--top must be at least 1"):
        text_candidates(tiny_gemma, loaded, 0, "a feature", top=0)


@pytest.mark.parametrize(("extra", "message"), [
    (["--stage", "nope", "--features", "1"], "unknown stage 'nope'; the stack's stages are ['embed', 'late']"),
    (["--stage", "embed", "--features", "1,99"], "unknown feature '99' for stage 'embed': allowed ids are 0..31"),
    (["--stage", "embed", "--features", "1", "--strengths", "add:max:100"], "allowed: 0 to 64"),
    (["--stage", "embed", "--features", "1", "--strengths", "set:norm:1"], "SET takes strengths in units of the"),
    (["--stage", "embed", "--features", "1", "--strengths", "mul:max:1"], "allowed: add, set"),
    (["--stage", "embed", "--features", "1", "--strengths", "add:max:-1"], "allowed: 0 to 64"),
    (["--sample", "2", "--density", "0.5:0.1"], "--density must be LO:HI with 0 <= LO <= HI <= 1"),
    (["--stage", "embed", "--sample", "2", "--density", "1:1"], "has no feature with density in [1, 1]"),
    (["--text", "a feature"], "--text needs --stage"),
])
def test_bad_input_names_what_is_allowed(measured, capsys, extra, message):
    stack, _, _, _ = measured
    assert main(["steerability", "--stack", str(stack), "--model", "tiny-random", "--device", "cpu", *extra]) == 2
    assert message in capsys.readouterr().err


def test_bad_prompt_files_and_missing_dashboards(tiny_gemma, tmp_path, capsys):
    stack, _ = planted_stack(tiny_gemma, tmp_path / "plain", dashboards=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    base = ["steerability", "--stack", str(stack), "--model", "tiny-random", "--device", "cpu", "--stage", "embed",
            "--features", "0"]
    cases = [(["--prompts", str(empty)], "has no openings; expected one non-empty line per opening"),
             (["--prompts", str(binary)], "cannot read the prompt file"),
             (["--prompts", str(tmp_path / "missing.txt")], "cannot read the prompt file"),
             ([], "has no dashboard, and strengths in units of max need"),
             (["--sample", "3"], "not allowed with argument")]
    for extra, message in cases[:4]:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--sample", "3"])
    assert cases[4][1] in capsys.readouterr().err
    no_board = base[:-4] + ["--sample", "3"]
    assert main(no_board) == 2
    assert "has no dashboard, so features cannot be sampled by density" in capsys.readouterr().err
    # norm units need no dashboard
    assert main([*base, "--strengths", "add:norm:1", "--openings", "1", "--tokens", "2", "--samples", "0",
                 "--quiet"]) == 0
    assert read_stack(stack).stages[0].steerability["features"][0]["max_activation"] is None


def test_two_gloo_ranks_give_the_single_process_records(tiny_gemma, tmp_path):
    """torchrun with 2 processes: each rank measures every other feature of a round, rank 0 writes the stack."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    stack, _ = planted_stack(tiny_gemma, tmp_path / "stack", dashboards=True)
    single, double = tmp_path / "single", tmp_path / "double"
    shutil.copytree(stack, single)
    shutil.copytree(stack, double)
    args = ["steerability", "--stage", "embed", "--features", "0,3,5", "--model", "tiny-random", "--device", "cpu",
            "--strengths", "add:max:0,16", "set:max:8", "--openings", "2", "--tokens", "4", "--group", "1", "--quiet"]
    done = subprocess.run([sys.executable, "-m", "trainer", *args, "--stack", str(single)], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "trainer", *args, "--stack", str(double)],
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    one = read_stack(single).stages[0].steerability["features"]
    two = read_stack(double).stages[0].steerability["features"]
    assert sorted(one) == sorted(two) == [0, 3, 5]
    for feature, record in one.items():
        assert two[feature]["verdict"]["steers"] == record["verdict"]["steers"]
        for a, b in zip(record["curve"], two[feature]["curve"], strict=True):
            assert (a["op"], a["unit"], a["value"], a["examples"]) == (b["op"], b["unit"], b["value"], b["examples"])
            assert b["expression"] == pytest.approx(a["expression"]) and b["fluency_cost"] == pytest.approx(
                a["fluency_cost"], abs=1e-4)


def test_a_one_token_loop_does_not_pass_however_cheap():
    from trainer.steerability.measure import verdict

    point = {"op": "add", "unit": "norm", "value": 0.25, "amount": 1.0, "expression": 0.9, "lift": 0.3,
             "fluency_cost": 0.5, "repetition": 0.93}
    assert not verdict([point])["steers"]
    assert verdict([{**point, "repetition": 0.2}])["best"]["value"] == 0.25
    assert not verdict([{**point, "repetition": 0.2, "fluency_cost": 1.5}])["steers"]
    assert not verdict([{**point, "repetition": 0.2, "lift": 0.2}])["steers"]
    assert verdict([point], default_repetition=0.95)["steers"]  # the model loops unsteered too
