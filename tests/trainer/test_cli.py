"""`featurewire-train` / `python -m trainer`: the corpus subcommand, error exits, import hygiene."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import build_parser, main
from trainer.data.corpus import corpus_stats, load_corpus, split_documents

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m trainer` in a fresh interpreter (the shared conftest imports torch here)."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def jsonl_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(200)),
                    encoding="utf-8")
    return path


def test_corpus_json_counts_match_the_library(jsonl_corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["corpus", "--corpus", str(jsonl_corpus), "--json", "--eval-fraction", "0.2"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    characters = sum(len(f"document number {i}") for i in range(200))
    assert report["total"] == {"documents": 200, "characters": characters}
    splits = split_documents(load_corpus(str(jsonl_corpus)), eval_fraction=0.2)
    assert report["splits"] == {name: corpus_stats(part) for name, part in splits.items()}
    assert sum(s["documents"] for s in report["splits"].values()) == 200
    assert report["splits"]["eval"]["documents"] > report["splits"]["calibration"]["documents"]


def test_corpus_table_output(jsonl_corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["corpus", "--corpus", str(jsonl_corpus)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"corpus: {jsonl_corpus}")
    assert [line.split()[0] for line in lines[2:]] == ["train", "calibration", "eval", "total"]
    assert lines[-1].split()[1] == "200"


def test_text_field_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "abc"}\n{"body": "defg"}\n', encoding="utf-8")
    assert main(["corpus", "--corpus", str(path), "--text-field", "body", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == {"documents": 2, "characters": 7}


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--corpus", "{missing}"], "not found: use 'default'"),
     (["--corpus", "{bad}"], "bad.jsonl:2: invalid JSON"),
     (["--corpus", "{bad}", "--eval-fraction", "0.99"], "must be < 1")],
)
def test_errors_exit_2_with_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    if "--eval-fraction" in argv:
        bad.write_text('{"text": "ok"}\n', encoding="utf-8")
    paths = {"missing": tmp_path / "missing", "bad": bad}
    code = main(["corpus", *(a.format(**paths) for a in argv)])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.startswith("featurewire-train: error: ") and message in err
    assert err.count("\n") == 1


def test_parser_requires_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        build_parser().parse_args([])
    assert excinfo.value.code == 2
    assert "featurewire-train" in capsys.readouterr().err


def test_python_dash_m_trainer_on_the_default_corpus() -> None:
    """End to end in a fresh process: the embedded corpus, split with the default fractions."""
    result = _run_module("-m", "trainer", "corpus", "--corpus", "default", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # Exact per-split counts are the library's (tested in test_corpus); here: a sane, complete split.
    total = report["total"]
    assert total["documents"] > 400 and total["characters"] > 400_000
    for key in ("documents", "characters"):
        assert sum(s[key] for s in report["splits"].values()) == total[key]
    for held_out in ("calibration", "eval"):
        assert 0.01 * total["documents"] < report["splits"][held_out]["documents"] < 0.1 * total["documents"]


def test_python_dash_m_trainer_error_exit() -> None:
    result = _run_module("-m", "trainer", "corpus", "--corpus", "no/such/corpus.txt")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "not found" in result.stderr


def test_trainer_cli_starts_without_heavy_imports() -> None:
    """`featurewire-train --help` and `corpus` stay fast: torch and the host runtime load only when a
    command needs them (the package layering itself is checked in tests/test_layering.py)."""
    code = (
        "import sys, trainer, trainer.cli, trainer.data.corpus; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'service', 'torch', 'transformers'}); "
        "print(','.join(bad))"
    )
    result = _run_module("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_corpus_generates_into_the_cache_and_reports_drops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: a second thread only adds overhead
    try:
        args = ["corpus", "--corpus", f"generated:1,{tmp_path / 'n.txt'}:1", "--model", "tiny-random", "--device",
                "cpu", "--gen-tokens", "48", "--max-new-tokens", "12", "--min-new-tokens", "2", "--gen-batch-size",
                "4", "--cache-dir", str(tmp_path / "cache"), "--json"]
        (tmp_path / "n.txt").write_text("A note about gardens and rain. " * 10)
        assert main(args) == 0
        first = json.loads(capsys.readouterr().out)
        assert main(args) == 0
        second = json.loads(capsys.readouterr().out)
    finally:
        torch.set_num_threads(threads)
    assert not first["generated"]["cache_hit"] and second["generated"]["cache_hit"]
    stats = first["generated"]["stats"]
    assert stats["kept_tokens"] >= 48 and 0 <= stats["dropped_share"] < 1
    assert set(first["sources"]) == {"generated", str(tmp_path / "n.txt")}
    assert first["total"] == second["total"]


@pytest.mark.parametrize(("args", "message"), [
    (["--corpus", "generated:-1,pydocs:1"], "weight must be a finite number >= 0"),
    (["--corpus", "generated:0,pydocs:0"], "all weights are zero"),
    (["--corpus", "generated", "--top-p", "0"], r"generation.top_p must be a number in \(0, 1\]"),
    (["--corpus", "generated", "--max-new-tokens", "0"], r"generation.max_new_tokens must be an integer in \[8, "),
    (["--corpus", "wiki:1"], "corpus source 'wiki' not found: use 'default', 'pydocs', 'generated'"),
])
def test_corpus_bad_mix_or_generation_flags(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["corpus", *args]) == 2  # before any model loads
    assert re.search(message, capsys.readouterr().err)
