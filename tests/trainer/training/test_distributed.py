"""Distributed training: 2 CPU processes (torchrun, gloo) train the same SAE weights as one process.

One torchrun launch on the tiny model and a small corpus, all runs sharing one activation store that
rank 0 of the first run collects: `featurewire-train train` in data mode, then a stage-parallel run and a
data-parallel run that are each interrupted and resumed. The SAEs are BatchTopK (the batch-level
selection must be global) and dead latents reset during training. The reference is one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core.stack.reader import read_stack
from trainer.training.config import config_from_dict, load_config
from trainer.training.distributed import LOCAL, Distributed, from_env
from trainer.training.loop import run_training

REPO_ROOT = Path(__file__).resolve().parents[3]
TORCHRUN = Path(sys.executable).with_name("torchrun")
INTERRUPT_AT = 9  # after the checkpoint written at step 8 (checkpoint_every = 4)

DRIVER = textwrap.dedent(f"""
    import os, shutil, sys
    from trainer.cli import main
    from trainer.training.config import load_config
    from trainer.training.distributed import session
    from trainer.training.loop import run_training

    class Interrupted(Exception):
        pass

    def interrupt(step):
        if step == {INTERRUPT_AT}:
            raise Interrupted

    root = sys.argv[1]
    with session(os.environ, "cpu") as parallel:
        assert main(["train", "--config", f"{{root}}/data.toml", "--out", f"{{root}}/data-ddp", "--quiet"]) == 0
        for name in ("stages", "data"):
            cfg, out = load_config(f"{{root}}/{{name}}.toml"), f"{{root}}/{{name}}-resumed"
            try:
                run_training(cfg, out, progress=False, on_step=interrupt, parallel=parallel)
                raise SystemExit("the run was not interrupted")
            except Interrupted:
                pass
            if parallel.is_main:
                shutil.copy(f"{{out}}/checkpoint/checkpoint.json", f"{{root}}/{{name}}-interrupted.json")
            run_training(cfg, out, progress=False, parallel=parallel)
""")


def _config(root: Path, architecture: str, **distributed: str) -> dict:
    data = {
        "model": {"name": "tiny-random", "device": "cpu"},
        "corpus": {"spec": str(root / "corpus.jsonl"), "eval_fraction": 0.2},
        "activations": {"context_length": 64, "batch_size": 16, "max_tokens": 2048, "store": str(root / "store")},
        "stack": {"name": architecture, "hookpoints": ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]},
        "sae": {"architecture": architecture, "expansion_factor": 2, "k": 4},
        "training": {"batch_size": 256, "lr": 1e-3, "warmup_steps": 5, "sparsity_warmup_steps": 10,
                     "token_budget": 4096, "buffer_tokens": 1024, "dead_after_tokens": 512, "checkpoint_every": 4},
        "eval": {"max_tokens": 128, "ce_windows": 4},
    }
    if distributed:
        data["distributed"] = distributed
    return data


def _write_toml(path: Path, data: dict) -> Path:
    path.write_text("\n".join(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                              for section, values in data.items()))
    return path


def _torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _assert_same_weights(a: Path, b: Path, *, exact: bool = False) -> None:
    for x, y in zip(read_stack(a).stages, read_stack(b).stages, strict=True):
        theirs = y.sae.state_dict()
        for name, tensor in x.sae.state_dict().items():
            if exact:
                assert torch.equal(tensor, theirs[name]), name
            else:  # the reductions sum in another order: float rounding only
                torch.testing.assert_close(tensor, theirs[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The torchrun launch, and the single-process reference (after it: rank 0 collects the store)."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("distributed")
    texts = [text for _, text in sorted(topics.items())][:60]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    _write_toml(root / "data.toml", _config(root, "batchtopk"))
    _write_toml(root / "stages.toml", _config(root, "batchtopk", mode="stages"))
    (root / "driver.py").write_text(DRIVER)
    _torchrun(str(root / "driver.py"), str(root))
    run_training(load_config(root / "data.toml"), root / "single", progress=False)
    return root


def test_data_parallel_matches_one_process_with_the_same_global_batch(runs: Path) -> None:
    _assert_same_weights(runs / "data-ddp" / "stack", runs / "single" / "stack")
    ours, single = (json.loads((runs / run / "report.json").read_text()) for run in ("data-ddp", "single"))
    assert ours["steps"] == single["steps"] == 16
    assert any(s["training"]["dead_fraction"] > 0 for s in single["stages"])  # resets were exercised
    for a, b in zip(ours["stages"], single["stages"], strict=True):
        assert a["training"]["loss"] == pytest.approx(b["training"]["loss"], rel=1e-4)  # averaged over ranks
    assert not (runs / "data-ddp" / "activations").exists()  # every run used the shared store


def test_stage_parallel_run_resumes_and_matches_one_process(runs: Path) -> None:
    assert json.loads((runs / "stages-interrupted.json").read_text())["step"] == 8
    _assert_same_weights(runs / "stages-resumed" / "stack", runs / "single" / "stack")  # stage 1 from rank 1
    report = json.loads((runs / "stages-resumed" / "report.json").read_text())
    assert all(s["training"]["loss"] > 0 for s in report["stages"])  # each summary came from its owner


def test_an_interrupted_data_parallel_run_resumes_to_the_uninterrupted_result(runs: Path) -> None:
    assert json.loads((runs / "data-interrupted.json").read_text())["step"] == 8
    _assert_same_weights(runs / "data-resumed" / "stack", runs / "data-ddp" / "stack", exact=True)


def test_without_torchrun_a_process_trains_alone() -> None:
    assert from_env({}, "cpu") is LOCAL and from_env({"WORLD_SIZE": "1"}, "auto") is LOCAL
    batches = iter([{"h": torch.ones(4, 2)}])
    assert LOCAL.local_rows(batches) is batches and LOCAL.gradient_sync is None
    z = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, -1.0]])
    fired, tokens = LOCAL.firing(z)
    assert fired.tolist() == [False, True, True] and tokens == 2
    assert all(LOCAL.owns(i) for i in range(3))


def test_stage_ownership_and_batch_split_checks() -> None:
    cfg = config_from_dict({"stack": {"hookpoints": ["a", "b", "c"]}, "training": {"batch_size": 256},
                            "distributed": {"mode": "stages"}})
    ranks = [Distributed(rank, 2).for_config(cfg) for rank in (0, 1)]
    assert [[r.owns(i) for i in range(3)] for r in ranks] == [[True, False, True], [False, True, False]]
    with pytest.raises(ValueError, match="divisible by the 3 ranks"):
        Distributed(0, 3).for_config(config_from_dict({"stack": {"hookpoints": ["a"]}}))
    with pytest.raises(ValueError, match="distributed.mode must be"):
        config_from_dict({"stack": {"hookpoints": ["a"]}, "distributed": {"mode": "tensor"}})
    with pytest.raises(ValueError, match="pins one GPU"):
        from_env({"WORLD_SIZE": "2", "RANK": "0"}, "cuda:0")
