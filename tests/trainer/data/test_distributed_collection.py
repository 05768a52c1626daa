"""Collection under torchrun: 2 CPU processes (gloo) write the same store as one process, byte for byte.

One torchrun launch on the tiny model collects two stores (float32 with a token cap that ends inside a batch,
float16 over every document); shard_tokens is chosen so that the ranks' row ranges cut shards, which are
then assembled from pieces. The reference is one process. A second test replays uneven row ranges (a range
inside one shard, an empty one) through `ShardWriter` directly, without processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core.host.host_model import HostModel
from trainer.data.activations import collect_activations, plan_batches, rank_slice
from trainer.data.corpus import Document
from trainer.data.shard_writer import ShardWriter, assemble_pieces
from trainer.data.shards import METADATA_KEYS, TOKEN_IDS, ActivationManifest
from trainer.training.distributed import Distributed

REPO_ROOT = Path(__file__).resolve().parents[3]
TORCHRUN = Path(sys.executable).with_name("torchrun")
HOOKPOINTS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
RUNS = {  # store name -> collect_activations options
    "capped": {"context_length": 32, "batch_size": 3, "max_tokens": 1200, "shard_tokens": 170, "dtype": "float32"},
    "whole": {"context_length": 48, "batch_size": 4, "max_tokens": None, "shard_tokens": 256, "dtype": "float16"},
}

DRIVER = textwrap.dedent("""
    import json, os, sys
    from core.config import ModelConfig
    from core.host.loading import load_host_model
    from trainer.data.activations import collect_activations
    from trainer.data.corpus import Document
    from trainer.training.distributed import session

    root = sys.argv[1]
    spec = json.loads(open(f"{root}/spec.json").read())
    docs = [Document(f"doc:{i}", text, "test") for i, text in enumerate(spec["texts"])]
    host = load_host_model(ModelConfig(name="tiny-random", device="cpu"))
    with session(os.environ, "cpu") as parallel:
        assert parallel.world == 2
        for name, options in spec["runs"].items():
            collect_activations(host, docs, spec["hookpoints"], out_dir=f"{root}/{name}-ranks", progress=False,
                                parallel=parallel, **options)
""")


def _documents() -> list[Document]:
    from pydoc_data.topics import topics

    texts = [text for _, text in sorted(topics.items())][:14]
    texts.insert(5, "")  # an empty document gives no windows
    return [Document(f"doc:{i}", text[:1200], "test") for i, text in enumerate(texts)]


@pytest.fixture(scope="module")
def stores(tiny_gemma: HostModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import json

    root = tmp_path_factory.mktemp("collection")
    docs = _documents()
    (root / "spec.json").write_text(json.dumps({"texts": [d.text for d in docs], "runs": RUNS,
                                                "hookpoints": HOOKPOINTS}))
    (root / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(root / "driver.py"), str(root)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, options in RUNS.items():
        collect_activations(tiny_gemma, docs, HOOKPOINTS, out_dir=root / f"{name}-one", progress=False, **options)
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_write_the_single_process_store(stores: Path, tiny_gemma: HostModel, name: str) -> None:
    one, ranks = stores / f"{name}-one", stores / f"{name}-ranks"
    assert sorted(p.name for p in ranks.iterdir()) == sorted(p.name for p in one.iterdir())  # no pieces left
    assert (ranks / "manifest.json").read_bytes() == (one / "manifest.json").read_bytes()  # hashes, stats, counts
    a, b = ActivationManifest.load(one), ActivationManifest.load(ranks)
    assert len(a.shards) > 2
    keys = [*HOOKPOINTS, *METADATA_KEYS]
    for x, y in zip(a.shards, b.shards, strict=True):
        ours, theirs = a.read_shard(x, keys), b.read_shard(y, keys)
        for key in keys:
            assert torch.equal(ours[key], theirs[key]), (x.file, key)
    # rank 1's rows start inside a shard, so that shard was assembled from both ranks' pieces
    options = RUNS[name]
    plan = plan_batches(tiny_gemma.tokenizer, _documents(), context_length=options["context_length"],
                        batch_size=options["batch_size"], max_tokens=options["max_tokens"])
    assert rank_slice(plan, Distributed(1, 2)).first_row % options["shard_tokens"] != 0


def _write(directory: Path, batches: list[dict[str, torch.Tensor]], ranges: list[tuple[int, int]]) -> list[str]:
    """Write `batches` as ranks owning the batch ranges `ranges` would; the shards' sha256 in order."""
    directory.mkdir()
    writers, first_row = [], 0
    for rank, (lo, hi) in enumerate(ranges):
        writer = ShardWriter(directory, {"h": 3}, "float32", 5, first_row=first_row, ends_store=hi == len(batches))
        for index in range(lo, hi):
            batch = batches[index]
            writer.add({"h": batch["h"]}, batch, batch=index)
            first_row += len(batch[TOKEN_IDS])
        writer.close()
        writers.append((rank, writer))
    pieces = [p for _, w in writers for p in w.pieces]
    shards = {i: s for _, w in writers for i, s in w.shards.items()}
    shards.update(assemble_pieces(directory, pieces, sorted({p.shard for p in pieces})))
    assert not list(directory.glob("*.part-*"))
    return [shards[i].sha256 for i in sorted(shards)]


def test_uneven_row_ranges_give_the_same_shards(tmp_path: Path) -> None:
    sizes = [4, 0, 7, 2, 1, 9, 3]  # rows per batch; 26 rows in shards of 5
    batches = []
    for n in sizes:
        rows = torch.randn(n, 3)
        batches.append({"h": rows, **{key: torch.arange(n) for key in METADATA_KEYS}})
    single = _write(tmp_path / "one", batches, [(0, len(sizes))])
    assert len(single) == 6
    for case, ranges in enumerate([[(0, 3), (3, 7)], [(0, 2), (2, 3), (3, 3), (3, 7)], [(0, 5), (5, 6), (6, 7)]]):
        assert _write(tmp_path / f"ranks-{case}", batches, ranges) == single, ranges
